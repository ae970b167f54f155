import json
import pathlib

import numpy as np
import pytest

from tadjax.data import annotations as A

THIRD_PARTY = pathlib.Path(__file__).resolve().parents[1] / "third_party"


def write(tmp_path, data, name="anno.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def video(subset, duration, anns, **extra):
    return {"subset": subset, "duration": duration,
            "annotations": [{"label": l, "segment": list(s)} for l, s in anns], **extra}


# --- real THUMOS14 file -----------------------------------------------------------------------

def test_thumos14_test_subset_counts(thumos_json):
    gt = A.load_annotations(thumos_json, "Test")
    assert len(gt.videos) == 212
    assert gt.num_segments == 3358
    assert gt.thumos_conventions
    # Nothing to clean in this file; only the 26 segments past the video end are counted.
    assert gt.stats == {"ambiguous_removed": 0, "diving_added": 0, "invalid_dropped": 0,
                        "unknown_label_dropped": 0, "outside_duration": 26,
                        "duplicates_removed": 0, "blocked_removed": 0}
    assert sum("video_test_0000270" in s for s in gt.issues) == 22
    assert list(gt.videos) == sorted(gt.videos)
    v = gt.videos["video_test_0000004"]
    assert v.fps == 30.0 and v.num_frames is None and v.duration == 33.83
    assert v.segments[0].tolist() == [0.2, 1.1]
    assert gt.classes[v.labels[0]] == "CricketBowling"
    assert v.segments.dtype == np.float64 and v.labels.dtype == np.int32


def test_thumos14_validation_and_subset_method(thumos_json):
    full = A.load_annotations(thumos_json)
    assert full.subsets == {"Test": 212, "Validation": 200}
    assert full.num_segments == 6365
    val = full.subset("Validation")
    assert len(val.videos) == 200 and val.num_segments == 3007
    assert full.subset(["test"]).num_segments == 3358  # unique case-insensitive match
    with pytest.raises(ValueError, match=r"unknown subset 'training'.*'Test' \(212 videos\)"):
        full.subset("training")


def test_thumos14_classes_match_third_party(thumos_json):
    derived = A.load_annotations(thumos_json).classes
    assert derived == A.load_class_list(THIRD_PARTY / "thumos14" / "classes.txt")
    assert derived == list(A.THUMOS14_CLASSES)
    with open(thumos_json) as f:
        db = json.load(f)["database"]
    pairs = {(a["label_id"], a["label"]) for v in db.values() for a in v["annotations"]}
    assert sorted(pairs) == list(enumerate(derived))


def test_thumos14_opentad_block_list(thumos_json):
    gt = A.load_annotations(thumos_json, "Test",
                            blocked=THIRD_PARTY / "thumos14" / "opentad_removed_videos.txt")
    assert len(gt.videos) == 211 and gt.num_segments == 3358 - 29
    assert gt.excluded == ("video_test_0000270",)
    assert gt.stats["blocked_removed"] == 1


# --- dialects -----------------------------------------------------------------------------------

def test_official_activitynet_dialect(tmp_path):
    data = {"version": "VERSION 1.3", "taxonomy": [{"nodeName": "Root"}],
            "database": {
                "vid_b": video("validation", 20.0, [("Shaving", (1, 5))],
                               url="https://x", resolution="640x360"),
                "vid_a": video("training", 10.0, [("Archery", (0.5, 2.5)), ("Shaving", (3, 4))]),
                "vid_c": video("testing", 30.0, []),
            }}
    gt = A.load_annotations(write(tmp_path, data))
    assert gt.classes == ["Archery", "Shaving"]  # sorted names (no label_id)
    assert list(gt.videos) == ["vid_a", "vid_b", "vid_c"]
    a = gt.videos["vid_a"]
    assert a.fps is None and a.num_frames is None and a.subset == "training"
    assert a.segments.tolist() == [[0.5, 2.5], [3.0, 4.0]] and a.labels.tolist() == [0, 1]
    assert gt.videos["vid_c"].segments.shape == (0, 2)
    assert not gt.thumos_conventions
    # Class indices do not depend on the subset chosen.
    assert A.load_annotations(write(tmp_path, data), "validation").classes == gt.classes


def test_actionformer_dialect_orders_classes_by_label_id(tmp_path):
    db = {"v1": {"subset": "Test", "duration": 10.0, "fps": 25.0, "annotations": [
        {"label": "Zeta", "label_id": 0, "segment": [1.0, 2.0], "segment(frames)": [25, 50]},
        {"label": "Alpha", "label_id": 1, "segment": [3.0, 4.0], "segment(frames)": [75, 100]}]}}
    gt = A.load_annotations(write(tmp_path, {"database": db}), "Test")
    assert gt.classes == ["Zeta", "Alpha"]
    assert gt.videos["v1"].labels.tolist() == [0, 1]
    assert gt.videos["v1"].fps == 25.0
    db["v1"]["annotations"][1]["label_id"] = 0
    with pytest.raises(ValueError, match="label_id"):
        A.load_annotations(write(tmp_path, {"database": db}))


def test_opentad_dialect_fps_from_frame(tmp_path):
    db = {"video_validation_1": video("training", 20.0, [("Billiards", (1, 3))], frame=600)}
    v = A.load_annotations(write(tmp_path, {"database": db})).videos["video_validation_1"]
    assert v.num_frames == 600 and v.fps == 30.0


# --- class maps -----------------------------------------------------------------------------------

def test_class_map_from_list_and_files(tmp_path):
    db = {"v": video("val", 10.0, [("b", (1, 2)), ("a", (3, 4))])}
    path = write(tmp_path, {"database": db})
    assert A.load_annotations(path, classes=["b", "a", "c"]).videos["v"].labels.tolist() == [0, 1]
    txt = tmp_path / "classes.txt"
    txt.write_text("# comment\nc\n\nb\na\n")
    gt = A.load_annotations(path, classes=txt)
    assert gt.classes == ["c", "b", "a"] and gt.videos["v"].labels.tolist() == [1, 2]
    indexed = tmp_path / "Class Index_Detection.txt"
    indexed.write_text("7 a\n9 b\n")
    assert A.load_class_list(indexed) == ["a", "b"]
    js = tmp_path / "classes.json"
    js.write_text(json.dumps({"b": 1, "a": 0}))
    assert A.load_class_list(js) == ["a", "b"]
    txt.write_text("a\nb\na\n")
    with pytest.raises(ValueError, match="listed twice"):
        A.load_class_list(txt)


def test_class_agnostic(tmp_path):
    db = {"v": video("val", 10.0, [("b", (1, 2)), ("a", (1, 2)), ("a", (1, 2))])}
    gt = A.load_annotations(write(tmp_path, {"database": db}), class_agnostic=True)
    assert gt.classes == ["action"]
    # Duplicates are judged on the original labels: the a/b pair stays.
    assert gt.videos["v"].labels.tolist() == [0, 0] and gt.stats["duplicates_removed"] == 1


# --- clean-up rules ------------------------------------------------------------------------------

def test_duplicates_removed_within_tolerance(tmp_path):
    db = {"v": video("val", 20.0, [("a", (1.0, 5.0)), ("a", (1.0005, 4.9995)),  # duplicate
                                   ("b", (1.0, 5.0)),                          # other label
                                   ("a", (1.0, 5.002)),                        # > 1e-3 apart
                                   ("a", (1.0, 5.0))])}                        # duplicate
    gt = A.load_annotations(write(tmp_path, {"database": db}))
    v = gt.videos["v"]
    assert v.segments.tolist() == [[1.0, 5.0], [1.0, 5.0], [1.0, 5.002]]
    assert [gt.classes[i] for i in v.labels] == ["a", "b", "a"]
    assert gt.stats["duplicates_removed"] == 2


def test_thumos_conventions(tmp_path):
    db = {"video_test_1": video("Test", 50.0, [
        ("CliffDiving", (1, 4)), ("Diving", (1, 4)),   # copy present
        ("CliffDiving", (10, 12)),                     # copy missing -> added
        ("Ambiguous", (20, 22)), ("Billiards", (30, 31))])}
    path = write(tmp_path, {"database": db})
    gt = A.load_annotations(path)
    assert gt.thumos_conventions and "Ambiguous" not in gt.classes
    v = gt.videos["video_test_1"]
    names = [(gt.classes[l], s.tolist()) for l, s in zip(v.labels, v.segments)]
    assert names == [("CliffDiving", [1.0, 4.0]), ("Diving", [1.0, 4.0]),
                     ("CliffDiving", [10.0, 12.0]), ("Billiards", [30.0, 31.0]),
                     ("Diving", [10.0, 12.0])]
    assert gt.stats["ambiguous_removed"] == 1 and gt.stats["diving_added"] == 1
    off = A.load_annotations(path, thumos_conventions=False)
    assert "Ambiguous" in off.classes and off.num_segments == 5


def test_invalid_segment_and_unknown_label_raise_or_warn(tmp_path):
    db = {"vid_ok": video("val", 10.0, [("a", (1, 2))]),
          "vid_bad": video("val", 10.0, [("a", (1, 2)), ("a", (3, 3)), ("zz", (4, 5))])}
    path = write(tmp_path, {"database": db})
    with pytest.raises(ValueError, match=r"anno.json: video 'vid_bad', annotation 1: segment "
                                         r"start 3.0 >= end 3.0"):
        A.load_annotations(path)
    unknown = write(tmp_path, {"database": {"vid_bad": video("val", 10.0, [("zz", (4, 5))])}},
                    "unknown.json")
    with pytest.raises(ValueError, match=r"video 'vid_bad', annotation 0: label 'zz' is not"):
        A.load_annotations(unknown, classes=["a"])
    gt = A.load_annotations(path, classes=["a"], on_error="warn")
    assert gt.videos["vid_bad"].segments.tolist() == [[1.0, 2.0]]
    assert gt.stats["invalid_dropped"] == 1 and gt.stats["unknown_label_dropped"] == 1
    assert len(gt.issues) == 2 and "annotation 1" in gt.issues[0]


def test_segment_outside_duration_is_counted_and_kept(tmp_path):
    db = {"v": video("val", 10.0, [("a", (-0.5, 2)), ("a", (8, 10.5)), ("a", (3, 10))])}
    gt = A.load_annotations(write(tmp_path, {"database": db}))
    assert gt.videos["v"].segments.tolist() == [[-0.5, 2.0], [8.0, 10.5], [3.0, 10.0]]
    assert gt.stats["outside_duration"] == 2
    assert "video 'v', annotation 1" in gt.issues[1]


@pytest.mark.parametrize("entry, message", [
    ({"duration": 5.0, "annotations": []}, "video 'v': missing field 'subset'"),
    ({"subset": "s", "annotations": []}, "video 'v': missing field 'duration'"),
    ({"subset": "s", "duration": "long", "annotations": []}, "field 'duration' must be a number"),
    ({"subset": "s", "duration": 5.0, "annotations": [{"segment": [0, 1]}]},
     "video 'v', annotation 0: missing field 'label'"),
    ({"subset": "s", "duration": 5.0, "annotations": [{"label": "a"}]},
     "video 'v', annotation 0: missing field 'segment'"),
    ({"subset": "s", "duration": 5.0, "annotations": [{"label": "a", "segment": [1]}]},
     "annotation 0: field 'segment' must be"),
])
def test_missing_fields_name_file_video_field(tmp_path, entry, message):
    path = write(tmp_path, {"database": {"v": entry}})
    with pytest.raises(ValueError) as err:
        A.load_annotations(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_missing_database(tmp_path):
    with pytest.raises(ValueError, match="missing top-level field 'database'"):
        A.load_annotations(write(tmp_path, {"results": {}}))


def test_blocked_lists(tmp_path):
    db = {k: video("validation", 10.0, [("a", (1, 2))]) for k in ("aaa", "bbb", "ccc", "ddd")}
    path = write(tmp_path, {"database": db})
    gt = A.load_annotations(path, "validation", blocked=["bbb"])
    assert list(gt.videos) == ["aaa", "ccc", "ddd"] and gt.excluded == ("bbb",)
    missing = tmp_path / "missing_files.txt"
    missing.write_text("v_ccc.mp4\n/data/videos/v_aaa.mp4  # gone\nnot_in_file\n")
    gt = A.load_annotations(path, blocked=missing)
    assert list(gt.videos) == ["bbb", "ddd"] and gt.stats["blocked_removed"] == 2
    blocked_json = tmp_path / "blocked.json"
    blocked_json.write_text(json.dumps(["ddd"]))
    assert list(A.load_annotations(path, blocked=blocked_json).videos) == ["aaa", "bbb", "ccc"]


def test_write_then_load_round_trip(tmp_path):
    db = {"v2": video("Test", 12.5, [("b", (0.1, 2.3))], frame=300, filename="v2.mp4"),
          "v1": {"subset": "Test", "duration": 10.0, "fps": 29.97, "annotations": []}}
    gt = A.load_annotations(write(tmp_path, {"database": db}), classes=["a", "b", "c"])
    out = tmp_path / "out.json"
    A.write_annotations(out, gt)
    back = A.load_annotations(out)
    assert back.classes == ["a", "b", "c"]  # kept although "a" and "c" have no segment
    for vid in gt.videos:
        x, y = gt.videos[vid], back.videos[vid]
        assert (x.subset, x.duration, x.fps, x.num_frames, x.filename) == \
               (y.subset, y.duration, y.fps, y.num_frames, y.filename)
        np.testing.assert_array_equal(x.segments, y.segments)
        np.testing.assert_array_equal(x.labels, y.labels)
    assert back.videos["v2"].fps == 24.0 and back.videos["v2"].filename == "v2.mp4"
