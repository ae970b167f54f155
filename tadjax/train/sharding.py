"""Device mesh, partition rules and global batches, all from `config.mesh` (data, not code).

    mesh = make_mesh(config.mesh)                               # jax.sharding.Mesh
    state_sh = tree_shardings(mesh, config.mesh, abstract_state) # params, opt state, EMA alike
    batch_sh = batch_shardings(mesh, config.mesh, batch)         # frames: batch x snippet axes
    batch = global_batch(local_numpy_batch, batch_sh)            # each process its own share

`config.mesh` (see tadjax.config.mesh_config):
  axes         ((name, size), ...); one size may be -1: it takes the devices the others leave.
               The usual names: "data" (plain data parallelism), "fsdp" (data parallelism whose
               devices also split the parameters) and "snippet" (the chunks of one video).
  batch_axes   mesh axes the batch dimension of every input is split over.
  snippet_axis mesh axis the frames' time axis is split over ("" for none): the backbone's
               16-frame chunks of one long video are then spread over devices; the TIA's
               temporal conv across chunk borders becomes a halo exchange inserted by XLA.
  rules        ((regex, spec), ...) matched (re.search, first wins) against '/'-joined parameter
               paths; unmatched parameters are replicated. A spec is either
                 a tuple: the PartitionSpec itself, one entry per leading dimension
                   (None, an axis name, or a tuple of axis names), or
                 a string "a+b": split the largest dimension divisible by the product of those
                   axes' sizes over them (replicated when none is), i.e. FSDP-style sharding.
Optimizer state and the EMA follow the rule of the parameter they belong to: their leaf paths
end with that parameter's path (optax nests them under e.g. `opt/1/inner_states/head/0/mu/`).
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tadjax import tree as tree_lib


# ----------------------------------------------------------------------------- mesh

def mesh_shape(axes: Iterable[Sequence[Any]], num_devices: int) -> dict[str, int]:
    """{name: size} for the (name, size) pairs of `axes`, with -1 filled from `num_devices`."""
    axes = [(str(n), int(s)) for n, s in axes]
    names = [n for n, _ in axes]
    if len(set(names)) != len(names):
        raise ValueError(f"config.mesh.axes: duplicate axis names in {names}")
    fill = [n for n, s in axes if s == -1]
    if len(fill) > 1:
        raise ValueError(f"config.mesh.axes: only one axis may have size -1, got {fill}")
    bad = [(n, s) for n, s in axes if s == 0 or s < -1]
    if bad:
        raise ValueError(f"config.mesh.axes: sizes must be positive or -1, got {bad}")
    fixed = math.prod(s for _, s in axes if s != -1)
    if fill:
        if num_devices % fixed:
            raise ValueError(f"config.mesh.axes {axes}: {num_devices} devices are not a multiple "
                             f"of the fixed axes' product {fixed}")
        sizes = {n: (num_devices // fixed if s == -1 else s) for n, s in axes}
    else:
        sizes = dict(axes)
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"config.mesh.axes {axes} give a mesh of {math.prod(sizes.values())} "
                         f"devices, but {num_devices} are available")
    return sizes


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The Mesh of `mesh_cfg.axes` over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_cfg.axes, len(devices))
    shape, names = tuple(sizes.values()), tuple(sizes)
    # Auto axes: shardings of intermediates are left to XLA's propagation (the model carries
    # none), as opposed to JAX's explicit-sharding types.
    auto = (jax.sharding.AxisType.Auto,) * len(names)
    if devices == list(jax.devices()):
        # Topology-aware order on accelerators; on CPU it is the plain process-major order.
        return jax.make_mesh(shape, names, axis_types=auto, devices=devices)
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), names, axis_types=auto)


def _axis_tuple(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _check_axes(mesh_sizes: Mapping[str, int], names: Iterable[str], what: str):
    missing = [n for n in names if n not in mesh_sizes]
    if missing:
        raise ValueError(f"{what} names mesh axes {missing} that config.mesh.axes lacks "
                         f"(axes: {sorted(mesh_sizes)})")


# ----------------------------------------------------------------------------- parameters

def spec_for(path: str, shape: Sequence[int], rules, mesh_sizes: Mapping[str, int]) -> P:
    """The PartitionSpec of one parameter of `shape` at `path` under `rules` (see module doc)."""
    rule = tree_lib.match_rules(path, [(r, s) for r, s in rules], default=None)
    if rule is None or len(shape) == 0:
        return P()
    if isinstance(rule, str):
        axes = tuple(a for a in rule.split("+") if a)
        _check_axes(mesh_sizes, axes, f"partition rule {rule!r}")
        size = math.prod(mesh_sizes[a] for a in axes)
        if size == 1:
            return P()
        for dim in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
            if shape[dim] % size == 0:
                spec = [None] * len(shape)
                spec[dim] = axes if len(axes) > 1 else axes[0]
                return P(*spec)
        return P()
    entries = tuple(rule)
    if len(entries) > len(shape):
        raise ValueError(f"partition rule {rule!r} for {path!r} has {len(entries)} entries, but "
                         f"the parameter has shape {tuple(shape)}")
    for dim, entry in enumerate(entries):
        axes = _axis_tuple(entry)
        _check_axes(mesh_sizes, axes, f"partition rule {rule!r}")
        size = math.prod(mesh_sizes[a] for a in axes)
        if shape[dim] % size:
            raise ValueError(f"partition rule {rule!r}: dimension {dim} of {path!r} (shape "
                             f"{tuple(shape)}) is not divisible by {size} devices of {axes}")
    return P(*entries)


def param_specs(params, rules, mesh_sizes: Mapping[str, int]):
    """Tree of PartitionSpecs for a parameter tree (arrays or ShapeDtypeStructs)."""
    return tree_lib.map_with_path(lambda p, x: spec_for(p, x.shape, rules, mesh_sizes), params)


def state_specs(state, params_path: str = "params", *, rules, mesh_sizes: Mapping[str, int]):
    """PartitionSpecs for a whole train state: every leaf whose path ends with a parameter's
    path (and has that parameter's shape) gets the parameter's spec; the rest is replicated."""
    flat_params = tree_lib.flatten(state[params_path]) if params_path in state else {}
    by_path = {p: (tuple(x.shape), spec_for(p, x.shape, rules, mesh_sizes))
               for p, x in flat_params.items()}

    def leaf_spec(path: str, x):
        if x is None or not hasattr(x, "shape"):
            return P()
        parts = path.split("/")
        for start in range(len(parts)):  # the longest suffix first
            suffix = "/".join(parts[start:])
            if suffix in by_path:
                shape, spec = by_path[suffix]
                if shape == tuple(x.shape):
                    return spec
        return P()

    return tree_lib.map_with_path(leaf_spec, state)


def tree_shardings(mesh: Mesh, mesh_cfg, state, params_path: str = "params"):
    """NamedShardings for a train state (or for a bare parameter tree with params_path=None)."""
    sizes = dict(mesh.shape)
    if params_path is None:
        specs = param_specs(state, mesh_cfg.rules, sizes)
    else:
        specs = state_specs(state, params_path, rules=mesh_cfg.rules, mesh_sizes=sizes)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))


# ----------------------------------------------------------------------------- batches

def batch_axes(mesh_cfg) -> tuple[str, ...]:
    return tuple(mesh_cfg.batch_axes)


def snippet_axis(mesh_cfg) -> str | None:
    name = str(mesh_cfg.get("snippet_axis", "") or "")
    return name or None


def data_parallel_size(mesh: Mesh, mesh_cfg) -> int:
    """Number of batch slices (devices along the batch axes)."""
    axes = batch_axes(mesh_cfg)
    _check_axes(dict(mesh.shape), axes, "config.mesh.batch_axes")
    return math.prod(mesh.shape[a] for a in axes)


def input_spec(name: str, ndim: int, mesh_cfg) -> P:
    """frames [B, T_f, ...]: batch x snippet; everything else: batch on dimension 0."""
    b = batch_axes(mesh_cfg) or None
    if name == "frames" and snippet_axis(mesh_cfg):
        return P(b, snippet_axis(mesh_cfg))
    return P(b) if ndim else P()


def batch_shardings(mesh: Mesh, mesh_cfg, batch: Mapping[str, Any], *, strict: bool = True
                    ) -> dict[str, NamedSharding]:
    """NamedShardings for a batch dict (arrays or ShapeDtypeStructs). A dimension that its mesh
    axes do not divide is an error, or (strict=False, e.g. evaluation batches) left whole."""
    sizes = dict(mesh.shape)
    axes = batch_axes(mesh_cfg)
    _check_axes(sizes, axes, "config.mesh.batch_axes")
    snip = snippet_axis(mesh_cfg)
    if snip:
        _check_axes(sizes, (snip,), "config.mesh.snippet_axis")
    out = {}
    for name, x in batch.items():
        spec = list(input_spec(name, len(x.shape), mesh_cfg))
        for dim, entry in enumerate(spec):
            n = math.prod(sizes[a] for a in _axis_tuple(entry))
            if x.shape[dim] % n and not strict:
                spec[dim] = None
            elif x.shape[dim] % n:
                what = "batch size" if dim == 0 else "number of frames"
                raise ValueError(f"batch field {name!r}: {what} {x.shape[dim]} is not divisible "
                                 f"by the {n} devices of mesh axes {_axis_tuple(entry)} "
                                 f"(config.mesh.axes = {tuple(mesh_cfg.axes)})")
        out[name] = NamedSharding(mesh, P(*spec))
    return out


def batch_shard_of_process(mesh: Mesh, mesh_cfg, process_index: int | None = None
                           ) -> tuple[int, int]:
    """(index, count): which of `count` equal shares of the global batch this process loads.

    Processes whose devices hold the same rows of the batch (replicas along the non-batch axes,
    e.g. a "snippet" axis spanning hosts) load the same share; count is the number of distinct
    shares (the process count when the batch axes span all processes).
    """
    process_index = jax.process_index() if process_index is None else process_index
    axes = batch_axes(mesh_cfg)
    _check_axes(dict(mesh.shape), axes, "config.mesh.batch_axes")
    names = list(mesh.axis_names)
    rows_of: dict[int, set] = {}
    for idx in np.ndindex(*mesh.devices.shape):
        coords = [idx[names.index(a)] for a in axes]
        row = int(np.ravel_multi_index(coords, [mesh.shape[a] for a in axes])) if axes else 0
        rows_of.setdefault(mesh.devices[idx].process_index, set()).add(row)
    shares = sorted({tuple(sorted(r)) for r in rows_of.values()})
    flat = [r for share in shares for r in share]
    if len(flat) != len(set(flat)):
        raise ValueError(f"mesh {describe(mesh)}: processes hold overlapping but unequal parts of "
                         f"the batch; put the batch axes ({axes}) across processes or within them")
    return shares.index(tuple(sorted(rows_of[process_index]))), len(shares)


def global_batch(local_batch: Mapping[str, np.ndarray], shardings: Mapping[str, NamedSharding],
                 global_batch_size: int | None = None) -> dict[str, jax.Array]:
    """Global jax.Arrays from this process's share of the batch (its rows; whole videos).

    Every dimension but the batch one is whole on every process (a process slices out what its
    devices hold), so `global_shape` is the local shape with the batch dimension set to
    `global_batch_size` (default: the local rows times the process count). A process that
    holds the whole batch passes global_batch_size = its local rows.
    """
    out = {}
    for name, x in local_batch.items():
        x = np.asarray(x)
        n = global_batch_size or x.shape[0] * jax.process_count()
        shape = (n,) + x.shape[1:] if x.ndim else x.shape
        out[name] = jax.make_array_from_process_local_data(shardings[name], x, shape)
    return out


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{n}={s}" for n, s in mesh.shape.items())
