"""Compiled peak memory of a training step with sampled-gradient backbone training vs full
back-propagation (ETAD's encoder-gradient sampling on the AdaTAD model, chunk-local adapters).

  python -m tadjax.tools.bench etad --config configs/adatad_anet_s.py [--ratio 0.3] [--group 1]
         [--batch_size 1] [--json] [--config.x=y ...]

Both steps are lowered and compiled on abstract inputs (nothing is allocated; see
tadjax.tools.report) with the config's remat policy; TIAs are made chunk-local in both, so that
the two steps train the same model and differ only in which chunks the backward pass visits.
"""
from __future__ import annotations


def add_arguments(p):
    p.add_argument("--config", required=True)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--group", type=int, default=1, help="chunks per video in one loop step")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--json", action="store_true")


def _peak(config, ratio: float, group: int, batch_size: int) -> dict:
    from tadjax.tools import report
    with config.unlocked():
        config.train.sampled_grad_ratio = ratio
        config.train.sampled_grad_group = group
    out = report.report(config, batch_size=batch_size)
    return {"peak_bytes": out["peak_bytes_per_device"], "temp_bytes": out["memory"]["temp_bytes"],
            "compile_seconds": out["compile_seconds"], "flops": out["train_step_flops"],
            "frames": out["frames"], "img_size": out["img_size"]}


def run(args, overrides=()) -> dict:
    from tadjax.tools.bench import load_config
    config = load_config(args.config, list(overrides))
    with config.unlocked():
        if config.model.backbone.adapter_mode in ("adapter", "adapter_full"):
            config.model.backbone.adapter_chunk_local = True
    full = _peak(config, 0.0, args.group, args.batch_size)
    sampled = _peak(config, args.ratio, args.group, args.batch_size)
    return {"benchmark": "etad", "config": args.config, "batch_size": args.batch_size,
            "frames": full["frames"], "img_size": full["img_size"],
            "adapter_mode": config.model.backbone.adapter_mode,
            "remat_policy": config.model.backbone.remat_policy, "ratio": args.ratio,
            "group": args.group,
            "full_peak_bytes": full["peak_bytes"], "sampled_peak_bytes": sampled["peak_bytes"],
            "peak_ratio": sampled["peak_bytes"] / full["peak_bytes"],
            "full_flops": full["flops"], "sampled_flops": sampled["flops"],
            "compile_seconds": full["compile_seconds"] + sampled["compile_seconds"]}
