"""Post-processing: decode, Gaussian soft-NMS, voting, seconds, window merge, classifier fusion."""
import math

import numpy as np
import pytest

from tadjax.detection.points import make_points
from tadjax.detection.postprocess import (decode, fuse_video_classifier, grid_to_seconds,
                                          iou_voting, merge_windows, soft_nms)


def _iou(a, b):
    """IoU as the reference soft-NMS computes it (lengths + 1e-6)."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    la, lb = a[1] - a[0] + 1e-6, b[1] - b[0] + 1e-6
    return inter / (la + lb - inter)


def test_soft_nms_two_overlapping_and_one_disjoint():
    segs = np.array([[5.0, 15.0], [0.0, 10.0], [30.0, 40.0]])
    out = soft_nms(segs, [0.8, 0.9, 0.5], [0, 0, 0], sigma=0.7)
    iou = _iou([0, 10], [5, 15])  # 5 / 15
    assert iou == pytest.approx(1 / 3, rel=1e-6)
    np.testing.assert_allclose(out.scores, [0.9, 0.8 * math.exp(-iou ** 2 / 0.7), 0.5], rtol=1e-6)
    np.testing.assert_array_equal(out.segments, [[0, 10], [5, 15], [30, 40]])
    np.testing.assert_array_equal(out.labels, [0, 0, 0])


def test_soft_nms_decays_sequentially():
    a, b, c = [0.0, 10.0], [2.0, 12.0], [4.0, 14.0]
    out = soft_nms(np.array([a, b, c]), [0.9, 0.85, 0.5], [1, 1, 1], sigma=0.5)
    b1 = 0.85 * math.exp(-_iou(a, b) ** 2 / 0.5)
    c1 = 0.5 * math.exp(-_iou(a, c) ** 2 / 0.5)
    assert b1 > c1
    c2 = c1 * math.exp(-_iou(b, c) ** 2 / 0.5)  # decayed again by the second pick
    np.testing.assert_allclose(out.scores, [0.9, b1, c2], rtol=1e-6)
    np.testing.assert_array_equal(out.segments, [a, b, c])


def test_soft_nms_per_class_vs_agnostic_min_score_and_cap():
    segs = np.array([[0.0, 10.0], [0.0, 10.0], [1.0, 10.0]])
    per_class = soft_nms(segs, [0.9, 0.8, 0.7], [0, 1, 0])
    # Classes do not suppress each other; the same-class near duplicate does.
    np.testing.assert_allclose(per_class.scores[:2], [0.9, 0.8])
    np.testing.assert_array_equal(per_class.labels[:2], [0, 1])
    agnostic = soft_nms(segs, [0.9, 0.8, 0.7], [0, 1, 0], class_agnostic=True)
    dup, near = math.exp(-_iou(segs[0], segs[1]) ** 2 / 0.7), math.exp(-0.9 ** 2 / 0.7)
    # After 0.9: the duplicate drops to 0.8 * dup = 0.19, [1, 10] (IoU 0.9) to 0.7 * near = 0.22,
    # which is picked next and decays the duplicate once more.
    np.testing.assert_allclose(agnostic.scores, [0.9, 0.7 * near, 0.8 * dup * near], rtol=1e-5)
    np.testing.assert_array_equal(agnostic.labels, [0, 0, 1])
    # With min_score 0.2 the duplicate (0.19 < 0.2) is discarded at the first pick.
    kept = soft_nms(segs, [0.9, 0.8, 0.7], [0, 0, 0], min_score=0.2)
    np.testing.assert_allclose(kept.scores, [0.9, 0.7 * near], rtol=1e-5)
    assert len(soft_nms(segs, [0.9, 0.8, 0.7], [0, 1, 0], max_segments=2).scores) == 2
    empty = soft_nms(np.zeros((0, 2)), [], [])
    assert empty.segments.shape == (0, 2)


def _reference_soft_nms(segs, scores, sigma, min_score):
    """Transcription of the reference's in-place algorithm: pick the max among the remaining,
    swap it to the front, decay the rest, drop those below min_score by swapping in the last."""
    x1, x2, sc = list(segs[:, 0]), list(segs[:, 1]), list(scores)
    area = [b - a + 1e-6 for a, b in zip(x1, x2)]
    ind = list(range(len(sc)))
    n, i, out = len(sc), 0, []
    while i < n:
        m = max(range(i, n), key=lambda k: (sc[k], -k))
        for arr in (x1, x2, sc, area, ind):
            arr[i], arr[m] = arr[m], arr[i]
        out.append((ind[i], sc[i]))
        pos = i + 1
        while pos < n:
            inter = max(0.0, min(x2[i], x2[pos]) - max(x1[i], x1[pos]))
            ovr = inter / (area[i] + area[pos] - inter)
            sc[pos] *= math.exp(-ovr * ovr / sigma)
            if sc[pos] < min_score:
                for arr in (x1, x2, sc, area, ind):
                    arr[pos] = arr[n - 1]
                n -= 1
                pos -= 1
            pos += 1
        i += 1
    return out


@pytest.mark.parametrize("min_score", [0.0, 0.05])
def test_soft_nms_matches_reference_loop(min_score):
    rng = np.random.default_rng(1)
    start = rng.uniform(0, 100, 60)
    segs = np.stack([start, start + rng.uniform(1, 30, 60)], 1).astype(np.float32)
    scores = rng.uniform(0, 1, 60).astype(np.float32)
    labels = rng.integers(0, 3, 60)
    out = soft_nms(segs, scores, labels, sigma=0.7, min_score=min_score, max_segments=1000)
    expected = []
    for c in range(3):
        members = np.flatnonzero(labels == c)
        ref = _reference_soft_nms(segs[members].astype(np.float64), scores[members], 0.7,
                                  min_score)
        expected += [(members[k], s) for k, s in ref]
    expected.sort(key=lambda e: -e[1])
    assert len(out.scores) == len(expected) and (min_score == 0 or len(expected) < 60)
    np.testing.assert_allclose(out.scores, [s for _, s in expected], rtol=1e-5)
    np.testing.assert_array_equal(out.segments, segs[[k for k, _ in expected]])
    np.testing.assert_array_equal(out.labels, labels[[k for k, _ in expected]])


def test_iou_voting():
    kept = np.array([[0.0, 10.0], [50.0, 50.0]])
    cand = np.array([[0.0, 10.0], [1.0, 10.0], [0.0, 12.0], [50.0, 50.0]])
    scores = np.array([0.9, 0.6, 0.3, 0.5])
    # [1, 10] has IoU exactly 0.9 (kept, inclusive), [0, 12] 10/12 (left out).
    out = iou_voting(kept, cand, scores, threshold=0.9)
    np.testing.assert_allclose(out[0], [0.6 / 1.5, 10.0], rtol=1e-6)
    np.testing.assert_array_equal(out[1], [50.0, 50.0])  # degenerate: unchanged, not NaN


def test_decode_threshold_topk_and_single_class():
    points = make_points(32)
    num = len(points)
    logits = np.full((num, 2), -10.0, np.float32)  # sigmoid(-10) = 4.5e-5 < 0.001
    reg = np.zeros((num, 2), np.float32)
    i = int(np.flatnonzero((points[:, 0] == 8) & (points[:, 3] == 4))[0])
    logits[i] = [2.0, 0.0]
    reg[i] = [1.0, 0.5]  # [8 - 4, 8 + 2]
    logits[3] = [-1.0, 1.0]
    mask = np.ones(num, bool)
    out = decode(logits, reg, points, mask)
    sig = lambda x: 1 / (1 + math.exp(-x))
    np.testing.assert_allclose(out.scores, [sig(2), sig(1), sig(0), sig(-1)], rtol=1e-6)
    np.testing.assert_array_equal(out.labels, [0, 1, 1, 0])
    np.testing.assert_allclose(out.segments, [[4, 10], [3, 3], [4, 10], [3, 3]])
    top2 = decode(logits, reg, points, mask, pre_nms_topk=2)
    np.testing.assert_array_equal(top2.labels, [0, 1])
    mask[i] = False  # masked points are dropped
    assert len(decode(logits, reg, points, mask).scores) == 2
    # One class: every valid point is kept, in point order, without thresholding.
    single = decode(logits[:, :1], reg, points, np.ones(num, bool))
    assert len(single.scores) == num and np.all(single.labels == 0)
    np.testing.assert_allclose(single.scores[i], sig(2), rtol=1e-6)


def test_grid_to_seconds():
    seg = np.array([[10.0, 20.0]])
    out = grid_to_seconds(seg, duration=60.0, fps=30.0, snippet_stride=4, window_start_frame=1536)
    np.testing.assert_allclose(out, [[(40 + 1536) / 30, (80 + 1536) / 30]], rtol=1e-6)
    clamped = grid_to_seconds(seg, duration=53.0, fps=30.0, snippet_stride=4,
                              window_start_frame=1536)
    np.testing.assert_allclose(clamped, [[(40 + 1536) / 30, 53.0]], rtol=1e-6)
    resized = grid_to_seconds(np.array([[-1.0, 96.0], [150.0, 200.0]]), duration=100.0,
                              resize_length=192)
    np.testing.assert_allclose(resized, [[0.0, 50.0], [78.125, 100.0]], rtol=1e-6)
    with pytest.raises(ValueError, match="fps and snippet_stride"):
        grid_to_seconds(seg, duration=10.0)


def test_merge_windows_runs_per_class_soft_nms():
    w1 = (np.array([[10.0, 20.0]]), np.array([0.9]), np.array([0]))
    w2 = (np.array([[10.0, 20.0], [10.0, 20.0]]), np.array([0.8, 0.7]), np.array([0, 1]))
    out = merge_windows([w1, w2])
    iou = _iou([10, 20], [10, 20])
    np.testing.assert_allclose(out.scores, [0.9, 0.7, 0.8 * math.exp(-iou ** 2 / 0.7)],
                               rtol=1e-6)
    np.testing.assert_array_equal(out.labels, [0, 1, 0])


@pytest.mark.parametrize("mode", ["cuhk", "standard"])
def test_fuse_video_classifier(mode):
    segs = np.array([[1.0, 2.0], [3.0, 4.0]])
    det = np.array([0.5, 0.2])
    cls = np.array([0.1, 0.6, 0.3])  # top-2: class 1 (0.6), class 2 (0.3)
    out = fuse_video_classifier(segs, det, cls, topk=2, mode=mode)
    f = (lambda d, c: d * c) if mode == "cuhk" else (lambda d, c: math.sqrt(d * c))
    expected = sorted([(f(0.5, 0.6), 1, 0), (f(0.2, 0.6), 1, 1), (f(0.5, 0.3), 2, 0),
                       (f(0.2, 0.3), 2, 1)], key=lambda e: -e[0])
    np.testing.assert_allclose(out.scores, [e[0] for e in expected], rtol=1e-6)
    np.testing.assert_array_equal(out.labels, [e[1] for e in expected])
    np.testing.assert_array_equal(out.segments, segs[[e[2] for e in expected]])
    assert len(fuse_video_classifier(segs, det, cls, topk=2, mode=mode, max_outputs=3).scores) == 3
