"""VideoMAE / VideoMAEv2 ViT backbone with AdaTAD's temporal-informative adapters (spec §§2-3).

Data flow for frames [B, T_f, H, W, 3] (already normalised), K = T_f / 16 chunks per video:

    chunks [B·K, 16, H, W, 3] --tubelet 2xpxp--> tokens [B·K, 8·h·w, C] (+ fixed sinusoid table)
    --blocks (attention inside each chunk; each TIA mixes time across the whole video)-->
    tokens --mean over h, w--> features [B, K·8, C]     (no final LayerNorm: the reference has none)

`resize_features` then resamples [B, K·8, C] to the detector's length exactly as PyTorch
`F.interpolate(mode="linear", align_corners=False)`.

Parameter paths (public API, relative to the caller's name for this module, e.g. `backbone/`):
`patch_embed/{kernel [2,p,p,3,C], bias}`, `blocks_{i}/norm1/{scale,bias}`,
`blocks_{i}/attn/qkv/kernel [C,3C]` (no bias), `blocks_{i}/attn/{q_bias,v_bias}`,
`blocks_{i}/attn/proj/{kernel,bias}`, `blocks_{i}/norm2/...`, `blocks_{i}/mlp/{fc1,fc2}/...`,
`blocks_{i}/adapter/...` (see adapters.py), and `side_adapters_{i}/...` in "side" mode, where i is
the index of the tapped block. There is no `fc_norm` (the reference never uses it).

Block drop (spec blockdrop §1; tadjax.surgery.drop_blocks): `block_indices` lists the blocks the
model holds, by their *original* index, so `blocks_{i}` keeps its name, its drop-path rate
linspace(0, rate, depth)[i] and its adapter after other blocks are removed; `depth` stays the
original depth. `lora_rank` > 0 adds `blocks_{i}/attn/{qkv,proj}/{lora_a,lora_b}` (models/lora.py).
At run time, `block_mask` (bool [depth], by original index) skips blocks (identity) without
recompiling, and `mutable=["intermediates"]` returns every held block's output (after its adapter)
as `intermediates/.../block_outputs` = ({"i": [B·K, tokens, C]},).

Adapter modes (`adapter_mode`; spec §3.5):
  "adapter": a TIA after each block of `adapter_blocks`; the ViT weights are stop_gradient'ed,
             activation gradients flow through the frozen blocks to earlier TIAs.
  "adapter_full": the same TIAs with every ViT weight differentiable too (training from scratch,
             e.g. the demo without pretrained weights).
  "frozen":  plain ViT, output stop_gradient'ed (nothing in the backbone gets a gradient).
  "full":    plain ViT, everything differentiable (full fine-tuning). "none" is the same module.
  "side":    plain ViT under stop_gradient; out = f_last + sum_i TIA'_i(f_i) over the outputs f_i of
             the blocks in `adapter_blocks`, TIA' being the TIA without its outer residual.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from tadjax.models.attention import chunk_attention
from tadjax.models.adapters import (ADAPTER_MODES, TemporalInformativeAdapter, tia_halos,
                                    tia_rows, trunc_normal)
from tadjax.models.lora import LoRADense
from tadjax.models.remat import REMAT_POLICIES, remat, remat_narrow_input

# Spec §2.1. head_dim = embed_dim / num_heads (64, 64, 64, 80, 88).
VARIANTS = {
    "S": dict(embed_dim=384, depth=12, num_heads=6, mlp_dim=1536, patch_size=16),
    "B": dict(embed_dim=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16),
    "L": dict(embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096, patch_size=16),
    "H": dict(embed_dim=1280, depth=32, num_heads=16, mlp_dim=5120, patch_size=16),
    "g": dict(embed_dim=1408, depth=40, num_heads=16, mlp_dim=6144, patch_size=14),
}

LAYER_NORM_EPS = 1e-6


# ----------------------------------------------------------------------------- position table

def sinusoid_table(positions: int, dim: int) -> np.ndarray:
    """[positions, dim] float32: angle = pos / 10000^(2·floor(j/2)/dim); sin on even j, cos on odd j."""
    pos = np.arange(positions, dtype=np.float64)[:, None]
    j = np.arange(dim)
    angle = pos / np.power(10000.0, 2 * (j // 2) / dim)[None, :]
    table = np.where(j % 2 == 0, np.sin(angle), np.cos(angle))
    return table.astype(np.float32)


def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
    """The four PyTorch cubic-convolution weights for taps at offsets -1, 0, 1, 2 from floor(src)."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
    """[out, in] float64 matrix of PyTorch's bicubic resize (align_corners=False, no antialias).

    src = (dst + 0.5)·in/out - 0.5 (not clamped, unlike linear), taps floor(src)-1 .. floor(src)+2
    clamped to the border, weights from Keys' cubic with A = -0.75.
    """
    scale = in_size / out_size
    src = (np.arange(out_size) + 0.5) * scale - 0.5
    base = np.floor(src)
    weights = _cubic_weights(src - base, a)
    matrix = np.zeros((out_size, in_size))
    for tap in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)
        np.add.at(matrix, (np.arange(out_size), idx), weights[:, tap])
    return matrix


def position_table(dim: int, time_tokens: int, pretrain_grid: int, grid: tuple[int, int]) -> np.ndarray:
    """The fixed table [time_tokens·h·w, dim] (t-major, then h, then w) for an h×w token grid.

    The table is built for the pretraining grid (pretrain_grid²) and, if the grid differs, each of
    the time_tokens slices is resized spatially with PyTorch bicubic (spec §2.3). Time is never
    resized. Computed in float64 from the float32 table, returned as float32.
    """
    table = sinusoid_table(time_tokens * pretrain_grid ** 2, dim)
    h, w = grid
    if (h, w) == (pretrain_grid, pretrain_grid):
        return table
    slices = table.reshape(time_tokens, pretrain_grid, pretrain_grid, dim).astype(np.float64)
    rows, cols = bicubic_matrix(pretrain_grid, h), bicubic_matrix(pretrain_grid, w)
    resized = np.einsum("hi,wj,tijc->thwc", rows, cols, slices)
    return resized.reshape(time_tokens * h * w, dim).astype(np.float32)


# ----------------------------------------------------------------------------- feature resize

def linear_resize_indices(in_size: int, out_size: int):
    """(i0, i1, w0, w1) of PyTorch 1-D linear interpolation, align_corners=False, size given.

    src = max((dst + 0.5)·in/out - 0.5, 0); i0 = floor(src); i1 = min(i0 + 1, in - 1);
    out = w0·x[i0] + w1·x[i1] with w1 = src - i0, w0 = 1 - w1.
    """
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = src - i0
    return i0, i1, 1.0 - w1, w1


def resize_features(x: jax.Array, length: int) -> jax.Array:
    """[B, L, C] -> [B, length, C] by PyTorch linear interpolation (align_corners=False).

    Identity when length == L; averaging adjacent pairs when length == L/2.
    """
    if x.ndim != 3:
        raise ValueError(f"resize_features expects [B, L, C], got shape {x.shape}")
    i0, i1, w0, w1 = linear_resize_indices(x.shape[1], length)
    w0 = jnp.asarray(w0, x.dtype)[None, :, None]
    w1 = jnp.asarray(w1, x.dtype)[None, :, None]
    return x[:, i0] * w0 + x[:, i1] * w1


# ----------------------------------------------------------------------------- block

def drop_path_mask(key: jax.Array, rate: jax.Array, shape: tuple) -> jax.Array:
    """Stochastic-depth keep mask, one draw per row of axis 0: bool [rows, 1, ...] for `shape`."""
    return jax.random.bernoulli(key, 1.0 - rate, (shape[0],) + (1,) * (len(shape) - 1))


def apply_drop_path(x: jax.Array, keep: jax.Array, rate: jax.Array) -> jax.Array:
    """x / (1 - rate) where `keep`, 0 elsewhere."""
    return jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros((), x.dtype))


def drop_path(x: jax.Array, key: jax.Array, rate: jax.Array) -> jax.Array:
    """Stochastic depth per row of axis 0 (one row = one 16-frame chunk): x / keep or 0."""
    return apply_drop_path(x, drop_path_mask(key, rate, x.shape), rate)


class Attention(nn.Module):
    """Joint space-time self-attention over the tokens of one chunk; qkv bias = [q_bias, 0, v_bias]."""

    embed_dim: int
    num_heads: int
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    lora_rank: int = 0
    row_from_probs: bool = False   # chunk_attention's backward without the output (see there)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        rows, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        init = trunc_normal(0.02)
        if self.lora_rank:
            dense = lambda n, **kw: LoRADense(n, rank=self.lora_rank, **kw)
        else:
            dense = nn.Dense
        qkv = dense(3 * dim, use_bias=False, kernel_init=init, dtype=self.dtype,
                    param_dtype=jnp.float32, name="qkv")(x)
        q_bias = self.param("q_bias", nn.initializers.zeros, (dim,), jnp.float32)
        v_bias = self.param("v_bias", nn.initializers.zeros, (dim,), jnp.float32)
        bias = jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
        qkv = (qkv + bias).reshape(rows, tokens, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.attention_impl in (None, "", "tadjax"):
            out = chunk_attention(q, k, v, self.row_from_probs)
        else:
            out = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
        out = out.reshape(rows, tokens, dim)
        return dense(dim, kernel_init=init, dtype=self.dtype, param_dtype=jnp.float32,
                     name="proj")(out)


class Mlp(nn.Module):
    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = trunc_normal(0.02)
        y = nn.Dense(self.hidden_dim, kernel_init=init, dtype=self.dtype, param_dtype=jnp.float32,
                     name="fc1")(x)
        y = nn.gelu(y, approximate=False)
        return nn.Dense(x.shape[-1], kernel_init=init, dtype=self.dtype, param_dtype=jnp.float32,
                        name="fc2")(y)


def row_split(axes: Sequence[str], rows: int) -> int:
    """Devices the chunk rows are split over: the product of the `axes` sizes of the mesh set by
    `jax.set_mesh` when it holds them all and they divide `rows`; 1 otherwise."""
    if not axes:
        return 1
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(axes) <= set(mesh.axis_names):
        return 1
    size = int(np.prod([mesh.shape[a] for a in axes]))
    return size if rows % size == 0 else 1


def row_devices(axes: Sequence[str], rows: int) -> int:
    """Devices the chunk rows are taken to be split over when grouping them: row_split under a
    mesh; without one (a step traced outside `jax.set_mesh`), every device of the process when
    they divide the rows (the configs' meshes split the rows over all devices), else 1."""
    if not jax.sharding.get_abstract_mesh().empty:
        return row_split(axes, rows)
    count = jax.device_count()
    return count if axes and rows % count == 0 else 1


def constrain_rows(x: jax.Array, axes: Sequence[str], dim: int = 0) -> jax.Array:
    """x with dimension `dim` (chunk rows) split over the mesh `axes` (see row_split); x
    unchanged where row_split is 1.

    Without it XLA's sharding propagation may follow the FSDP-split weights instead (split the
    channels, and gather the frames and every row onto every device).
    """
    if row_split(axes, x.shape[dim]) == 1:
        return x
    spec = [None] * x.ndim
    spec[dim] = tuple(axes)
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


def row_groups(rows: int, group: int) -> int:
    """How many groups `map_row_groups` splits `rows` rows into for groups of at most `group`
    rows: the smallest divisor n of rows with rows / n <= group (1 when group <= 0)."""
    if group <= 0 or group >= rows:
        return 1
    return next(n for n in range(1, rows + 1) if rows % n == 0 and rows // n <= group)


def device_row_groups(rows: int, group: int, row_axes: Sequence[str]) -> int:
    """row_groups for groups of at most `group` rows on each device's share of `rows` rows."""
    return row_groups(rows // row_devices(row_axes, rows), group)


def map_row_groups(fn, args: tuple, groups: int, row_axes: Sequence[str] = ()):
    """fn(*args) computed one group of rows (axis 0) at a time, for a row-local fn.

    The rows are split over D devices (row_devices(row_axes)), D contiguous blocks of rows / D;
    group j takes the j-th run of rows / (D·groups) rows from every device's block, so no rows
    move between devices, and on one device a group is a contiguous run of rows (no copy: the
    regrouping is a reshape). `lax.map` runs the groups one after another, so the temporaries
    of fn (the attention scores) exist for one group only.
    """
    if groups == 1:
        return fn(*args)
    rows = args[0].shape[0]
    devices = row_devices(row_axes, rows)
    size = rows // (devices * groups)

    def split(a):  # [rows, ...] -> [groups, devices·size, ...]
        a = jnp.swapaxes(a.reshape((devices, groups, size) + a.shape[1:]), 0, 1)
        return constrain_rows(a.reshape((groups, devices * size) + a.shape[3:]), row_axes, dim=1)

    def one_group(xs):
        return constrain_rows(fn(*(constrain_rows(a, row_axes) for a in xs)), row_axes)

    out = jax.lax.map(one_group, tuple(split(a) for a in args))
    out = out.reshape((groups, devices, size) + out.shape[2:])
    out = jnp.swapaxes(out, 0, 1).reshape((rows,) + out.shape[3:])
    return constrain_rows(out, row_axes)


class _RowGroups:
    """The groups of `map_row_groups`: group g is [devices·size, ...]. On several devices they
    are read from views [rows, ...] -> [devices, groups, size, ...] (a reshape, no copy); on one
    device, group g is rows [g·size, (g + 1)·size) sliced from the array as it is (XLA:CPU gave
    such views of different arrays layouts differing in their size-1 dimensions, and copied
    whole arrays between them)."""

    def __init__(self, rows: int, groups: int, row_axes: Sequence[str]):
        self.groups, self.row_axes = groups, tuple(row_axes)
        self.devices = row_devices(row_axes, rows)
        self.size = rows // (self.devices * groups)

    def view(self, a):
        if self.devices == 1:
            return a
        return constrain_rows(a.reshape((self.devices, self.groups, self.size) + a.shape[1:]),
                              self.row_axes)

    def take(self, v, g):
        if self.devices == 1:
            return jax.lax.dynamic_slice_in_dim(v, g * self.size, self.size, axis=0)
        part = jax.lax.dynamic_index_in_dim(v, g, axis=1, keepdims=False)
        return constrain_rows(part.reshape((self.devices * self.size,) + v.shape[3:]),
                              self.row_axes)

    def take_slot(self, stack, slot, g):
        """Group g of slot `slot` of a stack of views [slots, devices, groups, size, ...],
        read in place (only the group's rows are copied)."""
        if self.devices == 1:
            part = jax.lax.dynamic_slice(stack, (slot, g * self.size) + (0,) * (stack.ndim - 2),
                                         (1, self.size) + stack.shape[2:])
            return part.reshape(part.shape[1:])
        part = jax.lax.dynamic_slice_in_dim(
            jax.lax.dynamic_slice_in_dim(stack, slot, 1, axis=0), g, 1, axis=2)
        return constrain_rows(part.reshape((self.devices * self.size,) + stack.shape[4:]),
                              self.row_axes)

    def put(self, v, g, part):
        if self.devices == 1:
            return jax.lax.dynamic_update_slice_in_dim(v, part.astype(v.dtype), g * self.size,
                                                       axis=0)
        part = part.reshape((self.devices, 1, self.size) + part.shape[1:])
        return constrain_rows(jax.lax.dynamic_update_slice_in_dim(v, part, g, axis=1),
                              self.row_axes)


def _groups_forward(fn, trained, frozen, x, diff_rows, const_rows, rg: _RowGroups):
    """fn on every group of rows, each group's output written over its input rows."""
    diff_v, const_v = tuple(map(rg.view, diff_rows)), tuple(map(rg.view, const_rows))

    def body(g, xv):
        return rg.put(xv, g, fn(trained, frozen, rg.take(xv, g),
                                tuple(rg.take(a, g) for a in diff_v),
                                tuple(rg.take(a, g) for a in const_v)))

    return jax.lax.fori_loop(0, rg.groups, body, rg.view(x)).reshape(x.shape)


def _groups_backward(fn, trained, frozen, read_x, diff_rows, const_rows, ct, rg: _RowGroups):
    """The backward pass of _groups_forward: each group recomputed from its input rows
    (read_x(g)) and back-propagated, its input cotangent written over its output cotangent.
    Returns (d_trained, d_x, d_diff_rows)."""
    diff_v, const_v = tuple(map(rg.view, diff_rows)), tuple(map(rg.view, const_rows))

    def body(g, carry):
        ct_v, d_trained, d_diff = carry
        consts = tuple(rg.take(a, g) for a in const_v)
        _, vjp = jax.vjp(lambda t, xg, dg: fn(t, frozen, xg, dg, consts),
                         trained, read_x(g), tuple(rg.take(a, g) for a in diff_v))
        dt, dx, dd = vjp(rg.take(ct_v, g))
        d_trained = jax.tree_util.tree_map(jnp.add, d_trained, dt)
        d_diff = tuple(rg.put(b, g, d) for b, d in zip(d_diff, dd))
        return rg.put(ct_v, g, dx), d_trained, d_diff

    init = (rg.view(ct), jax.tree_util.tree_map(jnp.zeros_like, trained),
            tuple(jnp.zeros_like(a) for a in diff_v))
    ct_v, d_trained, d_diff = jax.lax.fori_loop(0, rg.groups, body, init)
    return (d_trained, ct_v.reshape(ct.shape),
            tuple(d.reshape(a.shape) for d, a in zip(d_diff, diff_rows)))


def map_row_groups_recompute(fn, trained, frozen, x, diff_rows=(), const_rows=(), *,
                             groups: int, row_axes: Sequence[str] = ()):
    """fn(trained, frozen, rows, diff_rows, const_rows) -> rows' (x's row shape) computed one
    group of rows at a time (the groups of `map_row_groups`), for a row-local fn; the backward
    pass recomputes each group from its inputs and back-propagates it before the next
    (checkpoint "full" per group).

    Unlike `lax.map` under `jax.checkpoint`, which stacks its outputs in a zero-filled buffer of
    their own (that XLA:CPU copies once more per loop), the forward pass writes each group's
    output over its input rows, and the backward pass each group's input cotangent over its
    output cotangent, in place: XLA copies x only where x is still needed afterwards.

    Gradients flow to `trained` (a pytree), x and `diff_rows` (row-aligned arrays, e.g. the
    TIA's halos); `frozen` (a pytree: frozen weights, gates, rates) and `const_rows` (e.g.
    drop-path masks) get none.
    """
    rg = _RowGroups(x.shape[0], groups, row_axes)

    @jax.custom_vjp
    def run(trained, frozen, x, diff_rows, const_rows):
        return _groups_forward(fn, trained, frozen, x, diff_rows, const_rows, rg)

    def forward(trained, frozen, x, diff_rows, const_rows):
        return run(trained, frozen, x, diff_rows, const_rows), (trained, frozen, x, diff_rows,
                                                                 const_rows)

    def backward(saved, ct):
        trained, frozen, x, diff_rows, const_rows = saved
        xv = rg.view(x)
        d_trained, dx, d_diff = _groups_backward(fn, trained, frozen, lambda g: rg.take(xv, g),
                                                 diff_rows, const_rows, ct.astype(x.dtype), rg)
        return d_trained, None, dx, d_diff, None

    run.defvjp(forward, backward)
    return run(trained, frozen, x, tuple(diff_rows), tuple(const_rows))


def _index(tree, i):
    return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False),
                                  tree)


def scan_units_recompute(unit, trained, frozen, consts, x, tail=None, *, groups: int,
                         row_axes: Sequence[str] = (), finish=None, head=None,
                         keep_mid: bool = False):
    """x through n units in turn (then `tail`, if given), each rematerialised from its input
    (checkpoint "full" per unit, as lax.scan of jax.checkpoint'ed units), with less memory.

    Unit i is `unit(frozen, i, consts_i, shape) -> (frozen_i, masks, halos_fn, rows_fn)`
    (unit_pieces' pieces), run in chunk groups as map_row_groups_recompute; `trained` and
    `consts` are stacked along a leading axis of n (unit i gets their slices i), `frozen` is
    given whole to `unit` (e.g. every unit's frozen weights, which it picks by i: no stacked
    copy). tail: (tail_unit(tail_consts, shape) -> pieces, tail_trained, tail_consts), one
    more unit (e.g. the last TIA on its own).

    All unit inputs live in one stack of slots: in the forward pass unit k reads its rows from
    slot k and writes its output rows into slot k + 1 (the last unit: into the output); in the
    backward pass unit k reads its input rows from slot k and its output cotangent from slot
    k + 1 (the last unit: from the incoming cotangent) and writes its input cotangent over slot
    k, group by group. So besides the slots only the output / its cotangent exist: lax.scan of
    checkpointed units held a second cotangent and a copy of each unit input. Gradients flow to
    `trained`, `tail_trained` and x; `frozen` and the consts get none.

    finish: a row-local function applied to the last stage's output rows group by group (e.g.
    the spatial mean pooling after the ViT), so that neither the full-length output nor its
    cotangent is ever whole: returns finish(output), rows [rows, ...finish's row shape].

    head: (head_fn, head_frozen, head_rows): x computed here, group by group, as
    head_fn(head_frozen, rows of head_rows) (row-local; head_rows a tuple of row-aligned
    arrays, e.g. the frames and the drop-path masks of the computation that makes x); x is
    then only its shape (a jax.ShapeDtypeStruct) and gets no gradient (nor does the head).
    Slot 0 is then not kept: the forward pass computes x whole for stage 0 (a temporary) and
    keeps its edge tokens for the halos, the backward pass recomputes each group's rows of x
    with the head (one more head pass, one slot fewer).

    keep_mid: the units' rows functions are SplitRows (unit_pieces(split=True); the tail's is
    not); the forward pass also keeps each unit's `mid` rows (its attention residual) in a
    second stack, and the backward pass differentiates the second half from them, then the
    first half from the unit input: the first half's recompute then needs only what its own
    backward reads (with chunk_attention's row_from_probs, neither P·V nor the projection).
    One more stack the size of the slots, for less recompute.
    """
    n = jax.tree_util.tree_leaves(consts)[0].shape[0]
    rg = _RowGroups(x.shape[0], groups, row_axes)
    tail_unit, tail_trained, tail_consts = tail if tail is not None else (None, {}, ())
    slots_n = n + (tail_unit is not None)          # unit inputs kept
    looped = slots_n - 1                           # units slot -> next slot; the last is peeled

    def stage(trained, frozen, consts, tail_trained, tail_consts, k):
        """(trained_k, pieces of stage k): unit k (k < n) or the tail (k == n)."""
        if tail_unit is not None and isinstance(k, int) and k == n:
            return tail_trained, tail_unit(tail_consts, x.shape)
        return _index(trained, k), unit(frozen, k, _index(consts, k), x.shape)

    flat = rg.devices == 1   # slots [stacked, rows, ...], groups sliced from the rows
    # With a head, slot 0 (x) is not kept: the stack holds slots 1.. at indices 0..
    first = 0 if head is None else 1
    stacked = slots_n - first
    if head is not None and looped < 1:
        raise ValueError("scan_units_recompute: a head needs at least two stages")

    def view_slots(stack):
        if flat:
            return stack
        return stack.reshape((stack.shape[0], rg.devices, rg.groups, rg.size) + x.shape[1:])

    def slot(slots, k):
        return jax.lax.dynamic_index_in_dim(slots, k - first, keepdims=False).reshape(x.shape)

    def take_slot(slots, k, g):
        return rg.take_slot(slots, k - first, g)

    def slot_edges(slots, k, edge, add=None):
        """row_edges of slot k, read in place; with `add` (its shape): slots with `add` added
        there."""
        tokens = x.shape[1]
        parts = []
        lead = 1 if flat else 3     # the row axes after the slot axis
        for n_, start in enumerate((0, tokens - edge)):
            at = (k - first,) + (0,) * lead + (start,) + (0,) * (slots.ndim - 2 - lead)
            part = jax.lax.dynamic_slice(slots, at, (1,) + slots.shape[1:1 + lead] + (edge,)
                                         + slots.shape[2 + lead:])
            if add is None:
                parts.append(part.reshape((x.shape[0], edge) + x.shape[2:]))
            else:
                more = add[:, n_ * edge:(n_ + 1) * edge].reshape(part.shape)
                slots = jax.lax.dynamic_update_slice(slots, part + more.astype(part.dtype), at)
        return slots if add is not None else jnp.concatenate(parts, axis=1)

    def put_in(stack, i, g, rows):
        """Group g of entry i of a stack (the slots, the mids) set to `rows`."""
        if flat:
            return jax.lax.dynamic_update_slice(stack, rows[None].astype(stack.dtype),
                                                (i, g * rg.size) + (0,) * (stack.ndim - 2))
        rows = rows.reshape((1, rg.devices, 1, rg.size) + rows.shape[1:])
        return jax.lax.dynamic_update_slice(stack, rows.astype(stack.dtype),
                                            (i, 0, g) + (0,) * (stack.ndim - 3))

    def put_slot(slots, k, g, rows):
        return put_in(slots, k - first, g, rows)

    def split_of(rows_fn):
        """rows_fn's halves if its mid is kept, else None."""
        if not keep_mid or not isinstance(rows_fn, SplitRows):
            return None
        return rows_fn

    def apply_rows(rows_fn, k, g, mids, t, f, rows, d, m):
        """rows_fn on group g's rows (stage k), its mid kept in `mids` if split."""
        halves = split_of(rows_fn)
        if halves is None:
            return rows_fn(t, f, rows, d, m), mids
        mid = halves.first(t, f, rows, d, m)
        return halves.second(t, f, mid, m), put_in(mids, k, g, mid)

    def head_rows_of(src, g):
        """Group g of x: from x, or computed by the head."""
        head_fn, _, _ = head
        head_frozen, head_rows = src
        return head_fn(head_frozen, tuple(rg.take(rg.view(a), g) for a in head_rows))

    def primal_input(src):
        if head is None:
            return src
        return map_row_groups(lambda *r: head[0](src[0], r), src[1], groups, row_axes)

    def primal(trained, frozen, consts, tail_trained, tail_consts, src):
        x = primal_input(src)

        def step(h, xs):
            t, c, i = xs
            f, masks, halos_fn, rows_fn, edge = unit(frozen, i, c, h.shape)
            halos = halos_fn(t, f, row_edges(h, edge)) if edge else ()
            return _groups_forward(rows_fn, t, f, h, halos, masks, rg), None
        h = jax.lax.scan(step, x, (trained, consts, jnp.arange(n)))[0]
        if tail_unit is not None:
            f, masks, halos_fn, rows_fn, edge = tail_unit(tail_consts, h.shape)
            halos = halos_fn(tail_trained, f, row_edges(h, edge)) if edge else ()
            h = _groups_forward(rows_fn, tail_trained, f, h, halos, masks, rg)
        return h if finish is None else finish(h)

    out = jax.eval_shape(finish or (lambda h: h), jax.ShapeDtypeStruct(x.shape, x.dtype))

    def finished(rows_fn):
        """The last stage's row function, with `finish` after it."""
        if finish is None:
            return rows_fn
        if isinstance(rows_fn, SplitRows):
            return SplitRows(rows_fn.first,
                             lambda t, f, mid, m: finish(rows_fn.second(t, f, mid, m)))
        return lambda t, f, r, d, m: finish(rows_fn(t, f, r, d, m))

    @jax.custom_vjp
    def run(trained, frozen, consts, tail_trained, tail_consts, src):
        return primal(trained, frozen, consts, tail_trained, tail_consts, src)

    def run_forward(trained, frozen, consts, tail_trained, tail_consts, src):
        args = (trained, frozen, consts, tail_trained, tail_consts)
        slots = view_slots(jnp.zeros((stacked,) + x.shape, x.dtype))
        if head is None:
            slots = jax.lax.dynamic_update_index_in_dim(
                slots, src.reshape(slots.shape[1:]), 0, axis=0)
        # Unit k's mid rows at mids[k] (the tail has none).
        mids = view_slots(jnp.zeros((n,) + x.shape, x.dtype)) if keep_mid else None

        def run_stage(k, state, read, edges):
            """Stage k's groups (input rows read(g), halos from edges), output into slot k + 1
            (state: the slots and the mids)."""
            t, (f, masks, halos_fn, rows_fn, edge) = stage(*args, k)
            halos = halos_fn(t, f, edges(edge)) if edge else ()
            diff_v, const_v = tuple(map(rg.view, halos)), tuple(map(rg.view, masks))

            def body(g, state):
                slots, mids = state
                rows, mids = apply_rows(rows_fn, k, g, mids, t, f, read(slots, g),
                                        tuple(rg.take(a, g) for a in diff_v),
                                        tuple(rg.take(a, g) for a in const_v))
                return put_slot(slots, k + 1, g, rows), mids
            return jax.lax.fori_loop(0, rg.groups, body, state)

        edges0 = None
        if head is not None:
            # x whole for stage 0 (a temporary, freed after it), then kept as its edges only:
            # the backward pass recomputes its rows from the head.
            x0 = primal_input(src)
            edges0 = row_edges(x0, stage(*args, 0)[1][4])
            x0v = rg.view(x0)
            slots, mids = run_stage(0, (slots, mids), lambda slots, g: rg.take(x0v, g),
                                    lambda e: edges0)
        slots, mids = jax.lax.fori_loop(
            first, looped, lambda k, state: run_stage(
                k, state, lambda slots, g: take_slot(slots, k, g),
                lambda e: slot_edges(state[0], k, e)), (slots, mids))
        t, (f, masks, halos_fn, rows_fn, edge) = stage(*args, looped)
        halos = halos_fn(t, f, slot_edges(slots, looped, edge)) if edge else ()
        if finish is None and split_of(rows_fn) is None:
            y = _groups_forward(rows_fn, t, f, slot(slots, looped), halos, masks, rg)
        else:   # the (finished) rows of each group into an output of their own shape
            fn = finished(rows_fn)
            diff_v, const_v = tuple(map(rg.view, halos)), tuple(map(rg.view, masks))

            def body(g, state):
                yv, mids = state
                rows, mids = apply_rows(fn, looped, g, mids, t, f, take_slot(slots, looped, g),
                                        tuple(rg.take(a, g) for a in diff_v),
                                        tuple(rg.take(a, g) for a in const_v))
                return rg.put(yv, g, rows), mids
            yv, mids = jax.lax.fori_loop(0, rg.groups, body,
                                         (rg.view(jnp.zeros(out.shape, out.dtype)), mids))
            y = yv.reshape(out.shape)
        return y, (args, slots, mids, src if head is not None else None, edges0)

    def run_backward(saved, ct):
        args, slots, mids, src, edges0 = saved
        trained = args[0]

        def back(k, slots, ct_v, from_head=False):
            """Stage k's backward pass: input rows from slot k, output cotangent from slot
            k + 1 (ct_v: from that view instead), input cotangent over slot k. from_head
            (stage 0 with a head): input rows recomputed by the head, halos from the saved
            edges, no input cotangent."""
            t, (f, masks, halos_fn, rows_fn, edge) = stage(*args, k)
            if ct_v is not None:    # the last stage
                rows_fn = finished(rows_fn)
            if edge:
                halos, halos_vjp = jax.vjp(lambda t, e: halos_fn(t, f, e), t,
                                           edges0 if from_head else slot_edges(slots, k, edge))
            else:
                halos = ()
            diff_v, const_v = tuple(map(rg.view, halos)), tuple(map(rg.view, masks))

            def body(g, carry):
                slots, d_t, d_diff = carry
                rows_masks = tuple(rg.take(a, g) for a in const_v)
                if ct_v is not None:
                    ct_g = rg.take(ct_v, g).astype(out.dtype)
                else:
                    ct_g = take_slot(slots, k + 1, g)
                diff_g = tuple(rg.take(a, g) for a in diff_v)
                first_fn, dt_second = rows_fn, None
                halves = split_of(rows_fn)
                if halves is not None:   # the second half from the kept mid, then the first
                    _, vjp = jax.vjp(lambda t, m: halves.second(t, f, m, rows_masks), t,
                                     rg.take_slot(mids, k, g))
                    dt_second, ct_g = vjp(ct_g)
                    first_fn = halves.first
                if from_head:
                    rows = head_rows_of(src, g)
                    _, vjp = jax.vjp(lambda t, d: first_fn(t, f, rows, d, rows_masks), t, diff_g)
                    dt, dd = vjp(ct_g)
                else:
                    _, vjp = jax.vjp(lambda t, r, d: first_fn(t, f, r, d, rows_masks), t,
                                     take_slot(slots, k, g), diff_g)
                    dt, dx, dd = vjp(ct_g)
                    slots = put_slot(slots, k, g, dx)
                if dt_second is not None:
                    dt = jax.tree_util.tree_map(jnp.add, dt, dt_second)
                d_t = jax.tree_util.tree_map(jnp.add, d_t, dt)
                d_diff = tuple(rg.put(b, g, d) for b, d in zip(d_diff, dd))
                return slots, d_t, d_diff

            init = (slots, jax.tree_util.tree_map(jnp.zeros_like, t),
                    tuple(jnp.zeros_like(a) for a in diff_v))
            slots, d_t, d_diff = jax.lax.fori_loop(0, rg.groups, body, init)
            if not edge:
                return slots, d_t
            d_t_halos, d_edges = halos_vjp(tuple(d.reshape(a.shape)
                                                 for d, a in zip(d_diff, halos)))
            if not from_head:
                # The halos' share of the input cotangent: on the edge tokens only.
                slots = slot_edges(slots, k, edge, add=d_edges)
            return slots, jax.tree_util.tree_map(jnp.add, d_t, d_t_halos)

        slots, d_last = back(looped, slots, rg.view(ct))

        def put_d(d_trained, d_t, k):
            return jax.tree_util.tree_map(
                lambda s, d: jax.lax.dynamic_update_index_in_dim(s, d, k, axis=0), d_trained, d_t)

        def step(j, carry):
            slots, d_trained = carry
            k = looped - 1 - j
            slots, d_t = back(k, slots, None)
            return slots, put_d(d_trained, d_t, k)

        d_trained = jax.tree_util.tree_map(jnp.zeros_like, trained)
        slots, d_trained = jax.lax.fori_loop(0, looped - first, step, (slots, d_trained))
        if head is not None:
            slots, d_t = back(0, slots, None, from_head=True)
            d_trained = put_d(d_trained, d_t, 0)
        if tail_unit is not None:
            d_tail = d_last
        else:
            d_tail = {}
            d_trained = put_d(d_trained, d_last, looped)
        return d_trained, None, None, d_tail, None, (slot(slots, 0) if head is None else None)

    run.defvjp(run_forward, run_backward)
    src = x if head is None else (head[1], tuple(head[2]))
    return run(trained, frozen, consts, tail_trained, tail_consts, src)


def spatial_mean(rows, time_tokens: int):
    """Token rows [rows, time_tokens·sites, C] averaged over the sites: [rows, time_tokens, C]."""
    return rows.reshape(rows.shape[0], time_tokens, -1, rows.shape[-1]).mean(axis=2)


def drop_path_inputs(drop_key, drop_rate, shape, use_drop_path: bool):
    """(masks, rate) of a block's two drop paths (attention, MLP) for rows of `shape`: drawn for
    every row at once, whatever the grouping; ((), ()) without drop path."""
    if not use_drop_path:
        return (), ()
    masks = tuple(drop_path_mask(k, drop_rate, shape) for k in jax.random.split(drop_key))
    return masks, (drop_rate,)


class SplitRows(NamedTuple):
    """A unit's rows function in two halves, called like one: rows_fn = second ∘ first, with

      first(trained, frozen, rows, row_halos, row_masks) -> mid   the TIA, then the attention
                                                                   residual (x + attention)
      second(trained, frozen, mid, row_masks) -> rows'            then the MLP residual

    so that a recompute can keep `mid` (scan_units_recompute) and differentiate each half apart.
    """
    first: Callable
    second: Callable

    def __call__(self, trained, frozen, rows, row_halos, row_masks):
        mid = self.first(trained, frozen, rows, row_halos, row_masks)
        return self.second(trained, frozen, mid, row_masks)


def unit_pieces(block, frozen_params, drop_key, drop_rate, shape, *, has_adapter: bool,
                use_drop_path: bool, keep_adapter=None, keep=None, mix: bool = True,
                videos: int = 1, time_tokens: int = 1, split: bool = False):
    """Block.mix_rows as pure pieces, for rows of `shape`, with parameters {"mix": the block's
    attention/MLP/norms, "adapter": the previous block's TIA} split into the trained ones
    (passed to the pieces as `trained`) and `frozen_params`:

      frozen                              what the pieces take as `frozen` (frozen_params,
                                          gates, drop rate)
      masks                               the drop-path masks, row-aligned (const rows)
      halos_fn(trained, frozen, edges)    the TIA's halos (adapters.tia_halos) from the rows'
                                          edges (row_edges(x, edge)), row-aligned
                                          (differentiable rows); () without a TIA or chunk-local
      rows_fn(trained, frozen, rows, row_halos, row_masks) -> rows'   row-local: any chunk rows
      edge                                tokens per temporal position (0: no halos)

    `block` is a Block (bound or not) giving the sizes; no parameters are read from it.

    split (with mix): rows_fn is a SplitRows, halved at the attention residual, whose attention
    backward pass reads no attention output (chunk_attention's row_from_probs): given the kept
    residual, the first half's recompute needs neither the P·V matmul nor the projection.
    """
    use_drop_path = use_drop_path and mix
    masks, rate = drop_path_inputs(drop_key, drop_rate, shape, use_drop_path)
    frozen = (frozen_params, ((keep_adapter, keep), rate))
    split = split and mix
    bare = block.clone(parent=None, chunk_group=0, adapter_ratio=None,
                       attention_row_from_probs=split or block.attention_row_from_probs)

    halos = has_adapter and not block.adapter_chunk_local
    edge = shape[1] // time_tokens if halos else 0   # tokens of one temporal position

    def halos_fn(trained, frozen, edges):
        """The halos from `edges` [rows, 2·edge, C]: each row's first and last `edge` tokens
        (its first and last temporal position), all that tia_halos reads."""
        if not halos:
            return ()
        p = {**frozen[0], **trained}["adapter"]
        return tuple(constrain_rows(h, block.row_axes) for h in tia_halos(
            p, edges, videos=videos, time_tokens=2, dtype=block.dtype))

    def gate(flag, fn, rows):
        return fn(rows) if flag is None else jax.lax.cond(flag, fn, lambda r: r, rows)

    def rows_part(trained, frozen, rows, row_halos, row_masks, adapter, method):
        """The TIA (if `adapter`), then `method` of the block (None: nothing)."""
        params = {**frozen[0], **trained}
        (keep_adapter, keep), rate = frozen[1]
        if adapter:
            rows = gate(keep_adapter, lambda r: tia_rows(
                params["adapter"], r, *(row_halos or (None, None)), time_tokens=time_tokens,
                dtype=block.dtype), rows)
        if method is not None:
            rows = gate(keep, lambda r: bare.apply({"params": params["mix"]}, r, *row_masks,
                                                   *rate, method=method), rows)
        return rows

    if split:
        rows_fn = SplitRows(
            functools.partial(rows_part, adapter=has_adapter, method=Block.mix_attention),
            lambda trained, frozen, mid, row_masks: rows_part(
                trained, frozen, mid, (), row_masks, adapter=False, method=Block.mix_mlp))
    else:
        rows_fn = functools.partial(rows_part, adapter=has_adapter,
                                    method=Block.mix if mix else None)
    return frozen, masks, halos_fn, rows_fn, edge


def row_edges(x, edge: int):
    """x [rows, tokens, C] -> its first and last `edge` tokens of each row [rows, 2·edge, C]."""
    return jnp.concatenate([x[:, :edge], x[:, x.shape[1] - edge:]], axis=1)


def _residual(x, y, keep, drop_rate):
    return x + (y if keep is None else apply_drop_path(y, keep, drop_rate))


class Block(nn.Module):
    """Pre-LN ViT block, then (optionally) its TIA: y = TIA(Block(x)).

    `adapter_ratio=None` builds a block without adapter. The drop-path key and rate are arguments
    (not RNG streams / attributes) so that an unrolled loop and a scan over stacked blocks draw
    the same masks.

    `chunk_group` > 0 computes attention + MLP (which are local to each chunk row) for at most
    that many rows per device at a time (devices: `row_devices`), so that neither the forward
    nor the backward pass holds more than one group's attention scores. With remat_policy
    "full" or "none" the groups run in `map_row_groups_recompute` (each recomputed in the
    backward pass, outputs and cotangents written in place), otherwise in `map_row_groups`
    under `jax.checkpoint` with the policy. A TIA run through `mix_rows` (the backbone's units:
    the previous block's TIA, then this block's attention + MLP) runs in the same groups, made
    row-local by its halos (adapters.tia_halos). The values are those of the ungrouped block.
    """

    embed_dim: int
    num_heads: int
    mlp_dim: int
    adapter_ratio: float | None = None
    adapter_chunk_local: bool = False
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    lora_rank: int = 0
    chunk_group: int = 0
    remat_policy: str = "none"
    row_axes: tuple[str, ...] = ()
    attention_row_from_probs: bool = False   # Attention.row_from_probs (unit_pieces sets it)

    def setup(self):
        def norm():
            return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, param_dtype=jnp.float32)

        self.norm1 = norm()
        self.attn = Attention(self.embed_dim, self.num_heads, self.dtype, self.attention_impl,
                              self.lora_rank, row_from_probs=self.attention_row_from_probs)
        self.norm2 = norm()
        self.mlp = Mlp(self.mlp_dim, self.dtype)
        if self.adapter_ratio is not None:
            self.adapter = TemporalInformativeAdapter(self.embed_dim, self.adapter_ratio,
                                                      chunk_local=self.adapter_chunk_local,
                                                      dtype=self.dtype)

    def mix(self, x, attn_keep=None, mlp_keep=None, drop_rate=None):
        """x + attention, then + MLP, on rows of x [rows, tokens, C]; `*_keep` are the drop-path
        masks [rows, 1, 1] (None: no drop path)."""
        x = self.mix_attention(x, attn_keep, mlp_keep, drop_rate)
        return self.mix_mlp(x, attn_keep, mlp_keep, drop_rate)

    def mix_attention(self, x, attn_keep=None, mlp_keep=None, drop_rate=None):
        """mix's first half: x + attention (the attention residual). Same arguments as mix."""
        return _residual(x, self.attn(self.norm1(x)), attn_keep, drop_rate)

    def mix_mlp(self, x, attn_keep=None, mlp_keep=None, drop_rate=None):
        """mix's second half: x + MLP, x the attention residual. Same arguments as mix."""
        return _residual(x, self.mlp(self.norm2(x)), mlp_keep, drop_rate)

    def __call__(self, x, drop_key, drop_rate, *, videos: int, time_tokens: int,
                 use_drop_path: bool):
        x = self.mix_rows(x, drop_key, drop_rate, use_drop_path=use_drop_path)
        return self.adapt(x, videos=videos, time_tokens=time_tokens)

    def mix_rows(self, x, drop_key, drop_rate, *, use_drop_path: bool, adapter=None,
                 keep_adapter=None, keep=None, mix: bool = True, videos: int = 1,
                 time_tokens: int = 1, trained_keys: tuple[str, ...] | None = None):
        """Attention + MLP (with their residuals) of every chunk row, in chunk groups (see the
        class docstring). Reads no adapter parameters of its own.

        adapter: parameters of a TIA (the previous block's) to run first, in the same chunk
        groups: each row's temporal conv reads one bottleneck row from each neighbouring chunk,
        computed beforehand for all rows (adapters.tia_halos), so the TIA too is row-local and
        neither it nor its backward pass holds a full-length temporary. keep_adapter / keep:
        traced bools gating the TIA / the attention + MLP (False: identity; None: always on).
        mix=False: the TIA alone. trained_keys: which of "adapter" / "mix" get gradients
        (None: both); the others are not differentiated (frozen weights).
        """
        x = constrain_rows(x, self.row_axes)
        if self.is_initializing():
            if adapter is not None or not mix:
                raise ValueError("Block.mix_rows: the adapter runs here only after init")
            masks, rate = drop_path_inputs(drop_key, drop_rate, x.shape, use_drop_path)
            return self.mix(x, *masks, *rate)
        params = ({"mix": {k: v for k, v in self.variables["params"].items() if k != "adapter"}}
                  if mix else {})
        if adapter is not None:
            params["adapter"] = adapter
        trained = {k: v for k, v in params.items() if trained_keys is None or k in trained_keys}
        frozen, masks, halos_fn, rows_fn, edge = unit_pieces(
            self, {k: v for k, v in params.items() if k not in trained}, drop_key, drop_rate,
            x.shape, has_adapter=adapter is not None, use_drop_path=use_drop_path,
            keep_adapter=keep_adapter, keep=keep, mix=mix, videos=videos, time_tokens=time_tokens)
        halos = halos_fn(trained, frozen, row_edges(x, edge)) if edge else ()
        # chunk_group rows per device: as many groups as one device's share needs.
        groups = device_row_groups(x.shape[0], self.chunk_group, self.row_axes)
        if groups == 1:
            x = rows_fn(trained, frozen, x, halos, masks)
        elif self.remat_policy in ("none", "full"):  # each group recomputed in the backward pass
            x = map_row_groups_recompute(rows_fn, trained, frozen, x, halos, masks, groups=groups,
                                         row_axes=self.row_axes)
        else:  # each group under jax.checkpoint with the policy (e.g. "dots": matmuls kept)
            def one_group(rows, *row_args):
                return rows_fn(trained, frozen, rows, row_args[len(masks):],
                               row_args[:len(masks)])

            x = map_row_groups(remat(one_group, self.remat_policy, prevent_cse=False),
                               (x, *masks, *halos), groups, self.row_axes)
        return constrain_rows(x, self.row_axes)

    def adapt(self, x, *, videos: int, time_tokens: int):
        """The block's TIA (identity without one). Reads only the adapter parameters."""
        if self.adapter_ratio is None:
            return x
        return constrain_rows(self.adapter(x, videos=videos, time_tokens=time_tokens),
                              self.row_axes)


# ----------------------------------------------------------------------------- backbone

class VisionTransformer(nn.Module):
    """VideoMAE ViT over 16-frame chunks, with TIA / side adapters (see the module docstring).

    Attributes:
      embed_dim, depth, num_heads, mlp_dim, patch_size: the size (see VARIANTS).
      tubelet, chunk_frames: temporal patch and chunk length (2 and 16: 8 temporal tokens/chunk).
      pretrain_img_size: side of the grid the position table is built for (224 -> 224 // p).
      drop_path_rate: stochastic depth, linspace(0, rate, depth)[i] for block i, drawn per chunk
        from the "dropout" RNG stream when train=True; active on frozen blocks too.
      adapter_mode: "adapter" | "adapter_full" | "frozen" | "full" | "side" | "none".
      adapter_blocks: "all" or block indices carrying a TIA ("adapter") or tapped ("side").
      adapter_ratio: TIA bottleneck ratio.
      adapter_chunk_local: TIA temporal conv confined to each chunk (chunks independent; needed
        for exact sampled-gradient training, see tadjax.train.sampled_grad). Side adapters always
        see the whole window.
      remat_policy: one of remat.REMAT_POLICIES, applied per block (block + its TIA) and per side
        adapter.
      scan_blocks: run each run of consecutive same-structure blocks with `lax.scan` over the
        stacked block parameters (stored unstacked as blocks_0 .. blocks_{depth-1}; the stack is
        one extra copy of those parameters per step, except for frozen ViT weights, which each
        unit picks from the unstacked ones with lax.switch). XLA:CPU compiled temp memory for the ViT-S
        adapter gradient at 256 frames, 160 px: 13.6 GiB unrolled with or without remat "full",
        1.8 GiB scanned with remat "full" (3.7 GiB with "dots"). With remat "full", chunk
        groups and only the TIAs trained, each run is one `scan_units_recompute` (the unit
        inputs in one stack, read and overwritten in place by the backward pass: 833 -> 777 MB
        for the 768-frame adapter step).
      dtype: computation dtype; parameters are float32, the residual stream stays float32.
      attention_impl: None / "" / "tadjax": head-major attention with a hand-written backward
        (models/attention.py; about 3x faster than the alternatives on XLA:CPU); otherwise the
        `implementation` of jax.nn.dot_product_attention ("xla", "cudnn").
      block_indices: original indices of the blocks this model holds (None: all of range(depth));
        a block-dropped parameter tree (tadjax.surgery.drop_blocks) loads into a model with the
        same `depth` and the kept indices here.
      lora_rank: rank of the LoRA branches on attn/qkv and attn/proj (0: none).
      chunk_group: > 0: each block computes its attention + MLP, and the TIA before them, for
        at most this many chunk rows per device at a time (see Block); 0: all rows at once. The rows are those of every video of the batch; the devices are those of
        `row_axes` in the mesh set with `jax.set_mesh` (without one: all devices, see
        row_devices), so that with D devices a group takes chunk_group rows from each.
      remat_input_dtype: None / "": with remat_policy "full", each block keeps its input for the
        backward pass as it is (float32); e.g. "bfloat16": keeps it in bfloat16 (half the
        memory; the backward pass recomputes the block from the rounded input, so gradients
        carry a relative error ~ 2^-8; the forward values are unchanged).
      row_axes: mesh axes the chunk rows (axis 0 of [videos·K, tokens, C], video-major) are
        split over, e.g. ("data", "fsdp", "snippet") for a batch split over data x fsdp and
        each video's chunks over snippet; applied (constrain_rows) only while a mesh holding
        these axes is set with `jax.set_mesh`, and a no-op otherwise.
      recompute_embedding: where the TIAs alone train through scanned, remat "full" chunk
        groups (AdaTAD's case), the frozen patch embedding and block 0 become the head of the
        recomputed units (scan_units_recompute's `head`): block 0's output is not kept for the
        backward pass but computed again there, group by group, from the frames. One block
        input less kept, one more embedding + block 0 pass: ViT-S at 256 frames, 160 px, the
        adapter step ran 3-7% slower (a profile / an A/B run) for a peak no lower (the forward
        pass holds that output whole for a moment either way), and at 768 frames 24 MiB less
        of XLA's temporaries (743 vs 767 MiB). False: keep block 0's output like the other block inputs.
      keep_attention_residual: where the TIAs alone train through scanned, remat "full" chunk
        groups (as recompute_embedding), each unit also keeps its attention residual (x +
        attention, the MLP's input) for the backward pass (scan_units_recompute's keep_mid),
        whose recompute of the attention half then skips the P·V matmul and the projection:
        one more activation per block kept (ViT-S, 256 frames, 160 px: ~20 MB a block) for
        less time. False: each block recomputed from its input alone.
    """

    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    tubelet: int = 2
    chunk_frames: int = 16
    pretrain_img_size: int = 224
    drop_path_rate: float = 0.0
    adapter_mode: str = "adapter"
    adapter_blocks: str | Sequence[int] = "all"
    adapter_ratio: float = 0.25
    adapter_chunk_local: bool = False
    remat_policy: str = "none"
    scan_blocks: bool = False
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    block_indices: Sequence[int] | None = None
    lora_rank: int = 0
    chunk_group: int = 0
    remat_input_dtype: Any = None
    row_axes: Sequence[str] = ()
    recompute_embedding: bool = True
    keep_attention_residual: bool = False

    def __post_init__(self):
        # A list from a config becomes a tuple so the module stays hashable (jit static args).
        if not isinstance(self.adapter_blocks, (str, tuple)):
            object.__setattr__(self, "adapter_blocks", tuple(self.adapter_blocks))
        if not isinstance(self.row_axes, tuple):
            object.__setattr__(self, "row_axes", tuple(self.row_axes))
        if self.block_indices is not None and not isinstance(self.block_indices, tuple):
            object.__setattr__(self, "block_indices", tuple(int(i) for i in self.block_indices))
        super().__post_init__()

    def kept_blocks(self) -> tuple[int, ...]:
        """Original indices of the blocks this model holds, ascending."""
        if self.block_indices is None:
            return tuple(range(self.depth))
        kept = tuple(sorted(set(int(i) for i in self.block_indices)))
        bad = [i for i in kept if not 0 <= i < self.depth]
        if bad or not kept or len(kept) != len(self.block_indices):
            raise ValueError(f"block_indices {self.block_indices} must be distinct indices in "
                             f"[0, depth={self.depth}), at least one")
        return kept

    # -- configuration checks and derived structure

    def _adapter_indices(self) -> tuple[int, ...]:
        if self.adapter_mode not in ADAPTER_MODES:
            raise ValueError(f"unknown adapter_mode {self.adapter_mode!r}; expected one of {ADAPTER_MODES}")
        if self.adapter_mode not in ("adapter", "adapter_full", "side"):
            return ()
        if isinstance(self.adapter_blocks, str):
            if self.adapter_blocks != "all":
                raise ValueError(f"adapter_blocks must be 'all' or a list of block indices, "
                                 f"got {self.adapter_blocks!r}")
            return tuple(range(self.depth))
        indices = tuple(sorted(set(int(i) for i in self.adapter_blocks)))
        bad = [i for i in indices if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"adapter_blocks {bad} out of range for depth {self.depth}")
        return indices

    def _block_kwargs(self, i: int) -> dict:
        with_adapter = self.adapter_mode in ("adapter", "adapter_full") and i in self._adapter_indices()
        return dict(embed_dim=self.embed_dim, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                    adapter_ratio=self.adapter_ratio if with_adapter else None,
                    adapter_chunk_local=self.adapter_chunk_local, dtype=self.dtype,
                    attention_impl=self.attention_impl, lora_rank=self.lora_rank,
                    chunk_group=self.chunk_group, remat_policy=self.remat_policy,
                    row_axes=self.row_axes)

    def _patch_conv(self, **kw) -> nn.Conv:
        kernel = (self.tubelet, self.patch_size, self.patch_size)
        return nn.Conv(self.embed_dim, kernel, strides=kernel, padding="VALID", dtype=self.dtype,
                       param_dtype=jnp.float32, **kw)

    def setup(self):
        self._adapter_indices()  # validates adapter_mode and adapter_blocks
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {self.remat_policy!r}; expected one of {REMAT_POLICIES}")
        if self.remat_input_dtype and self.remat_policy != "full":
            raise ValueError(f"remat_input_dtype={self.remat_input_dtype!r} needs remat_policy "
                             f"'full' (the block recomputed from its input), got "
                             f"{self.remat_policy!r}")
        if self.keep_attention_residual and not (self._units_recomputed_in_place()
                                                 and self.chunk_group > 0):
            raise ValueError("keep_attention_residual applies to the TIA-only training of "
                             "scanned, remat 'full' chunk groups: it needs adapter_mode "
                             "'adapter', scan_blocks=True, remat_policy 'full', chunk_group > 0 "
                             f"and no remat_input_dtype; got adapter_mode={self.adapter_mode!r}, "
                             f"scan_blocks={self.scan_blocks}, remat_policy={self.remat_policy!r}, "
                             f"chunk_group={self.chunk_group}, "
                             f"remat_input_dtype={self.remat_input_dtype!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.chunk_frames % self.tubelet:
            raise ValueError(f"chunk_frames {self.chunk_frames} is not a multiple of tubelet {self.tubelet}")
        self.patch_embed = self._patch_conv()
        # A dict keyed by original index: the submodules are named blocks_{i} (flax's naming).
        self.blocks = {str(i): Block(**self._block_kwargs(i)) for i in self.kept_blocks()}
        if self.adapter_mode == "side":
            missing = sorted(set(self._adapter_indices()) - set(self.kept_blocks()))
            if missing:
                raise ValueError(f"side adapters tap blocks {missing}, which block_indices drops")
            self.side_adapters = {
                str(i): TemporalInformativeAdapter(self.embed_dim, self.adapter_ratio, residual=False,
                                                   dtype=self.dtype)
                for i in self._adapter_indices()}

    # -- forward

    def __call__(self, frames: jax.Array, *, train: bool = False, return_tokens: bool = False,
                 block_mask: jax.Array | None = None, normalize=None):
        """frames [B, T_f, H, W, 3], normalised, T_f a multiple of chunk_frames; or, with
        `normalize` (frames -> normalised frames, e.g. detector.normalize_frames for 0-255
        frames), frames as they come (uint8): normalised here in the chunk groups of the patch
        embedding, so that the float frames (4 x the uint8 ones) never exist all at once.

        Returns features [B, T_f // tubelet, C] (float32, spatially averaged, before any
        resize), or (features, tokens [B, K, t·h·w, C]) with return_tokens=True. `block_mask`:
        bool [depth] by original block index, False = skip that block (identity; its adapter is
        skipped with it); entries of blocks the model does not hold are ignored.
        """
        if frames.ndim != 5 or frames.shape[-1] != 3:
            raise ValueError(f"VisionTransformer expects frames [B, T, H, W, 3], got {frames.shape}")
        videos, num_frames, height, width, _ = frames.shape
        if num_frames % self.chunk_frames:
            raise ValueError(f"VisionTransformer: {num_frames} frames is not a multiple of "
                             f"chunk_frames={self.chunk_frames}")
        if min(height, width) < self.patch_size:
            raise ValueError(f"VisionTransformer: frames {height}x{width} are smaller than one "
                             f"{self.patch_size}-px patch")
        chunks = num_frames // self.chunk_frames
        rows_in = constrain_rows(frames.reshape(videos * chunks, self.chunk_frames, height, width,
                                                3), self.row_axes)
        # Token grid [t, h, w] of a chunk (VALID: remainder pixels dropped).
        time_tokens, dim = self.chunk_frames // self.tubelet, self.embed_dim
        h, w = height // self.patch_size, width // self.patch_size
        pos = position_table(dim, time_tokens, self.pretrain_img_size // self.patch_size, (h, w))
        frozen_embed = self._frozen_embedding()

        def embed_all():
            x = self._embed(rows_in, normalize)  # [B·K, t, h, w, C]
            x = x.astype(jnp.float32).reshape(videos * chunks, time_tokens * h * w, dim) + pos
            x = constrain_rows(x, self.row_axes)
            return jax.lax.stop_gradient(x) if frozen_embed else x

        embed = None
        if frozen_embed and self.recompute_embedding and not self.is_initializing():
            # The embedding as a row-local function, for _run_blocks to compute group by group.
            conv_fn, conv_params = self._patch_embed_fn(normalize)

            def embed_rows(p, rows):
                y = conv_fn(p, rows)
                return y.astype(jnp.float32).reshape(rows.shape[0], time_tokens * h * w, dim) + pos
            embed = (embed_rows, conv_params, rows_in, (videos * chunks, time_tokens * h * w, dim))

        if block_mask is not None:
            block_mask = jnp.asarray(block_mask)
            if block_mask.shape != (self.depth,):
                raise ValueError(f"block_mask must have shape ({self.depth},) (one flag per "
                                 f"original block index), got {block_mask.shape}")
        collect = self.is_mutable_collection("intermediates")
        pool = not return_tokens and self.adapter_mode != "side"
        x, taps, outputs = self._run_blocks(embed_all, videos=videos, time_tokens=time_tokens,
                                            train=train, block_mask=block_mask, collect=collect,
                                            pool=pool, embed=embed)
        if collect:
            self.sow("intermediates", "block_outputs", outputs)
        if self.adapter_mode == "frozen":
            x = jax.lax.stop_gradient(x)
        if pool:   # already averaged over space: [B·K, t, C]
            return x.reshape(videos, chunks * time_tokens, dim)

        if self.adapter_mode == "side":
            x = x + self._side_sum(taps, videos=videos, time_tokens=time_tokens)
        tokens = x.reshape(videos, chunks, time_tokens * h * w, dim)
        features = spatial_mean(tokens.reshape(videos * chunks, time_tokens * h * w, dim),
                                time_tokens)
        features = features.reshape(videos, chunks * time_tokens, dim)
        return (features, tokens) if return_tokens else features

    def _embed(self, x, normalize):
        """Patch embedding of chunk rows [rows, chunk_frames, H, W, 3], `normalize` first (None:
        frames already normalised); with `normalize` and chunk_group > 0, in the chunk groups of
        the blocks (row-local, like them), so the normalised frames exist one group at a time.
        (Already-float frames are embedded at once: grouping them saves nothing, and XLA:CPU
        then kept more of them.)"""
        if normalize is None:
            return self.patch_embed(x)
        groups = device_row_groups(x.shape[0], self.chunk_group, self.row_axes)
        if groups == 1 or self.is_initializing():
            return self.patch_embed(normalize(x))
        conv_fn, params = self._patch_embed_fn(normalize)
        return map_row_groups(lambda rows: conv_fn(params, rows), (x,), groups, self.row_axes)

    def _frozen_embedding(self) -> bool:
        """Whether the patch embedding gets no gradient (the modes that freeze the ViT)."""
        return self.adapter_mode in ("adapter", "frozen", "side")

    def _patch_embed_fn(self, normalize):
        """(fn(params, frame rows) -> patch tokens [rows, t, h, w, C], `normalize` first when
        given; the embedding's parameters, under stop_gradient where it is frozen)."""
        params = self.variables["params"]["patch_embed"]
        if self._frozen_embedding():
            params = jax.lax.stop_gradient(params)
        conv = self._patch_conv(parent=None)

        def fn(p, rows):
            return conv.apply({"params": p}, rows if normalize is None else normalize(rows))
        return fn, params

    def _drop_inputs(self, train: bool):
        use = bool(train) and self.drop_path_rate > 0
        rates = jnp.asarray(np.linspace(0.0, self.drop_path_rate, self.depth), jnp.float32)
        if use:
            keys = jax.random.split(self.make_rng("dropout"), self.depth)
        else:  # placeholders, never read
            keys = jnp.zeros((self.depth,), jnp.uint32)
        return use, keys, rates

    def _run_blocks(self, x_fn, *, videos, time_tokens, train, block_mask=None, collect=False,
                    pool=False, embed=None):
        """The blocks on the tokens x = x_fn() [rows, tokens, C]. Returns (output of the last
        block, {block index: output} for the side taps, {"i": output of block i} if `collect`
        else {}); with `pool`, the output averaged over space (spatial_mean: [rows,
        time_tokens, C]), inside the last recomputed run where there is one (so the
        full-length output and its cotangent never exist whole).

        embed: (embed_rows(params, rows) -> token rows, params, rows, x's shape): x as a frozen
        row-local function of row-aligned input (the patch embedding of the frames). Where the first
        unit (block 0's attention + MLP, frozen) is followed by a run of scan_units_recompute,
        the embedding and that unit are its head: block 0's output is not kept for the backward
        pass but recomputed there group by group from the frames (one block input fewer)."""
        use_drop_path, keys, rates = self._drop_inputs(train)
        tapped = set(self._adapter_indices()) if self.adapter_mode == "side" else set()
        call_kw = dict(videos=videos, time_tokens=time_tokens, use_drop_path=use_drop_path)
        kept = self.kept_blocks()
        taps, outputs = {}, {}
        keep_flags = (jnp.ones((self.depth,), bool) if block_mask is None
                      else block_mask.astype(bool))

        def gated(fn, keep, h):
            # lax.cond: a skipped block costs nothing, and one compiled function serves any mask.
            if block_mask is None:
                return fn(h)
            return jax.lax.cond(keep, fn, lambda h: h, h)

        if self.is_initializing():  # create the parameters through the ordinary submodules
            x = x_fn()
            for i in kept:
                x = self.blocks[str(i)](x, keys[i], rates[i], **call_kw)
                if i in tapped:
                    taps[i] = jax.lax.stop_gradient(x)
            return (spatial_mean(x, time_tokens) if pool else x), taps, outputs

        params = {i: self._block_params(i) for i in kept}
        has_adapter = {i: self._block_kwargs(i)["adapter_ratio"] is not None for i in kept}
        # The checkpointed unit j is the TIA of held block kept[j-1] followed by the attention +
        # MLP of kept[j] (unit 0: the attention + MLP of kept[0]; the TIA of the last block runs
        # after the units). Each unit keeps only its input for the backward pass, as a unit
        # "block + its TIA" would, but the backward pass of a unit needs no output of its
        # attention + MLP (only their inputs, which the cheap TIA recomputes), so with chunk
        # groups (each group's attention + MLP is checkpointed on its own) they run twice in
        # all (forward, and once more when back-propagated), not three times. And unit 0,
        # whose input gets no gradient, is never recomputed or back-propagated unless the ViT
        # itself trains. A unit's TIA runs inside its chunk groups (Block.mix_rows), so with
        # chunk groups no full-length TIA temporary exists, forward or backward.
        mixer = Block(**{**self._block_kwargs(kept[0]), "adapter_ratio": None}, parent=None)

        def adapter_fn(p, h, i):
            block = Block(**self._block_kwargs(i), parent=None)
            return block.apply({"params": {"adapter": p}}, h, videos=videos,
                               time_tokens=time_tokens, method=Block.adapt)

        def unit_fn(p, h, key, rate, keep_prev, keep, adapter_only=False):
            def run(h):
                return mixer.apply({"params": p["mix"]}, h, key, rate, use_drop_path=use_drop_path,
                                   adapter=p.get("adapter"), mix=not adapter_only,
                                   keep_adapter=None if block_mask is None else keep_prev,
                                   keep=None if block_mask is None else keep,
                                   videos=videos, time_tokens=time_tokens,
                                   trained_keys=self._unit_grad_keys(), method=Block.mix_rows)

            if block_mask is None:
                return run(h)
            active = keep_prev if adapter_only else (keep | keep_prev if "adapter" in p else keep)
            return jax.lax.cond(active, run, lambda h: h, h)

        def unit_params(j):
            p = {"mix": {k: v for k, v in params[kept[j]].items() if k != "adapter"}}
            if j > 0 and has_adapter[kept[j - 1]]:
                p["adapter"] = params[kept[j - 1]]["adapter"]
            return p

        def previous_output(j, p, h, keep_prev):
            """Output of held block kept[j-1] (after its TIA) from unit j's params and input:
            the TIA once more outside the checkpointed unit (cheap), only where block outputs
            are collected or tapped."""
            if "adapter" not in p:
                return h
            return gated(lambda h: adapter_fn(p["adapter"], h, kept[j - 1]), keep_prev, h)

        # Runs of consecutive units with the same structure, each one scan (or unrolled loop).
        runs = []
        for j in range(len(kept)):
            prev = kept[j - 1] if j else None
            signature = (j == 0, j > 0 and has_adapter[prev], prev in tapped)
            if runs and runs[-1][0] == signature and j > 0:
                runs[-1][1].append(j)
            else:
                runs.append((signature, [j]))

        def record(i, y):
            if i in tapped:
                taps[i] = jax.lax.stop_gradient(y)
            if collect:
                outputs[str(i)] = y

        # In a scan, frozen attention/MLP weights are not stacked (a copy of them all, each
        # step: the ViT's size again in temporaries) but picked inside the unit by lax.switch
        # on the unit's position (a copy of one block's weights at a time).
        pick_mix = self.scan_blocks and "mix" not in (self._unit_grad_keys() or ("mix",))

        def picking_unit_fn(p, h, *rest):
            """unit_fn with p["mix"] picked from p["mixes"] (every unit's of the run, explicit
            so that a custom VJP receives them) by p["mix_index"]."""
            mixes, index = p["mixes"], p["mix_index"]
            p = {k: v for k, v in p.items() if k not in ("mixes", "mix_index")}
            p["mix"] = jax.lax.switch(index, [functools.partial(lambda m: m, m) for m in mixes])
            return unit_fn(p, h, *rest)

        # With remat "full", chunk groups and only the TIAs trained (AdaTAD's case), each run
        # of units and the last TIA go through scan_units_recompute: the same values and
        # gradients, with the kept unit inputs read in place in the backward pass.
        rows = embed[3][0] if embed is not None else None
        if rows is None:
            x = x_fn()
            rows = x.shape[0]
        groups = device_row_groups(rows, self.chunk_group, self.row_axes)
        in_place = self._units_recomputed_in_place() and groups > 1

        def unit_of(mixes, i, consts, shape):
            """unit_pieces of a unit that starts with a TIA (the trained part), its frozen
            attention/MLP weights picked from `mixes` by i (none: the TIA alone)."""
            key, rate, keep_prev, keep = consts
            frozen = ({"mix": jax.lax.switch(i, [functools.partial(lambda m: m, m)
                                                for m in mixes])} if mixes else {})
            gated = block_mask is not None
            return unit_pieces(mixer, frozen, key, rate, shape, has_adapter=True,
                               use_drop_path=use_drop_path, mix=bool(mixes),
                               keep_adapter=keep_prev if gated else None,
                               keep=keep if gated else None, videos=videos,
                               time_tokens=time_tokens, split=self.keep_attention_residual)

        def recomputed(run):
            """Whether a run goes through scan_units_recompute."""
            (first, with_adapter, prev_tapped), units = run
            need_prev = not first and (collect or prev_tapped)
            return in_place and with_adapter and pick_mix and len(units) > 1 and not need_prev

        head = None
        if embed is not None and len(runs) > 1 and recomputed(runs[1]):
            # The embedding and unit 0 (block kept[0]'s attention + MLP, no TIA before it, all
            # frozen here) as the head of the next run.
            embed_rows, embed_params, rows_in, rows_shape = embed
            first_block = kept[0]
            unit0, masks0, _, rows0_fn, _ = unit_pieces(
                mixer, {"mix": unit_params(0)["mix"]}, keys[first_block], rates[first_block],
                rows_shape, has_adapter=False, use_drop_path=use_drop_path,
                keep=None if block_mask is None else keep_flags[first_block],
                videos=videos, time_tokens=time_tokens)

            def head_fn(hf, rows):
                return rows0_fn({}, hf["unit"], embed_rows(hf["embed"], rows[0]), (), rows[1:])
            head = (head_fn, {"embed": embed_params, "unit": unit0}, (rows_in, *masks0))
            x = jax.ShapeDtypeStruct(rows_shape, jnp.float32)
            runs = runs[1:]
        elif embed is not None:
            x = x_fn()

        tail_done = pooled = False
        for run_ in runs:
            (first, with_adapter, prev_tapped), units = run_
            pick = pick_mix and len(units) > 1
            need_prev = not first and (collect or prev_tapped)
            cur = np.asarray([kept[j] for j in units])
            if recomputed(run_):
                trained = jax.tree_util.tree_map(
                    lambda *a: jnp.stack(a), *[{"adapter": params[kept[j - 1]]["adapter"]}
                                               for j in units])
                prev = np.asarray([kept[j - 1] for j in units])
                tail = None
                if units[-1] == len(kept) - 1 and has_adapter[kept[-1]]:  # the last TIA too
                    one = kept[-1]
                    tail = (lambda c, shape: unit_of([], 0, c, shape),
                            {"adapter": params[one]["adapter"]},
                            (keys[one], rates[one], keep_flags[one], keep_flags[one]))
                    tail_done = True
                # The pooling inside too, when this run ends the network.
                ends = units[-1] == len(kept) - 1 and (tail_done or not has_adapter[kept[-1]])
                finish = None
                if pool and ends and not collect and kept[-1] not in tapped:
                    finish, pooled = functools.partial(spatial_mean, time_tokens=time_tokens), True
                x = scan_units_recompute(
                    unit_of, trained, [unit_params(j)["mix"] for j in units],
                    (keys[cur], rates[cur], keep_flags[prev], keep_flags[cur]), x, tail,
                    groups=groups, row_axes=self.row_axes, finish=finish, head=head,
                    keep_mid=self.keep_attention_residual)
                head = None
                continue
            fn = picking_unit_fn if pick else unit_fn
            if self.remat_input_dtype:
                fn = remat_narrow_input(fn, jnp.dtype(self.remat_input_dtype),
                                        grad_keys=self._unit_grad_keys())
            else:
                fn = remat(fn, self.remat_policy, prevent_cse=not self.scan_blocks)
            prev = np.asarray([kept[j - 1] if j else kept[0] for j in units])
            keep_prev = keep_flags[prev] if not first else jnp.ones((len(units),), bool)
            if self.scan_blocks:
                per_unit = [unit_params(j) for j in units]
                mixes = [q["mix"] for q in per_unit] if pick else None
                if pick:
                    per_unit = [{**{k: v for k, v in q.items() if k != "mix"},
                                 "mix_index": jnp.int32(n)} for n, q in enumerate(per_unit)]
                stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *per_unit)

                def body(h, xs, fn=fn, need_prev=need_prev, j0=units[0], mixes=mixes):
                    p, key, rate, kp, k = xs
                    if mixes is not None:
                        p = {**p, "mixes": mixes}
                    y = previous_output(j0, p, h, kp) if need_prev else None
                    return fn(p, h, key, rate, kp, k), y

                x, ys = jax.lax.scan(body, x, (stacked, keys[cur], rates[cur], keep_prev,
                                               keep_flags[cur]))
                if need_prev:
                    for n, j in enumerate(units):
                        record(kept[j - 1], ys[n])
            else:
                for n, j in enumerate(units):
                    p = unit_params(j)
                    if need_prev:
                        record(kept[j - 1], previous_output(j, p, x, keep_prev[n]))
                    x = fn(p, x, keys[cur[n]], rates[cur[n]], keep_prev[n], keep_flags[cur[n]])
        last = kept[-1]
        if has_adapter[last] and not tail_done:  # the last TIA, on its own, in the same groups
            final = remat(lambda p, h: unit_fn(p, h, keys[last], rates[last], keep_flags[last],
                                               keep_flags[last], adapter_only=True),
                          self.remat_policy)
            # The mixer is applied with the last block's weights but reads none of them (mix=False).
            mix_params = {k: v for k, v in params[last].items() if k != "adapter"}
            x = final({"mix": mix_params, "adapter": params[last]["adapter"]}, x)
        if not pooled:
            record(last, x)
            if pool:
                x = spatial_mean(x, time_tokens)
        return x, taps, outputs

    def _units_recomputed_in_place(self) -> bool:
        """Whether the settings send the units through scan_units_recompute (given more than one
        chunk group): scanned, remat "full" with float inputs kept, only the TIAs trained."""
        return bool(self.scan_blocks and self.remat_policy == "full" and not self.remat_input_dtype
                    and self._unit_grad_keys() == ("adapter",))

    def _unit_grad_keys(self) -> tuple[str, ...] | None:
        """Entries of a unit's parameters ({"mix": ..., "adapter": ...}) that get gradients
        (None: all), as _block_params."""
        if self.adapter_mode in ("full", "none", "adapter_full"):
            return None
        return ("adapter",) if self.adapter_mode == "adapter" else ()

    def _block_params(self, i: int):
        """Parameters of block i, with stop_gradient on whatever the mode keeps frozen."""
        p = self.variables["params"][f"blocks_{i}"]
        if self.adapter_mode in ("full", "none", "adapter_full"):
            return p
        if self.adapter_mode == "adapter":
            return {k: (v if k == "adapter" else jax.lax.stop_gradient(v)) for k, v in p.items()}
        return jax.lax.stop_gradient(p)

    def _side_sum(self, taps, *, videos, time_tokens):
        total = 0.0
        for key, adapter in self.side_adapters.items():
            f = taps[int(key)]
            if self.is_initializing():
                total = total + adapter(f, videos=videos, time_tokens=time_tokens)
                continue
            params = self.variables["params"][f"side_adapters_{key}"]
            module = TemporalInformativeAdapter(self.embed_dim, self.adapter_ratio, residual=False,
                                                dtype=self.dtype, parent=None)
            fn = remat(lambda p, f: module.apply({"params": p}, f, videos=videos,
                                                 time_tokens=time_tokens), self.remat_policy)
            total = total + fn(params, f)
        return total


def from_variant(name: str, **overrides) -> VisionTransformer:
    """VisionTransformer of a named size ("S", "B", "L", "H", "g") with attribute overrides."""
    if name not in VARIANTS:
        raise ValueError(f"unknown ViT variant {name!r}; expected one of {sorted(VARIANTS)}")
    return VisionTransformer(**{**VARIANTS[name], **overrides})
