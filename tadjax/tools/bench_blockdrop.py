"""Backbone cost of block drop: FLOPs (XLA cost analysis) and measured forward time of the full
and the block-dropped ViT, eval mode, batch 1, at the config's input size.

  python -m tadjax.tools.bench blockdrop --config configs/adatad_thumos_s.py --drop 3 --json

`--drop N` removes N blocks (`--indices` says which, by original index; default: the last N,
the same cost as any other N). Timings: one warm-up call, then the median of `--repeats` calls;
compare the ratio, measured in one run, not absolute times across machines.
"""
from __future__ import annotations


def add_arguments(p):
    p.add_argument("--config", required=True)
    p.add_argument("--drop", type=int, default=3, help="number of blocks to drop")
    p.add_argument("--indices", type=str, default="",
                   help="comma-separated original block indices to drop (default: the last N)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", action="store_true")


def run(args, overrides=()) -> dict:
    from tadjax import blockdrop, compress
    from tadjax.tools.bench import load_config
    config = load_config(args.config, list(overrides))
    depth = blockdrop.config_depth(config)
    if args.indices:
        dropped = sorted(int(i) for i in args.indices.split(","))
    else:
        dropped = list(range(depth - int(args.drop), depth))
    if len(dropped) >= depth or any(not 0 <= i < depth for i in dropped):
        raise SystemExit(f"bench blockdrop: cannot drop {dropped} of {depth} blocks")
    kept = [i for i in range(depth) if i not in dropped]
    full = compress.backbone_cost(config, repeats=args.repeats)
    small = compress.backbone_cost(blockdrop.reduced_config(config, kept), repeats=args.repeats)
    return {
        "benchmark": "blockdrop", "config": args.config, "frames_shape": full["frames_shape"],
        "depth": depth, "dropped": dropped,
        "full_flops": full["flops"], "dropped_flops": small["flops"],
        "flops_ratio": small["flops"] / full["flops"],
        "full_forward_seconds": full["forward_seconds"],
        "dropped_forward_seconds": small["forward_seconds"],
        "time_ratio": small["forward_seconds"] / full["forward_seconds"],
        "full_forward_seconds_all": full["forward_seconds_all"],
        "dropped_forward_seconds_all": small["forward_seconds_all"],
    }
