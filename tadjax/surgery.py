"""Pure functions on parameter trees: each takes a tree and returns a new one, nothing is mutated.

Paths are '/'-joined (`backbone/blocks_3/attn/qkv/kernel`, see tadjax.tree). Sections:

  * Loading weights: `compare_trees` (the missing / unexpected / wrongly shaped report),
    `load_subtree` (strict merge of a flat {path: array} under a prefix), `load_pretrained`
    (a PyTorch VideoMAE checkpoint or a `tadjax.tools.convert` output into a detector's
    backbone; the file reading and renaming lives in tadjax.convert).
  * Position tables: `resample_position_table`.
  * Block drop and LoRA (defined in tadjax.blockdrop, re-exported here): `kept_blocks`,
    `drop_blocks`, `add_lora`, `merge_lora`, `strip_lora`, `has_lora`, `block_mask`,
    `reduced_config`.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Iterable, Mapping

import jax.numpy as jnp
import numpy as np

from tadjax import tree
from tadjax.blockdrop import (add_lora, block_mask, drop_blocks, has_lora,  # noqa: F401
                              kept_blocks, merge_lora, reduced_config, strip_lora)

log = logging.getLogger(__name__)

Tree = Any

# Parameters a pretrained VideoMAE checkpoint never has: AdaTAD's TIAs and side adapters.
ADAPTER_PATHS = (r"(^|/)adapter/", r"(^|/)side_adapters_\d+/")


# ---------------------------------------------------------------------------------------------
# Loading weights


@dataclasses.dataclass
class LoadReport:
    """What a load did. Paths are relative to the loaded subtree."""

    source: str
    loaded: list[str]
    missing: list[str]            # in the target, not in the file
    unexpected: list[str]         # in the file, not in the target
    wrong_shape: list[str]        # "path: expected (..), got (..)"
    allowed_missing: list[str]
    allowed_unexpected: list[str]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong_shape)

    def text(self, limit: int = 50) -> str:
        lines = [f"{self.source}: {len(self.loaded)} tensors loaded"]
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                           ("wrong shape", self.wrong_shape),
                           ("missing, allowed (kept as initialised)", self.allowed_missing),
                           ("unexpected, allowed (dropped)", self.allowed_unexpected)):
            if keys:
                more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
                lines.append(f"  {name} ({len(keys)}): " + ", ".join(keys[:limit]) + more)
        return "\n".join(lines)


def _matches(path: str, patterns: Iterable[str]) -> bool:
    return any(re.search(p, path) for p in patterns)


def compare_trees(target: Tree, loaded: Mapping[str, Any], *, allow_missing: Iterable[str] = (),
                  allow_unexpected: Iterable[str] = (), source: str = "loaded tree") -> LoadReport:
    """The report of putting flat `loaded` {path: array} into `target` (nested or flat)."""
    allow_missing, allow_unexpected = tuple(allow_missing), tuple(allow_unexpected)
    flat_t = target if _is_flat(target) else tree.flatten(target)
    missing = [k for k in flat_t if k not in loaded]
    unexpected = [k for k in loaded if k not in flat_t]
    wrong = [f"{k}: expected {tuple(np.shape(flat_t[k]))}, got {tuple(np.shape(loaded[k]))}"
             for k in flat_t if k in loaded and tuple(np.shape(flat_t[k])) != tuple(np.shape(loaded[k]))]
    return LoadReport(
        source=source, loaded=[k for k in flat_t if k in loaded],
        missing=[k for k in missing if not _matches(k, allow_missing)],
        unexpected=[k for k in unexpected if not _matches(k, allow_unexpected)],
        wrong_shape=wrong,
        allowed_missing=[k for k in missing if _matches(k, allow_missing)],
        allowed_unexpected=[k for k in unexpected if _matches(k, allow_unexpected)])


def _is_flat(t) -> bool:
    return isinstance(t, Mapping) and all(not isinstance(v, Mapping) for v in t.values())


def load_subtree(params: Tree, loaded: Mapping[str, Any], *, prefix: str = "",
                 allow_missing: Iterable[str] = (), allow_unexpected: Iterable[str] = (),
                 source: str = "loaded tree") -> tuple[Tree, LoadReport]:
    """`params` with the subtree at `prefix` ("" = the whole tree) replaced by `loaded`.

    Strict: a missing, unexpected or wrongly shaped path fails with a ValueError listing them,
    unless it matches a regex of `allow_missing` (the target's value is kept) or
    `allow_unexpected` (the loaded value is dropped). Regexes see prefix-relative paths. Loaded
    arrays take the dtype of the leaf they replace.
    """
    sub = params
    for part in [p for p in prefix.split("/") if p]:
        if not isinstance(sub, Mapping) or part not in sub:
            raise KeyError(f"parameter tree has no subtree {prefix!r}")
        sub = sub[part]
    report = compare_trees(sub, loaded, allow_missing=allow_missing,
                           allow_unexpected=allow_unexpected, source=source)
    if not report.ok:
        raise ValueError("cannot load parameters: " + report.text())
    flat_sub = tree.flatten(sub)
    merged = {k: (jnp.asarray(loaded[k], dtype=v.dtype) if k in loaded else v)
              for k, v in flat_sub.items()}
    new_sub = tree.unflatten(merged)
    if not prefix:
        return new_sub, report
    return _replace(params, [p for p in prefix.split("/") if p], new_sub), report


def _replace(node: Mapping, parts: list[str], value) -> dict:
    out = dict(node)
    out[parts[0]] = value if len(parts) == 1 else _replace(node[parts[0]], parts[1:], value)
    return out


def load_pretrained(params: Tree, path: str, *, prefix: str = "backbone",
                    allow_missing: Iterable[str] = (), allow_unexpected: Iterable[str] = (),
                    pretrain_grid: int | None = None, prefer_ema: bool = True,
                    trust_pickle: bool = False) -> tuple[Tree, LoadReport]:
    """`params` with its backbone (at `prefix`) from a VideoMAE checkpoint (see tadjax.convert).

    Typical use for an AdaTAD model (adapters are not in a VideoMAE checkpoint):
        params, report = load_pretrained(params, "videomae_s.pth", allow_missing=ADAPTER_PATHS)
    `pretrain_grid` (pretrain_img_size // patch_size of the model) is checked against the grid
    of the file's position table when it has one. The file's SHA-256 goes to the log.
    """
    from tadjax import convert

    sub = params
    for part in [p for p in prefix.split("/") if p]:
        sub = sub[part]
    side = sorted(int(m.group(1)) for k in sub for m in [re.match(r"^side_adapters_(\d+)$", k)] if m)
    ckpt = convert.read_checkpoint(path, side_blocks=side, prefer_ema=prefer_ema,
                                   trust_pickle=trust_pickle)
    if pretrain_grid is not None and ckpt.pretrain_grid is not None and ckpt.pretrain_grid != pretrain_grid:
        raise ValueError(f"{path}: the checkpoint's position table is for a {ckpt.pretrain_grid}x"
                         f"{ckpt.pretrain_grid} token grid, the model's for {pretrain_grid}x"
                         f"{pretrain_grid}; set model.backbone.pretrain_img_size accordingly")
    loaded = dict(ckpt.params)
    source = f"{path} ({ckpt.format}, sha256 {ckpt.sha256[:16]})" if ckpt.sha256 else path
    for key in ckpt.unknown:  # never silently dropped: unexpected unless allowed
        loaded.setdefault(key, np.zeros(()))
    new, report = load_subtree(params, loaded, prefix=prefix, allow_missing=allow_missing,
                               allow_unexpected=allow_unexpected, source=source)
    log.info("%s", report.text(limit=10))
    return new, report


def start_from_pretrained(state: dict, tx, mask: Tree, config) -> dict:
    """A fresh train state whose backbone comes from `config.model.pretrained` (the trainer calls
    this before step 0): optimizer state and EMA are rebuilt from the loaded parameters."""
    from tadjax.train import state as state_lib

    b = config.model.backbone
    from tadjax.models import vit
    patch = int(b.get("patch_size") or vit.VARIANTS[b.variant]["patch_size"])
    params, _ = load_pretrained(
        state["params"], str(config.model.pretrained),
        allow_missing=tuple(config.model.get("pretrained_allow_missing", ADAPTER_PATHS)),
        pretrain_grid=int(b.get("pretrain_img_size", 224)) // patch)
    return state_lib.create_state(params, tx, mask, rng=state["rng"],
                                  init_loss_norm=float(config.model.init_loss_norm))


# ---------------------------------------------------------------------------------------------
# Position tables


def resample_position_table(table: np.ndarray, *, time_tokens: int, grid: tuple[int, int],
                            new_grid: tuple[int, int]) -> np.ndarray:
    """A [time_tokens·h·w, C] table (t-major, then h, then w) resized to `new_grid` per time slice
    with PyTorch bicubic (A = -0.75, align_corners=False, no antialias), as the reference resizes
    VideoMAE's table for inputs other than 224 px. Time is never resized."""
    from tadjax.models import vit

    table = np.asarray(table)
    h, w = grid
    if table.shape[0] != time_tokens * h * w:
        raise ValueError(f"position table has {table.shape[0]} rows, expected "
                         f"{time_tokens}x{h}x{w}={time_tokens * h * w}")
    if tuple(new_grid) == (h, w):
        return table
    slices = table.reshape(time_tokens, h, w, -1).astype(np.float64)
    rows, cols = vit.bicubic_matrix(h, new_grid[0]), vit.bicubic_matrix(w, new_grid[1])
    out = np.einsum("hi,wj,tijc->thwc", rows, cols, slices)
    return out.reshape(time_tokens * new_grid[0] * new_grid[1], -1).astype(table.dtype)
