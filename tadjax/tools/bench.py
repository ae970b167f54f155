"""Benchmarks that print figures (not tests). One subcommand per benchmark:

  python -m tadjax.tools.bench step --config configs/adatad_thumos_s.py [--frames 256]
         [--dtype float32|bfloat16] [--steps 3] [--json]
      median wall time of a training step on random input, and the process's peak memory
      (overall, compilation included, and during the timed steps only), with what it is made
      of: the process after its imports, the train state, the compiled step's temporaries
  python -m tadjax.tools.bench loader [--json]     loader throughput (frames/s at 160 px)
  python -m tadjax.tools.bench eval [--json]       THUMOS14 evaluation speed (424,000 predictions)
  python -m tadjax.tools.bench reference --config configs/adatad_thumos_s.py [--frames 256] [--rounds R] [--json]
      the backbone's adapter step (ViT + TIA, remat) in tadjax and in a PyTorch reference, one
      process each, with time and memory ratios (tadjax/tools/bench_reference.py; needs torch);
      with --detector, the whole detector's train step (the head, its loss, optimizer and EMA)
  python -m tadjax.tools.bench blockdrop --config configs/adatad_thumos_s.py --drop 3 [--json]
      backbone FLOPs and forward time, full vs. block-dropped (tadjax/tools/bench_blockdrop.py)
  python -m tadjax.tools.bench etad --config configs/adatad_anet_s.py [--ratio 0.3] [--json]
      compiled peak memory of sampled-gradient (ETAD) vs full back-propagation

Run each on an otherwise idle machine, and compare ratios measured in one run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss; on Linux reset_peak_rss restarts it too)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_rss() -> bool:
    """Restart Linux's resident-memory high-water mark (VmHWM) from the current RSS, after
    handing the C heap's free memory (e.g. what compilation used) back to the system.
    False where /proc/self/clear_refs cannot be written (not Linux, or not allowed)."""
    import tadjax
    tadjax.release_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes_since_reset() -> int:
    """VmHWM of /proc/self/status (the peak since the last reset_peak_rss), else ru_maxrss."""
    peak = _proc_status_bytes("VmHWM")
    return peak_rss_bytes() if peak is None else peak


def time_steps(step, steps: int, compile=None) -> dict:
    """Runs `compile()` if given (ahead-of-time compilation of what `step` runs, then the heap's
    freed memory handed back, as the trainer does), `step()` (which must block until its work
    is done) once as a warm-up, then `steps` timed times. Median and all step times, and the
    peak resident memory overall and during the timed steps alone (compilation and the
    warm-up's allocations excluded). Per timed step, from getrusage: the process's CPU seconds
    (user + system; a 2-core machine kept busy gives twice the step time), its voluntary
    context switches (a thread waiting: on a lock, e.g. the C heap's, or for work) and its
    minor page faults (memory mapped afresh and touched, e.g. a large buffer allocated again
    every step)."""
    compile_seconds = None
    if compile is not None:
        import tadjax
        t0 = time.time()
        compile()
        compile_seconds = time.time() - t0
        tadjax.release_freed_memory()
    t0 = time.time()
    step()
    first = time.time() - t0
    peak_overall = peak_rss_bytes()
    reset = reset_peak_rss()
    rss_before_steps = _proc_status_bytes("VmRSS")
    times = []
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        t0 = time.time()
        step()
        times.append(time.time() - t0)
    usage1 = resource.getrusage(resource.RUSAGE_SELF)

    def per_step(field):
        return (getattr(usage1, field) - getattr(usage0, field)) / max(steps, 1)
    # The steps' peak first: the overall peak includes it (the kernel's ru_maxrss can lag
    # VmHWM by what was allocated since it was last updated).
    peak_steps = peak_rss_bytes_since_reset() if reset else None
    return {"step_seconds": statistics.median(times), "step_seconds_all": times,
            "first_step_seconds": first, "compile_seconds": compile_seconds,
            "peak_rss_bytes": max(peak_overall, peak_rss_bytes(), peak_steps or 0),
            "peak_rss_bytes_steps": peak_steps,
            "rss_bytes_before_steps": rss_before_steps,
            "cpu_seconds_per_step": per_step("ru_utime") + per_step("ru_stime"),
            "context_switches_per_step": per_step("ru_nvcsw"),
            "minor_faults_per_step": per_step("ru_minflt")}


def load_config(path: str, overrides: list[str]):
    """A config file plus --config.x=y style overrides, without absl's global flags."""
    from absl import flags
    from ml_collections import config_flags
    fv = flags.FlagValues()
    argv = ["bench", f"--config={path}", *overrides]
    # sys_argv: the override flags are found in these arguments, not in the process's sys.argv
    # (ml_collections' default), so that a call from Python (a notebook, a script) works too.
    config_flags.DEFINE_config_file("config", path, "config", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    return fv.config


def with_frames(config, frames: int | None):
    """`config` with `frames` fed to the backbone (None: as configured). In window mode the
    detector grid has frames / scale_factor positions; in resize mode it keeps its length."""
    if frames:
        with config.unlocked():
            if config.data.mode == "window":
                config.data.window = frames // int(config.data.scale_factor)
            else:
                length = int(config.data.resize_length)
                if frames % length:
                    raise ValueError(f"--frames {frames}: this config resizes every video to "
                                     f"{length} positions (data.mode='resize'), so the frames "
                                     f"must be a multiple of {length}")
                config.data.scale_factor = frames // length
    return config


def random_batch(config, batch_size: int) -> dict:
    """A training batch of random 0-255 frames and 4 random ground-truth segments per video
    (numpy, seeded: the same batch for the same config)."""
    import numpy as np
    from tadjax.models import detector as detector_lib
    frames_shape, mask_shape = detector_lib.input_shapes(config, batch_size)
    rng = np.random.default_rng(0)
    b, m, t = batch_size, int(config.data.max_gt), mask_shape[1]
    starts = rng.uniform(0, t * 0.8, size=(b, m)).astype(np.float32)
    lengths = rng.uniform(2, t * 0.2, size=(b, m)).astype(np.float32)
    return {
        "frames": rng.integers(0, 256, frames_shape, dtype=np.uint8),
        "mask": np.ones(mask_shape, bool),
        "gt_segments": np.stack([starts, np.minimum(starts + lengths, t)], -1),
        "gt_labels": rng.integers(0, int(config.model.head.num_classes), (b, m)).astype(np.int32),
        "gt_valid": (np.arange(m)[None, :] < 4).repeat(b, 0),
    }


def bench_step(args, overrides) -> dict:
    import jax
    import jax.numpy as jnp
    from tadjax.models import detector as detector_lib
    from tadjax.train import state as state_lib
    from tadjax.train.trainer import Run

    rss_after_imports = _proc_status_bytes("VmRSS")
    extra = []
    if args.dtype:
        extra += [f"--config.model.dtype={args.dtype}"]
    config = with_frames(load_config(args.config, overrides + extra), args.frames)
    run = Run(config, None, with_data=False)
    tx, _ = run.make_tx(steps_per_epoch=100)
    state = run.init_state(tx)
    b = int(args.batch_size or config.data.batch_size)
    frames_shape, _ = detector_lib.input_shapes(config, b)
    batch = {k: jnp.asarray(v) for k, v in random_batch(config, b).items()}
    step = state_lib.make_train_step(run.model, config, tx, run.mask, run.points)
    box = {"state": state}

    def one_step():
        box["state"], metrics = box["step"](box["state"], batch)
        jax.block_until_ready(metrics)
        box["metrics"] = metrics

    def compile():
        box["step"] = step.lower(box["state"], batch).compile()
        analysis = box["step"].memory_analysis()
        box["temp_bytes"] = None if analysis is None else int(analysis.temp_size_in_bytes)

    state_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(state))
    timing = time_steps(one_step, args.steps, compile)
    metrics = box["metrics"]
    return {"benchmark": "step", "config": args.config, "frames": frames_shape[1],
            "img_size": frames_shape[2], "batch_size": b, "dtype": config.model.dtype,
            "remat_policy": config.model.backbone.remat_policy,
            **timing,
            # where the memory goes: the process after its imports, the train state (params,
            # optimizer state, EMA), and XLA's temporaries of the compiled step
            "rss_bytes_after_imports": rss_after_imports, "state_bytes": state_bytes,
            "compiled_temp_bytes": box["temp_bytes"],
            "chunk_group": int(config.model.backbone.get("chunk_group", 0) or 0),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "loss": float(metrics["loss"])}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m tadjax.tools.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="name", required=True)
    p = sub.add_parser("step", help="training step time and peak memory")
    p.add_argument("--config", required=True)
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("loader", help="loader throughput")
    p.add_argument("--json", action="store_true")
    p.add_argument("--seconds", type=float, default=10.0)
    p = sub.add_parser("etad", help="compiled peak memory: sampled-gradient vs full backprop")
    from tadjax.tools import bench_etad
    bench_etad.add_arguments(p)
    p = sub.add_parser("eval", help="evaluation speed on THUMOS14")
    from tadjax.tools import bench_eval
    bench_eval.add_arguments(p)
    if not any(a.dest == "json" for a in p._actions):
        p.add_argument("--json", action="store_true")
    p = sub.add_parser("reference", help="backbone adapter step (or, with --detector, the whole "
                                         "detector's step): tadjax vs a PyTorch reference")
    from tadjax.tools import bench_reference
    bench_reference.add_arguments(p)
    p = sub.add_parser("blockdrop", help="backbone FLOPs and forward time with blocks dropped")
    from tadjax.tools import bench_blockdrop
    bench_blockdrop.add_arguments(p)
    args, overrides = parser.parse_known_args(argv)
    if args.name == "step":
        out = bench_step(args, overrides)
    elif args.name == "loader":
        from tadjax.tools import bench_loader_cmd
        out = bench_loader_cmd.run(args)
    elif args.name == "etad":
        from tadjax.tools import bench_etad
        out = bench_etad.run(args, overrides)
    elif args.name == "reference":
        from tadjax.tools import bench_reference
        out = bench_reference.run(args, overrides)
    elif args.name == "blockdrop":
        from tadjax.tools import bench_blockdrop
        out = bench_blockdrop.run(args, overrides)
    elif args.name == "eval":
        from tadjax.tools import bench_eval
        out = bench_eval.run(args)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
