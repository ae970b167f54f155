"""Progressive Block Drop: the alignment losses against a NumPy reference, selection rules, and
one resumable round end to end on the tiny synthetic set."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_demo_config
from tadjax import compress, surgery
from tadjax.detection import assignment
from tadjax.models import detector as detector_lib
from tadjax.train import state as state_lib


def _np_diou(a, b):
    inter = np.maximum(np.minimum(a[..., 1], b[..., 1]) - np.maximum(a[..., 0], b[..., 0]), 0)
    union = (a[..., 1] - a[..., 0]) + (b[..., 1] - b[..., 0]) - inter
    enc = np.maximum(a[..., 1], b[..., 1]) - np.minimum(a[..., 0], b[..., 0])
    dc = 0.5 * (a[..., 0] + a[..., 1]) - 0.5 * (b[..., 0] + b[..., 1])
    return inter / union - dc ** 2 / enc ** 2


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_alignment_losses_match_numpy_reference(tiny_synthetic, tmp_path):
    config = tiny_demo_config(tiny_synthetic, tmp_path)
    with config.unlocked():
        config.compress = compress.compress_config(lora_rank=4)
        config.compress.align.update(dict(feature=2.0, cls_kd=0.5, reg_kd=3.0, detection=0.0))
    points = jnp.asarray(detector_lib.points_for(config))
    p, c, b, m = points.shape[0], int(config.model.head.num_classes), 2, 3
    rng = np.random.default_rng(0)

    def outputs():
        return {"cls_logits": jnp.asarray(rng.normal(size=(b, p, c)), jnp.float32),
                "reg": jnp.asarray(rng.uniform(0.2, 3.0, size=(b, p, 2)), jnp.float32),
                "point_mask": jnp.asarray(rng.uniform(size=(b, p)) < 0.8)}
    s_out, t_out = outputs(), outputs()
    t_out["point_mask"] = s_out["point_mask"]
    feats_s = {k: jnp.asarray(rng.normal(size=(4, 5, 6)), jnp.float32) for k in ("0", "2", "3")}
    feats_t = {k: jnp.asarray(rng.normal(size=(4, 5, 6)), jnp.float32) for k in ("0", "1", "2", "3")}
    batch = {"gt_segments": jnp.asarray([[[3.0, 20.0], [30.0, 35.0], [0, 0]]] * b, jnp.float32),
             "gt_labels": jnp.asarray([[1, 4, 0]] * b, jnp.int32),
             "gt_valid": jnp.asarray([[True, True, False]] * b)}
    total, aux = compress.alignment_losses(s_out, t_out, feats_s, feats_t, points, batch,
                                           config=config, loss_norm=jnp.float32(10.0))

    # Cross-depth feature term: only the student's blocks (0, 2, 3), each against the teacher's
    # block of the same original index, averaged.
    feature = np.mean([np.mean((np.asarray(feats_s[k]) - np.asarray(feats_t[k])) ** 2)
                       for k in ("0", "2", "3")])
    valid = np.asarray(s_out["point_mask"])
    temp = 3.5
    ls = _np_log_softmax(np.asarray(s_out["cls_logits"], np.float64) / temp)
    lt = _np_log_softmax(np.asarray(t_out["cls_logits"], np.float64) / temp)
    kl = (np.exp(lt) * (lt - ls)).sum(-1)
    cls_kd = temp ** 2 * kl[valid].sum() / valid.sum()
    targets, _ = assignment.assign_targets_batch(points, batch["gt_segments"], batch["gt_labels"],
                                                 batch["gt_valid"], c, 1.5)
    pos = (np.asarray(targets).sum(-1) > 0) & valid
    assert pos.sum() > 4
    pts = np.asarray(points, np.float64)

    def seg(reg):
        reg = np.asarray(reg, np.float64)
        return np.stack([pts[:, 0] - reg[..., 0] * pts[:, 3], pts[:, 0] + reg[..., 1] * pts[:, 3]], -1)
    reg_kd = (1 - _np_diou(seg(s_out["reg"]), seg(t_out["reg"])))[pos].mean()
    np.testing.assert_allclose(float(aux["feature"]), feature, rtol=1e-5)
    np.testing.assert_allclose(float(aux["cls_kd"]), cls_kd, rtol=1e-4)
    np.testing.assert_allclose(float(aux["reg_kd"]), reg_kd, rtol=1e-4)
    np.testing.assert_allclose(float(total), 2 * feature + 0.5 * cls_kd + 3 * reg_kd, rtol=1e-4)

    # A student equal to its teacher has zero distillation terms.
    _, same = compress.alignment_losses(t_out, t_out, feats_t, feats_t, points, batch,
                                        config=config, loss_norm=jnp.float32(10.0))
    for k in ("feature", "cls_kd", "reg_kd"):
        assert abs(float(same[k])) < 1e-5, (k, float(same[k]))


def test_choose_block_and_target_parsing():
    assert compress.choose_block({-1: 0.9, 0: 0.5, 2: 0.7, 3: 0.7}) == 2  # tie: lower index
    assert compress.parse_target("blocks:9") == ("blocks", 9.0)
    assert compress.parse_target("map_drop:0.01") == ("map_drop", 0.01)
    with pytest.raises(ValueError, match="compress.target"):
        compress.parse_target("depth:3")
    rounds = [{"round": 0, "train_average_mAP": 0.50}, {"round": 1, "train_average_mAP": 0.495},
              {"round": 2, "train_average_mAP": 0.48}]
    assert compress.result_round(rounds, "map_drop", 0.01)["round"] == 1
    assert compress._target_reached("map_drop", 0.01, rounds, 4)
    assert not compress._target_reached("map_drop", 0.01, rounds[:2], 4)


@pytest.mark.slow
# About 1 min on an idle 2-core machine, 4 min under load (7 XLA compiles): with the slow checks.
@pytest.mark.slow
def test_one_round_resumes_and_loads_by_config(tiny_synthetic, tmp_path):
    # The smallest detector that still has every part (compiles dominate on 2 CPU cores).
    config = tiny_demo_config(tiny_synthetic, tmp_path)
    with config.unlocked():
        config.model.backbone.update(dict(drop_path_rate=0.1, depth=2, embed_dim=32, num_heads=2,
                                          mlp_dim=64))
        config.model.head.update(dict(channels=32, arch=(1, 1, 1), num_levels=2, head_convs=1))
        config.model.strides = (1, 2)
        config.model.regress_ranges = ((0, 8), (8, 10000))
    # M0: an untrained demo model written as .npz (the loop's mechanics do not need a good one).
    model = detector_lib.build_detector(config)
    shapes = jax.eval_shape(lambda r: state_lib.init_params(model, config, r), jax.random.key(0))
    rng = np.random.default_rng(0)
    m0 = jax.tree.map(lambda s: rng.normal(0.0, 0.1, s.shape).astype(np.float32), shapes)
    compress.save_params(str(tmp_path / "m0.npz"), m0)
    with config.unlocked():
        config.compress = compress.compress_config(
            teacher=str(tmp_path / "m0.npz"), target="blocks:1", lora_rank=4, epochs=1,
            warmup_epochs=1, horizon_epochs=1, backbone_lr=1e-3, head_lr=1e-3)
        config.compress.selection.metric = "feature_mse"
        config.compress.selection.batches = 1
        config.compress.timing_repeats = 1
    workdir = str(tmp_path / "bd")
    assert compress.compress(config, workdir, stop_at_step=2) is None
    selection = json.load(open(os.path.join(workdir, "round_01", "selection.json")))
    assert sorted(selection["scores"]) == ["-1", "0", "1"]
    assert selection["scores"]["-1"] == 0.0  # the unskipped model against itself
    assert not os.path.exists(os.path.join(workdir, "round_01", "round.json"))

    report = compress.compress(config, workdir)
    rounds = report["rounds"]
    assert [r["blocks"] for r in rounds] == [2, 1]
    k = selection["block"]
    assert rounds[1]["dropped"] == [k] and k not in rounds[1]["kept"]
    assert rounds[1]["flops"] < rounds[0]["flops"]
    steps = [json.loads(l)["step"] for l in open(os.path.join(workdir, "round_01", "train_log.jsonl"))]
    assert steps[-1] == 4  # 8 videos / batch 2, one epoch, across the interruption
    # The merged round tree has no LoRA and loads into the reduced config and nothing else.
    merged = compress.load_params(os.path.join(workdir, "round_01", "params.npz"))
    assert not surgery.has_lora(merged)
    assert surgery.kept_blocks(merged) == tuple(rounds[1]["kept"])
    reduced = surgery.reduced_config(config, surgery.kept_blocks(merged))
    want = jax.eval_shape(lambda r: state_lib.init_params(detector_lib.build_detector(reduced),
                                                          reduced, r), jax.random.key(0))
    from tadjax import tree
    tree.merge_params(want, tree.flatten(merged), source="round_01/params.npz")
    assert "| 1 |" in open(os.path.join(workdir, "report.md")).read()
    # Complete: running again does nothing new and reports the same rounds.
    again = compress.compress(config, workdir)
    assert [r["kept"] for r in again["rounds"]] == [r["kept"] for r in rounds]
