import json
import subprocess
import sys

import numpy as np
import pytest

from tadjax import evaluation as E
from tadjax.data.annotations import AnnotationSet, VideoAnnotation, load_annotations
from tadjax.tools import bench_eval


def make_gt(videos, classes, excluded=()):
    """videos: {vid: [(start, end, label), ...]}"""
    out = {}
    for vid, anns in sorted(videos.items()):
        seg = np.array([(s, e) for s, e, _ in anns], np.float64).reshape(-1, 2)
        out[vid] = VideoAnnotation(vid, "test", 100.0, None, None, seg,
                                   np.array([l for _, _, l in anns], np.int32))
    return AnnotationSet(list(classes), out, "<memory>", excluded=tuple(excluded))


def make_preds(videos):
    """videos: {vid: [(start, end, score, label), ...]}"""
    return {vid: {"segments": np.array([(s, e) for s, e, _, _ in p], np.float64).reshape(-1, 2),
                  "scores": np.array([x[2] for x in p], np.float64),
                  "labels": np.array([x[3] for x in p], np.int64)} for vid, p in videos.items()}


# --- an independent, literal implementation of spec section 7 -----------------------------------

def ref_tiou(s, e, gs, ge):
    inter = max(0.0, min(e, ge) - max(s, gs))
    union = (ge - gs) + (e - s) - inter
    return inter / max(union, 1e-8)


def ref_ap(hits, npos):
    tp = fp = 0
    prec, rec = [], []
    for hit in hits:
        tp += hit
        fp += not hit
        prec.append(tp / (tp + fp))
        rec.append(tp / npos)
    mrec = [0.0] + rec + [1.0]
    mprec = [0.0] + prec + [0.0]
    for i in range(len(mprec) - 2, -1, -1):
        mprec[i] = max(mprec[i], mprec[i + 1])
    return sum((mrec[i] - mrec[i - 1]) * mprec[i] for i in range(1, len(mrec))
               if mrec[i] != mrec[i - 1])


def reference_map(gt, preds, tious):
    """Per class, per prediction (stable descending score, videos in sorted order), visiting the
    GT of its video and class by descending tIoU (ties: GT listed first)."""
    n_classes = len(gt.classes)
    ap = np.full((len(tious), n_classes), np.nan)
    for c in range(n_classes):
        gts = [(vid, j, s, e) for vid in sorted(gt.videos)
               for j, ((s, e), l) in enumerate(zip(gt.videos[vid].segments.tolist(),
                                                    gt.videos[vid].labels)) if l == c]
        if not gts:
            continue
        plist = [(score, vid, s, e) for vid in sorted(preds) if vid not in gt.excluded
                 for (s, e), score, l in zip(preds[vid]["segments"].tolist(),
                                             preds[vid]["scores"].tolist(), preds[vid]["labels"])
                 if l == c]
        plist.sort(key=lambda p: -p[0])  # stable
        for ti, t in enumerate(tious):
            locked, hits = set(), []
            for _, vid, s, e in plist:
                cands = sorted(((ref_tiou(s, e, gs, ge), j) for gv, j, gs, ge in gts if gv == vid),
                               key=lambda x: (-x[0], x[1]))
                hit = False
                for value, j in cands:
                    if value < t:
                        break
                    if (vid, j) in locked:
                        continue
                    locked.add((vid, j))
                    hit = True
                    break
                hits.append(hit)
            ap[ti, c] = ref_ap(hits, len(gts))
    return ap


def random_case(rng, n_videos=5, n_classes=3, max_gt=6, max_pred=25, grid=True):
    gt_videos, pred_videos = {}, {}
    for v in range(n_videos):
        anns = []
        for _ in range(rng.integers(0, max_gt + 1)):
            s = rng.integers(0, 20) * 0.5 if grid else rng.uniform(0, 10)
            length = rng.integers(1, 10) * 0.5 if grid else rng.uniform(0.2, 5)
            anns.append((s, s + length, int(rng.integers(0, n_classes))))
        if anns or rng.random() < 0.5:
            gt_videos[f"v{v}"] = anns
    for v in range(n_videos + 2):  # two videos absent from the GT
        preds = []
        for _ in range(rng.integers(0, max_pred + 1)):
            s = rng.integers(0, 20) * 0.5 if grid else rng.uniform(0, 10)
            length = rng.integers(0, 10) * 0.5 if grid else rng.uniform(0.0, 5)
            score = round(rng.random(), 1) if grid else rng.random()  # ties when on the grid
            preds.append((s, s + length, score, int(rng.integers(0, n_classes))))
        pred_videos[f"v{v}"] = preds
    return make_gt(gt_videos, [f"c{i}" for i in range(n_classes)]), make_preds(pred_videos)


# --- hand-computed cases -----------------------------------------------------------------------

def test_hand_computed_case():
    # Class 0, video v1: GT A=[0,10], B=[2,12].
    #   p3 [30,40] 0.95: no overlap -> FP.
    #   p1 [0,10]  0.90: tIoU A 1.0, B 8/12 -> takes A.
    #   pX         0.85: video 'absent' has no GT -> FP (official ActivityNet behaviour).
    #   p2 [0,9]   0.80: tIoU A 0.9 (taken), B 7/12=0.583 -> TP for t <= 0.5, FP for t >= 0.6.
    #   t <= 0.5: hits 0,1,0,1 -> AP 0.5;  t >= 0.6: hits 0,1,0,0 -> AP 0.25.
    # Class 1: one GT, no prediction -> AP 0. Class 2: predictions but no GT -> ignored (nan).
    gt = make_gt({"v1": [(0, 10, 0), (2, 12, 0)], "v2": [(5, 6, 1)]}, ["a", "b", "c"])
    preds = make_preds({"v1": [(0, 9, 0.80, 0), (0, 10, 0.90, 0), (30, 40, 0.95, 0),
                               (5, 6, 0.99, 2)],
                        "absent": [(0, 10, 0.85, 0)]})
    r = E.evaluate_detection(gt, preds, "0.3:0.7:5")
    np.testing.assert_allclose(r["ap_per_class"][:, 0], [0.5, 0.5, 0.5, 0.25, 0.25], atol=1e-12)
    np.testing.assert_array_equal(r["ap_per_class"][:, 1], 0.0)
    assert np.all(np.isnan(r["ap_per_class"][:, 2]))
    assert list(r["mAP"]) == ["0.30", "0.40", "0.50", "0.60", "0.70"]
    np.testing.assert_allclose(list(r["mAP"].values()), [0.25, 0.25, 0.25, 0.125, 0.125])
    assert r["average_mAP"] == pytest.approx(0.2, abs=1e-12)
    assert r["num_gt"] == 3 and r["num_predictions"] == 5
    np.testing.assert_allclose(reference_map(gt, preds, E.parse_thresholds("0.3:0.7:5")),
                               r["ap_per_class"], atol=1e-12)


def test_duplicate_predictions_on_one_gt():
    # Two identical predictions on GT [0,10]: the first is TP, the second FP; [20,30] found last.
    # hits 1,0,1 -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> AP = 1/2 + 1/2 * 2/3 = 5/6.
    gt = make_gt({"v": [(0, 10, 0), (20, 30, 0)]}, ["a"])
    preds = make_preds({"v": [(0, 10, 0.9, 0), (0, 10, 0.8, 0), (20, 30, 0.7, 0)]})
    r = E.evaluate_detection(gt, preds, [0.5])
    assert r["mAP"]["0.50"] == pytest.approx(5 / 6, abs=1e-12)


def test_duplicate_ground_truth_both_matchable():
    # Duplicate GT given directly (the loader would remove one): each needs its own prediction.
    gt = make_gt({"v": [(0, 10, 0), (0, 10, 0)]}, ["a"])
    one = E.evaluate_detection(gt, make_preds({"v": [(0, 10, 0.9, 0)]}), [0.5])
    two = E.evaluate_detection(gt, make_preds({"v": [(0, 10, 0.9, 0), (1, 10, 0.8, 0)]}), [0.5])
    assert one["average_mAP"] == pytest.approx(0.5) and two["average_mAP"] == pytest.approx(1.0)


def test_threshold_is_inclusive_and_blocked_videos_ignored():
    # tIoU([0,10],[0,5]) = 0.5 exactly: a TP at t = 0.5, not at 0.55.
    gt = make_gt({"v": [(0, 10, 0)]}, ["a"], excluded=["blk"])
    preds = make_preds({"v": [(0, 5, 0.5, 0)], "blk": [(0, 1, 0.9, 0)]})
    r = E.evaluate_detection(gt, preds, [0.5, 0.55])
    assert r["mAP"] == {"0.50": 1.0, "0.55": 0.0} and r["num_predictions"] == 1
    r = E.evaluate_detection(gt, preds, [0.5], ignore_videos=["v"])
    assert r["mAP"]["0.50"] == 0.0


def test_empty_ground_truth_is_an_error():
    gt = make_gt({"v": []}, ["a"])
    with pytest.raises(ValueError, match="no ground-truth segments"):
        E.evaluate_detection(gt, make_preds({"v": [(0, 1, 0.5, 0)]}), [0.5])


def test_bad_predictions_are_errors():
    gt = make_gt({"v": [(0, 10, 0)]}, ["a"])
    with pytest.raises(ValueError, match="video 'v': label index outside"):
        E.evaluate_detection(gt, make_preds({"v": [(0, 1, 0.5, 3)]}), [0.5])
    with pytest.raises(ValueError, match="video 'v': prediction 0 ends before it starts"):
        E.evaluate_detection(gt, make_preds({"v": [(2, 1, 0.5, 0)]}), [0.5])
    with pytest.raises(ValueError, match="missing field 'scores'"):
        E.evaluate_detection(gt, {"v": {"segments": np.zeros((0, 2)), "labels": []}}, [0.5])


# --- equivalence with the literal reference ----------------------------------------------------

@pytest.mark.parametrize("grid", [True, False])
def test_matches_reference_on_random_cases(grid):
    rng = np.random.default_rng(1234 + grid)
    tious = E.parse_thresholds("0.1:0.9:9")
    for _ in range(25):
        gt, preds = random_case(rng, grid=grid)
        if gt.num_segments == 0:
            continue
        r = E.evaluate_detection(gt, preds, tious)
        ref = reference_map(gt, preds, tious)
        np.testing.assert_array_equal(np.isnan(ref), np.isnan(r["ap_per_class"]))
        np.testing.assert_allclose(r["ap_per_class"], ref, atol=1e-9, rtol=0)
        present = ~np.isnan(ref[0])
        assert r["average_mAP"] == pytest.approx(ref[:, present].mean(), abs=1e-9)


def test_matches_reference_on_dense_conflicts():
    # Many overlapping predictions competing for few GTs: exercises the round-based matching.
    rng = np.random.default_rng(7)
    tious = E.parse_thresholds("0.1:0.7:4")
    for _ in range(5):
        gt, preds = random_case(rng, n_videos=2, n_classes=1, max_gt=12, max_pred=120)
        if gt.num_segments:
            np.testing.assert_allclose(E.evaluate_detection(gt, preds, tious)["ap_per_class"],
                                       reference_map(gt, preds, tious), atol=1e-9, rtol=0)


def test_matches_reference_on_bench_predictions(thumos_json):
    gt = load_annotations(thumos_json, "Test")
    gt.videos = {k: gt.videos[k] for k in list(gt.videos)[:6]}
    preds = bench_eval.make_predictions(gt, per_video=60, seed=3)
    tious = E.THRESHOLDS["thumos14"]
    np.testing.assert_allclose(E.evaluate_detection(gt, preds, tious)["ap_per_class"],
                               reference_map(gt, preds, tious), atol=1e-9, rtol=0)


# --- real THUMOS14 -----------------------------------------------------------------------------

def test_ground_truth_as_predictions_scores_one(thumos_json):
    gt = load_annotations(thumos_json, "Test")
    r = E.evaluate_detection(gt, E.gt_as_predictions(gt), E.THRESHOLDS["thumos14"])
    assert r["mAP"] == {k: 1.0 for k in ("0.30", "0.40", "0.50", "0.60", "0.70")}
    assert r["average_mAP"] == 1.0 and r["num_gt"] == 3358


def test_cli_json_line(thumos_json, tmp_path, capsys):
    gt = load_annotations(thumos_json, "Test")
    pred = tmp_path / "pred.json"
    E.write_results(pred, E.gt_as_predictions(gt), gt.classes)
    assert E.main(["--gt", str(thumos_json), "--pred", str(pred), "--subset", "Test",
                   "--tiou", "0.3:0.7:5", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert set(out) == {"mAP", "average_mAP", "seconds"}
    assert out["mAP"] == {"0.30": 1.0, "0.40": 1.0, "0.50": 1.0, "0.60": 1.0, "0.70": 1.0}
    assert out["average_mAP"] == 1.0


def test_cli_module_table_and_errors(tmp_path):
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps({"database": {
        "v": {"subset": "validation", "duration": 50.0,
              "annotations": [{"label": "a", "segment": [0, 10]}]},
        "w": {"subset": "testing", "duration": 50.0, "annotations": []}}}))
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps({"version": "x", "external_data": {}, "results": {
        "v": [{"label": "a", "score": 0.9, "segment": [0, 5]}]}}))
    run = lambda *a: subprocess.run([sys.executable, "-m", "tadjax.evaluation", "--gt",
                                     str(gt_path), "--pred", str(pred), *a],
                                    capture_output=True, text=True)
    ok = run("--subset", "validation", "--tiou", "0.5,0.6")
    assert ok.returncode == 0, ok.stderr
    assert "0.50    100.00" in ok.stdout and "0.60      0.00" in ok.stdout
    assert "avg     50.00" in ok.stdout
    empty = run("--subset", "testing")
    assert empty.returncode == 2 and "no ground-truth segments" in empty.stderr
    assert "nan" not in empty.stdout + empty.stderr
    unknown = run("--subset", "train")
    assert unknown.returncode == 2 and "subsets present: 'testing'" in unknown.stderr


# --- results JSON, thresholds, recall -------------------------------------------------------------

def test_results_round_trip_and_unknown_labels(tmp_path):
    classes = ["a", "b"]
    preds = make_preds({"v1": [(0.25, 1.5, 0.75, 1), (2.0, 3.0, 0.5, 0)], "v2": []})
    path = tmp_path / "res.json"
    E.write_results(path, preds, classes, external_data={"used": True, "details": "x"})
    data = json.loads(path.read_text())
    assert data["version"] == "tadjax" and data["external_data"]["used"] is True
    assert data["results"]["v1"][0] == {"label": "b", "score": 0.75, "segment": [0.25, 1.5]}
    back = E.load_results(path, classes)
    for vid in preds:
        for k in ("segments", "scores", "labels"):
            np.testing.assert_array_equal(back[vid][k], preds[vid][k])
    data["results"]["v1"].append({"label": "zz", "score": 0.1, "segment": [0, 1]})
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="ignored 1 predictions.*'zz'"):
        assert len(E.load_results(path, classes)["v1"]["labels"]) == 2
    del data["results"]["v1"][0]["score"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="video 'v1', prediction 0: missing field 'score'"):
        E.load_results(path, classes)


def test_parse_thresholds():
    np.testing.assert_array_equal(E.parse_thresholds("0.3:0.7:5"), np.linspace(0.3, 0.7, 5))
    np.testing.assert_array_equal(E.parse_thresholds("activitynet"), np.linspace(0.5, 0.95, 10))
    assert E.parse_thresholds("0.5,0.75").tolist() == [0.5, 0.75]
    assert E.parse_thresholds(0.5).tolist() == [0.5]
    assert len(E.THRESHOLDS["multithumos"]) == 9 and E.THRESHOLDS["ego4d"][-1] == 0.5
    assert [E.threshold_key(t) for t in E.THRESHOLDS["activitynet"]][:3] == ["0.50", "0.55", "0.60"]
    with pytest.raises(ValueError):
        E.parse_thresholds("0:2:3")


def test_average_recall_hand_computed():
    # v: GT [0,10] (twice: a CliffDiving/Diving-style copy counts once) and [20,30]; predictions
    # by score: [20,29] (tIoU .9 with the 2nd), [0,6] (.6 with the 1st), [0,9.5] (.95 with 1st).
    # w: GT [0,4], no predictions.  Total 3 GT.
    gt = make_gt({"v": [(0, 10, 0), (0, 10, 1), (20, 30, 0)], "w": [(0, 4, 0)]}, ["a", "b"])
    preds = make_preds({"v": [(0, 6, 0.8, 1), (20, 29, 0.9, 0), (0, 9.5, 0.1, 0)]})
    r = E.average_recall(gt, preds, [0.5, 0.7], topk=(1, 2, 3))
    np.testing.assert_allclose(r["recall"], [[1 / 3, 2 / 3, 2 / 3], [1 / 3, 1 / 3, 2 / 3]])
    assert r["AR"] == pytest.approx({1: 1 / 3, 2: 0.5, 3: 2 / 3})
    assert r["num_gt"] == 3
