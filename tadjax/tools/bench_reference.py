"""Side-by-side: the backbone's adapter-training step in tadjax and in a PyTorch reference, one run.

  python -m tadjax.tools.bench reference --config configs/adatad_thumos_s.py [--frames 256]
         [--steps 2] [--rounds 1] [--detector] [--json]

Both sides run the same work on random 0-255 frames [1, frames, px, px, 3], uint8 as both
pipelines deliver them (decoded video; the reference normalises on the device in its data
preprocessor, tadjax's detector inside its jitted step): normalisation, the VideoMAE ViT with a TIA
after every block (the config's size, 160 px for the THUMOS configs), loss = mean of the squared
pooled features, gradients for the adapters only (the ViT frozen), one AdamW update of the
adapters. The PyTorch side is our own eager implementation of that network written the way the
AdaTAD reference runs it: `torch.nn.functional.scaled_dot_product_attention`, each block + its TIA
under `torch.utils.checkpoint` except the first (its input needs no gradient), float32, the
process's threads as torch chooses. The tadjax side is the config's backbone (scanned blocks,
remat, chunk groups) under `jax.jit`. Each side runs in its own process (so that each peak
memory is its own; both import `tadjax`, so both run under its process defaults, e.g. glibc's
malloc arenas), one warm-up step, then `--steps` timed steps; memory is the peak resident
set (VmHWM) over the timed steps, and over the whole process.

With `--detector` the comparison is the whole detector's train step instead: tadjax runs the
config's step as `bench step` does (backbone + TIA, the features resized to the detection grid,
the ActionFormer head, focal + DIoU loss with the EMA normaliser, AdamW with the adapter and head
parameter groups, global-norm clipping, the EMA of the trained parameters, drop path on), on
`bench.random_batch`; the PyTorch side runs the same backbone in training mode, linear
interpolation to the grid, a PyTorch ActionFormer head and loss
(`tadjax/tools/torch_actionformer.py`, tested to compute what tadjax's do) on the targets tadjax
assigns to that batch, the same optimizer groups, clipping and EMA.

The machine is shared and noisy: compare the ratios printed here, measured in one run. With
`--rounds R` the two sides run R times each, alternating (tadjax first in even rounds, PyTorch
first in odd ones, so that a drift of the machine's load falls on both), and the figures are the
median time ratio over the rounds (with every round's ratio listed), each side's median step
time, and each side's largest peak (and each round's CPU seconds, context switches and page
faults per step, see `time_steps`). Needs
torch (`pip install -e ".[torch]"`); no weights are downloaded (both sides use random weights).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from tadjax.tools.bench import random_batch, time_steps, with_frames


def add_arguments(p):
    p.add_argument("--config", required=True)
    p.add_argument("--frames", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1,
                   help="run the two sides this many times each, alternating which goes first")
    p.add_argument("--json", action="store_true")
    p.add_argument("--detector", action="store_true",
                   help="the whole detector's train step (tadjax: `bench step`'s; PyTorch: the "
                        "same backbone plus the ActionFormer head, its loss, parameter groups, "
                        "clipping and EMA) instead of the backbone's adapter step")
    p.add_argument("--targets", default="",
                   help="the PyTorch detector side's assigned targets (used internally)")
    p.add_argument("--side", choices=["both", "tadjax", "torch"], default="both",
                   help="run one side in this process (used internally; 'both' spawns one "
                        "process per side)")
    p.add_argument("--sizes", default="",
                   help="the network's sizes as JSON (used internally: the PyTorch side's "
                        "process then imports no JAX, whose memory would count as its own)")


def _backbone(config):
    import jax.numpy as jnp
    from tadjax.models import detector as detector_lib
    return detector_lib.build_backbone(config.model.backbone, jnp.dtype(config.model.dtype))


def sizes(config) -> dict:
    """The sizes both sides build (the config's backbone, overrides included) and the frames'
    normalisation."""
    from tadjax.models.adapters import adapter_width
    from tadjax.models.detector import MEAN, STD
    vit = _backbone(config)
    return {"dim": vit.embed_dim, "depth": vit.depth, "heads": vit.num_heads,
            "hidden": vit.mlp_dim, "patch": vit.patch_size, "px": int(config.data.img_size),
            "width": adapter_width(vit.embed_dim, vit.adapter_ratio),
            "mean": MEAN, "std": STD}


def run_tadjax(config, frames: int, steps: int) -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from tadjax.models.detector import normalize_frames
    from tadjax.train import optimizer as opt_lib

    backbone = _backbone(config)
    px = int(config.data.img_size)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, frames, px, px, 3), np.uint8))
    normalize = functools.partial(normalize_frames, dtype=jnp.float32)
    params = jax.jit(backbone.init)(jax.random.key(0), normalize(x[:, :16]))["params"]
    mask = jax.tree_util.tree_map_with_path(
        lambda p, _: "adapter" in jax.tree_util.keystr(p), params)
    trainable, frozen = opt_lib.split_trainable(params, mask)
    tx = optax.adamw(1e-4, weight_decay=0.05)
    opt = tx.init(trainable)

    def loss_fn(trainable, frozen, x):
        feats = backbone.apply({"params": opt_lib.merge_trainable(trainable, frozen)}, x,
                               train=False, normalize=normalize)  # as the detector calls it
        return jnp.mean(jnp.square(feats))

    @jax.jit
    def step(trainable, opt, frozen, x):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, x)
        updates, opt = tx.update(grads, opt, trainable)
        return optax.apply_updates(trainable, updates), opt, loss

    box = {"t": trainable, "o": opt}

    def one():
        box["t"], box["o"], loss = box["step"](box["t"], box["o"], frozen, x)
        jax.block_until_ready(loss)

    def compile():   # ahead of time, as the trainer compiles its step
        box["step"] = step.lower(box["t"], box["o"], frozen, x).compile()

    return time_steps(one, steps, compile)


def _torch_backbone(size: dict, frames: int, drop_path_rate: float = 0.0):
    """The PyTorch ViT + TIA (random weights, frozen but for the adapters) and its forward:
    uint8 frames [1, frames, px, px, 3] -> features [1, frames // 2, dim] (spatial mean), each
    block + TIA but the first under `torch.utils.checkpoint`. With drop_path_rate > 0 and
    `train`, stochastic depth on each block's attention and MLP branches, drawn per chunk, at
    linspace(0, rate, depth)[i] (as tadjax's ViT; the checkpoint replays the same draw)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.checkpoint import checkpoint

    dim, depth, heads, hidden, patch, px, width = (size[k] for k in (
        "dim", "depth", "heads", "hidden", "patch", "px", "width"))
    rates = np.linspace(0.0, drop_path_rate, depth).tolist()

    class Adapter(nn.Module):
        def __init__(self):
            super().__init__()
            self.down, self.up = nn.Linear(dim, width), nn.Linear(width, dim)
            self.dw = nn.Conv1d(width, width, 3, padding=1, groups=width)
            self.pw = nn.Conv1d(width, width, 1)
            self.gamma = nn.Parameter(torch.ones(()))

        def forward(self, z, videos, t):
            rows, tokens, _ = z.shape
            a = F.gelu(self.down(z))                                    # [rows, t*hw, r]
            hw = tokens // t
            # video-long time axis per spatial site: [videos*hw, r, rows/videos*t]
            s = a.reshape(videos, rows // videos * t, hw, width).permute(0, 2, 3, 1)
            s = s.reshape(videos * hw, width, -1)
            s = s + self.pw(self.dw(s))
            a = s.reshape(videos, hw, width, -1).permute(0, 3, 1, 2).reshape(rows, tokens, width)
            return z + self.gamma * self.up(a)

    class Block(nn.Module):
        def __init__(self, rate):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
            self.adapter = Adapter()
            self.rate = rate

        def drop(self, y):
            if not (self.training and self.rate > 0):
                return y
            keep = torch.rand(y.shape[0], 1, 1) >= self.rate
            return y * keep / (1.0 - self.rate)

        def forward(self, x, videos, t):
            rows, tokens, _ = x.shape
            q, k, v = self.qkv(self.norm1(x)).reshape(rows, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(rows, tokens, dim)
            x = x + self.drop(self.proj(a))
            x = x + self.drop(self.fc2(F.gelu(self.fc1(self.norm2(x)))))
            return self.adapter(x, videos, t)

    torch.manual_seed(0)
    embed = nn.Conv3d(3, dim, (2, patch, patch), stride=(2, patch, patch))
    blocks = nn.ModuleList([Block(r) for r in rates])
    for p in list(embed.parameters()) + list(blocks.parameters()):
        p.requires_grad_(False)
    adapters = [p for b in blocks for p in b.adapter.parameters()]
    for p in adapters:
        p.requires_grad_(True)
    mean, std = torch.tensor(size["mean"]), torch.tensor(size["std"])
    grid = px // patch
    pos = torch.randn(8 * grid * grid, dim) * 0.02

    def forward(frames_in, train: bool):
        blocks.train(train)
        chunks = frames // 16
        x = (frames_in.float() - mean) / std
        x = x.reshape(chunks, 16, px, px, 3).permute(0, 4, 1, 2, 3)
        x = embed(x).flatten(2).transpose(1, 2) + pos                  # [chunks, 8*hw, C]
        for i, block in enumerate(blocks):
            x = block(x, 1, 8) if i == 0 else checkpoint(block, x, 1, 8, use_reentrant=False)
        return x.reshape(1, chunks * 8, grid * grid, dim).mean(2)

    return forward, adapters


def _random_frames(size: dict, frames: int):
    import numpy as np
    import torch
    px = size["px"]
    return torch.from_numpy(
        np.random.default_rng(0).integers(0, 256, (1, frames, px, px, 3), np.uint8))


def _torch_info() -> dict:
    import torch
    return {"torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
            "jax_imported": "jax" in sys.modules}


def run_torch(size: dict, frames: int, steps: int) -> dict:
    import math
    import torch

    forward, adapters = _torch_backbone(size, frames)
    opt = torch.optim.AdamW(adapters, lr=1e-4, weight_decay=0.05)
    frames_in = _random_frames(size, frames)

    def step():
        loss = forward(frames_in, train=False).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        assert math.isfinite(float(loss))

    return {**time_steps(step, steps), **_torch_info()}


def detector_sizes(config, frames: int) -> dict:
    """`sizes` plus what the PyTorch side of the whole detector builds and trains like the
    config's train step: the head, the grid length, the backbone's drop path, the adapter and
    head parameter groups (learning rate, weight decay), gradient clipping, the EMA decay, the
    loss normaliser's start, the regression loss weight and the label smoothing (with the
    ActivityNet configs' absolute position embedding and input dropout in the head's sizes)."""
    from tadjax.data import loader as loader_lib
    config = with_frames(config, frames)
    groups = {str(g["name"]): g for g in config.train.param_groups}
    missing = {"adapter", "head"} - set(groups)
    if missing:
        raise ValueError(f"bench reference --detector: config.train.param_groups has no "
                         f"group named {sorted(missing)} (have {sorted(groups)})")
    h, m = config.model.head, config.model
    length = int(loader_lib.grid_length(config.data))   # the head's max_seq_len, as in flax
    return {**sizes(config), "length": length,
            "drop_path_rate": float(m.backbone.drop_path_rate),
            "head": {"num_classes": int(h.num_classes), "channels": int(h.channels),
                     "arch": [int(a) for a in h.arch], "n_head": int(h.n_head),
                     "mha_win_size": h.mha_win_size if isinstance(h.mha_win_size, int)
                     else [int(w) for w in h.mha_win_size],
                     "path_pdrop": float(h.path_pdrop), "num_levels": len(m.strides),
                     "input_pdrop": float(h.get("input_pdrop", 0.0)),
                     "use_abs_pe": bool(h.get("use_abs_pe", False)),
                     "max_seq_len": length},
            "label_smoothing": float(m.get("label_smoothing", 0.0)),
            **{f"{k}_{name}": float(groups[name][k]) for name in ("adapter", "head")
               for k in ("lr", "weight_decay")},
            "grad_clip": float(config.train.grad_clip), "ema_decay": float(config.train.ema_decay),
            "init_loss_norm": float(m.init_loss_norm), "loss_weight": float(m.loss_weight)}


def write_targets(config, frames: int, path: str):
    """The batch `bench step` trains on (bench.random_batch, one video), its targets assigned
    as tadjax's loss assigns them, saved for the PyTorch side: points [P, 4], cls_targets
    [1, P, C], reg_targets [1, P, 2], the grid's mask [1, T]."""
    import numpy as np
    from tadjax.detection.assignment import assign_targets_batch
    from tadjax.models import detector as detector_lib
    config = with_frames(config, frames)
    batch = random_batch(config, 1)
    points = detector_lib.points_for(config)
    cls_t, reg_t = assign_targets_batch(points, batch["gt_segments"], batch["gt_labels"],
                                        batch["gt_valid"], int(config.model.head.num_classes),
                                        float(config.model.center_sample_radius))
    np.savez(path, points=np.asarray(points, np.float32), cls_targets=np.asarray(cls_t),
             reg_targets=np.asarray(reg_t), mask=batch["mask"])


def run_tadjax_detector(config_path: str, overrides, frames: int, steps: int) -> dict:
    """The config's whole train step (`bench step`, batch 1)."""
    import argparse
    from tadjax.tools.bench import bench_step
    args = argparse.Namespace(config=config_path, frames=frames, dtype=None, steps=steps,
                              batch_size=1)
    return bench_step(args, overrides)


def run_torch_detector(size: dict, targets_path: str, frames: int, steps: int) -> dict:
    """The whole detector's train step in PyTorch: the backbone of `run_torch` (drop path on, as
    in training), the features resized to the grid by linear interpolation, the ActionFormer
    head (tadjax/tools/torch_actionformer.py, tested equal to tadjax's) and its focal + DIoU loss
    on the targets tadjax assigned, the EMA loss normaliser, AdamW with the config's adapter and
    head groups (the head's 0-d and 1-d parameters, its biases, norms and scales, without weight
    decay, as the config's no_decay patterns pick them), global-norm clipping, an EMA of the
    trained parameters."""
    import math

    import numpy as np
    import torch
    import torch.nn.functional as F
    from tadjax.tools import torch_actionformer as taf

    forward, adapters = _torch_backbone(size, frames, size["drop_path_rate"])
    h = size["head"]
    head = taf.ActionFormer(in_channels=size["dim"], **h)
    head.train()
    data = np.load(targets_path)
    points, cls_t, reg_t = (torch.from_numpy(data[k]) for k in (
        "points", "cls_targets", "reg_targets"))
    mask = torch.from_numpy(data["mask"])
    head_params = list(head.parameters())
    opt = torch.optim.AdamW([
        {"params": adapters, "lr": size["lr_adapter"], "weight_decay": size["weight_decay_adapter"]},
        {"params": [p for p in head_params if p.ndim > 1], "lr": size["lr_head"],
         "weight_decay": size["weight_decay_head"]},
        {"params": [p for p in head_params if p.ndim <= 1], "lr": size["lr_head"],
         "weight_decay": 0.0}])
    trainable = adapters + head_params
    ema = [p.detach().clone() for p in trainable]
    frames_in = _random_frames(size, frames)
    box = {"norm": size["init_loss_norm"]}

    def step():
        feats = forward(frames_in, train=True)
        feats = F.interpolate(feats.transpose(1, 2), size=size["length"], mode="linear",
                              align_corners=False).transpose(1, 2)
        out = head(feats, mask)
        box["num_pos"] = float(((cls_t.sum(-1) > 0) & out["point_mask"]).sum())
        box["norm"] = 0.9 * box["norm"] + 0.1 * max(box["num_pos"], 1.0)
        total, _, _ = taf.detection_loss(out, points, cls_t, reg_t, box["norm"],
                                         loss_weight=size["loss_weight"],
                                         label_smoothing=size["label_smoothing"])
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(trainable, size["grad_clip"])
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in trainable], 1.0 - size["ema_decay"])
        box["loss"] = float(total)
        assert math.isfinite(box["loss"])

    timing = time_steps(step, steps)
    return {**timing, **_torch_info(), "num_pos": box["num_pos"], "loss": box["loss"]}


def run(args, overrides) -> dict:
    import tempfile

    from tadjax.tools.bench import load_config
    if args.side == "torch" and args.sizes:
        if args.detector:
            if not args.targets:
                raise ValueError("bench reference --detector --side torch --sizes needs --targets")
            return run_torch_detector(json.loads(args.sizes), args.targets, args.frames,
                                      args.steps)
        return run_torch(json.loads(args.sizes), args.frames, args.steps)
    if args.side == "tadjax":
        if args.detector:
            return run_tadjax_detector(args.config, overrides, args.frames, args.steps)
        return run_tadjax(load_config(args.config, overrides), args.frames, args.steps)
    config = load_config(args.config, overrides)
    if args.rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {args.rounds}")
    # What the PyTorch side builds (and, for the detector, its targets), computed here once.
    with tempfile.TemporaryDirectory() as tmp:
        targets = os.path.join(tmp, "targets.npz")
        if args.detector:
            size = detector_sizes(config, args.frames)
            write_targets(config, args.frames, targets)
        else:
            size = sizes(config)
        if args.side == "torch":
            if args.detector:
                return run_torch_detector(size, targets, args.frames, args.steps)
            return run_torch(size, args.frames, args.steps)
        return _both_sides(args, overrides, json.dumps(size), targets)


def _both_sides(args, overrides, size: str, targets: str) -> dict:
    def one_side(side):
        torch_only = ["--sizes", size, *(["--targets", targets] if args.detector else [])]
        cmd = [sys.executable, "-m", "tadjax.tools.bench", "reference", "--config", args.config,
               "--frames", str(args.frames), "--steps", str(args.steps), "--side", side,
               "--json", *(torch_only if side == "torch" else []),
               *(["--detector"] if args.detector else []), *overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode:
            raise RuntimeError(f"bench reference --side {side} failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    rounds = []
    for r in range(args.rounds):
        order = ("tadjax", "torch") if r % 2 == 0 else ("torch", "tadjax")
        out = {side: one_side(side) for side in order}
        rounds.append({"tadjax": out["tadjax"], "torch": out["torch"],
                       "time_ratio": out["tadjax"]["step_seconds"] / out["torch"]["step_seconds"]})
    result = {"benchmark": "reference", "config": args.config, "frames": args.frames,
              "detector": bool(args.detector)}
    if args.rounds == 1:
        j, t = rounds[0]["tadjax"], rounds[0]["torch"]
    else:
        def largest(runs, key):  # None where a side could not reset its peak (not Linux)
            values = [r[key] for r in runs]
            return None if None in values else max(values)

        def summary(side):
            runs = [r[side] for r in rounds]
            return {"step_seconds": statistics.median(r["step_seconds"] for r in runs),
                    "step_seconds_rounds": [r["step_seconds"] for r in runs],
                    "peak_rss_bytes": largest(runs, "peak_rss_bytes"),
                    "peak_rss_bytes_steps": largest(runs, "peak_rss_bytes_steps"),
                    **{f"{key}_rounds": [r[key] for r in runs] for key in (
                        "cpu_seconds_per_step", "context_switches_per_step",
                        "minor_faults_per_step")}}
        j, t = summary("tadjax"), summary("torch")
        result["rounds"] = args.rounds
        result["time_ratios"] = [r["time_ratio"] for r in rounds]

    def ratio(key):
        return None if j[key] is None or t[key] is None else j[key] / t[key]

    return {**result, "tadjax": j, "torch": t,
            "time_ratio": statistics.median(r["time_ratio"] for r in rounds),
            "memory_ratio_steps": ratio("peak_rss_bytes_steps"),
            "memory_ratio_overall": ratio("peak_rss_bytes")}
