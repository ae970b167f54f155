import json

import pytest

from tadjax.data import doctor, synthetic


@pytest.fixture()
def broken_set(tmp_path):
    """A tiny synthetic set with one video deleted, one truncated, one JSON duration and fps wrong,
    and the validation subset stripped of ground truth."""
    ann_path = synthetic.generate(tmp_path, seed=1, num_train=4, num_val=1, video_seconds=(4.0, 6.0),
                                  action_seconds=(0.6, 2.0), gap_seconds=(0.5, 1.0))
    data = json.loads(ann_path.read_text())
    db = data["database"]
    (tmp_path / "videos" / "syn_train_0000.mp4").unlink()
    corrupt = tmp_path / "videos" / "syn_train_0001.mp4"
    corrupt.write_bytes(corrupt.read_bytes()[:2000])
    db["syn_train_0002"]["duration"] += 3.0
    db["syn_train_0003"]["fps"] *= 2
    db["syn_val_0000"]["annotations"] = []
    ann_path.write_text(json.dumps(data))
    return ann_path, tmp_path / "videos", data


def test_doctor_finds_every_problem(broken_set):
    ann_path, video_dir, data = broken_set
    r = doctor.diagnose(ann_path, video_dir)
    assert not r["ok"]
    assert [m["video_id"] for m in r["missing"]] == ["syn_train_0000"]
    assert "tried syn_train_0000.mp4" in r["missing"][0]["error"]
    assert [m["video_id"] for m in r["unreadable"]] == ["syn_train_0001"]
    assert "syn_train_0001.mp4" in r["unreadable"][0]["error"]
    assert [m["video_id"] for m in r["duration_mismatch"]] == ["syn_train_0002"]
    assert r["duration_mismatch"][0]["json_duration"] - r["duration_mismatch"][0]["video_duration"] == pytest.approx(3.0)
    assert [m["video_id"] for m in r["fps_mismatch"]] == ["syn_train_0003"]
    assert r["subsets"]["validation"] == {"videos": 1, "instances": 0}
    assert r["subsets"]["training"]["videos"] == 4
    assert r["subsets_without_ground_truth"] == ["validation"]
    n = sum(len(v["annotations"]) for v in data["database"].values())
    assert r["action_seconds"]["count"] == n == r["subsets"]["training"]["instances"]
    assert 0.6 - 1e-9 <= r["action_seconds"]["min"] and r["action_seconds"]["max"] <= 2.0 + 0.1
    # Snippets: seconds * fps / stride, using the file's fps when it is readable, else the JSON's.
    expected = []
    for vid, v in sorted(data["database"].items()):
        fps = v["fps"] / 2 if vid == "syn_train_0003" else v["fps"]
        expected += [(e - s) * fps / 4 for s, e in (a["segment"] for a in v["annotations"])]
    assert r["action_snippets"]["max"] == pytest.approx(max(expected))
    r2 = doctor.diagnose(ann_path, video_dir, snippet_stride=2)
    assert r2["action_snippets"]["max"] == pytest.approx(2 * r["action_snippets"]["max"])


def test_doctor_cli(broken_set, capsys):
    ann_path, video_dir, _ = broken_set
    assert doctor.main(["--annotations", str(ann_path), "--videos", str(video_dir), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["subsets_without_ground_truth"] == ["validation"]
    assert doctor.main(["--annotations", str(ann_path), "--videos", str(video_dir), "--subset", "validation"]) == 0
    text = capsys.readouterr().out
    assert "subset 'validation': 1 videos, 0 instances" in text and "has no ground truth" in text and "OK" in text


def test_suggest_hand_case():
    s = doctor.suggest({"count": 10, "p95": 100.0, "p99": 150.0}, {"count": 5, "p50": 1000.0})
    # levels: ceil(log2 100) - 1 = 6; window: max(64, 200, 200) -> 224 (multiple of 32).
    assert s["num_levels"] == 6 and s["window_size"] == 224
    assert s["regression_ranges"] == [[0, 4], [4, 8], [8, 16], [16, 32], [32, 64], [64, 10000]]
    assert s["mode"] == "sliding windows"
    small = doctor.suggest({"count": 3, "p95": 6.0, "p99": 7.0}, {"count": 2, "p50": 50.0})
    assert small["num_levels"] == 2 and small["window_size"] == 64 and small["mode"].startswith("resize")
    assert small["regression_ranges"] == [[0, 4], [4, 10000]]
