import json
import os

import numpy as np
import pytest

from tadjax.data import annotations, synthetic, video

TINY = dict(num_train=2, num_val=1, video_seconds=(5.0, 7.0), action_seconds=(0.6, 2.0), gap_seconds=(0.5, 1.0))


def test_deterministic_and_valid(tmp_path):
    a = synthetic.generate(tmp_path / "a", seed=3, **TINY)
    b = synthetic.generate(tmp_path / "b", seed=3, **TINY)
    assert a.read_bytes() == b.read_bytes()
    c = synthetic.generate(tmp_path / "c", seed=4, **TINY)
    assert a.read_bytes() != c.read_bytes()

    ann = annotations.load_annotations(a)
    assert ann.classes == list(synthetic.CLASSES)
    assert ann.subsets == {"training": 2, "validation": 1}
    assert ann.num_segments >= 3
    for vid, v in ann.videos.items():
        path_a = video.find_video(a.parent / "videos", vid, v.filename)
        info = video.video_info(path_a)
        assert info.num_frames == v.num_frames and info.fps == v.fps and info.height == info.width == 64
        assert v.fps in (10, 12, 15) and v.duration == pytest.approx(v.num_frames / v.fps)
        assert (v.segments[:, 1] > v.segments[:, 0]).all() and (v.segments[:, 1] <= v.duration).all()
        assert (np.diff(v.segments.ravel()) >= 0).all()  # non-overlapping, in order
        idx = np.arange(0, v.num_frames, 5)
        np.testing.assert_array_equal(video.read_frames(path_a, idx),
                                      video.read_frames(b.parent / "videos" / path_a.name, idx))


def test_actor_present_exactly_during_action():
    """With no distractors, an object is drawn exactly on the frames of an action (sharp boundaries)."""
    cfg = synthetic.SyntheticConfig(max_distractors=0, noise_std=0.0, video_seconds=(20.0, 20.0),
                                    gap_seconds=(0.5, 2.0), action_seconds=(0.6, 3.0))
    plan = synthetic.plans(1, cfg)[0]
    assert len(plan.actions) >= 3
    frames = np.concatenate(list(synthetic.render_video(plan, cfg))).astype(float)
    # The object fill is bright yellow; the background has no pixel with R, G > 200 and B < 100.
    yellow = ((frames[..., 0] > 200) & (frames[..., 1] > 180) & (frames[..., 2] < 100)).sum(axis=(1, 2))
    truth = np.zeros(plan.num_frames, bool)
    for start, end, _ in plan.actions:
        truth[start:end] = True
    np.testing.assert_array_equal(yellow > 20, truth)


def positions_from_frames(frames):
    """Object position (x, y) on the torus from object-only renders: circular mean of the fill mask."""
    mask = frames[..., 0] > 128  # [N, H, W]
    size = frames.shape[1]
    ang = 2 * np.pi * (np.arange(size) + 0.5) / size
    xs = np.angle((mask * np.exp(1j * ang)[None, None, :]).sum(axis=(1, 2)))
    ys = np.angle((mask * np.exp(1j * ang)[None, :, None]).sum(axis=(1, 2)))
    return np.mod(np.stack([xs, ys], -1) * size / (2 * np.pi) - 0.5, size), mask.sum(axis=(1, 2))


def nearest_centroid_accuracy(train_x, train_y, test_x, test_y, k):
    centroids = np.stack([train_x[train_y == c].mean(0) for c in range(k)])
    pred = np.argmin(((test_x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    return (pred == test_y).mean()


def test_classes_need_motion_not_appearance():
    """From one frame the class is at chance; from a few frames it is not.

    By construction every object's position is uniform on the (toroidal) frame at any time,
    whatever its class, and all objects look the same. Empirically: nearest-centroid on
    single-frame statistics (position embedding + object area) is at chance, while on the
    displacement between frames (axis orientation + turning) it is nearly perfect.
    """
    cfg = synthetic.SyntheticConfig()
    rng = np.random.default_rng(0)
    k, per_class, fps, gap = len(synthetic.CLASSES), 150, 12, 2
    single, motion, labels = [], [], []
    for label in range(k):
        for _ in range(per_class):
            track = synthetic.action_track(label, 40, fps, cfg.size, cfg, rng)
            t = int(rng.integers(0, 40 - 2 * gap))
            pos = track[[t, t + gap, t + 2 * gap]][:, None]  # [3, 1, 2]
            frames = synthetic.render_objects(np.zeros((3, cfg.size, cfg.size, 3), np.float32), pos, cfg.object_radius)
            xy, area = positions_from_frames(frames)
            a = 2 * np.pi * xy[0] / cfg.size
            single.append([np.cos(a[0]), np.sin(a[0]), np.cos(a[1]), np.sin(a[1]), area[0] / 100])
            d1 = np.mod(xy[1] - xy[0] + cfg.size / 2, cfg.size) - cfg.size / 2
            d2 = np.mod(xy[2] - xy[1] + cfg.size / 2, cfg.size) - cfg.size / 2
            theta = np.arctan2(d1[1], d1[0])
            turn = (d1[0] * d2[1] - d1[1] * d2[0]) / (np.linalg.norm(d1) * np.linalg.norm(d2) + 1e-9)
            motion.append([np.cos(2 * theta), np.sin(2 * theta), 2 * abs(turn)])
            labels.append(label)
    single, motion, labels = np.array(single), np.array(motion), np.array(labels)
    order = rng.permutation(len(labels))
    tr, te = order[: len(order) // 2], order[len(order) // 2:]
    acc_single = nearest_centroid_accuracy(single[tr], labels[tr], single[te], labels[te], k)
    acc_motion = nearest_centroid_accuracy(motion[tr], labels[tr], motion[te], labels[te], k)
    print(f"nearest centroid: single frame {acc_single:.3f}, three frames {acc_motion:.3f}")
    assert acc_single < 0.3  # chance is 0.2
    assert acc_motion > 0.8
    # The object looks the same in every class: same area (up to antialiasing), same colours.
    areas = single[:, 4] * 100
    assert areas.max() - areas.min() <= 8


def test_default_dataset_cached_atomically(tmp_path, monkeypatch):
    overrides = dict(num_train=1, num_val=1, video_seconds=(3.0, 3.0))
    ann, vids = synthetic.default_dataset(tmp_path, workers=1, **overrides)
    assert ann.parent.name.startswith(f"synthetic-{synthetic.VERSION}-") and ann.parent == vids.parent
    assert len(list(vids.glob("*.mp4"))) == 2
    assert json.loads(ann.read_text())["version"] == "tadjax-synthetic-1"
    mtime = os.stat(ann).st_mtime_ns

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(synthetic, "generate", boom)
    # Cached: no generation happens.
    assert synthetic.default_dataset(tmp_path, workers=1, **overrides) == (ann, vids)
    assert os.stat(ann).st_mtime_ns == mtime
    # Other parameters: another folder; a crash leaves nothing behind.
    with pytest.raises(RuntimeError, match="interrupted"):
        synthetic.default_dataset(tmp_path, workers=1, num_train=2, num_val=1, video_seconds=(3.0, 3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == [ann.parent.name]
    monkeypatch.setenv("TADJAX_CACHE", str(tmp_path))
    assert synthetic.default_dataset(workers=1, **overrides) == (ann, vids)
