"""VideoMAE ViT: parity with Hugging Face transformers and PyTorch resizes, parameter paths and
counts, scan/remat equivalence, gradient semantics of the adapter modes."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tadjax import tree
from tadjax.models import vit
from tadjax.models.adapters import trainable_regex

# These tiny programs need compiling fast, not running fast (XLA:CPU, 2 shared cores).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run(fn, *args):
    """fn(*args) under jit, compiled with cheap XLA settings."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST)(*args)


_COMPILED = {}


def apply(model, params, x, rng=None, **kw):
    """model.apply compiled once per (model, keywords, shapes); rng feeds the "dropout" stream."""
    key = (model, tuple(sorted(kw.items())), x.shape, x.dtype, rng is None,
           jax.tree_util.tree_structure(params))
    if key not in _COMPILED:
        def fn(p, x, rng):
            return model.apply({"params": p}, x, rngs={} if rng is None else {"dropout": rng}, **kw)
        _COMPILED[key] = jax.jit(fn).lower(params, x, rng).compile(compiler_options=FAST)
    return _COMPILED[key](params, x, rng)


TINY = dict(embed_dim=32, depth=4, num_heads=2, mlp_dim=64, patch_size=8, pretrain_img_size=32)


def tiny(**overrides):
    return vit.VisionTransformer(**{**TINY, **overrides})


def frames(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def random_params(model, x, seed=0, std=0.1):
    """Parameters of `model` for input `x`, every leaf random (scales and gamma around 1) so no
    zero-initialised path hides a bug. Built from eval_shape: no init compile."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(seed)

    def draw(name, leaf):
        centre = 1.0 if re.search(r"(scale|gamma)$", name) else 0.0
        return jnp.asarray(centre + std * rng.normal(size=leaf.shape), jnp.float32)

    return tree.map_with_path(draw, shapes)


# --------------------------------------------------------------------------- sizes and paths

def closed_form_vit_count(embed_dim, depth, mlp_dim, patch_size, **_):
    c, m = embed_dim, mlp_dim
    patch_embed = 2 * patch_size * patch_size * 3 * c + c
    block = (2 * c          # norm1
             + 3 * c * c + 2 * c  # qkv kernel, q_bias, v_bias
             + c * c + c    # proj
             + 2 * c        # norm2
             + c * m + m + m * c + c)  # fc1, fc2
    return patch_embed + depth * block


@pytest.mark.parametrize("name,table_count,tia_total", [
    ("S", 21.9e6, 1.01e6), ("B", 86.2e6, 4.00e6), ("L", 303.9e6, 14.2e6),
    ("H", 631.6e6, 29.6e6), ("g", 1011.6e6, 44.7e6)])
def test_variant_parameter_counts(name, table_count, tia_total):
    model = vit.from_variant(name, adapter_mode="adapter")
    p = vit.VARIANTS[name]["patch_size"]
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 16, p, p, 3), jnp.float32))["params"]
    flat = tree.flatten(shapes)
    adapters = sum(v.size for k, v in flat.items() if "/adapter/" in k)
    backbone = sum(v.size for k, v in flat.items() if "/adapter/" not in k)
    # Exactly the layer shapes (no fc_norm); the spec's table agrees to its printed precision.
    assert backbone == closed_form_vit_count(**vit.VARIANTS[name])
    assert abs(backbone / table_count - 1) < 0.005
    assert abs(adapters / tia_total - 1) < 0.005
    assert all(v.dtype == jnp.float32 for v in flat.values())


def test_tia_per_block_count_small():
    model = vit.from_variant("S", adapter_mode="adapter", adapter_blocks=[0])
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 16, 16, 16, 3), jnp.float32))["params"]
    assert tree.count(shapes["blocks_0"]["adapter"]) == 83_905  # spec §3.4


def test_parameter_paths_and_shapes():
    model = tiny(adapter_mode="adapter", adapter_blocks=[1, 2])
    params = jax.eval_shape(model.init, jax.random.key(0), frames((1, 16, 24, 24, 3)))["params"]
    shapes = {k: v.shape for k, v in tree.flatten(params).items()}
    c, r = 32, 8
    expected = {"patch_embed/kernel": (2, 8, 8, 3, c), "patch_embed/bias": (c,)}
    for i in range(4):
        b = f"blocks_{i}/"
        expected.update({
            b + "norm1/scale": (c,), b + "norm1/bias": (c,),
            b + "attn/qkv/kernel": (c, 3 * c), b + "attn/q_bias": (c,), b + "attn/v_bias": (c,),
            b + "attn/proj/kernel": (c, c), b + "attn/proj/bias": (c,),
            b + "norm2/scale": (c,), b + "norm2/bias": (c,),
            b + "mlp/fc1/kernel": (c, 64), b + "mlp/fc1/bias": (64,),
            b + "mlp/fc2/kernel": (64, c), b + "mlp/fc2/bias": (c,)})
        if i in (1, 2):
            expected.update({
                b + "adapter/down/kernel": (c, r), b + "adapter/down/bias": (r,),
                b + "adapter/dwconv/kernel": (3, 1, r), b + "adapter/dwconv/bias": (r,),
                b + "adapter/pwconv/kernel": (r, r), b + "adapter/pwconv/bias": (r,),
                b + "adapter/up/kernel": (r, c), b + "adapter/up/bias": (c,),
                b + "adapter/gamma": ()})
    assert shapes == expected

    side = tiny(adapter_mode="side", adapter_blocks=[2, 3])
    names = tree.flatten(jax.eval_shape(side.init, jax.random.key(0), frames((1, 16, 24, 24, 3)))["params"])
    assert {n.split("/")[0] for n in names} == {
        "patch_embed", "blocks_0", "blocks_1", "blocks_2", "blocks_3",
        "side_adapters_2", "side_adapters_3"}
    assert not any("/adapter/" in n for n in names)


# --------------------------------------------------------------------------- Hugging Face parity

def hf_to_tadjax(model: transformers.VideoMAEModel, depth: int) -> dict:
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    flat = {
        "patch_embed/kernel": sd["embeddings.patch_embeddings.projection.weight"].transpose(2, 3, 4, 1, 0),
        "patch_embed/bias": sd["embeddings.patch_embeddings.projection.bias"],
    }
    for i in range(depth):
        h, b = f"encoder.layer.{i}.", f"blocks_{i}/"
        att = h + "attention.attention."
        flat.update({
            b + "norm1/scale": sd[h + "layernorm_before.weight"],
            b + "norm1/bias": sd[h + "layernorm_before.bias"],
            b + "attn/qkv/kernel": np.concatenate(
                [sd[att + n + ".weight"].T for n in ("query", "key", "value")], axis=1),
            b + "attn/q_bias": sd[att + "q_bias"], b + "attn/v_bias": sd[att + "v_bias"],
            b + "attn/proj/kernel": sd[h + "attention.output.dense.weight"].T,
            b + "attn/proj/bias": sd[h + "attention.output.dense.bias"],
            b + "norm2/scale": sd[h + "layernorm_after.weight"],
            b + "norm2/bias": sd[h + "layernorm_after.bias"],
            b + "mlp/fc1/kernel": sd[h + "intermediate.dense.weight"].T,
            b + "mlp/fc1/bias": sd[h + "intermediate.dense.bias"],
            b + "mlp/fc2/kernel": sd[h + "output.dense.weight"].T,
            b + "mlp/fc2/bias": sd[h + "output.dense.bias"],
        })
    return tree.unflatten({k: jnp.asarray(v) for k, v in flat.items()})


def test_matches_huggingface_videomae_tokens():
    torch.manual_seed(0)
    config = transformers.VideoMAEConfig(
        image_size=32, patch_size=16, num_frames=16, tubelet_size=2, hidden_size=64,
        num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, hidden_act="gelu",
        qkv_bias=True, use_mean_pooling=True, layer_norm_eps=1e-6, attn_implementation="eager")
    hf = transformers.VideoMAEModel(config).eval()
    assert hf.layernorm is None  # use_mean_pooling=True: no final norm, as OpenTAD
    with torch.no_grad():  # random everything, biases and LN affine included
        for name, p in hf.named_parameters():
            if p.ndim > 1:  # unit-scale activations keep float32 rounding well below 1e-5
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            else:
                is_ln_scale = "layernorm" in name and name.endswith("weight")
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if is_ln_scale else 0.0))
    clips = torch.randn(2, 16, 3, 32, 32)  # two 16-frame clips = the two chunks of one video
    with torch.no_grad():
        expected = hf(pixel_values=clips).last_hidden_state.numpy()  # [2, 32, 64]

    model = vit.VisionTransformer(embed_dim=64, depth=2, num_heads=2, mlp_dim=128, patch_size=16,
                                  pretrain_img_size=32, adapter_mode="none")
    params = hf_to_tadjax(hf, depth=2)
    video = jnp.asarray(clips.permute(0, 1, 3, 4, 2).reshape(1, 32, 32, 32, 3).numpy())
    features, tokens = apply(model, params, video, return_tokens=True)
    assert 1.0 < np.abs(expected).max() < 10.0
    np.testing.assert_allclose(np.asarray(tokens[0]), expected, atol=1e-5, rtol=0)
    pooled = expected.reshape(2, 8, 4, 64).mean(axis=2).reshape(1, 16, 64)
    np.testing.assert_allclose(np.asarray(features), pooled, atol=1e-5, rtol=0)

    # The same parameters in scan + remat form give the same tokens.
    again = apply(model.clone(scan_blocks=True, remat_policy="full"), params, video,
                  return_tokens=True)[1]
    np.testing.assert_allclose(np.asarray(again[0]), expected, atol=1e-5, rtol=0)


def test_sinusoid_table_matches_huggingface():
    from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table
    np.testing.assert_array_equal(vit.sinusoid_table(392, 48),
                                  get_sinusoid_encoding_table(392, 48)[0].numpy())


# --------------------------------------------------------------------------- resizes vs PyTorch

@pytest.mark.parametrize("grid", [(10, 10), (11, 11), (16, 16), (7, 9), (14, 14)])
def test_position_table_resize_matches_torch_bicubic(grid):
    dim, t, g = 24, 8, 14
    table = vit.sinusoid_table(t * g * g, dim)
    got = vit.position_table(dim, t, g, grid)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(table).reshape(t, g, g, dim).permute(0, 3, 1, 2), size=grid,
        mode="bicubic", align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(-1, dim).numpy()
    np.testing.assert_allclose(got, ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize("in_size,out_size", [(14, 10), (14, 11), (14, 16), (5, 13), (14, 14)])
def test_bicubic_matrix_matches_torch_on_random_data(in_size, out_size):
    x = np.random.default_rng(0).normal(size=(3, in_size, in_size))
    got = np.einsum("hi,wj,cij->chw", vit.bicubic_matrix(in_size, out_size),
                    vit.bicubic_matrix(in_size, out_size), x)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None], size=(out_size, out_size),
                                          mode="bicubic", align_corners=False)[0].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("in_len,out_len", [(12, 24), (12, 6), (12, 12), (12, 7), (7, 12), (5, 1)])
def test_resize_features_matches_torch_linear(in_len, out_len):
    x = np.random.default_rng(1).normal(size=(2, in_len, 5)).astype(np.float32)
    got = np.asarray(vit.resize_features(jnp.asarray(x), out_len))
    ref = torch.nn.functional.interpolate(torch.from_numpy(x).transpose(1, 2), size=out_len,
                                          mode="linear", align_corners=False).transpose(1, 2).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
    if out_len == in_len:
        np.testing.assert_array_equal(got, x)
    if 2 * out_len == in_len:
        np.testing.assert_allclose(got, x.reshape(2, out_len, 2, 5).mean(axis=2), atol=1e-6)


# --------------------------------------------------------------------------- scan / remat / modes

def trainable_names(params, mode):
    patterns = trainable_regex(mode)
    return {k for k in tree.flatten({"backbone": params}) if any(re.search(p, k) for p in patterns)}


@pytest.mark.parametrize("mode,blocks,remat_policy", [
    ("adapter", [1, 2], "full"), ("side", [1, 2], "dots"), ("full", "all", "full")])
def test_scan_and_remat_match_unrolled_values_and_gradients(mode, blocks, remat_policy):
    """Also: gradients are non-zero exactly on the parameters trainable_regex(mode) names."""
    base = tiny(depth=3, adapter_mode=mode, adapter_blocks=blocks, drop_path_rate=0.3)
    x = frames((2, 32, 16, 16, 3))
    params = random_params(base, x)
    rngs = {"dropout": jax.random.key(7)}

    def value_and_grad(model):
        def loss(p):
            y = model.apply({"params": p}, x, train=True, rngs=rngs)
            return jnp.sum(jnp.sin(y)), y
        return run(jax.value_and_grad(loss, has_aux=True), params)

    (_, y0), g0 = value_and_grad(base)
    (_, y1), g1 = value_and_grad(base.clone(scan_blocks=True, remat_policy=remat_policy))
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), atol=1e-5, rtol=0)
    g1 = tree.flatten(g1)
    for name, a in tree.flatten(g0).items():
        np.testing.assert_allclose(np.asarray(g1[name]), np.asarray(a), atol=1e-5, rtol=1e-5,
                                   err_msg=name)
    nonzero = {k for k, g in tree.flatten({"backbone": g0}).items() if np.any(np.asarray(g) != 0)}
    assert nonzero == trainable_names(params, mode)
    # Drop path ran: the deterministic output differs.
    assert np.any(np.asarray(y0) != np.asarray(apply(base, params, x)))


@pytest.mark.parametrize("mode", ["frozen", "adapter_full"])
def test_gradients_of_frozen_and_adapter_full_modes(mode):
    model = tiny(depth=2, adapter_mode=mode)
    x = frames((1, 16, 16, 16, 3))
    params = random_params(model, x)
    grads = run(jax.grad(lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, x)))), params)
    nonzero = {k for k, g in tree.flatten({"backbone": grads}).items() if np.any(np.asarray(g) != 0)}
    assert nonzero == trainable_names(params, mode)
    assert len(nonzero) == (0 if mode == "frozen" else len(tree.flatten(params)))
    assert any("/adapter/" in k for k in nonzero) == (mode == "adapter_full")
    assert trainable_names(params, "none") == trainable_names(params, "full") == set(
        tree.flatten({"backbone": params}))


def test_drop_path_is_per_chunk_and_seeded():
    x = jnp.ones((64, 3, 2))
    y = np.asarray(vit.drop_path(x, jax.random.key(0), jnp.float32(0.5)))
    rows = y.reshape(64, -1)
    assert set(np.unique(rows)) == {0.0, 2.0}
    assert np.all(rows.min(axis=1) == rows.max(axis=1))  # whole rows (chunks) kept or dropped
    np.testing.assert_array_equal(vit.drop_path(x, jax.random.key(0), jnp.float32(0.0)), x)

    model = tiny(depth=2, adapter_mode="adapter", drop_path_rate=0.5)
    v = frames((1, 16, 16, 16, 3))
    params = random_params(model, v)
    a = apply(model, params, v, jax.random.key(1), train=True)
    b = apply(model, params, v, jax.random.key(1), train=True)
    np.testing.assert_array_equal(a, b)
    assert np.any(np.asarray(a) != np.asarray(apply(model, params, v)))


def test_patch_embedding_drops_remainder_pixels():
    # 20 px with 8-px patches -> 2x2 grid; the last 4 rows and columns are never read.
    model = tiny(adapter_mode="none")
    x = frames((1, 16, 20, 20, 3))
    params = random_params(model, x)
    y = apply(model, params, x, return_tokens=True)[1]
    assert y.shape == (1, 1, 8 * 2 * 2, 32)
    changed = x.at[:, :, 16:, :, :].add(5.0).at[:, :, :, 16:, :].add(5.0)
    np.testing.assert_array_equal(apply(model, params, changed, return_tokens=True)[1], y)


def test_bfloat16_compute_keeps_float32_params_and_output():
    x = frames((1, 16, 16, 16, 3))
    f32 = tiny(depth=1, adapter_mode="adapter")
    params = random_params(f32, x)
    bf16 = f32.clone(dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.float32
               for v in tree.flatten(jax.eval_shape(bf16.init, jax.random.key(0), x)).values())
    y16, y32 = apply(bf16, params, x), apply(f32, params, x)
    assert y16.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(y16 - y32))) < 0.05 * float(jnp.max(jnp.abs(y32)))
    assert np.any(np.asarray(y16) != np.asarray(y32))


def test_bad_inputs_fail_clearly():
    init = lambda model, shape: jax.eval_shape(model.init, jax.random.key(0), frames(shape))
    with pytest.raises(ValueError, match="chunk_frames"):
        init(tiny(), (1, 24, 16, 16, 3))
    with pytest.raises(ValueError, match="adapter_mode"):
        init(tiny(adapter_mode="lora"), (1, 16, 16, 16, 3))
    with pytest.raises(ValueError, match="out of range"):
        init(tiny(adapter_blocks=[4]), (1, 16, 16, 16, 3))
    with pytest.raises(ValueError, match="remat_policy"):
        init(tiny(remat_policy="some"), (1, 16, 16, 16, 3))
    with pytest.raises(ValueError, match="variant"):
        vit.from_variant("XL")


@pytest.mark.parametrize("row_from_probs", [False, True])
def test_chunk_attention_matches_jax_attention_values_and_gradients(row_from_probs):
    """models/attention.py's hand-written backward against autodiff of jax.nn.dot_product_attention,
    with its row term from the output or from the probabilities."""
    from tadjax.models.attention import chunk_attention
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(key, (3, 20, 2, 8)) * 2.0 for key in keys[:3])
    probe = jax.random.normal(keys[3], (3, 20, 2, 8))
    np.testing.assert_allclose(chunk_attention(q, k, v, row_from_probs),
                               jax.nn.dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    ours = jax.grad(lambda *a: jnp.sum(chunk_attention(*a, row_from_probs) * probe),
                    argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(lambda *a: jnp.sum(jax.nn.dot_product_attention(*a) * probe),
                   argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", ours, ref):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=name)
    with pytest.raises(ValueError, match="chunk_attention"):
        chunk_attention(q, k[:, :10], v)


def test_model_modules_do_not_import_the_data_or_checkpoint_stack():
    """Notebook use of the models (and `bench reference`'s memory) should not pay for grain,
    TFDS, orbax and tensorstore (~40 MB resident)."""
    import subprocess
    import sys
    code = ("import sys, tadjax.models.detector, tadjax.models.vit, tadjax.train.optimizer; "
            "print([m for m in ('grain', 'tensorflow_datasets', 'orbax.checkpoint', 'tensorstore')"
            " if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-2000:])
