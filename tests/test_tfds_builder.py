"""The activitynet_style TFDS builder: build from a tiny synthetic set, read back without TF."""
import json
import logging
import os
import shutil
import sys

import numpy as np
import pytest

from tadjax.data import annotations as annotations_lib
from tadjax.data import synthetic
from tadjax.data import tfds_builder
from tadjax.data import video as video_lib


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_synthetic")
    ann_path = synthetic.generate(root, seed=3, num_train=3, num_val=2, size=32, video_seconds=(4.0, 6.0),
                                  action_seconds=(0.5, 1.5), gap_seconds=(0.3, 1.0))
    return ann_path, root / "videos"


@pytest.fixture(scope="module")
def built(tiny_set, tmp_path_factory):
    ann_path, video_dir = tiny_set
    config = tfds_builder.make_config("tiny", annotations=ann_path, videos=video_dir)
    builder = tfds_builder.prepare(config, tmp_path_factory.mktemp("tfds"))
    return builder, ann_path, video_dir


def _copy_set(tiny_set, tmp_path):
    ann_path, video_dir = tiny_set
    shutil.copytree(video_dir, tmp_path / "videos")
    shutil.copy(ann_path, tmp_path / "annotations.json")
    return tmp_path / "annotations.json", tmp_path / "videos"


def test_round_trip_without_tensorflow(built):
    builder, ann_path, video_dir = built
    expected = annotations_lib.load_annotations(ann_path)
    assert sorted(builder.info.splits.keys()) == ["training", "validation"]
    assert builder.info.metadata["classes"] == list(synthetic.CLASSES)
    total = 0
    for split in ("training", "validation"):
        source = builder.as_data_source(split)
        records = tfds_builder.video_records(builder, split)
        ids = sorted(v for v, a in expected.videos.items() if a.subset == split)
        assert len(source) == len(records) == len(ids)
        for i, video_id in enumerate(ids):  # fixed order: sorted by video id
            ann = expected.videos[video_id]
            ex = tfds_builder.decode_example(source[i])
            for got in (ex, records[i]):
                assert got["video_id"] == video_id
                assert got["subset"] == split
                np.testing.assert_array_equal(got["segments"], ann.segments)
                assert got["segments"].dtype == np.float64
                np.testing.assert_array_equal(got["labels"], ann.labels)
                assert got["duration"] == ann.duration
                assert got["annotation_fps"] == ann.fps
                assert got["annotation_num_frames"] == ann.num_frames
            path = video_dir / f"{video_id}.mp4"
            assert ex["video"] == path.read_bytes()
            info = video_lib.video_info(path)
            assert (ex["num_frames"], ex["fps"], ex["height"], ex["width"]) == (
                info.num_frames, info.fps, info.height, info.width)
            assert ex["num_frames"] == ann.num_frames  # the generator's frame count
            total += len(ann.labels)
    assert total > 0
    assert "tensorflow" not in sys.modules


def test_reuses_a_built_dataset(built, monkeypatch):
    builder, ann_path, video_dir = built

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt a dataset that was already built")

    monkeypatch.setattr(tfds_builder.ActivityNetStyle, "_split_generators", fail)
    again = tfds_builder.prepare(builder.builder_config, builder.data_dir_root)
    assert again.data_dir == builder.data_dir
    assert len(again.as_data_source("validation")) == len(builder.as_data_source("validation"))


def test_settings_change_the_config_name(tiny_set):
    ann_path, video_dir = tiny_set
    a = tfds_builder.make_config("tiny", annotations=ann_path, videos=video_dir)
    b = tfds_builder.make_config("tiny", annotations=ann_path, videos=video_dir)
    c = tfds_builder.make_config("tiny", annotations=ann_path, videos=video_dir, class_agnostic=True)
    d = tfds_builder.make_config("tiny", annotations=ann_path, videos=video_dir, store_video="path")
    assert a.name == b.name
    assert len({a.name, c.name, d.name}) == 3
    assert a.name.startswith("tiny_")


def test_crash_mid_build_leaves_nothing_complete(tiny_set, tmp_path, monkeypatch):
    ann_path, video_dir = tiny_set
    config = tfds_builder.make_config("crash", annotations=ann_path, videos=video_dir)
    real_probe = video_lib.probe_video
    calls = []

    def probe_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real_probe(*args, **kwargs)

    monkeypatch.setattr(video_lib, "probe_video", probe_then_die)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tfds_builder.prepare(config, tmp_path)
    builder = tfds_builder.ActivityNetStyle(config=config, data_dir=str(tmp_path))
    assert not tfds_builder.is_prepared(builder)
    assert not builder.data_path.exists()
    monkeypatch.setattr(video_lib, "probe_video", real_probe)
    builder = tfds_builder.prepare(config, tmp_path)
    assert len(builder.as_data_source("training")) == 3


def test_missing_video_is_an_error_or_skipped(tiny_set, tmp_path, caplog):
    ann_path, video_dir = _copy_set(tiny_set, tmp_path)
    victim = sorted(json.loads(ann_path.read_text())["database"])[1]
    (video_dir / f"{victim}.mp4").unlink()
    config = tfds_builder.make_config("missing", annotations=ann_path, videos=video_dir)
    with pytest.raises(video_lib.VideoError, match=victim) as err:
        tfds_builder.prepare(config, tmp_path / "tfds")
    assert f"{victim}.mp4" in str(err.value)

    config = tfds_builder.make_config("missing", annotations=ann_path, videos=video_dir, skip_bad_videos=True)
    with caplog.at_level(logging.WARNING, logger=tfds_builder.__name__):
        builder = tfds_builder.prepare(config, tmp_path / "tfds")
    assert any(victim in r.getMessage() for r in caplog.records)
    ids = [r["video_id"] for r in tfds_builder.video_records(builder, "training")]
    assert victim not in ids and len(ids) == 2
    source = builder.as_data_source("training")
    assert [tfds_builder.decode_example(source[i])["video_id"] for i in range(2)] == ids
    assert [s["video_id"] for s in builder.info.metadata["skipped"]["training"]] == [victim]


def test_corrupt_video_names_the_file(tiny_set, tmp_path):
    ann_path, video_dir = _copy_set(tiny_set, tmp_path)
    victim = sorted(json.loads(ann_path.read_text())["database"])[-1]
    path = video_dir / f"{victim}.mp4"
    path.write_bytes(path.read_bytes()[:300])  # truncated
    config = tfds_builder.make_config("corrupt", annotations=ann_path, videos=video_dir)
    with pytest.raises(video_lib.VideoError, match=victim):
        tfds_builder.prepare(config, tmp_path / "tfds")


def test_path_mode_stores_paths(tiny_set, tmp_path):
    ann_path, video_dir = tiny_set
    config = tfds_builder.make_config("paths", annotations=ann_path, videos=video_dir, store_video="path")
    builder = tfds_builder.prepare(config, tmp_path)
    ex = tfds_builder.decode_example(builder.as_data_source("validation")[0])
    assert ex["video"] == b""
    assert ex["video_path"] == os.path.abspath(video_dir / f"{ex['video_id']}.mp4")


def test_bad_settings_are_rejected(tiny_set, tmp_path):
    ann_path, video_dir = tiny_set
    with pytest.raises(ValueError, match="store_video"):
        tfds_builder.make_config("x", annotations=ann_path, videos=video_dir, store_video="both")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        tfds_builder.make_config("x", annotations=ann_path, videos=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="dataset name"):
        tfds_builder.make_config("a/b", annotations=ann_path, videos=video_dir)
