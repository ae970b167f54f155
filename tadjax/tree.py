"""Parameter-tree utilities keyed by '/'-joined paths.

Parameter paths (``backbone/blocks_3/attn/qkv/kernel``) are tadjax's public API: block drop,
freezing masks, optimizer groups, checkpoint import and partition rules all address parameters by
path. These helpers are the one place that turns nested dicts into paths and back.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

import jax

Tree = Any


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path) -> str:
    """A jax key path as 'a/b/c'."""
    return "/".join(_key_name(k) for k in path)


def flatten(tree: Tree) -> dict[str, Any]:
    """Nested dict (or any pytree) -> {'a/b/c': leaf}, in tree order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_str(p): v for p, v in leaves}


def unflatten(flat: Mapping[str, Any]) -> dict:
    """{'a/b/c': leaf} -> nested plain dicts."""
    out: dict = {}
    for name, value in flat.items():
        node = out
        *parents, last = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"path {name!r} passes through a leaf at {p!r}")
        if last in node:
            raise ValueError(f"duplicate path {name!r}")
        node[last] = value
    return out


def map_with_path(fn: Callable[[str, Any], Any], tree: Tree) -> Tree:
    """tree_map where fn also receives the '/'-joined path of each leaf."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), tree)


def match_rules(path: str, rules: Iterable[tuple[str, Any]], default: Any = None) -> Any:
    """Value of the first (regex, value) rule whose regex matches `path` (re.search)."""
    for pattern, value in rules:
        if re.search(pattern, path):
            return value
    return default


def mask_by_regex(tree: Tree, patterns: Iterable[str]) -> Tree:
    """Boolean tree: True where the path matches any of the regexes."""
    compiled = [re.compile(p) for p in patterns]
    return map_with_path(lambda p, _: any(c.search(p) for c in compiled), tree)


def merge_params(target: Tree, loaded: Mapping[str, Any] | Tree, *, allow_missing: Iterable[str] = (),
                 allow_unexpected: Iterable[str] = (), source: str = "loaded tree") -> Tree:
    """Put `loaded` leaves into `target`; fail loudly on missing, unexpected or misshaped paths.

    `allow_missing` / `allow_unexpected` are regexes naming gaps the caller accepts (for example
    freshly initialised adapters). Returns a tree with target's structure.
    """
    flat_t = flatten(target)
    flat_l = loaded if all(isinstance(k, str) and not isinstance(v, Mapping)
                           for k, v in dict(loaded).items()) else flatten(loaded)
    flat_l = dict(flat_l)
    missing = [k for k in flat_t if k not in flat_l
               and not any(re.search(p, k) for p in allow_missing)]
    unexpected = [k for k in flat_l if k not in flat_t
                  and not any(re.search(p, k) for p in allow_unexpected)]
    shape_err = [f"{k}: expected {tuple(flat_t[k].shape)}, got {tuple(flat_l[k].shape)}"
                 for k in flat_t if k in flat_l and tuple(flat_t[k].shape) != tuple(flat_l[k].shape)]
    if missing or unexpected or shape_err:
        lines = [f"cannot load parameters from {source}:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): " + ", ".join(missing[:50]))
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected[:50]))
        if shape_err:
            lines.append(f"  wrong shape ({len(shape_err)}): " + "; ".join(shape_err[:50]))
        raise ValueError("\n".join(lines))
    merged = {k: (flat_l[k] if k in flat_l else v) for k, v in flat_t.items()}
    return unflatten(merged)


def count(tree: Tree, mask: Tree | None = None) -> int:
    """Number of scalars in the tree (only where mask is True, if given)."""
    leaves = jax.tree_util.tree_leaves(tree)
    if mask is None:
        return int(sum(int(x.size) for x in leaves))
    mleaves = jax.tree_util.tree_leaves(mask)
    return int(sum(int(x.size) for x, m in zip(leaves, mleaves) if m))
