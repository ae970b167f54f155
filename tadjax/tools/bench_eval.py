"""Detection-mAP speed on THUMOS14 scale.

The THUMOS14 Test ground truth (212 videos, 3,358 segments) against `--per-video` predictions
per video (2,000 by default: 424,000 in all), drawn with a fixed seed: half are jittered copies
of the video's GT (centre and length noise, 20 % with a random label), half are random segments
with random labels; scores are higher on average for the jittered half. Timed: one call of
`evaluation.evaluate_detection` at the 5 THUMOS thresholds (best of `--repeats`).

    python -m tadjax.tools.bench_eval [--per-video 2000] [--seed 0] [--repeats 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from tadjax import evaluation
from tadjax.data.annotations import AnnotationSet, load_annotations

DEFAULT_GT = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "thumos14.json"


def make_predictions(gt: AnnotationSet, per_video: int, seed: int = 0) -> evaluation.Predictions:
    """Seeded synthetic predictions: jittered GT plus noise (see the module docstring)."""
    rng = np.random.default_rng(seed)
    n_classes = len(gt.classes)
    out = {}
    for vid, video in gt.videos.items():
        dur = video.duration
        n_gt = len(video.labels)
        n_jit = per_video // 2 if n_gt else 0
        n_rand = per_video - n_jit
        pick = rng.integers(0, max(n_gt, 1), n_jit)
        g = video.segments[pick] if n_gt else np.zeros((0, 2))
        length = (g[:, 1] - g[:, 0]) * np.exp(rng.normal(0.0, 0.3, n_jit))
        centre = (g[:, 0] + g[:, 1]) / 2 + rng.normal(0.0, 0.25, n_jit) * (g[:, 1] - g[:, 0])
        jit_labels = np.where(rng.random(n_jit) < 0.8, video.labels[pick] if n_gt else 0,
                              rng.integers(0, n_classes, n_jit))
        r_centre = rng.uniform(0.0, dur, n_rand)
        r_length = np.exp(rng.uniform(np.log(0.5), np.log(30.0), n_rand))
        centres = np.concatenate([centre, r_centre])
        lengths = np.concatenate([length, r_length])
        segs = np.stack([centres - lengths / 2, centres + lengths / 2], axis=1).clip(0.0, dur)
        scores = np.concatenate([rng.beta(2.0, 1.0, n_jit), rng.beta(1.0, 2.0, n_rand)])
        labels = np.concatenate([jit_labels, rng.integers(0, n_classes, n_rand)])
        out[vid] = {"segments": segs, "scores": scores, "labels": labels.astype(np.int64)}
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gt", default=str(DEFAULT_GT), help="annotation JSON (THUMOS14)")
    parser.add_argument("--subset", default="Test")
    parser.add_argument("--per-video", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiou", default="thumos14")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON line")


def run(args) -> dict:
    """Returns {"seconds", "predictions", "videos", "gt_segments", "thresholds", "average_mAP"}."""
    gt = load_annotations(args.gt, args.subset)
    predictions = make_predictions(gt, args.per_video, args.seed)
    tious = evaluation.parse_thresholds(args.tiou)
    best = float("inf")
    for _ in range(max(1, args.repeats)):
        start = time.perf_counter()
        result = evaluation.evaluate_detection(gt, predictions, tious)
        best = min(best, time.perf_counter() - start)
    return {"seconds": round(best, 4), "predictions": result["num_predictions"],
            "videos": len(gt.videos), "gt_segments": result["num_gt"],
            "thresholds": len(tious), "average_mAP": result["average_mAP"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tadjax.tools.bench_eval",
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    out = run(args)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{out['predictions']} predictions on {out['videos']} videos "
              f"({out['gt_segments']} GT), {out['thresholds']} thresholds: "
              f"{out['seconds']:.3f} s, average mAP {out['average_mAP']:.4f}")


if __name__ == "__main__":
    main()
