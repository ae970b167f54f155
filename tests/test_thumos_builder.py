"""The THUMOS14 pipeline on tiny generated videos named as THUMOS names them, with the real
annotation file cut down to those videos: subsets, segments, class ids, OpenTAD's removed videos,
and the AdaTAD THUMOS config's loader settings."""
import json
import pathlib

import av
import numpy as np
import pytest

from conftest import REPO, load_config_file
from tadjax.data import annotations as annotations_lib
from tadjax.data import loader as loader_lib
from tadjax.data import tfds_builder

VIDEOS = {"video_validation_0000988": "Validation", "video_validation_0000989": "Validation",
          "video_test_0000004": "Test", "video_test_0000006": "Test",
          "video_test_0000270": "Test"}  # 0270: removed by OpenTAD (wrong annotations)


def frames_for(entry) -> int:
    return int(np.ceil(entry["duration"] * 2)) + 1


def write_video(path, num_frames=24, fps=30, size=(36, 48)):
    h, w = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.height, stream.width, stream.pix_fmt = h, w, "yuv420p"
        for t in range(num_frames):
            img = np.full((h, w, 3), (t * 9) % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture(scope="module")
def thumos_dir(thumos_json, tmp_path_factory):
    root = tmp_path_factory.mktemp("thumos")
    full = json.loads(pathlib.Path(thumos_json).read_text())
    small = dict(full, database={k: full["database"][k] for k in VIDEOS})
    (root / "thumos14_small.json").write_text(json.dumps(small))
    (root / "videos").mkdir()
    for vid in VIDEOS:
        # As long as the annotation says (the builder rejects files shorter than their
        # annotations), at 2 fps to stay tiny.
        write_video(root / "videos" / f"{vid}.mp4", num_frames=frames_for(full["database"][vid]),
                    fps=2)
    return root, full["database"]


def test_builder_yields_the_subsets_and_segments(thumos_dir, tmp_path):
    root, database = thumos_dir
    config = tfds_builder.make_config(
        "thumos14", annotations=str(root / "thumos14_small.json"), videos=str(root / "videos"),
        classes=str(REPO / "third_party" / "thumos14" / "classes.txt"),
        blocked=str(REPO / "third_party" / "thumos14" / "opentad_removed_videos.txt"))
    builder = tfds_builder.prepare(config, str(tmp_path / "tfds"))
    assert sorted(builder.info.splits.keys()) == ["Test", "Validation"]
    assert list(builder.info.metadata["classes"]) == list(annotations_lib.THUMOS14_CLASSES)
    seen = {}
    for split in ("Validation", "Test"):
        records = tfds_builder.video_records(builder, split)
        for r in records:
            seen[r["video_id"]] = split
            ann = database[r["video_id"]]
            expected = np.asarray([a["segment"] for a in ann["annotations"]], np.float64)
            np.testing.assert_array_equal(r["segments"], expected)
            assert r["labels"].tolist() == [a["label_id"] for a in ann["annotations"]]
            assert r["duration"] == ann["duration"] and r["annotation_fps"] == ann["fps"]
            assert (r["num_frames"], r["fps"], r["height"], r["width"]) == (frames_for(ann), 2.0, 36, 48)
            assert r["filename"] == f"{r['video_id']}.mp4"
    assert seen == {k: v for k, v in VIDEOS.items() if k != "video_test_0000270"}


def test_adatad_thumos_config_trains_on_validation_and_tests_on_test(thumos_dir, tmp_path):
    root, database = thumos_dir
    config = load_config_file(REPO / "configs" / "adatad_thumos_s.py")
    assert (config.data.train_subset, config.data.eval_subset) == ("Validation", "Test")
    assert (config.data.window, config.data.snippet_stride, config.data.test_overlap) == (768, 4, 0.5)
    config.data.annotations = str(root / "thumos14_small.json")
    config.data.videos = str(root / "videos")
    config.data.tfds_dir = str(tmp_path / "tfds")
    # Found from any working directory.
    assert config.data.blocked == str(REPO / "third_party" / "thumos14" / "opentad_removed_videos.txt")
    sources = loader_lib.build_or_load(config.data)
    train = loader_lib.get_split(sources, config.data.train_subset)
    evaluation = loader_lib.eval_videos(config.data, sources)
    assert [r["video_id"] for r in train.records] == ["video_validation_0000988", "video_validation_0000989"]
    assert [v["video_id"] for v in evaluation] == ["video_test_0000004", "video_test_0000006"]
    # At most 135 frames at stride 4: under 768 grid positions, one window; times use the
    # annotation's 30 fps, not the file's.
    assert all(v["grid_starts"] == [0] and v["fps"] == 30.0 for v in evaluation)
    np.testing.assert_allclose(loader_lib.grid_to_seconds(evaluation[0], np.array([3.0])), [0.4])
