"""Pre-training clips of the synthetic world and the demo's pre-trained backbone."""
import json
import os

import numpy as np
import pytest

from conftest import REPO, load_config_file
from tadjax.data import synthetic


def _yellow(frames):
    """Pixels of an object's fill (yellow) in uint8 frames: bool [..., H, W]."""
    f = frames.astype(np.int32)
    return (f[..., 0] > 190) & (f[..., 1] > 150) & (f[..., 2] < 130)


def test_clip_labels_follow_the_objects():
    rng = np.random.default_rng(0)
    seen = np.zeros(len(synthetic.PRETRAIN_CLASSES), int)
    labelled = []
    for _ in range(60):
        frames, labels = synthetic.pretraining_clip(rng)
        assert frames.shape == (16, 64, 64, 3) and frames.dtype == np.uint8
        assert labels.shape == (8, 4, 4)
        # Object fill pixels per token (2 frames x 16 x 16 px).
        fill = _yellow(frames).reshape(8, 2, 4, 16, 4, 16).sum(axis=(1, 3, 5))
        seen += np.bincount(labels.ravel(), minlength=len(seen))
        # A token with much of an object's fill is not background.
        assert (labels[fill >= 40] >= 1).all()
        labelled.append(fill[labels >= 1] > 0)
    # A labelled token holds part of an object's fill (a disk grazing the patch may cover
    # >= 20 px of it with its 1.5-px dark rim only).
    assert np.concatenate(labelled).mean() > 0.9
    assert (seen > 0).all(), seen  # every class occurs


def test_clip_deterministic_and_validated():
    a = synthetic.pretraining_clip(np.random.default_rng(5))
    b = synthetic.pretraining_clip(np.random.default_rng(5))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    with pytest.raises(ValueError, match="tubelet"):
        synthetic.pretraining_clip(np.random.default_rng(0), frames=15)


def test_actor_token_class_is_its_motion():
    """With one actor and nothing else, the labelled tokens' class is the actor's class and its
    fill moves along that class's axis between the two frames of a token (hand-checked geometry)."""
    rng = np.random.default_rng(11)
    checked = 0
    for _ in range(40):
        frames, labels = synthetic.pretraining_clip(rng, max_objects=1)
        actor = labels[labels >= 2]
        if actor.size == 0:
            continue
        assert len(set(actor.tolist())) == 1
        cls = int(actor[0]) - 2
        ys, xs = [], []
        for f in _yellow(frames):
            yy, xx = np.nonzero(f)
            # Centroids only where the disk is whole (not split by the torus's edges).
            whole = yy.size and np.ptp(yy) < 16 and np.ptp(xx) < 16
            ys.append(yy.mean() if whole else np.nan)
            xs.append(xx.mean() if whole else np.nan)
        dx, dy = np.diff(xs), np.diff(ys)
        ok = np.isfinite(dx) & np.isfinite(dy) & (np.hypot(dx, dy) > 1.5)
        if ok.sum() < 3:
            continue
        dx, dy = dx[ok], dy[ok]
        if cls == 0:
            assert np.abs(dy).max() < 1.0
        elif cls == 1:
            assert np.abs(dx).max() < 1.0
        elif cls == 2:
            assert np.abs(dx - dy).max() < 1.5
        elif cls == 3:
            assert np.abs(dx + dy).max() < 1.5
        checked += 1
    assert checked >= 5


@pytest.mark.slow
def test_pretrain_writes_a_loadable_backbone(tmp_path):
    from tadjax import convert, surgery, tree
    from tadjax.tools import pretrain_synthetic
    from tadjax.train.trainer import Run

    config = load_config_file(REPO / "configs" / "demo.py", "quick")
    out = tmp_path / "vit"
    lines = []
    meta = pretrain_synthetic.pretrain(config, str(out), steps=30, batch=2, lr=1e-3, warmup=5,
                                       seed=0, eval_clips=4, log_every=10, log=lines.append)
    losses = [float(l.split("loss ")[1].split()[0]) for l in lines if l.startswith("step ")]
    assert losses[-1] < losses[0] < 2.5, lines  # falls from ~ln 7 (plus init noise)
    assert set(meta["held_out"]) == {"actor_class_accuracy", "object_recall", "background_accuracy"}

    # It loads into the demo's detector (adapters stay at their initialisation) by config alone.
    with config.unlocked():
        config.model.pretrained = str(out)
    run = Run(config, None, with_data=False)
    tx, _ = run.make_tx(steps_per_epoch=10)
    state = surgery.start_from_pretrained(run.init_state(tx), tx, run.mask, config)
    flat = tree.flatten(state["params"]["backbone"])
    written = convert.read_checkpoint(str(out)).params
    assert written and all(not k.count("/adapter/") for k in written)
    for k, v in written.items():
        np.testing.assert_array_equal(np.asarray(flat[k]), v)
    assert any("/adapter/" in k for k in flat)


def test_shipped_demo_backbone():
    """configs/demo.py starts from the shipped weights, made by the documented command."""
    config = load_config_file(REPO / "configs" / "demo.py")
    path = config.model.pretrained
    assert os.path.isdir(path), path
    with open(os.path.join(path, "tadjax_import.json")) as f:
        meta = json.load(f)
    assert meta["source"] == "tadjax.tools.pretrain_synthetic"
    b = config.model.backbone
    for key in ("embed_dim", "depth", "num_heads", "mlp_dim", "patch_size"):
        assert meta["backbone"][key] == b[key], key
    # It learned the motion of the world: far above chance (1/5 over actors' tokens).
    assert meta["held_out"]["actor_class_accuracy"] > 0.5, meta["held_out"]
