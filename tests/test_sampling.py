import numpy as np
import pytest

from tadjax.data import sampling


def test_seconds_grid_hand_cases_and_roundtrip():
    # 30 fps, 4 frames per snippet: 2 s = frame 60 = grid 15.
    assert sampling.seconds_to_grid(2.0, fps=30, snippet_stride=4) == 15
    assert sampling.seconds_to_grid(2.0, fps=30, snippet_stride=4, window_start=10) == 5
    assert sampling.seconds_to_grid(2.0, fps=30, snippet_stride=4, offset_frames=8) == 13
    assert sampling.grid_to_seconds(15, fps=30, snippet_stride=4) == 2.0
    assert sampling.grid_to_seconds(13, fps=30, snippet_stride=4, offset_frames=8) == 2.0
    t = np.array([[0.0, 1.7], [12.25, 99.9]])
    kw = dict(fps=29.97, snippet_stride=4, offset_frames=3, window_start=384)
    np.testing.assert_allclose(sampling.grid_to_seconds(sampling.seconds_to_grid(t, **kw), **kw), t, rtol=1e-12)


def test_resized_grid():
    assert sampling.seconds_to_resized(50.0, duration=100.0, length=192) == 96
    np.testing.assert_array_equal(sampling.seconds_to_resized([-5.0, 120.0], duration=100.0, length=192), [0, 192])
    assert sampling.seconds_to_resized(120.0, duration=100.0, length=192, clip=False) == pytest.approx(230.4)
    assert sampling.resized_to_seconds(96, duration=100.0, length=192) == 50


def test_resize_frame_indices_hand_cases():
    # stride 12.5: centres 5.75 + 12.5 k.
    np.testing.assert_array_equal(sampling.resize_frame_indices(100, 8), [6, 18, 31, 43, 56, 68, 81, 93])
    # Short video: stride 0.5, centres -0.25 + 0.5 k, frames repeat.
    np.testing.assert_array_equal(sampling.resize_frame_indices(3, 6), [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(sampling.resize_frame_indices(4, 4), [0, 1, 2, 3])


def opentad_window_starts(n, window, overlap):
    """OpenTAD's sliding-window loop, as described in the spec (with its duplicates)."""
    stride = int(window * (1 - overlap))
    starts = []
    for idx in range(max(1, n // stride)):
        start = idx * stride
        if start + window > n:
            start = max(0, n - window)
        starts.append(start)
    return starts


def test_sliding_window_starts():
    assert sampling.sliding_window_starts(1000, 768) == [0, 232]
    assert sampling.sliding_window_starts(1536, 768) == [0, 384, 768]
    assert sampling.sliding_window_starts(500, 768) == [0]
    assert sampling.sliding_window_starts(768, 768) == [0]
    assert sampling.sliding_window_starts(769, 768) == [0, 1]
    for n in range(1, 2000, 7):
        ours = sampling.sliding_window_starts(n, 768, 0.5)
        assert ours == sorted(set(opentad_window_starts(n, 768, 0.5))), n
        # Any overlap: the windows cover the video, with starts `stride` apart except the last.
        ours = sampling.sliding_window_starts(n, 128, 0.25)
        covered = np.zeros(n, bool)
        for s in ours:
            covered[s:s + 128] = True
        assert covered.all() and all(b - a == 96 for a, b in zip(ours[:-2], ours[1:-1]))
    # OpenTAD's loop leaves the end uncovered when the overlap is below one half; ours does not.
    assert opentad_window_starts(134, 128, 0.25) == [0]
    assert sampling.sliding_window_starts(134, 128, 0.25) == [0, 6]


def test_eval_windows_pad_and_scale():
    (w,) = sampling.eval_windows(2000, window_size=768, snippet_stride=4)  # 500 snippets
    assert w.start == 0 and w.mask.sum() == 500 and not w.mask[500:].any()
    np.testing.assert_array_equal(w.frame_indices[:500], np.arange(0, 2000, 4))
    assert (w.frame_indices[500:] == 1996).all() and len(w.frame_indices) == 768
    (w2,) = sampling.eval_windows(2000, window_size=768, snippet_stride=4, scale_factor=2)
    assert len(w2.frame_indices) == 1536
    np.testing.assert_array_equal(w2.frame_indices[:1000], np.arange(0, 2000, 2))
    assert (w2.frame_indices[1000:] == 1998).all()
    windows = sampling.eval_windows(4003, window_size=256, snippet_stride=4)  # 1001 snippets
    assert [w.start for w in windows] == [0, 128, 256, 384, 512, 640, 745]
    last = windows[-1]
    assert last.mask.all() and last.frame_indices[-1] == 4000 and last.frame_indices[0] == 745 * 4


def coverage(segments, start, length):
    lo = np.maximum(segments[:, 0], start)
    hi = np.minimum(segments[:, 1], start + length)
    return np.maximum(hi - lo, 0) / (segments[:, 1] - segments[:, 0])


def test_train_window_truncation_rule():
    rng = np.random.default_rng(0)
    segments = np.array([[10.0, 30.0], [300.0, 420.0], [900.0, 905.0]])
    labels = np.array([0, 1, 2], np.int32)
    for _ in range(200):
        w = sampling.train_window(4000, segments, labels, rng, window_size=256, snippet_stride=4)  # 1000 snippets
        assert 0 <= w.start <= 1000 - 256 and w.mask.all()
        cover = coverage(segments, w.start, 256)
        kept = cover >= 0.75
        assert kept.any()
        np.testing.assert_array_equal(w.labels, labels[kept])
        expected = np.clip(segments[kept], w.start, w.start + 256) - w.start
        np.testing.assert_allclose(w.segments, expected)
        np.testing.assert_array_equal(w.frame_indices, (w.start + np.arange(256)) * 4)


def test_train_window_fallback_keeps_longest_coverable_instance():
    rng = np.random.default_rng(0)
    segments = np.array([[100.0, 500.0]])  # 400 snippets: never 75 % inside a 256 window
    w = sampling.train_window(4000, segments, [3], rng, window_size=256, snippet_stride=4, max_tries=5)
    assert w.start == 172  # centred on the instance
    np.testing.assert_allclose(w.segments, [[0.0, 256.0]])
    np.testing.assert_array_equal(w.labels, [3])


def test_train_window_short_video_crop_and_pad():
    rng = np.random.default_rng(1)
    segments = np.array([[20.0, 40.0], [60.0, 90.0]])
    for _ in range(100):
        w = sampling.train_window(400, segments, [0, 1], rng, window_size=256, snippet_stride=4)  # 100 snippets
        valid = int(w.mask.sum())
        assert 90 <= valid <= 100 and w.start + valid <= 100 and not w.mask[valid:].any()
        np.testing.assert_array_equal(w.frame_indices[:valid], (w.start + np.arange(valid)) * 4)
        assert (w.frame_indices[valid:] == w.frame_indices[valid - 1]).all()
        cover = coverage(segments, w.start, valid)
        np.testing.assert_array_equal(w.labels, np.array([0, 1])[cover >= 0.75])
        assert len(w.labels) >= 1
    # Without ground truth: the whole video.
    w = sampling.train_window(400, np.zeros((0, 2)), [], rng, window_size=256, snippet_stride=4)
    assert w.start == 0 and w.mask.sum() == 100 and len(w.segments) == 0


def test_train_window_rejects_bad_scale():
    with pytest.raises(ValueError, match="divisible"):
        sampling.train_window(400, np.zeros((0, 2)), [], np.random.default_rng(0), snippet_stride=4, scale_factor=3)


def test_resize_window():
    w = sampling.resize_window(1000, 768, 192, np.array([[10.0, 20.0], [0.0, 0.5], [90.0, 130.0]]), [1, 2, 3],
                               duration=100.0, min_relative_length=0.01)
    np.testing.assert_allclose(w.segments, [[19.2, 38.4], [172.8, 192.0]])
    np.testing.assert_array_equal(w.labels, [1, 3])
    assert w.mask.all() and len(w.frame_indices) == 768 and w.frame_indices[-1] == 999
