"""Bad input and the message it gets: one test per row of the README table of that name.

Each test breaks one thing in a tiny synthetic dataset (3 real mp4 videos of 32-px frames) or in
the config, runs the code path a training run takes (`loader.build_or_load`, the train iterator,
the checkpoint restore, the command's flag parsing, the mesh) and checks the message names the
file, the video and the field or key.
"""
import json
import logging
import os
import re
import shutil

import numpy as np
import pytest

from conftest import REPO
from tadjax.data import loader
from tadjax.data import video as video_lib


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """annotations.json and videos/ with 2 training and 1 validation video."""
    from tadjax.data import synthetic
    root = tmp_path_factory.mktemp("bad_input_src")
    synthetic.generate(root, seed=5, num_train=2, num_val=1, size=32, video_seconds=(4.0, 5.0),
                       action_seconds=(1.0, 2.0), gap_seconds=(0.5, 1.0))
    return root


@pytest.fixture
def copy(small_set, tmp_path):
    """A private copy: (annotation dict, write(ann) -> path, videos dir, data config maker)."""
    videos = tmp_path / "videos"
    shutil.copytree(small_set / "videos", videos)
    with open(small_set / "annotations.json") as f:
        ann = json.load(f)
    path = tmp_path / "annotations.json"

    def write(data):
        path.write_text(json.dumps(data))
        return str(path)

    def data_config(**overrides):
        c = loader.default_data_config()
        c.update(dict(annotations=str(path), videos=str(videos), tfds_dir=str(tmp_path / "tfds"),
                      name="bad", window=64, snippet_stride=2, img_size=32,
                      train_short_side=36, eval_short_side=32, batch_size=1))
        c.update(overrides)
        return c

    write(ann)
    return ann, write, videos, data_config


def _first(ann, subset="training"):
    return sorted(v for v, e in ann["database"].items() if e["subset"] == subset)[0]


def test_corrupt_mp4(copy):
    ann, write, videos, data_config = copy
    vid = _first(ann)
    mp4 = videos / f"{vid}.mp4"
    mp4.write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 3])  # a download cut off
    with pytest.raises(video_lib.VideoError) as e:
        loader.build_or_load(data_config())
    msg = str(e.value)
    assert msg.startswith(f"video {vid}: {mp4}: cannot open (")
    assert "subset 'training'" in msg and "skip_bad_videos=True" in msg


def test_corrupt_mp4_skipped_with_a_warning(copy, caplog):
    ann, write, videos, data_config = copy
    vid = _first(ann)
    (videos / f"{vid}.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200)
    with caplog.at_level(logging.WARNING):
        sources = loader.build_or_load(data_config(skip_bad_videos=True))
    assert [r["video_id"] for r in sources["training"].records] == [
        v for v in sorted(ann["database"]) if v != vid and ann["database"][v]["subset"] == "training"]
    assert any(f"skipping video {vid!r} (subset 'training')" in r.getMessage() for r in caplog.records)


def test_missing_video(copy):
    ann, write, videos, data_config = copy
    vid = _first(ann)
    os.remove(videos / f"{vid}.mp4")
    with pytest.raises(video_lib.VideoError) as e:
        loader.build_or_load(data_config())
    msg = str(e.value)
    assert msg.startswith(f"video {vid}: no file in {videos}; tried {vid}.mp4, ")
    assert "skip_bad_videos=True" in msg


def test_video_shorter_than_its_annotations(copy):
    ann, write, videos, data_config = copy
    vid = _first(ann)
    entry = ann["database"][vid]
    real = entry["duration"]
    entry["duration"] = real + 10.0
    entry.pop("frame", None)
    entry["annotations"].append({"label": entry["annotations"][0]["label"],
                                 "segment": [real + 2.0, real + 6.0]})
    write(ann)
    with pytest.raises(video_lib.VideoError) as e:
        loader.build_or_load(data_config())
    msg = str(e.value)
    assert msg.startswith(f"video {vid}: file {videos / (vid + '.mp4')} lasts {real:.2f} s")
    assert f"its annotation says duration {real + 10:.2f} s, with segments up to {real + 6:.2f} s" in msg
    assert "shorter than its annotations" in msg and "skip_bad_videos=True" in msg


def test_json_missing_field(copy):
    ann, write, videos, data_config = copy
    vid = _first(ann)
    del ann["database"][vid]["duration"]
    path = write(ann)
    with pytest.raises(ValueError, match=re.escape(f"{path}: video {vid!r}: missing field 'duration'")):
        loader.build_or_load(data_config())
    ann["database"][vid]["duration"] = 5.0
    del ann["database"][vid]["annotations"][0]["segment"]
    write(ann)
    with pytest.raises(ValueError, match=re.escape(
            f"{path}: video {vid!r}, annotation 0: missing field 'segment'")):
        loader.build_or_load(data_config())


def test_unknown_subset(copy):
    ann, write, videos, data_config = copy
    cfg = data_config(train_subset="train")
    sources = loader.build_or_load(cfg)
    with pytest.raises(KeyError) as e:
        loader.train_iterator(cfg, sources)
    assert str(e.value).startswith(
        "no split 'train' (check config.data.train_subset / eval_subset, subset names of the "
        "annotation file); ")
    assert str(e.value).endswith("has 'training' (2 videos), 'validation' (1 videos)")


def test_start_not_before_end(copy):
    ann, write, videos, data_config = copy
    vid = _first(ann)
    ann["database"][vid]["annotations"][0]["segment"] = [3.0, 3.0]
    path = write(ann)
    with pytest.raises(ValueError, match=re.escape(
            f"{path}: video {vid!r}, annotation 0: segment start 3.0 >= end 3.0")):
        loader.build_or_load(data_config())


def test_segment_beyond_the_duration_is_kept_with_a_warning(copy, caplog):
    ann, write, videos, data_config = copy
    vid = _first(ann)
    entry = ann["database"][vid]
    d = entry["duration"]
    entry["annotations"][0]["segment"] = [d - 0.5, d + 0.2]
    path = write(ann)
    with caplog.at_level(logging.WARNING):
        sources = loader.build_or_load(data_config())
    expected = (f"{path}: video {vid!r}, annotation 0: segment [{d - 0.5}, {d + 0.2}] reaches "
                f"outside [0, duration {d}] (kept)")
    assert expected in [r.getMessage() for r in caplog.records]
    record = next(r for r in sources["training"].records if r["video_id"] == vid)
    assert record["segments"].max() == pytest.approx(d + 0.2)


def test_unknown_label(copy):
    ann, write, videos, data_config = copy
    vid = _first(ann)
    path = write(ann)
    label = ann["database"][vid]["annotations"][0]["label"]
    others = sorted({a["label"] for e in ann["database"].values() for a in e["annotations"]} - {label})
    with pytest.raises(ValueError, match=re.escape(
            f"{path}: video {vid!r}, annotation 0: label {label!r} is not in the class list")):
        loader.build_or_load(data_config(classes=others))


def test_empty_evaluation_subset(copy):
    from tadjax.train import trainer
    ann, write, videos, data_config = copy
    for entry in ann["database"].values():
        if entry["subset"] == "validation":
            entry["annotations"] = []
    path = write(ann)
    cfg = data_config()
    sources = loader.build_or_load(cfg)
    with pytest.raises(ValueError, match=re.escape(
            f"config.data.eval_subset='validation' of {path}: 1 videos with 0 ground-truth "
            "segments, so evaluation (mAP) is impossible")):
        trainer.check_eval_subset(cfg, sources)


def test_checkpoint_from_another_architecture(tmp_path):
    import jax.numpy as jnp
    from tadjax.train import checkpoint as ckpt_lib
    def state(depth, width):
        params = {"backbone": {f"blocks_{i}": {"mlp": {"kernel": jnp.ones((width, 2 * width))}}
                               for i in range(depth)}}
        return {"step": jnp.zeros((), jnp.int32), "params": params}
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    ckpt.save(5, state(depth=2, width=4))
    ckpt.wait()
    restored = ckpt.restore(5, ckpt_lib.abstract_like(state(depth=2, width=4)))
    assert restored["params"]["backbone"]["blocks_1"]["mlp"]["kernel"].shape == (4, 8)
    with pytest.raises(ValueError) as e:
        ckpt.restore(5, ckpt_lib.abstract_like(state(depth=3, width=8)))
    ckpt.close()
    assert str(e.value) == (
        f"checkpoint {tmp_path / 'checkpoints' / '5'} does not fit this config (written by "
        "another architecture or config?): 1 arrays missing from the checkpoint, e.g. "
        "['params/backbone/blocks_2/mlp/kernel']; 2 arrays with another shape, e.g. "
        "params/backbone/blocks_0/mlp/kernel (4, 8) in the checkpoint, (8, 16) expected; "
        "params/backbone/blocks_1/mlp/kernel (4, 8) in the checkpoint, (8, 16) expected. Train "
        "in a fresh --workdir, or use the config the checkpoint was written with (saved beside "
        "it as config/).")


@pytest.mark.parametrize("flag, message", [
    ("--config.train.epoch=3", "--config.train.epoch: the config has no field 'epoch'. "
                               'Did you mean "epochs" instead of "epoch"?'),
    ("--config.trian.epochs=3", "--config.trian.epochs: the config has no field 'trian'. "
                                'Did you mean "train" instead of "trian"?'),
])
def test_config_key_typo(flag, message, capsys, monkeypatch):
    from tadjax import main
    argv = ["tadjax.main", f"--config={REPO / 'configs' / 'demo.py'}", flag]
    monkeypatch.setattr("sys.argv", argv)  # config_flags finds the overrides in sys.argv
    try:
        with pytest.raises(SystemExit) as e:
            main.parse_flags(argv)
    finally:
        main.FLAGS.unparse_flags()
    assert e.value.code == 1
    assert capsys.readouterr().err == f"FATAL Flags parsing error: {message}\n"


def test_mesh_that_does_not_divide_the_device_count():
    from tadjax.train import sharding
    with pytest.raises(ValueError, match=re.escape(
            "config.mesh.axes [('data', -1), ('fsdp', 3)]: 8 devices are not a multiple of the "
            "fixed axes' product 3")):
        sharding.mesh_shape((("data", -1), ("fsdp", 3)), 8)
    with pytest.raises(ValueError, match=re.escape(
            "config.mesh.axes [('data', 4)] give a mesh of 4 devices, but 8 are available")):
        sharding.mesh_shape((("data", 4),), 8)
