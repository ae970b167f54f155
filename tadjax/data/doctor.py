"""Dataset doctor: checks an annotation file against its video folder before a long run.

    python -m tadjax.data.doctor --annotations A.json --videos DIR [--subset NAME ...]
        [--snippet-stride 4] [--no-decode] [--json]

Reports missing and unreadable videos (opening each file, and decoding its first and last frames
unless --no-decode), subset names with video and instance counts, subsets without ground truth,
durations and frame rates on which the JSON and the file disagree, the distribution of action
lengths in seconds and in snippets (grid positions of `snippet_stride` raw frames), and suggests
a window size and regression ranges from it. Exit status 1 when a video is missing or unreadable.

The suggestions are rules of thumb, not tuned values:
* window: the smallest multiple of the pyramid's total stride that holds twice the 95th-percentile
  action and the 99th-percentile action at the 75 % truncation threshold (at least 64). If the
  median video is no longer than that, resizing whole videos (ActivityNet style) is suggested.
* regression ranges: ActionFormer's doubling ranges (0, 4), (4, 8), ... in level-0 grid units, with
  as many levels (2..6) as make the last level start near the 95th-percentile action length.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

from tadjax.data import annotations as annotations_lib
from tadjax.data import video as video_lib

DURATION_TOLERANCE = (0.5, 0.01)  # seconds, fraction of the duration: both must be exceeded
FPS_TOLERANCE = 0.01  # fraction
PERCENTILES = (0, 5, 25, 50, 75, 95, 99, 100)


def _distribution(values) -> dict:
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return {"count": 0}
    out = {"count": int(values.size), "mean": float(values.mean())}
    for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES)):
        out[{0: "min", 100: "max"}.get(p, f"p{p}")] = float(v)
    return out


def suggest(action_snippets: dict, video_snippets: dict, trunc_thresh: float = 0.75) -> dict:
    """Window size and regression ranges from the length distributions (see the module docstring)."""
    if action_snippets.get("count", 0) == 0:
        return {"note": "no ground truth: nothing to suggest"}
    p95, p99 = action_snippets["p95"], action_snippets["p99"]
    levels = int(np.clip(math.ceil(math.log2(max(p95, 1.0))) - 1, 2, 6))
    total_stride = max(32, 2 ** (levels - 1))
    need = max(64.0, 2 * p95, p99 / trunc_thresh)
    window = int(math.ceil(need / total_stride) * total_stride)
    bounds = [0] + [4 * 2**i for i in range(levels - 1)] + [10000]
    ranges = [[bounds[i], bounds[i + 1]] for i in range(levels)]
    out = {"window_size": window, "num_levels": levels, "regression_ranges": ranges, "mode": "sliding windows"}
    if video_snippets.get("count", 0) and video_snippets["p50"] <= window:
        length = int(math.ceil(video_snippets["p50"] / total_stride) * total_stride)
        out["mode"] = (f"resize: the median video ({video_snippets['p50']:.0f} snippets) fits one window; "
                       f"consider resizing every video to {max(length, total_stride)} positions")
    return out


def diagnose(annotations_path, video_dir, *, subset=None, snippet_stride: int = 4, decode: bool = True) -> dict:
    """Runs every check; returns a JSON-serialisable report."""
    annset = annotations_lib.load_annotations(annotations_path, subset, on_error="warn")
    subsets = {}
    for v in annset.videos.values():
        s = subsets.setdefault(v.subset, {"videos": 0, "instances": 0})
        s["videos"] += 1
        s["instances"] += len(v.labels)
    report = {
        "annotations": str(annotations_path), "video_dir": str(video_dir), "num_classes": len(annset.classes),
        "subsets": subsets,
        "subsets_without_ground_truth": sorted(k for k, s in subsets.items() if s["instances"] == 0),
        "annotation_issues": list(annset.issues),
        "missing": [], "unreadable": [], "duration_mismatch": [], "fps_mismatch": [],
    }
    action_seconds, action_snippets, video_snippets = [], [], []
    for vid, v in annset.videos.items():
        info = None
        try:
            path = video_lib.find_video(video_dir, vid, v.filename)
        except FileNotFoundError as e:
            report["missing"].append({"video_id": vid, "error": str(e)})
            path = None
        if path is not None:
            try:
                info = video_lib.probe_video(path) if decode else video_lib.video_info(path)
            except video_lib.VideoError as e:
                report["unreadable"].append({"video_id": vid, "path": str(path), "error": str(e)})
        if info is not None:
            diff = abs(info.duration - v.duration)
            if diff > DURATION_TOLERANCE[0] and diff > DURATION_TOLERANCE[1] * v.duration:
                report["duration_mismatch"].append(
                    {"video_id": vid, "json_duration": v.duration, "video_duration": info.duration})
            if v.fps is not None and abs(info.fps - v.fps) > FPS_TOLERANCE * v.fps:
                report["fps_mismatch"].append({"video_id": vid, "json_fps": v.fps, "video_fps": info.fps})
        fps = info.fps if info is not None else v.fps
        lengths = v.segments[:, 1] - v.segments[:, 0]
        action_seconds.extend(lengths.tolist())
        if fps:
            action_snippets.extend((lengths * fps / snippet_stride).tolist())
            frames = info.num_frames if info is not None else v.duration * fps
            video_snippets.append(frames / snippet_stride)
    report["action_seconds"] = _distribution(action_seconds)
    report["action_snippets"] = _distribution(action_snippets)
    report["video_snippets"] = _distribution(video_snippets)
    report["snippet_stride"] = snippet_stride
    report["suggestion"] = suggest(report["action_snippets"], report["video_snippets"])
    report["ok"] = not (report["missing"] or report["unreadable"])
    return report


def _fmt_dist(d: dict, unit: str) -> str:
    if d.get("count", 0) == 0:
        return "none"
    keys = ("min", "p5", "p25", "p50", "p75", "p95", "max")
    return f"n={d['count']}  " + "  ".join(f"{k} {d[k]:.1f}" for k in keys) + f" {unit}"


def format_report(r: dict) -> str:
    lines = [f"annotations {r['annotations']}, videos {r['video_dir']}, {r['num_classes']} classes"]
    for name, s in r["subsets"].items():
        lines.append(f"  subset {name!r}: {s['videos']} videos, {s['instances']} instances")
    for name in r["subsets_without_ground_truth"]:
        lines.append(f"  WARNING subset {name!r} has no ground truth")
    for issue in r["annotation_issues"]:
        lines.append(f"  annotation issue: {issue}")
    lines.append(f"missing videos: {len(r['missing'])}")
    lines += [f"  {m['error']}" for m in r["missing"]]
    lines.append(f"unreadable videos: {len(r['unreadable'])}")
    lines += [f"  {m['error']}" for m in r["unreadable"]]
    lines.append(f"duration disagreements (> {DURATION_TOLERANCE[0]} s and {DURATION_TOLERANCE[1]:.0%}): "
                 f"{len(r['duration_mismatch'])}")
    lines += [f"  {m['video_id']}: json {m['json_duration']:.2f} s, file {m['video_duration']:.2f} s"
              for m in r["duration_mismatch"]]
    lines.append(f"fps disagreements (> {FPS_TOLERANCE:.0%}): {len(r['fps_mismatch'])}")
    lines += [f"  {m['video_id']}: json {m['json_fps']:.3f}, file {m['video_fps']:.3f}" for m in r["fps_mismatch"]]
    lines.append(f"action length: {_fmt_dist(r['action_seconds'], 's')}")
    lines.append(f"action length: {_fmt_dist(r['action_snippets'], 'snippets')} (stride {r['snippet_stride']})")
    lines.append(f"video length:  {_fmt_dist(r['video_snippets'], 'snippets')}")
    s = r["suggestion"]
    if "window_size" in s:
        lines.append(f"suggested window: {s['window_size']} snippets ({s['mode']}); "
                     f"{s['num_levels']} levels, regression ranges {s['regression_ranges']}")
    else:
        lines.append(s["note"])
    lines.append("OK" if r["ok"] else "PROBLEMS FOUND")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tadjax.data.doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", required=True, help="ActivityNet-style annotation JSON")
    parser.add_argument("--videos", required=True, help="folder holding the video files")
    parser.add_argument("--subset", nargs="*", default=None, help="subset name(s) to check (default: all)")
    parser.add_argument("--snippet-stride", type=int, default=4, help="raw frames per grid position")
    parser.add_argument("--no-decode", action="store_true", help="only open files, decode no frame")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = diagnose(args.annotations, args.videos, subset=args.subset or None,
                      snippet_stride=args.snippet_stride, decode=not args.no_decode)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
