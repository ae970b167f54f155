"""Memory options of the ViT backbone: chunk-grouped blocks give the values and gradients of the
ungrouped ones and hold less in XLA's compiled temporaries."""
import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_vit import FAST, frames, random_params, run, tiny  # noqa: E402

from tadjax import tree  # noqa: E402
from tadjax.models import vit  # noqa: E402


def assert_same_values_and_grads(y1, g1, y0, g0) -> dict:
    """y1 and every gradient of g1 equal y0 and g0's (float32 tolerances); g0 flattened."""
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), atol=1e-5, rtol=0)
    g0, g1 = tree.flatten(g0), tree.flatten(g1)
    for name, a in g0.items():
        np.testing.assert_allclose(np.asarray(g1[name]), np.asarray(a), atol=1e-5, rtol=1e-5,
                                   err_msg=name)
    return g0


@pytest.mark.parametrize("rows,group,expected", [
    (12, 0, 1), (12, 12, 1), (12, 20, 1), (12, 4, 3), (12, 5, 3), (12, 1, 12), (7, 3, 7),
    (96, 8, 12)])
def test_row_groups(rows, group, expected):
    assert vit.row_groups(rows, group) == expected


def test_map_row_groups_takes_contiguous_rows_on_one_device():
    x = jnp.arange(12.0).reshape(6, 2)
    seen = []

    def fn(rows):
        seen.append(rows.shape)
        return rows * 10 + jnp.arange(2.0)

    np.testing.assert_array_equal(vit.map_row_groups(fn, (x,), 3), x * 10 + jnp.arange(2.0))
    assert seen == [(2, 2)]  # traced once, on groups of 6 / 3 rows
    # Group j holds rows 2j, 2j + 1: each group repeats its first row.
    first = vit.map_row_groups(lambda r: jnp.broadcast_to(r[:1], r.shape), (x,), 3)
    np.testing.assert_array_equal(first, np.asarray(x)[[0, 0, 2, 2, 4, 4]])


@pytest.mark.parametrize("mode,blocks,policy,scan,group,masked,keep", [
    ("adapter", "all", "full", True, 1, True, False), ("adapter", "all", "full", True, 1, True, True),
    ("adapter_full", "all", "full", False, 1, False, False),
    ("adapter_full", "all", "dots", False, 2, True, False),
    ("side", [1], "none", True, 2, False, False)])
def test_chunk_group_matches_ungrouped_values_and_gradients(mode, blocks, policy, scan, group,
                                                            masked, keep):
    """3 videos x 2 chunks = 6 rows in groups of 2 (video by video) or of 1 (each TIA's temporal
    conv then reads its neighbouring chunks' halos across groups); policy "full" / "none" runs
    the groups with the in-place recomputing map, "dots" with lax.map under the policy; with a
    block mask (block 1 skipped) the gated TIA / attention + MLP inside the groups; keep: each
    unit's attention residual kept (its drop-path mask and gate applied in either half)."""
    base = tiny(depth=3, adapter_mode=mode, adapter_blocks=blocks, drop_path_rate=0.3,
                remat_policy=policy, scan_blocks=scan)
    x = frames((3, 32, 16, 16, 3))
    params = random_params(base, x)
    rngs = {"dropout": jax.random.key(3)}
    mask = jnp.asarray([True, False, True]) if masked else None

    def value_and_grad(model):
        def loss(p):
            y = model.apply({"params": p}, x, train=True, rngs=rngs, block_mask=mask)
            return jnp.sum(jnp.sin(y)), y
        return run(jax.value_and_grad(loss, has_aux=True), params)

    (_, y0), g0 = value_and_grad(base)
    (_, y1), g1 = value_and_grad(base.clone(chunk_group=group, keep_attention_residual=keep))
    g0 = assert_same_values_and_grads(y1, g1, y0, g0)
    assert any(np.any(np.asarray(a) != 0) for a in g0.values())


@pytest.mark.parametrize("mode", ["adapter", pytest.param("full", marks=pytest.mark.slow)])
def test_grouped_patch_embedding_normalises_uint8_frames_in_the_groups(mode):
    """uint8 frames with `normalize`: the chunk groups normalise and embed their own rows; the
    values and gradients (of the patch embedding too, when it trains) are those of embedding the
    normalised frames at once."""
    from tadjax.models.detector import normalize_frames
    base = tiny(depth=2, adapter_mode=mode, remat_policy="full", scan_blocks=True)
    raw = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 32, 16, 16, 3)), jnp.uint8)
    norm = functools.partial(normalize_frames, dtype=jnp.float32)
    params = random_params(base, norm(raw))

    def value_and_grad(model, x, **kw):
        def loss(p):
            y = model.apply({"params": p}, x, **kw)
            return jnp.sum(jnp.sin(y)), y
        return run(jax.value_and_grad(loss, has_aux=True), params)

    (_, y0), g0 = value_and_grad(base, norm(raw))
    (_, y1), g1 = value_and_grad(base.clone(chunk_group=1), raw, normalize=norm)
    assert_same_values_and_grads(y1, g1, y0, g0)
    g1 = tree.flatten(g1)
    assert (mode == "full") == bool(np.any(np.asarray(g1["patch_embed/kernel"]) != 0))


def test_map_row_groups_recompute_values_and_gradients():
    """A row-local fn with a trained weight, a frozen one, a differentiable row input and a
    constant one: the values and gradients of calling it on all rows at once."""
    rng = np.random.default_rng(0)
    x, d, c = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((6, 4, 3), (6, 3), (6, 1, 1)))
    w, f = jnp.asarray(rng.normal(size=(3, 3)), jnp.float32), jnp.float32(0.5)

    def fn(trained, frozen, rows, diff_rows, const_rows):
        (dr,), (cr,) = diff_rows, const_rows
        return jnp.tanh(rows @ trained["w"] * frozen + dr[:, None]) * cr + rows

    def loss(w, x, d, grouped):
        if grouped:
            y = vit.map_row_groups_recompute(fn, {"w": w}, f, x, (d,), (c,), groups=3)
        else:
            y = fn({"w": w}, f, x, (d,), (c,))
        return jnp.sum(jnp.sin(y) * jnp.arange(3.0))

    ref = jax.value_and_grad(loss, argnums=(0, 1, 2))(w, x, d, False)
    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)(w, x, d, True)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-6)


def _units_case(n=3, videos=2, chunks=4, time_tokens=4, sites=16, dim=32, seed=0):
    """n units "TIA, then attention + MLP" (+ a TIA-only tail) over videos·chunks rows, as
    unit_pieces builds them, with random weights, drop path and gates."""
    from tadjax.models.adapters import TemporalInformativeAdapter
    rows, tokens = videos * chunks, time_tokens * sites
    x = jax.random.normal(jax.random.key(seed), (rows, tokens, dim))
    block = vit.Block(embed_dim=dim, num_heads=2, mlp_dim=2 * dim, parent=None)
    keys = jax.random.split(jax.random.key(seed + 1), n + 1)
    mixes = [jax.tree.map(lambda a: a + 0.1 * jax.random.normal(keys[i], a.shape),
                          block.init(keys[i], x, keys[i], 0.0, use_drop_path=False,
                                     method=vit.Block.mix_rows)["params"]) for i in range(n)]
    tia = TemporalInformativeAdapter(dim)
    adapters = [jax.tree.map(lambda a: a + 0.1 * jax.random.normal(keys[i], a.shape),
                             tia.init(keys[i], x, videos=videos, time_tokens=time_tokens)["params"])
                for i in range(n + 1)]
    trained = jax.tree.map(lambda *a: jnp.stack(a), *[{"adapter": a} for a in adapters[:n]])
    consts = (keys[:n], jnp.full((n,), 0.3), jnp.asarray([True, False, True][:n]),
              jnp.asarray([True, True, False][:n]))

    def unit(mixes, i, c, shape):
        key, rate, keep_prev, keep = c
        frozen = ({"mix": jax.lax.switch(i, [lambda m=m: m for m in mixes])} if mixes else {})
        return vit.unit_pieces(block, frozen, key, rate, shape, has_adapter=True,
                               use_drop_path=True, mix=bool(mixes), keep_adapter=keep_prev,
                               keep=keep, videos=videos, time_tokens=time_tokens)

    tail_consts = (keys[n], jnp.float32(0.0), jnp.asarray(True), jnp.asarray(True))
    tail = (lambda c, shape: unit([], 0, c, shape), {"adapter": adapters[n]}, tail_consts)
    return x, trained, mixes, consts, tail, unit


def _scanned_checkpointed_units(unit, trained, mixes, consts, x, tail, groups):
    """The same units as lax.scan of jax.checkpoint'ed units (each through
    map_row_groups_recompute), then the tail under jax.checkpoint: JAX's own autodiff."""
    def one(t, f, c, h, unit_fn):
        f, masks, halos_fn, rows_fn, edge = unit_fn(c, h.shape)
        halos = halos_fn(t, f, vit.row_edges(h, edge)) if edge else ()
        return vit.map_row_groups_recompute(rows_fn, t, f, h, halos, masks, groups=groups)

    def step(h, xs):
        t, c, i = xs
        return jax.checkpoint(lambda t, h: one(t, None, c, h,
                                               lambda c, s: unit(mixes, i, c, s)))(t, h), None

    h = jax.lax.scan(step, x, (trained, consts, jnp.arange(len(mixes))))[0]
    tail_unit, tail_trained, tail_consts = tail
    return jax.checkpoint(lambda t, h: one(t, None, tail_consts, h, tail_unit))(tail_trained, h)


# The heaviest cases (23-37 s each on the CI's 2 cores) run with the slow checks, to keep the
# default suite under 10 minutes; the others cover the same code paths.
@pytest.mark.parametrize("groups,pool", [pytest.param(1, False, marks=pytest.mark.slow),
                                         (2, False), (8, False), (8, True)])
def test_scan_units_recompute_matches_scanned_checkpointed_units(groups, pool):
    """Values and gradients (TIAs, input) of scan_units_recompute (unit inputs in one stack,
    read and overwritten in place) against JAX's autodiff of lax.scan of checkpointed units,
    with the TIAs' halos crossing groups, drop path and gated TIAs / blocks; with `pool`, the
    spatial mean inside (finish, group by group) against the mean after the reference."""
    x, trained, mixes, consts, tail, unit = _units_case()
    finish = functools.partial(vit.spatial_mean, time_tokens=4) if pool else None

    def loss(trained, tail_trained, x, fn):
        y = fn(trained, (tail[0], tail_trained, tail[2]), x)
        return jnp.sum(jnp.sin(y) * jnp.linspace(-1, 1, y.shape[-1]))

    def new(trained, tail, x):
        return vit.scan_units_recompute(unit, trained, mixes, consts, x, tail, groups=groups,
                                        finish=finish)

    def ref(trained, tail, x):
        y = _scanned_checkpointed_units(unit, trained, mixes, consts, x, tail, groups)
        return y if finish is None else finish(y)

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
    got = run(lambda t, tt, x: grad(t, tt, x, new), trained, tail[1], x)
    want = run(lambda t, tt, x: grad(t, tt, x, ref), trained, tail[1], x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)
    assert float(jnp.max(jnp.abs(got[1][0]["adapter"]["down"]["kernel"]))) > 0


@pytest.mark.parametrize("groups", [1, pytest.param(8, marks=pytest.mark.slow)])
def test_scan_units_recompute_head_matches_given_input(groups):
    """With a head (x computed from row-aligned inputs, recomputed group by group in the
    backward pass instead of kept), the values and the gradients of the TIAs are those with x
    computed beforehand and given."""
    x, trained, mixes, consts, tail, unit = _units_case()
    w = jax.random.normal(jax.random.key(7), (x.shape[-1], x.shape[-1])) / 4
    noise = jax.random.normal(jax.random.key(8), x.shape)

    def head_fn(hf, rows):
        return jnp.tanh(rows[0] @ hf["w"]) + rows[1]

    def loss(trained, tail_trained, with_head):
        t = (tail[0], tail_trained, tail[2])
        if with_head:
            shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
            y = vit.scan_units_recompute(unit, trained, mixes, consts, shape, t, groups=groups,
                                         head=(head_fn, {"w": w}, (x, noise)))
        else:
            y = vit.scan_units_recompute(unit, trained, mixes, consts,
                                         head_fn({"w": w}, (x, noise)), t, groups=groups)
        return jnp.sum(jnp.sin(y) * jnp.linspace(-1, 1, y.shape[-1]))

    grad = jax.value_and_grad(loss, argnums=(0, 1))
    got = jax.jit(grad, static_argnums=2)(trained, tail[1], True)
    want = jax.jit(grad, static_argnums=2)(trained, tail[1], False)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)
    assert float(jnp.max(jnp.abs(got[1][0]["adapter"]["down"]["kernel"]))) > 0


def test_scan_units_recompute_holds_fewer_temporaries():
    """16 rows in groups of one, 4 units + tail: the stack of unit inputs and one cotangent,
    where lax.scan of checkpointed units also held a copy of the unit input and a second
    cotangent."""
    x, trained, mixes, consts, tail, unit = _units_case(n=3, videos=1, chunks=16, sites=64)

    def temps(fn):
        def loss(trained, x):
            return jnp.sum(fn(trained, x) ** 2)
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(trained, x).compile(
            compiler_options=FAST)
        return compiled.memory_analysis().temp_size_in_bytes

    new = temps(lambda t, x: vit.scan_units_recompute(unit, t, mixes, consts, x, tail, groups=16))
    ref = temps(lambda t, x: _scanned_checkpointed_units(unit, t, mixes, consts, x, tail, 16))
    block_input = x.size * 4
    assert new < ref - 0.75 * block_input, (new / block_input, ref / block_input)  # 8.2 vs 9.2


def test_grouped_units_hold_few_full_length_temporaries():
    """Adapter gradient, 32 chunk rows in groups of one: the TIA runs in the groups too
    (row-local with its halos) and the groups' outputs and input cotangents are written in
    place, so the compiled temporaries are the 3 kept unit inputs and a few more full-length
    buffers, under 8.5 block inputs (11.6 when the TIA ran over the whole sequence between
    lax.maps over the attention + MLP)."""
    x = jax.ShapeDtypeStruct((1, 512, 32, 32, 3), jnp.float32)
    model = tiny(depth=4, embed_dim=64, mlp_dim=128, remat_policy="full", scan_blocks=True,
                 chunk_group=1)
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    block_input = 32 * 128 * 64 * 4  # rows x tokens x C x float32
    assert grad_temp_bytes(model, x, params) < 8.5 * block_input


def grad_compiled(model, x, params, **options):
    def loss(p, x):
        return jnp.sum(model.apply({"params": p}, x, train=False) ** 2)
    return jax.jit(jax.grad(loss)).lower(params, x).compile(compiler_options=options)


def grad_temp_bytes(model, x, params) -> int:
    return int(grad_compiled(model, x, params, **FAST).memory_analysis().temp_size_in_bytes)


def test_kept_attention_residual_drops_two_matmuls_from_the_recompute():
    """keep_attention_residual: the backward pass of every recomputed unit runs the attention's
    P·V and its projection no more (XLA drops them: nothing reads them, the attention's row term
    coming from P and dP), for one more kept activation per unit (units 1-3 of 4: about 3 block
    inputs more of compiled temporaries). Counted in the optimised program: the dot ops of the
    unit's backward body (one body for units 1-3), at full optimisation as in training."""
    import re
    x = jax.ShapeDtypeStruct((1, 64, 32, 32, 3), jnp.float32)
    model = tiny(depth=4, patch_size=8, remat_policy="full", scan_blocks=True, chunk_group=1,
                 recompute_embedding=False)
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    kept = model.clone(keep_attention_residual=True)

    def dots(m):
        return len(re.findall(r"\bdot\(", grad_compiled(m, x, params).as_text()))
    assert dots(kept) == dots(model) - 2, (dots(kept), dots(model))
    block_input = 4 * 128 * 32 * 4  # rows x tokens x C x float32
    more = grad_temp_bytes(kept, x, params) - grad_temp_bytes(model, x, params)
    assert 2.5 * block_input <= more <= 3.5 * block_input, more / block_input  # 2.7
    with pytest.raises(ValueError, match="keep_attention_residual.*remat_policy='dots'"):
        jax.eval_shape(model.clone(keep_attention_residual=True, remat_policy="dots").init,
                       jax.random.key(0), x)


@pytest.mark.slow
def test_uint8_frames_normalised_in_the_groups_are_never_whole_in_float():
    """512 uint8 frames (float32: 6 block inputs' worth), normalised in the patch embedding's
    chunk groups: the forward pass (evaluation) holds 5 block inputs less than with the float
    frames normalised first (2.0 vs 7.0 MB when written), and the gradient no more."""
    from tadjax.models.detector import normalize_frames
    norm = functools.partial(normalize_frames, dtype=jnp.float32)
    model = tiny(depth=4, embed_dim=64, mlp_dim=128, remat_policy="full", scan_blocks=True,
                 chunk_group=1)
    x = jax.ShapeDtypeStruct((1, 512, 32, 32, 3), jnp.uint8)
    params = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct(x.shape, jnp.float32))["params"]

    def temps(inside, grad):
        def loss(p, x):
            y = (model.apply({"params": p}, x, normalize=norm) if inside
                 else model.apply({"params": p}, norm(x)))
            return jnp.sum(y ** 2)
        fn = jax.grad(loss) if grad else loss
        compiled = jax.jit(fn).lower(params, x).compile(compiler_options=FAST)
        return compiled.memory_analysis().temp_size_in_bytes

    block_input = 32 * 128 * 64 * 4
    assert temps(True, False) < temps(False, False) - 4 * block_input
    assert temps(True, True) <= temps(False, True)


def test_chunk_group_lowers_compiled_temporaries():
    """8 chunk rows of 512 tokens: the attention scores of all rows dominate the ungrouped
    block's temporaries; grouped by 2 rows they exist for a quarter of the rows at a time."""
    model = tiny(depth=2, patch_size=4, remat_policy="full", scan_blocks=True)
    x = jax.ShapeDtypeStruct((2, 64, 32, 32, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    whole = grad_temp_bytes(model, x, params)
    grouped = grad_temp_bytes(model.clone(chunk_group=2), x, params)
    scores = 8 * 2 * 512 * 512 * 4  # rows x heads x tokens^2 x float32
    # Grouping saves more than the scores of every row take.
    assert whole - grouped > scores, (whole, grouped, scores)


def test_blocks_before_the_first_adapter_keep_no_residuals():
    """Frozen blocks in front of the first TIA need no backward pass: two more of them add
    less to the compiled temporaries of the adapter gradient than one block input takes."""
    x = jax.ShapeDtypeStruct((1, 64, 32, 32, 3), jnp.float32)
    block_input = 4 * 512 * 32 * 4  # rows x tokens x C x float32

    def temp_bytes(depth):
        model = tiny(depth=depth, patch_size=4, adapter_mode="adapter", adapter_blocks=[depth - 1],
                     remat_policy="full", scan_blocks=True)
        params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]

        def loss(adapter, frozen, x):
            p = dict(frozen, **{f"blocks_{depth - 1}": dict(frozen[f"blocks_{depth - 1}"],
                                                            adapter=adapter)})
            return jnp.sum(model.apply({"params": p}, x) ** 2)

        adapter = params[f"blocks_{depth - 1}"]["adapter"]
        compiled = jax.jit(jax.grad(loss)).lower(adapter, params, x).compile(compiler_options=FAST)
        return int(compiled.memory_analysis().temp_size_in_bytes)

    shallow, deep = temp_bytes(2), temp_bytes(4)
    assert deep - shallow < block_input, (shallow, deep, block_input)


@pytest.mark.parametrize("mode,blocks,chunk_group", [
    ("adapter", [1, 2], 2), ("adapter_full", "all", 0), ("side", [1], 0)])
def test_remat_input_dtype_values_and_gradients(mode, blocks, chunk_group):
    """Kept in float32 the custom backward pass gives remat "full"'s gradients; in bfloat16 the
    same up to bfloat16 rounding; the forward values never change; the same leaves get grads."""
    base = tiny(depth=3, adapter_mode=mode, adapter_blocks=blocks, drop_path_rate=0.3,
                remat_policy="full", scan_blocks=True, chunk_group=chunk_group)
    x = frames((3, 32, 16, 16, 3))
    params = random_params(base, x)
    rngs = {"dropout": jax.random.key(3)}

    def value_and_grad(model):
        def loss(p):
            y = model.apply({"params": p}, x, train=True, rngs=rngs)
            return jnp.sum(jnp.sin(y)), y
        (_, y), g = run(jax.value_and_grad(loss, has_aux=True), params)
        return np.asarray(y), {k: np.asarray(v) for k, v in tree.flatten(g).items()}

    y0, g0 = value_and_grad(base)
    y32, g32 = value_and_grad(base.clone(remat_input_dtype="float32"))
    y16, g16 = value_and_grad(base.clone(remat_input_dtype="bfloat16"))
    # The forward values are those of float32 (bfloat16 rounding would show at ~1e-3): equal up
    # to the last bit or so that two differently fused programs may differ by on XLA:CPU.
    np.testing.assert_allclose(y32, y0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y16, y0, rtol=1e-6, atol=1e-6)
    for name, a in g0.items():
        np.testing.assert_allclose(g32[name], a, atol=1e-5, rtol=1e-5, err_msg=name)
        scale = np.abs(a).max()
        np.testing.assert_allclose(g16[name], a, atol=3e-2 * scale, rtol=0, err_msg=name)
        assert np.any(g16[name] != 0) == np.any(a != 0), name
    if mode == "adapter":  # gradients reach the adapters through the bfloat16 path, not exactly
        assert any(np.any(g16[k] != g0[k]) for k in g0)


def test_remat_input_dtype_needs_full_remat():
    model = tiny(remat_policy="dots", remat_input_dtype="bfloat16")
    with pytest.raises(ValueError, match="remat_input_dtype"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 16, 3)))


def test_remat_input_dtype_halves_the_kept_block_inputs():
    x = jax.ShapeDtypeStruct((2, 64, 32, 32, 3), jnp.float32)
    model = tiny(depth=4, patch_size=4, remat_policy="full", scan_blocks=True, chunk_group=2)
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    # Against the same checkpointing with the inputs kept in float32 (the units' in-place stack,
    # used without remat_input_dtype, keeps one block input less again: 23.9 vs 24.9).
    kept = grad_temp_bytes(model.clone(remat_input_dtype="float32"), x, params)
    narrow = grad_temp_bytes(model.clone(remat_input_dtype="bfloat16"), x, params)
    block_input = 8 * 512 * 32 * 4  # rows x tokens x C x float32
    # The inputs of units 1-3 (TIA of block i-1 + attention/MLP of block i), half of each saved;
    # unit 0 (attention/MLP of block 0) gets no gradient and keeps nothing.
    assert kept - narrow >= 3 * block_input // 2, (kept, narrow, block_input)
    assert grad_temp_bytes(model, x, params) < kept - 0.9 * block_input


def test_map_row_groups_takes_the_same_rows_from_every_device(monkeypatch):
    """12 rows on 2 devices (rows 0-5 and 6-11), 3 groups: group j holds rows 2j, 2j + 1 of
    each device's block."""
    monkeypatch.setattr(vit, "row_devices", lambda axes, rows: 2)
    monkeypatch.setattr(vit, "constrain_rows", lambda x, axes, dim=0: x)
    x = np.arange(12.0)[:, None]
    first = vit.map_row_groups(lambda r: jnp.broadcast_to(r[:1], r.shape), (jnp.asarray(x),), 3,
                               ("snippet",))
    np.testing.assert_array_equal(np.asarray(first)[:, 0], [0, 0, 2, 2, 4, 4, 0, 0, 2, 2, 4, 4])
    np.testing.assert_array_equal(vit.map_row_groups(lambda r: r * 2, (jnp.asarray(x),), 3), 2 * x)


ROWS_ON_FOUR_DEVICES = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tadjax.models import vit
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
model = vit.VisionTransformer(embed_dim=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8,
                              pretrain_img_size=32, remat_policy="full", scan_blocks=True)
x = jax.random.normal(jax.random.key(0), (2, 64, 16, 16, 3))  # 2 videos x 4 chunks = 8 rows
params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
leaves, tree = jax.tree.flatten(params)
params = jax.tree.unflatten(tree, [0.1 * jax.random.normal(jax.random.key(i), s.shape)
                                   for i, s in enumerate(leaves)])

def loss(m):
    return lambda p, x: jnp.sum(jnp.sin(m.apply({"params": p}, x)))

def grads(m, p, x):
    return jax.jit(jax.value_and_grad(loss(m))).lower(p, x).compile(compiler_options=FAST)(p, x)

v0, g0 = grads(model, params, x)
mesh = jax.make_mesh((2, 2), ("data", "snippet"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
split = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(
    mesh, P(*(["snippet"] + [None] * (a.ndim - 1)) if a.ndim and a.shape[0] % 2 == 0 else P()))), params)
xs = jax.device_put(x, NamedSharding(mesh, P("data", "snippet")))
grouped = model.clone(chunk_group=1, row_axes=("data", "snippet"))
for m in (grouped, grouped.clone(keep_attention_residual=True)):
    with jax.set_mesh(mesh):
        assert vit.row_split(("data", "snippet"), 8) == vit.row_devices(("data", "snippet"), 8) == 4
        v1, g1 = grads(m, split, xs)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):  # sums over devices: other order
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * np.abs(b).max(),
                                   rtol=0)
print("ok")
"""


@pytest.mark.slow
def test_rows_split_over_a_mesh_give_the_same_values_and_gradients():
    """4 CPU devices (2 data x 2 snippet), weights split, chunk rows constrained, groups of one
    row per device: the loss and gradients of one device."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", ROWS_ON_FOUR_DEVICES], env=env,
                          cwd=pathlib.Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_scanned_frozen_weights_are_not_stacked():
    """A scan over units picks each unit's frozen attention/MLP weights (lax.switch) instead of
    stacking them all (a copy of the ViT per step): with weights far larger than the
    activations, the adapter gradient's temporaries stay under half the stack's size; with the
    ViT trained (its gradients are stacked anyway) they do not."""
    x = jax.ShapeDtypeStruct((1, 16, 16, 16, 3), jnp.float32)
    model = tiny(depth=6, embed_dim=64, mlp_dim=256, remat_policy="full", scan_blocks=True)
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    per_block = 64 * 3 * 64 + 64 * 64 + 2 * 64 * 256  # qkv, proj, fc1, fc2 kernels
    stack = 5 * per_block * 4  # units 1-5 (one scan), float32
    assert grad_temp_bytes(model, x, params) < stack // 2
    assert grad_temp_bytes(model.clone(adapter_mode="adapter_full"), x, params) > stack


@pytest.mark.parametrize("recompute,keep_residual", [(True, False), (False, False), (True, True),
                                                     (False, True)])
def test_block0_output_recomputed_or_kept_gives_the_same_values_and_gradients(recompute,
                                                                              keep_residual):
    """TIAs alone trained through the recomputed chunk groups (AdaTAD's case), uint8 frames
    normalised in the groups: whether block 0's output is computed again in the backward pass
    from the frames (recompute_embedding, the patch convolution then runs twice in the
    gradient) or kept, and whether each unit's attention residual is kept too
    (keep_attention_residual), the values and adapter gradients are those of the ungrouped
    blocks."""
    from tadjax.models.detector import normalize_frames
    norm = functools.partial(normalize_frames, dtype=jnp.float32)
    base = tiny(depth=4, adapter_mode="adapter", remat_policy="full", scan_blocks=True)
    raw = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 32, 16, 16, 3)), jnp.uint8)
    params = random_params(base, norm(raw))
    grouped = base.clone(chunk_group=1, recompute_embedding=recompute,
                         keep_attention_residual=keep_residual)

    def loss(model, x, **kw):
        def fn(p):
            y = model.apply({"params": p}, x, **kw)
            return jnp.sum(jnp.sin(y)), y
        return fn

    (_, y0), g0 = run(jax.value_and_grad(loss(base, norm(raw)), has_aux=True), params)
    grad1 = jax.value_and_grad(loss(grouped, raw, normalize=norm), has_aux=True)
    (_, y1), g1 = run(grad1, params)
    g0 = assert_same_values_and_grads(y1, g1, y0, g0)
    assert any("adapter" in name and np.any(np.asarray(a) != 0) for name, a in g0.items())
    convs = str(jax.make_jaxpr(grad1)(params)).count("conv_general_dilated")
    assert convs == (2 if recompute else 1), convs
