r"""Per-video backbone features as .npy, on the grid the configs' detector sees.

  python -m tadjax.tools.export_features --checkpoint workdirs/demo --videos clips/ --out feats/

Each video gives OUT/<video_id>.npy, float32 [N, C], and OUT/features.json the conventions:

  "window" mode: row k is grid position k of the video's snippet grid, i.e. raw frame
      k * snippet_stride (offset_frames = 0), time k * snippet_stride / fps; N = ceil(frames /
      snippet_stride). Rows are computed window by window exactly as evaluation cuts the video
      (the loader's EvalElement, non-overlapping windows of `window` positions, the last one
      right-aligned; where windows overlap the later one wins), with the detector's own
      `features` (normalise, ViT + adapters, linear resize to the grid).
  "resize" mode: N = resize_length rows over the whole video (row k covers
      [k, k + 1) / N * duration), from the frames evaluation would decode.

So a feature-based run with the same snippet_stride (and offset 0) lines up with the end-to-end
run of the same config. Adapters see one window at a time, as in evaluation.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np


def feature_fn(model):
    """jitted (backbone params, uint8 frames [B, T_f, S, S, 3]) -> features [B, T, C]."""
    def fn(backbone_params, frames):
        return model.apply({"params": {"backbone": backbone_params}}, frames, train=False,
                           method=type(model).features)
    return jax.jit(fn)


def export_features(config, params, videos, out_dir: str, *, progress: bool = True) -> dict:
    """Writes OUT/<id>.npy per video and OUT/features.json; returns the json's content."""
    from tadjax import predict
    from tadjax.data import loader as loader_lib
    from tadjax.data import sampling
    from tadjax.models import detector as detector_lib

    c = predict.predict_config(config)
    c.data.test_overlap = 0.0
    model = detector_lib.build_detector(c)
    source = predict.FileSource(videos, ["action"])
    sources = {predict.PREDICT_SPLIT: source}
    infos = loader_lib.eval_videos(c.data, sources)
    frames_per_item = loader_lib.num_input_frames(c.data)
    bar = predict.FrameProgress(sum(len(v["grid_starts"]) for v in infos) * frames_per_item,
                                enabled=progress)
    fn = feature_fn(model)
    length = loader_lib.grid_length(c.data)
    rows = {v["video_id"]: (sampling.num_snippets(v["num_frames"], int(c.data.snippet_stride))
                            if c.data.mode == "window" else length) for v in infos}
    feats: dict[str, np.ndarray] = {}
    for batch in loader_lib.eval_batches(c.data, sources, int(c.eval.batch_size)):
        out = np.asarray(fn(params["backbone"], jnp.asarray(batch["frames"])))
        bar.update(int(batch["valid"].sum()) * frames_per_item)
        for i in np.flatnonzero(batch["valid"]):
            vid = infos[int(batch["video_index"][i])]["video_id"]
            if vid not in feats:
                feats[vid] = np.zeros((rows[vid], out.shape[-1]), np.float32)
            start = int(batch["grid_start"][i])
            valid = int(batch["mask"][i].sum())
            feats[vid][start:start + valid] = out[i, :valid]
    bar.close()
    os.makedirs(out_dir, exist_ok=True)
    meta = {"mode": c.data.mode, "snippet_stride": int(c.data.snippet_stride), "offset_frames": 0,
            "scale_factor": int(c.data.scale_factor), "img_size": int(c.data.img_size),
            "grid_length": length, "videos": {}}
    for v in infos:
        vid = v["video_id"]
        np.save(os.path.join(out_dir, f"{vid}.npy"), feats[vid])
        meta["videos"][vid] = {"num_positions": int(feats[vid].shape[0]), "dim": int(feats[vid].shape[1]),
                               "fps": v["fps"], "num_frames": v["num_frames"], "duration": v["duration"]}
    with open(os.path.join(out_dir, "features.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tadjax.tools.export_features",
                                description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="workdir, checkpoints/ or checkpoints/<step>")
    p.add_argument("--videos", required=True, help="a video file or a directory of videos")
    p.add_argument("--out", required=True)
    p.add_argument("--step", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from tadjax import predict

    predictor = predict.Predictor.from_checkpoint(args.checkpoint, args.step)
    meta = export_features(predictor.config, predictor.params, predict.list_videos(args.videos), args.out)
    print(f"wrote {len(meta['videos'])} feature files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
