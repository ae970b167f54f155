"""Point generator and label assignment: hand-computed cases and a loop reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tadjax.detection.assignment import assign_targets, assign_targets_batch
from tadjax.detection.points import level_lengths, make_points

POINTS = make_points(32)  # levels of 32, 16, 8, 4, 2, 1 points
_assign_jit = jax.jit(assign_targets, static_argnums=(4,))


def _assign(segments, labels, num_classes=3, valid=None):
    segments = np.asarray(segments, np.float32)
    valid = np.ones(len(segments), bool) if valid is None else np.asarray(valid)
    cls, reg = _assign_jit(POINTS, segments, np.asarray(labels), valid, num_classes)
    return np.asarray(cls), np.asarray(reg)


def _find(position, stride):
    hits = np.flatnonzero((POINTS[:, 0] == position) & (POINTS[:, 3] == stride))
    assert len(hits) == 1
    return int(hits[0])


def test_make_points_layout():
    assert level_lengths(64) == [64, 32, 16, 8, 4, 2]
    pts = make_points(64)
    assert pts.shape == (126, 4) and pts.dtype == np.float32
    np.testing.assert_array_equal(pts[:3], [[0, 0, 4, 1], [1, 0, 4, 1], [2, 0, 4, 1]])
    np.testing.assert_array_equal(pts[64:66], [[0, 4, 8, 2], [2, 4, 8, 2]])
    np.testing.assert_array_equal(pts[-2:], [[0, 64, 10000, 32], [32, 64, 10000, 32]])
    with pytest.raises(ValueError, match="divisible by stride 32"):
        make_points(48)


def test_center_sampling_strict_and_range_inclusive():
    # GT [10, 20], centre 15. Stride 1: region (13.5, 16.5) holds 14, 15, 16 but their max
    # distance (>= 5) exceeds the range [0, 4]. Stride 2: region [12, 18]; 12 and 18 sit exactly
    # on the boundary (strict test: out); 14 and 16 have max distance 6 in [4, 8]: positive.
    # Stride 4: region [9, 21] clipped to [10, 20]; 12 has max distance 8 = lo of [8, 16]
    # (inclusive: positive); 16 has 6 < 8; 20 is on the boundary. Nothing else.
    cls, reg = _assign([[10.0, 20.0]], [2])
    positive = {(float(POINTS[i, 0]), float(POINTS[i, 3])) for i in np.flatnonzero(cls.sum(1))}
    assert positive == {(14.0, 2.0), (16.0, 2.0), (12.0, 4.0)}
    np.testing.assert_array_equal(cls[_find(14, 2)], [0, 0, 1])
    np.testing.assert_allclose(reg[_find(14, 2)], [2.0, 3.0])  # (14-10, 20-14) / 2
    np.testing.assert_allclose(reg[_find(16, 2)], [3.0, 2.0])
    np.testing.assert_allclose(reg[_find(12, 4)], [0.5, 2.0])  # (2, 8) / 4
    assert np.all(reg[cls.sum(1) == 0] == 0)


def test_shorter_gt_wins():
    # Both GTs pass at point 14 / stride 2 (A: max distance 8, B: 6); B is shorter.
    cls, reg = _assign([[8.0, 22.0], [10.0, 20.0]], [0, 1])
    i = _find(14, 2)
    np.testing.assert_array_equal(cls[i], [0, 1, 0])
    np.testing.assert_allclose(reg[i], [2.0, 3.0])
    # Order of the GTs does not matter.
    cls2, reg2 = _assign([[10.0, 20.0], [8.0, 22.0]], [1, 0])
    np.testing.assert_array_equal(cls2, cls)
    np.testing.assert_allclose(reg2, reg)


@pytest.mark.parametrize("second_end, multi_hot", [(21.0, True), (21.0005, True), (21.01, False)])
def test_similar_lengths_give_multi_hot(second_end, multi_hot):
    # A = [10, 20] (class 0), B = [11, second_end] (class 2); both pass at 14 and 16 / stride 2.
    cls, reg = _assign([[10.0, 20.0], [11.0, second_end]], [0, 2])
    for pos in (14, 16):
        i = _find(pos, 2)
        np.testing.assert_array_equal(cls[i], [1, 0, 1] if multi_hot else [1, 0, 0])
        np.testing.assert_allclose(reg[i], [(pos - 10) / 2, (20 - pos) / 2])  # A is first/shortest


def test_same_class_twice_is_clamped_and_invalid_rows_ignored():
    cls, _ = _assign([[10.0, 20.0], [10.0, 20.0], [0.0, 32.0]], [1, 1, 0],
                     valid=[True, True, False])
    assert cls.max() == 1.0
    ref, _ = _assign([[10.0, 20.0]], [1])
    np.testing.assert_array_equal(cls, ref)
    empty_cls, empty_reg = assign_targets(POINTS, np.zeros((0, 2)), np.zeros((0,), int),
                                          np.zeros((0,), bool), 3)
    assert empty_cls.shape == (len(POINTS), 3) and not np.any(empty_cls) and not np.any(empty_reg)


def _reference_assign(points, segments, labels, num_classes, radius=1.5):
    """Point-by-point, GT-by-GT transcription of the rules (spec 4.6)."""
    cls = np.zeros((len(points), num_classes))
    reg = np.zeros((len(points), 2))
    for p, (x, lo, hi, s) in enumerate(points):
        passing = []
        for (gs, ge) in segments:
            c = (gs + ge) / 2
            left_end, right_end = max(c - radius * s, gs), min(c + radius * s, ge)
            inside = (x - left_end > 0) and (right_end - x > 0)
            d = max(x - gs, ge - x)
            passing.append(inside and lo <= d <= hi)
        lens = [ge - gs if ok else np.inf for (gs, ge), ok in zip(segments, passing)]
        if not any(passing):
            continue
        best = int(np.argmin(lens))
        for g, ok in enumerate(passing):
            if ok and lens[g] <= lens[best] + 1e-3:
                cls[p, labels[g]] = 1
        reg[p] = [(x - segments[best][0]) / s, (segments[best][1] - x) / s]
    return cls, reg


def test_matches_loop_reference_on_random_gts():
    rng = np.random.default_rng(0)
    points = make_points(64)
    starts = rng.integers(0, 60, size=12).astype(np.float32)
    lengths = rng.choice([1.0, 2.5, 4.0, 7.0, 12.0, 30.0, 50.0], size=12).astype(np.float32)
    segments = np.stack([starts, starts + lengths], 1)
    labels = rng.integers(0, 4, size=12)
    cls, reg = _assign_jit(points, segments, labels, np.ones(12, bool), 4)
    ref_cls, ref_reg = _reference_assign(points, segments.astype(np.float64), labels, 4)
    assert ref_cls.sum() > 20  # the case is not vacuous
    np.testing.assert_array_equal(np.asarray(cls), ref_cls)
    np.testing.assert_allclose(np.asarray(reg), ref_reg, rtol=1e-6, atol=1e-6)


def test_batched_and_jitted():
    segs = np.array([[[10.0, 20.0], [0.0, 0.0]], [[8.0, 22.0], [10.0, 20.0]]], np.float32)
    labels = np.array([[2, -1], [0, 1]])
    valid = np.array([[True, False], [True, True]])
    fn = jax.jit(lambda s, l, v: assign_targets_batch(POINTS, s, l, v, 3))
    cls, reg = fn(jnp.asarray(segs), jnp.asarray(labels), jnp.asarray(valid))
    assert cls.shape == (2, len(POINTS), 3) and reg.shape == (2, len(POINTS), 2)
    for b in range(2):
        c, r = _assign(segs[b][valid[b]], labels[b][valid[b]])
        np.testing.assert_array_equal(np.asarray(cls[b]), c)
        np.testing.assert_allclose(np.asarray(reg[b]), r)
