"""ActionFormer projection / neck / head: parameter tree, init, shapes, masking, attention."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tadjax import tree
from tadjax.detection.points import level_lengths, make_points
from tadjax.models.actionformer import ActionFormer, MaskedMHCA, _resize_linear, sinusoid_table

# Tests compile a handful of small programs; cheap XLA settings keep that to seconds on 2 cores.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _run(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST)(*args)


C_IN, WIDTH, NUM_CLASSES, T = 8, 16, 3, 64
MODEL = ActionFormer(num_classes=NUM_CLASSES, channels=WIDTH, max_seq_len=T, use_abs_pe=True)
# Numerical tests use fewer blocks (4 levels, strides 1..8) to keep compilation short; every
# block type and the per-level head are the same code as in the full model.
SMALL = MODEL.clone(arch=(2, 1, 3), num_levels=4)
SMALL_T = 32


def _level_lengths(seq_len, num_levels):
    return level_lengths(seq_len, tuple(2 ** i for i in range(num_levels)))


def test_parameter_tree_and_output_shapes():
    x = jax.ShapeDtypeStruct((2, T, C_IN), jnp.float32)
    m = jax.ShapeDtypeStruct((2, T), jnp.bool_)
    variables = jax.eval_shape(lambda k, x, m: MODEL.init({"params": k}, x, m, train=False),
                               jax.random.PRNGKey(0), x, m)
    flat = tree.flatten(variables["params"])
    shapes = {k: tuple(v.shape) for k, v in flat.items()}
    expected = {
        "embed_0/conv/kernel": (3, C_IN, WIDTH), "embed_1/conv/kernel": (3, WIDTH, WIDTH),
        "embed_0/norm/scale": (WIDTH,), "stem_1/ln1/scale": (WIDTH,),
        "stem_0/attn/query_conv/kernel": (3, 1, WIDTH),
        "branch_2/attn/query_conv/kernel": (3, 1, WIDTH),
        "branch_4/attn/value_norm/bias": (WIDTH,), "branch_4/attn/proj/kernel": (WIDTH, WIDTH),
        "branch_0/mlp/fc1/kernel": (WIDTH, 4 * WIDTH), "branch_0/mlp/fc2/kernel": (4 * WIDTH, WIDTH),
        "stem_0/drop_path_attn/scale": (WIDTH,), "branch_4/drop_path_mlp/scale": (WIDTH,),
        "neck/norm_3/scale": (WIDTH,), "neck/norm_5/bias": (WIDTH,),
        "head/cls_tower_0/conv/kernel": (3, WIDTH, WIDTH), "head/reg_tower_1/norm/scale": (WIDTH,),
        "head/cls_head/kernel": (3, WIDTH, NUM_CLASSES), "head/cls_head/bias": (NUM_CLASSES,),
        "head/reg_head/kernel": (3, WIDTH, 2), "head/reg_head/bias": (2,), "head/scale_5": (),
    }
    for path, shape in expected.items():
        assert shapes.get(path) == shape, path
    # Exactly: 2 embeds, 2 stem + 5 branch blocks, 6 neck norms, 6 scales, no conv biases.
    assert {p.split("/")[0] for p in flat} == {"embed_0", "embed_1", "stem_0", "stem_1", "neck",
                                              "head"} | {f"branch_{i}" for i in range(5)}
    assert not any(p.endswith("conv/bias") for p in flat)
    assert len([p for p in flat if p.startswith("head/scale_")]) == 6
    assert len([p for p in flat if p.startswith("neck/norm_")]) == 12
    # Without path drop the reference has no AffineDropPath (and no 1e-4 scale).
    no_drop = jax.eval_shape(lambda k, x, m: MODEL.clone(path_pdrop=0.0).init(k, x, m, train=False),
                             jax.random.PRNGKey(0), x, m)
    assert not any("drop_path" in p for p in tree.flatten(no_drop))

    out = jax.eval_shape(lambda v, x, m: MODEL.apply(v, x, m, train=False), variables, x, m)
    num_points = 64 + 32 + 16 + 8 + 4 + 2
    assert out["cls_logits"].shape == (2, num_points, NUM_CLASSES)
    assert out["reg"].shape == (2, num_points, 2) and out["point_mask"].shape == (2, num_points)
    assert out["cls_logits"].dtype == jnp.float32 and out["point_mask"].dtype == jnp.bool_


@pytest.fixture(scope="module")
def params():
    x = jnp.zeros((1, SMALL_T, C_IN))
    m = jnp.ones((1, SMALL_T), bool)
    return _run(lambda k: SMALL.init({"params": k}, x, m, train=False)["params"],
                jax.random.PRNGKey(0))


def test_initial_values(params):
    flat = tree.flatten(params)
    np.testing.assert_allclose(flat["head/cls_head/bias"], -math.log(99), rtol=1e-6)
    checked = 0
    for path, value in flat.items():
        v = np.asarray(value)
        name = path.split("/")
        if path.startswith("head/scale_"):
            assert v == 1.0
        elif "drop_path" in path:
            np.testing.assert_allclose(v, 1e-4)
        elif name[-1] == "scale":  # LayerNorms
            assert np.all(v == 1.0), path
        elif name[-1] == "bias" and path not in ("head/cls_head/bias", "head/reg_head/bias"):
            assert np.all(v == 0.0), path  # LayerNorm biases and every projection bias
        elif name[-1] == "kernel":
            # PyTorch default: uniform(+-1/sqrt(fan_in)), fan_in = kernel size * in / groups.
            bound = 1 / math.sqrt(int(np.prod(v.shape[:-1])))
            assert np.abs(v).max() <= bound and np.abs(v).max() > 0.5 * bound, path
            checked += 1
    assert checked > 20
    reg_bias = np.asarray(flat["head/reg_head/bias"])
    assert np.all(np.abs(reg_bias) <= 1 / math.sqrt(3 * WIDTH)) and np.any(reg_bias != 0)


def _level_index(long_len, short_len, num_levels):
    """Indices in the concatenated outputs for T=long_len of the points of each level that
    exist for T=short_len."""
    long_levels = _level_lengths(long_len, num_levels)
    offsets = np.cumsum([0] + long_levels[:-1])
    return np.concatenate([off + np.arange(n)
                           for off, n in zip(offsets, _level_lengths(short_len, num_levels))])


def test_point_mask_and_padding_equivalence(params):
    # Trained-like weights: residual branches at full strength, non-trivial LN scales. LN biases
    # stay 0: with them the reference lets padded positions leak into the last valid points
    # (see the module docstring), so exact padding equivalence only holds without them.
    def perturb(path, v):
        if "drop_path" in path:
            return jnp.ones_like(v)
        if path.startswith("head/scale_"):
            return v * 0.5
        if path.endswith("/scale"):
            return v * 1.5
        return v
    p = tree.map_with_path(perturb, params)
    length, half = SMALL_T, SMALL_T // 2
    x = jax.random.normal(jax.random.PRNGKey(1), (2, length, C_IN))
    mask = jnp.stack([jnp.ones(length, bool), jnp.arange(length) < half])
    x_padded = jnp.where(mask[..., None], x, 0.0)
    apply = lambda p, x, m: SMALL.apply({"params": p}, x, m, train=False)
    out = _run(apply, p, x_padded, mask)

    strides = tuple(2 ** i for i in range(4))
    pts = make_points(length, strides, ((0, 4), (4, 8), (8, 16), (16, 10000)))
    np.testing.assert_array_equal(np.asarray(out["point_mask"]),
                                  np.stack([np.ones(len(pts), bool), pts[:, 0] < half]))
    assert np.all(np.asarray(out["reg"]) >= 0)

    # The second video (16 valid of 32, zero padding) equals the same 16 positions unpadded.
    short = _run(apply, p, x[1:, :half], jnp.ones((1, half), bool))
    idx = _level_index(length, half, 4)
    for key in ("cls_logits", "reg"):
        np.testing.assert_allclose(np.asarray(out[key][1, idx]), np.asarray(short[key][0]),
                                   rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(short["reg"])).max() > 0.1  # the comparison is not vacuous


def test_train_mode_uses_drop_path(params):
    x = jax.random.normal(jax.random.PRNGKey(2), (2, SMALL_T, C_IN))
    m = jnp.ones((2, SMALL_T), bool)
    p = tree.map_with_path(lambda path, v: jnp.ones_like(v) if "drop_path" in path else v,
                           params)
    model = SMALL.clone(path_pdrop=0.5, input_pdrop=0.1)
    train = lambda p, k: model.apply({"params": p}, x, m, train=True, rngs={"dropout": k})["reg"]
    fn = jax.jit(train).lower(p, jax.random.PRNGKey(0)).compile(compiler_options=FAST)
    a, b = fn(p, jax.random.PRNGKey(0)), fn(p, jax.random.PRNGKey(1))
    assert np.all(np.isfinite(np.asarray(a))) and not np.allclose(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(fn(p, jax.random.PRNGKey(0))), np.asarray(a))


def test_bad_length_is_rejected():
    x = jax.ShapeDtypeStruct((1, 48, C_IN), jnp.float32)
    m = jax.ShapeDtypeStruct((1, 48), jnp.bool_)
    with pytest.raises(ValueError, match="divisible by 32"):
        jax.eval_shape(lambda k, x, m: MODEL.init(k, x, m, train=False), jax.random.PRNGKey(0),
                       x, m)


def _np_layer_norm(y, p, eps=1e-5):
    mu = y.mean(-1, keepdims=True)
    var = ((y - mu) ** 2).mean(-1, keepdims=True)
    return (y - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_mhca(p, x, mask, n_head, stride):
    """Direct numpy transcription of masked multi-head conv attention (spec 4.2)."""
    b, t, c = x.shape
    t_out = t // stride
    m = mask[:, ::stride].astype(np.float64)[..., None]
    xp = np.pad(x, ((0, 0), (1, 1), (0, 0)))

    def branch(name):
        k = np.asarray(p[f"{name}_conv"]["kernel"], np.float64)[:, 0, :]  # [3, C]
        y = np.stack([sum(xp[:, i * stride + j] * k[j] for j in range(3)) for i in range(t_out)], 1)
        y = _np_layer_norm(y * m, {k2: np.asarray(v) for k2, v in p[f"{name}_norm"].items()})
        return y @ np.asarray(p[name]["kernel"]) + np.asarray(p[name]["bias"])

    q, k, v = branch("query"), branch("key"), branch("value")
    d = c // n_head
    out = np.zeros((b, t_out, c))
    for h in range(n_head):
        sl = slice(h * d, (h + 1) * d)
        logits = q[..., sl] @ np.swapaxes(k[..., sl], 1, 2) / math.sqrt(d)
        logits = np.where(m[:, None, :, 0] > 0, logits, -np.inf)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out[..., sl] = w @ (v[..., sl] * m)
    out = out @ np.asarray(p["proj"]["kernel"]) + np.asarray(p["proj"]["bias"])
    return out * m


@pytest.mark.parametrize("stride", [1, 2])
def test_masked_mhca_matches_numpy(stride):
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (2, 16, 8)), np.float64)
    mask = np.ones((2, 16), bool)
    mask[1, 11:] = False
    attn = MaskedMHCA(n_head=4, stride=stride)
    xj, mj = jnp.asarray(x, jnp.float32), jnp.asarray(mask)
    p = _run(lambda k: attn.init(k, xj, mj)["params"], jax.random.PRNGKey(4))
    # Non-trivial norms and biases so every term matters.
    rng = np.random.default_rng(stride)
    p = jax.tree_util.tree_map(lambda v: v + 0.1 * rng.standard_normal(v.shape), p)
    out, out_mask = _run(lambda p, x, m: attn.apply({"params": p}, x, m), p, xj, mj)
    np.testing.assert_array_equal(np.asarray(out_mask), mask[:, ::stride])
    np.testing.assert_allclose(np.asarray(out), _np_mhca(p, x, mask, 4, stride), rtol=1e-4,
                               atol=1e-5)


def test_local_attention_window():
    x = jax.random.normal(jax.random.PRNGKey(5), (1, 16, 8))
    mask = jnp.ones((1, 16), bool)
    local, full = MaskedMHCA(n_head=2, window_size=3), MaskedMHCA(n_head=2)
    p = _run(lambda k: full.init(k, x, mask)["params"], jax.random.PRNGKey(6))
    x2 = x.at[0, 9].add(5.0)  # query 3 sees keys 2..4, which see inputs 1..5 only
    # A window covering the whole sequence is global attention.
    wide = MaskedMHCA(n_head=2, window_size=33)
    loc, glob, wid = (np.asarray(a) for a in _run(
        lambda p, xs: [mod.apply({"params": p}, xs, jnp.ones((2, 16), bool))[0]
                       for mod in (local, full, wide)], p, jnp.concatenate([x, x2])))
    np.testing.assert_allclose(loc[1, :7], loc[0, :7], rtol=1e-6, atol=1e-6)
    assert not np.allclose(loc[1], loc[0])
    assert not np.allclose(glob[1, 3], glob[0, 3])
    np.testing.assert_allclose(wid, glob, rtol=1e-5, atol=1e-6)


def test_sinusoid_position_table_and_resize():
    table = sinusoid_table(16, 8)
    np.testing.assert_allclose(table[0], [0, 1] * 4)
    np.testing.assert_allclose(table[3, :4], [math.sin(3), math.cos(3), math.sin(3 / 10000 ** 0.25),
                                              math.cos(3 / 10000 ** 0.25)], rtol=1e-6)
    np.testing.assert_array_equal(_resize_linear(table, 16), table)
    # Linear, align_corners=False: output 0 of a 2x upsampling sits at source -0.25 -> clamped.
    up = _resize_linear(table, 32)
    np.testing.assert_allclose(up[0], table[0])
    np.testing.assert_allclose(up[1], 0.75 * table[0] + 0.25 * table[1], rtol=1e-6)
    torch = pytest.importorskip("torch")
    ref = torch.nn.functional.interpolate(torch.tensor(table).T[None], 40, mode="linear",
                                          align_corners=False)[0].T.numpy()
    np.testing.assert_allclose(_resize_linear(table, 40), ref, rtol=1e-5, atol=1e-6)
