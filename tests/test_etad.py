"""ETAD head: anchor map, 1-D RoI align vs a direct reference of torchvision's semantics, LSTM vs
torch.nn.LSTM, refinement, targets and losses by hand, decoding, and a tiny head's training loss."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tadjax.detection import etad_losses, etad_postprocess
from tadjax.models import etad

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def test_anchor_map():
    a = etad.anchor_map(128)
    assert a.shape == (8256, 2) and etad.num_train_anchors(128, 0.06) == 495
    small = etad.anchor_map(3)  # d=0: s=0,1,2; d=1: s=0,1; d=2: s=0
    np.testing.assert_allclose(small * 3, [[0, 1], [1, 2], [2, 3], [0, 2], [1, 3], [0, 3]])


def roi_align_reference(feats, roi, bins):
    """torchvision roi_align, aligned=False, sampling_ratio=-1, on a [T, 1] image (spec §2.4)."""
    t = feats.shape[0]
    s, e = roi
    length = max(e - s, 1.0)
    bin_size = length / bins
    g = int(math.ceil(length / bins))
    out = np.zeros((bins, feats.shape[1]))
    for k in range(bins):
        for j in range(g):
            y = s + k * bin_size + (j + 0.5) * bin_size / g
            if y < -1.0 or y > t:
                continue
            y = max(y, 0.0)
            lo = int(math.floor(y))
            if lo >= t - 1:
                value = feats[t - 1]
            else:
                value = feats[lo] * (1 - (y - lo)) + feats[lo + 1] * (y - lo)
            out[k] += value / g
    return out


def test_roi_align_matches_reference():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(20, 3))
    rois = np.array([[2.3, 9.7], [-4.0, 3.0], [15.5, 27.0], [5.0, 5.4], [-30.0, 60.0], [0.0, 20.0]])
    out = np.asarray(etad.roi_align_1d(jnp.asarray(feats, jnp.float32), jnp.asarray(rois, jnp.float32), 6))
    for roi, got in zip(rois, out):
        np.testing.assert_allclose(got, roi_align_reference(feats, roi, 6), atol=1e-5)


def test_lstm_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 7, 5)).astype(np.float32)
    ref = torch.nn.LSTM(5, 4, batch_first=True)
    params = {"ih": {"kernel": ref.weight_ih_l0.detach().numpy().T, "bias": ref.bias_ih_l0.detach().numpy()},
              "hh": {"kernel": ref.weight_hh_l0.detach().numpy().T, "bias": ref.bias_hh_l0.detach().numpy()}}
    want = ref(torch.from_numpy(x))[0].detach().numpy()
    got = etad.LSTM(4).apply({"params": params}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    # The backward LSTM is the forward one on the reversed sequence, reversed back.
    want_b = ref(torch.from_numpy(x[:, ::-1].copy()))[0].detach().numpy()[:, ::-1]
    got_b = etad.LSTM(4, reverse=True).apply({"params": params}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got_b), want_b, atol=1e-5)


def test_refine_by_hand():
    # anchor [0.2, 0.6]: l = 0.4, c = 0.4; Δs = 0.25 -> s1 = 0.3; Δe = 0 -> e1 = 0.6;
    # Δc = 0.5 -> c2 = 0.6; Δw = log 2 -> l2 = 0.8 -> [0.2, 1.0]; mean -> [0.25, 0.8]
    reg = jnp.asarray([[0.25, 0.0, 0.5, math.log(2.0)]])
    np.testing.assert_allclose(etad.refine(jnp.asarray([[0.2, 0.6]]), reg), [[0.25, 0.8]], atol=1e-6)
    np.testing.assert_allclose(etad_postprocess.refine(np.array([[0.2, 0.6]]), np.asarray(reg)),
                               [[0.25, 0.8]], atol=1e-6)


def test_boundary_targets_by_hand():
    # T = 10, GT [0.3, 0.8]: the start region [0.15, 0.45] covers half of cell 1 ([0.1, 0.2]),
    # cells 2 and 3 fully and half of cell 4; the end region [0.65, 0.95] cells 6 to 9 alike.
    gt = jnp.asarray([[[0.3, 0.8], [0.0, 0.0]]])
    valid = jnp.asarray([[True, False]])  # the padded GT at 0 must not count
    out = np.asarray(etad_losses.boundary_targets(gt, valid, 10))
    np.testing.assert_allclose(out[0, :, 0], [0, 0.5, 1, 1, 0.5, 0, 0, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(out[0, :, 1], [0, 0, 0, 0, 0, 0, 0.5, 1, 1, 0.5], atol=1e-6)


def test_losses_by_hand():
    p = jnp.asarray([0.8, 0.4, 0.1, 0.3])
    target = jnp.asarray([1.0, 0.0, 0.0, 0.0])
    # N = 4, 1 positive: coef_pos = 2, coef_neg = 2/3.
    want = -np.mean([2 * np.log(0.8 + 1e-6), 2 / 3 * np.log(0.6 + 1e-6),
                     2 / 3 * np.log(0.9 + 1e-6), 2 / 3 * np.log(0.7 + 1e-6)])
    np.testing.assert_allclose(etad_losses.balanced_bce(p, target), want, rtol=1e-6)
    # No positive: plain mean of the negative term, whatever the key.
    np.testing.assert_allclose(etad_losses.sampled_bce(p, jnp.zeros(4), 0.9, jax.random.key(0)),
                               -np.mean(np.log(1 - np.asarray(p) + 1e-6)), rtol=1e-6)
    # All positive: the mean positive term.
    np.testing.assert_allclose(etad_losses.sampled_bce(p, jnp.ones(4), 0.5, jax.random.key(0)),
                               -np.mean(np.log(np.asarray(p) + 1e-6)), rtol=1e-6)
    np.testing.assert_allclose(
        etad_losses.masked_smooth_l1(jnp.asarray([0.0, 3.0, 9.0]), jnp.asarray([0.5, 0.0, 0.0]),
                                     jnp.asarray([True, True, False])), (0.125 + 2.5) / 2)


def test_boundary_mask_and_decode():
    mask = etad_postprocess.boundary_mask(np.array([0.1, 0.3, 0.2, 0.9, 0.5, 0.6, 0.0]))
    assert mask.tolist() == [False, True, False, True, True, True, False]
    t = 8
    tem = np.zeros((t, 2))
    tem[2, 0] = tem[6, 1] = 1.0  # x_max = 6/8 is looked up in cell int(6/8 · 8) = 6
    anchors = np.array([[[2 / t, 6 / t], [0.0, 3 / t], [4 / t, 6 / t]]] * 2)
    iou = np.array([[[0.9, 0.8], [0.5, 0.5], [0.7, 0.7]]] * 2)
    det = etad_postprocess.decode(tem, anchors, iou, np.zeros((2, 3, 6)))
    # [4, 6] starts at cell 4 (not a start peak) and is dropped; [0, 3] starts at cell 0 (always
    # allowed) and ends in cell 3 (not an end peak): dropped too.
    np.testing.assert_allclose(det.segments, [[2, 6]])
    np.testing.assert_allclose(det.scores, [0.72], rtol=1e-6)


@pytest.mark.slow
def test_tiny_head_trains():
    """Shapes of a tiny ETAD head, and one gradient step of its loss lowers it."""
    head = etad.ETADHead(num_classes=3, max_seq_len=16, hidden=32)
    feats = jax.random.normal(jax.random.key(0), (2, 16, 8))
    rngs = {"params": jax.random.key(1), "dropout": jax.random.key(2)}
    params = head.init(rngs, feats, train=True)["params"]
    gt = jnp.asarray([[[2.0, 7.0], [9.0, 15.0]], [[4.0, 12.0], [0.0, 0.0]]])
    labels = jnp.asarray([[0, 2], [1, 0]])
    valid = jnp.asarray([[True, True], [True, False]])

    def loss(p, key):
        out = head.apply({"params": p}, feats, train=True, rngs={"dropout": key})
        return etad_losses.detection_loss(out, gt, labels, valid, jax.random.key(3), length=16)[0]

    out = jax.eval_shape(lambda p: head.apply({"params": p}, feats, train=False), params)
    k = 16 * 17 // 2
    assert out["iou"].shape == (2, 3, k, 2) and out["reg"].shape == (2, 3, k, 6)
    assert out["cls_logits"].shape == (2, 3, k, 3) and out["tem"].shape == (2, 16, 2)
    fn = jax.jit(jax.value_and_grad(loss)).lower(params, jax.random.key(4)).compile(
        compiler_options=FAST)
    before, grads = fn(params, jax.random.key(4))
    assert np.isfinite(float(before))
    from tadjax import tree
    # Stages 2 and 3 regress only anchors with IoU > 0.8 / 0.9: none yet in an untrained head.
    zero = [k for k, g in tree.flatten(grads).items() if not np.abs(np.asarray(g)).max() > 0
            and not re.match(r"stage_[12]/reg_", k)]
    assert not zero, f"no gradient reaches {zero}"
    norm = math.sqrt(sum(float(jnp.sum(g * g)) for g in jax.tree.leaves(grads)))
    stepped = jax.tree.map(lambda p, g: p - 1e-3 * g / norm, params, grads)
    after, _ = fn(stepped, jax.random.key(4))
    assert float(after) < float(before)
