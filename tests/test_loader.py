"""The grain loader: batch shapes, ground truth on the grid, frames at the right indices, resume.

The videos are grey ramps written here with PyAV: frame k of every video has grey level
10 + 6 k, so the frames in a batch tell which raw frames were decoded.
"""
import json

import av
import numpy as np
import pytest

from tadjax.data import loader, sampling

FPS = 10
H, W = 48, 64
# video id -> (subset, frames, segments in seconds, labels)
VIDEOS = {
    "ramp_a": ("training", 40, [[1.0, 2.0], [2.5, 3.5]], [0, 1]),
    "ramp_b": ("training", 30, [[0.5, 1.5]], [1]),
    "ramp_c": ("training", 36, [], []),  # no ground truth: not used for training
    "ramp_d": ("validation", 40, [[1.0, 3.0]], [0]),
    "ramp_e": ("validation", 24, [], []),
}
CLASSES = ["jump", "run"]


def grey(k):
    return 10 + 6 * np.asarray(k)


def write_ramp(path, num_frames):
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": "0", "g": "4"}
        for k in range(num_frames):
            img = np.full((H, W, 3), grey(k), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture(scope="module")
def ramp_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("ramps")
    (root / "videos").mkdir()
    database = {}
    for vid, (subset, n, segs, labels) in VIDEOS.items():
        write_ramp(root / "videos" / f"{vid}.mp4", n)
        database[vid] = {"subset": subset, "duration": n / FPS, "fps": FPS,
                         "annotations": [{"label": CLASSES[l], "segment": s} for s, l in zip(segs, labels)]}
    (root / "annotations.json").write_text(json.dumps({"database": database}))
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


def make_config(root, **overrides):
    c = loader.default_data_config()
    c.annotations = str(root / "annotations.json")
    c.videos = str(root / "videos")
    c.classes = str(root / "classes.txt")
    c.tfds_dir = str(root / "tfds")
    c.name = "ramps"
    c.window, c.snippet_stride, c.max_gt = 16, 2, 4
    c.img_size, c.train_short_side, c.eval_short_side = 32, 36, 32
    c.batch_size = 2
    c.update(overrides)
    return c


@pytest.fixture(scope="module")
def sources(ramp_set):
    return loader.build_or_load(make_config(ramp_set))


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_sources(sources):
    assert sorted(sources) == ["training", "validation"]
    assert [r["video_id"] for r in sources["training"].records] == ["ramp_a", "ramp_b", "ramp_c"]
    assert sources["training"].classes == CLASSES
    assert sources["validation"][0]["num_frames"] == 40
    assert loader.train_indices(loader.default_data_config(), sources["training"]) == [0, 1]
    # Resize mode drops instances <= min_relative_length of the video: ramp_a's are 1 s of 4 s.
    c = loader.default_data_config()
    c.mode, c.min_relative_length = "resize", 0.3
    assert loader.train_indices(c, sources["training"]) == [1]
    assert loader.get_split(sources, "Validation") is sources["validation"]


def test_training_batch_shapes_and_ground_truth(ramp_set, sources):
    c = make_config(ramp_set)
    batches = take(loader.train_iterator(c, sources, seed=0), 4)
    for b in batches:
        assert b["frames"].dtype == np.uint8 and b["frames"].shape == (2, 16, 32, 32, 3)
        assert b["mask"].dtype == bool and b["mask"].shape == (2, 16)
        assert b["gt_segments"].dtype == np.float32 and b["gt_segments"].shape == (2, 4, 2)
        assert b["gt_labels"].dtype == np.int32 and b["gt_labels"].shape == (2, 4)
        assert b["gt_valid"].dtype == bool and b["gt_valid"].shape == (2, 4)
        valid = b["gt_valid"]
        assert valid.any(axis=1).all()  # every training window keeps some ground truth
        segs = b["gt_segments"][valid]
        assert (segs >= 0).all() and (segs <= 16).all() and (segs[:, 1] > segs[:, 0]).all()
        assert (b["gt_segments"][~valid] == 0).all()


def test_hand_checked_window(ramp_set, sources):
    # The grid (32 positions, stride 2) holds the whole video and crop_ratio (1, 1) keeps it,
    # so the window starts at 0: g = t * fps / stride = 5 t. No colour jitter: grey levels stay.
    c = make_config(ramp_set, window=32, crop_ratio=(1.0, 1.0), color_jitter=False)
    (b,) = take(loader.train_iterator(c, sources, seed=0), 1)
    by_length = {int(m.sum()): i for i, m in enumerate(b["mask"])}
    assert sorted(by_length) == [15, 20]  # ramp_b: ceil(30 / 2); ramp_a: 40 / 2
    a, bb = by_length[20], by_length[15]
    np.testing.assert_array_equal(b["gt_segments"][a, :2], [[5.0, 10.0], [12.5, 17.5]])
    np.testing.assert_array_equal(b["gt_labels"][a, :2], [0, 1])
    np.testing.assert_array_equal(b["gt_valid"][a], [True, True, False, False])
    np.testing.assert_array_equal(b["gt_segments"][bb, :1], [[2.5, 7.5]])
    np.testing.assert_array_equal(b["gt_labels"][bb, :1], [1])
    np.testing.assert_array_equal(b["mask"][a], np.arange(32) < 20)
    # Position p shows raw frame 2p, then the last one (38) repeated.
    levels = b["frames"][a].reshape(32, -1).mean(axis=1)
    np.testing.assert_allclose(levels, grey(2 * np.minimum(np.arange(32), 19)), atol=3)


def test_resize_mode(ramp_set, sources):
    # ramp_a lasts 4 s: g = t / 4 * 8. 16 frames spread over its 40 frames.
    c = make_config(ramp_set, mode="resize", resize_length=8, scale_factor=2, color_jitter=False)
    (b,) = take(loader.train_iterator(c, sources, seed=0), 1)
    assert b["frames"].shape == (2, 16, 32, 32, 3) and b["mask"].shape == (2, 8) and b["mask"].all()
    a = int(np.argmax(b["gt_valid"].sum(axis=1)))  # ramp_a has two instances, ramp_b one
    np.testing.assert_array_equal(b["gt_segments"][a, :2], [[2.0, 4.0], [5.0, 7.0]])
    levels = b["frames"][a].reshape(16, -1).mean(axis=1)
    np.testing.assert_allclose(levels, grey(sampling.resize_frame_indices(40, 16)), atol=3)
    np.testing.assert_array_equal(sampling.resize_frame_indices(40, 16)[:4], [1, 3, 6, 8])


def test_resume_mid_epoch_is_exact(ramp_set, sources):
    c = make_config(ramp_set)
    it = loader.train_iterator(c, sources, seed=5)
    take(it, 3)  # 1.5 epochs of 2 videos... one epoch is one batch here; mid-stream either way
    state = it.get_state()
    expected = take(it, 3)
    restored = loader.train_iterator(c, sources, seed=5)
    restored.set_state(state)
    assert_batches_equal(take(restored, 3), expected)
    # Same seed, same stream; another seed, another stream.
    assert_batches_equal(take(loader.train_iterator(c, sources, seed=5), 6)[3:], expected)
    other = take(loader.train_iterator(c, sources, seed=6), 6)[3:]
    assert any(not np.array_equal(x["frames"], y["frames"]) for x, y in zip(other, expected))


def test_resume_with_worker_processes(ramp_set, sources):
    c = make_config(ramp_set, batch_size=1)
    reference = take(loader.train_iterator(c, sources, seed=2), 4)
    c.num_workers = 1
    it = loader.train_iterator(c, sources, seed=2)
    first = take(it, 2)
    state = it.get_state()
    rest = take(it, 2)
    it.close()
    assert_batches_equal(first + rest, reference)  # workers change nothing
    restored = loader.train_iterator(c, sources, seed=2)
    restored.set_state(state)
    assert_batches_equal(take(restored, 2), rest)
    restored.close()


def test_processes_share_the_global_batch(ramp_set, sources):
    c = make_config(ramp_set, batch_size=2)
    whole = take(loader.train_iterator(c, sources, seed=1), 2)
    parts = [take(loader.train_iterator(c, sources, seed=1, process_index=p, process_count=2), 2)
             for p in range(2)]
    for step in range(2):
        for p in range(2):
            assert parts[p][step]["frames"].shape[0] == 1
            for k in whole[step]:
                np.testing.assert_array_equal(parts[p][step][k][0], whole[step][k][p])
    with pytest.raises(ValueError, match="divisible"):
        loader.train_iterator(make_config(ramp_set, batch_size=3), sources, seed=1, process_count=2)


def test_eval_batches_cover_every_window_once(ramp_set, sources):
    c = make_config(ramp_set)
    videos = loader.eval_videos(c, sources)
    # ramp_d: 20 positions -> windows at 0 and 4 (right-aligned); ramp_e: 12 positions -> one window.
    assert [(v["video_id"], v["grid_starts"]) for v in videos] == [("ramp_d", [0, 4]), ("ramp_e", [0])]
    assert videos[0]["fps"] == FPS and videos[0]["duration"] == 4.0
    batches = list(loader.eval_batches(c, sources, batch_size=2))
    assert len(batches) == 2
    for b in batches:
        assert b["frames"].shape == (2, 16, 32, 32, 3) and b["mask"].shape == (2, 16)
    np.testing.assert_array_equal(np.concatenate([b["valid"] for b in batches]), [1, 1, 1, 0])
    np.testing.assert_array_equal(batches[0]["video_index"], [0, 0])
    np.testing.assert_array_equal(batches[1]["video_index"][:1], [1])
    np.testing.assert_array_equal(batches[0]["window_start"], [0.0, 8.0])  # raw frames
    np.testing.assert_array_equal(batches[0]["grid_start"], [0, 4])
    assert batches[0]["mask"].all()
    np.testing.assert_array_equal(batches[1]["mask"][0], np.arange(16) < 12)
    # Window at grid 4 of ramp_d shows raw frames 8, 10, ..., 38.
    levels = batches[0]["frames"][1].reshape(16, -1).mean(axis=1)
    np.testing.assert_allclose(levels, grey(8 + 2 * np.arange(16)), atol=3)
    # ramp_e's window: frames 0..22, then frame 22 repeated.
    levels = batches[1]["frames"][0].reshape(16, -1).mean(axis=1)
    np.testing.assert_allclose(levels, grey(2 * np.minimum(np.arange(16), 11)), atol=3)
    # Grid -> seconds: position 6 of the window at grid 4 is raw frame 20, i.e. 2 s.
    assert loader.grid_to_seconds(videos[0], 6.0, grid_start=4) == pytest.approx(2.0)


def test_pad_ground_truth_keeps_the_first_max_gt(caplog):
    segs = np.array([[5.0, 6.0], [1.0, 2.0], [3.0, 4.0], [0.0, 9.0]])
    out, labels, valid = loader.pad_ground_truth(segs, [0, 1, 2, 3], max_gt=2, length=8)
    np.testing.assert_array_equal(out, [[1.0, 2.0], [0.0, 8.0]])  # earliest starts, in input order, clipped
    np.testing.assert_array_equal(labels, [1, 3])
    assert valid.all()
    assert "max_gt=2" in caplog.text
    out, labels, valid = loader.pad_ground_truth(segs[:1], [4], max_gt=3, length=8)
    np.testing.assert_array_equal(out, [[5.0, 6.0], [0, 0], [0, 0]])
    np.testing.assert_array_equal(valid, [True, False, False])


def test_bad_config_is_rejected(ramp_set, sources):
    with pytest.raises(ValueError, match="mode"):
        loader.train_iterator(make_config(ramp_set, mode="pad"), sources, seed=0)
    with pytest.raises(KeyError, match="testing"):
        loader.train_iterator(make_config(ramp_set, train_subset="testing"), sources, seed=0)
