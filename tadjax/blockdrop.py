"""Block drop and LoRA as pure functions on parameter trees (re-exported by tadjax.surgery).

Every function takes a nested-dict tree and returns a new one; nothing is mutated and no module
state is involved, so they compose under `jax.jit` (the block indices and the rank are static)
and work as they are in a notebook:

    from tadjax import surgery
    small = surgery.drop_blocks(params, [3, 7])              # backbone/blocks_3, blocks_7 removed
    small = surgery.add_lora(small, jax.random.key(0), rank=24)
    ...                                                      # fine-tune the LoRA
    small = surgery.merge_lora(small)                        # back to plain kernels
    config = surgery.reduced_config(config, surgery.kept_blocks(small))   # loads `small`

Naming (decision): kept blocks **keep their original index**. After dropping blocks 3 and 7 of a
12-block ViT the tree holds backbone/blocks_{0,1,2,4,5,6,8,9,10,11}; the model that loads it is
the same config with `model.backbone.block_indices = (0, 1, 2, 4, 5, 6, 8, 9, 10, 11)` (and
`depth` unchanged). This keeps each block's drop-path rate, its adapter, the teacher block it is
aligned to, and the PyTorch checkpoint key `blocks.{i}` all addressed by one index, and the
mapping needs no separate table: `kept_blocks(params)` reads it off the tree.

LoRA (spec blockdrop §4.1): `attn/qkv` and `attn/proj` of every block get `lora_a` [in, r] drawn
from N(0, 1/r) and `lora_b` [r, out] = 0, so a fresh LoRA does not change the function; the
model runs them with `model.backbone.lora_rank = r` (tadjax.models.lora). `merge_lora` folds
them back: kernel += lora_a @ lora_b (flax [in, out] layout), then deletes them.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp

Tree = Any

BLOCK_NAME = re.compile(r"^blocks_(\d+)$")
LORA_TARGETS = ("qkv", "proj")
LORA_LEAVES = ("lora_a", "lora_b")


def _node(params: Tree, prefix: str) -> dict:
    node = params
    for part in [p for p in prefix.split("/") if p]:
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"parameter tree has no {prefix!r} subtree (missing {part!r})")
        node = node[part]
    return node


def _replace(params: Tree, prefix: str, new_node: dict) -> dict:
    parts = [p for p in prefix.split("/") if p]
    if not parts:
        return new_node
    head, rest = parts[0], "/".join(parts[1:])
    return {**params, head: _replace(params[head], rest, new_node)}


def kept_blocks(params: Tree, *, prefix: str = "backbone") -> tuple[int, ...]:
    """Original indices of the ViT blocks present under `prefix` ('' for a bare ViT tree)."""
    node = _node(params, prefix)
    return tuple(sorted(int(m.group(1)) for m in map(BLOCK_NAME.match, node) if m))


def drop_blocks(params: Tree, indices: Iterable[int], *, prefix: str = "backbone") -> dict:
    """The tree without blocks `indices` (original indices, see the module docstring).

    Everything else (including the remaining blocks' names) is unchanged. Raises if a block is
    not present or if no block would be left.
    """
    indices = sorted(set(int(i) for i in indices))
    present = kept_blocks(params, prefix=prefix)
    missing = [i for i in indices if i not in present]
    if missing:
        raise KeyError(f"drop_blocks: blocks {missing} are not in the tree (present: {list(present)})")
    if len(indices) >= len(present):
        raise ValueError(f"drop_blocks: dropping {indices} would leave no block")
    names = {f"blocks_{i}" for i in indices}
    node = _node(params, prefix)
    return _replace(params, prefix, {k: v for k, v in node.items() if k not in names})


def has_lora(params: Tree) -> bool:
    """Whether any node of the tree carries LoRA leaves."""
    found = []

    def visit(node):
        if isinstance(node, dict):
            if any(k in node for k in LORA_LEAVES):
                found.append(True)
            for v in node.values():
                visit(v)
    visit(params)
    return bool(found)


def add_lora(params: Tree, rng: jax.Array, rank: int, *, prefix: str = "backbone",
             targets: Sequence[str] = LORA_TARGETS) -> dict:
    """Fresh LoRA on `blocks_i/attn/{targets}` of every block: lora_a ~ N(0, 1/rank), lora_b = 0.

    Each (block, target) draws from its own key, fold_in(rng, index) then fold_in(·, target
    position), so a block's LoRA does not depend on which other blocks are present.
    """
    rank = int(rank)
    if rank < 1:
        raise ValueError(f"add_lora: rank must be >= 1, got {rank}")
    node = _node(params, prefix)
    new_node = dict(node)
    for i in kept_blocks(params, prefix=prefix):
        block = node[f"blocks_{i}"]
        attn = dict(block["attn"])
        for t, target in enumerate(targets):
            dense = attn[target]
            if any(k in dense for k in LORA_LEAVES):
                raise ValueError(f"add_lora: blocks_{i}/attn/{target} already has LoRA; merge it first")
            kernel = dense["kernel"]
            key = jax.random.fold_in(jax.random.fold_in(rng, i), t)
            a = jax.random.normal(key, (kernel.shape[0], rank), jnp.float32) / jnp.sqrt(float(rank))
            b = jnp.zeros((rank, kernel.shape[1]), jnp.float32)
            attn[target] = {**dense, "lora_a": a.astype(kernel.dtype), "lora_b": b.astype(kernel.dtype)}
        new_node[f"blocks_{i}"] = {**block, "attn": attn}
    return _replace(params, prefix, new_node)


def merge_lora(params: Tree) -> Tree:
    """Every node with {kernel, lora_a, lora_b} becomes {kernel + lora_a @ lora_b} (other leaves
    kept); the result runs on a model with lora_rank = 0. Works on any subtree (raw or EMA)."""
    if not isinstance(params, dict):
        return params
    if all(k in params for k in LORA_LEAVES):
        if "kernel" not in params:
            raise KeyError("merge_lora: a node has lora_a/lora_b but no kernel")
        kernel = params["kernel"]
        delta = jnp.dot(params["lora_a"].astype(jnp.float32), params["lora_b"].astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
        merged = {k: v for k, v in params.items() if k not in LORA_LEAVES}
        merged["kernel"] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
        return merged
    return {k: merge_lora(v) for k, v in params.items()}


def strip_lora(params: Tree) -> Tree:
    """The tree without LoRA leaves (drops the learned low-rank update; use merge_lora to keep it)."""
    if not isinstance(params, dict):
        return params
    return {k: strip_lora(v) for k, v in params.items() if k not in LORA_LEAVES}


def block_mask(depth: int, keep: Iterable[int]) -> jax.Array:
    """bool [depth] with True at the original indices in `keep` (the ViT's runtime skip mask)."""
    keep = set(int(i) for i in keep)
    return jnp.asarray([i in keep for i in range(int(depth))], bool)


def config_depth(config) -> int:
    """The backbone's original depth: `model.backbone.depth`, else its variant's."""
    from tadjax.models.vit import VARIANTS
    b = config.model.backbone
    depth = b.get("depth")
    return int(depth) if depth is not None else int(VARIANTS[b.variant]["depth"])


def reduced_config(config, kept: Iterable[int] | None, *, lora_rank: int | None = None):
    """A copy of a full tadjax config whose backbone holds only `kept` (original indices; None =
    all) and, if given, LoRA of rank `lora_rank`. The block-dropped tree loads into
    `build_detector(reduced_config(config, kept_blocks(tree)))` with nothing else."""
    new = config.copy_and_resolve_references()
    kept_tuple = None if kept is None else tuple(sorted(int(i) for i in kept))
    with new.unlocked():
        new.model.backbone.block_indices = kept_tuple
        if lora_rank is not None:
            new.model.backbone.lora_rank = int(lora_rank)
    new.lock()
    return new
