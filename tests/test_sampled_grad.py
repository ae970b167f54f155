"""Sampled-gradient backbone training: equals the masked stop_gradient reference, equals the full
gradient at ratio 1, same dropout masks in both passes; ViT chunk-local adapters are chunk-independent."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tadjax.train import sampled_grad as sg

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def snippet_fn(params, x, key):
    """A toy snippet encoder [4, 3] -> [4, 5] with dropout drawn from the snippet's key."""
    h = jnp.tanh(x @ params["w"] + params["b"])
    keep = jax.random.bernoulli(key, 0.7, h.shape)
    return jnp.where(keep, h / 0.7, 0.0) @ params["v"]


def detector_loss(feats, target):
    """A nonlinear 'detector' mixing snippets, so every snippet's cotangent is non-trivial."""
    mixed = jnp.cumsum(feats, axis=1)
    return jnp.sum(jnp.sin(mixed) * target) + 0.1 * jnp.sum(feats ** 2)


def setup(seed=0, b=2, k=6):
    """float64 inputs (call under jax.enable_x64): the equivalences then hold to ~1e-15."""
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(size=(3, 8))), "b": jnp.asarray(rng.normal(size=(8,))),
              "v": jnp.asarray(rng.normal(size=(8, 5)) * 0.3)}
    snippets = jnp.asarray(rng.normal(size=(b, k, 4, 3)))
    target = jnp.asarray(rng.normal(size=(b, k, 4, 5)))
    assert params["w"].dtype == jnp.float64
    return params, snippets, target


def grads(features_fn, params, snippets, target, key, **kw):
    def loss(p):
        return detector_loss(features_fn(snippet_fn, p, snippets, key, **kw), target)
    fn = jax.jit(jax.value_and_grad(loss)).lower(params).compile(compiler_options=FAST)
    return fn(params)


def assert_tree_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def test_num_sampled_matches_etad_rounding():
    # ETAD: 4·int(128·r/4 + 0.99) snippets for chunk 4 (spec §6 table).
    assert [sg.num_sampled(128, r, 4) for r in (0.1, 0.2, 0.3, 0.5, 1.0)] == [16, 28, 40, 64, 128]
    assert sg.num_sampled(48, 0.3) == 15
    assert sg.num_sampled(10, 0.01) == 1
    with pytest.raises(ValueError, match="ratio"):
        sg.num_sampled(10, 0.0)


def test_sample_mask_counts_and_differs_per_video():
    mask = np.asarray(sg.sample_mask(jax.random.key(3), 4, 12, 0.3, 2))
    assert mask.sum(axis=1).tolist() == [4, 4, 4, 4]
    assert len({tuple(r) for r in mask}) > 1


@pytest.mark.parametrize("ratio,group", [(0.3, 1), (0.5, 3)])
@jax.enable_x64(True)
def test_sampled_gradient_equals_masked_reference(ratio, group):
    params, snippets, target = setup()
    key = jax.random.key(7)
    loss_s, g_s = grads(sg.sampled_snippet_features, params, snippets, target, key,
                        ratio=ratio, group=group)
    loss_r, g_r = grads(sg.masked_reference_features, params, snippets, target, key,
                        ratio=ratio, group=group)
    np.testing.assert_allclose(float(loss_s), float(loss_r), rtol=1e-6)
    assert_tree_close(g_s, g_r, 1e-6)
    # It is a real subset: differs from the full gradient.
    _, g_full = grads(sg.masked_reference_features, params, snippets, target, key, ratio=1.0)
    assert np.abs(np.asarray(g_s["w"]) - np.asarray(g_full["w"])).max() > 1e-3


@jax.enable_x64(True)
def test_ratio_one_is_the_full_gradient():
    params, snippets, target = setup(seed=1)
    key = jax.random.key(11)
    keys = sg.snippet_keys(sg.split_key(key)[1], *snippets.shape[:2])

    def plain(fn, p, x, key):  # ordinary autodiff through every snippet, same keys
        return jax.vmap(jax.vmap(fn, in_axes=(None, 0, 0)), in_axes=(None, 0, 0))(p, x, keys)

    _, g_s = grads(sg.sampled_snippet_features, params, snippets, target, key, ratio=1.0, group=2)
    _, g_full = grads(plain, params, snippets, target, key)
    assert_tree_close(g_s, g_full, 1e-6)


def test_vit_chunk_local_adapters_are_chunk_independent():
    """A ViT with chunk-local TIAs gives each chunk the features it has alone; with the
    window-wide TIA (AdaTAD's) the same chunk's features change with its neighbours."""
    from tadjax.models import vit
    frames = jax.random.normal(jax.random.key(0), (1, 32, 16, 16, 3))

    def features(chunk_local):
        model = vit.VisionTransformer(embed_dim=16, depth=2, num_heads=2, mlp_dim=32, patch_size=8,
                                      pretrain_img_size=16, adapter_mode="adapter",
                                      adapter_chunk_local=chunk_local)
        params = jax.eval_shape(model.init, jax.random.key(0), frames)["params"]
        rng = np.random.default_rng(0)
        params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), jnp.float32),
                              params)
        fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
        both = fn(params, frames)
        alone = jnp.concatenate([fn(params, frames[:, :16]), fn(params, frames[:, 16:])], axis=1)
        return np.asarray(both), np.asarray(alone)

    both, alone = features(True)
    np.testing.assert_allclose(both, alone, atol=1e-5)
    both, alone = features(False)
    assert np.abs(both - alone).max() > 1e-3


@pytest.mark.slow
def test_detector_option_ratio_one_equals_full_backprop():
    """config.train.sampled_grad_ratio on the AdaTAD detector: at ratio 1 the gradient of every
    trainable leaf (chunk-local TIAs and the head) equals ordinary back-propagation; without
    chunk-local adapters it is refused."""
    import pathlib
    from conftest import load_config_file
    from tadjax.models import detector as detector_lib
    from tadjax.train import state as state_lib

    c = load_config_file(pathlib.Path(__file__).parents[1] / "configs" / "demo.py", "quick")
    with c.unlocked():
        c.data.window, c.data.img_size = 32, 32
        c.model.backbone.update(embed_dim=16, depth=2, num_heads=2, mlp_dim=32, adapter_mode="adapter",
                                adapter_chunk_local=True, pretrain_img_size=32)
        c.model.head.update(channels=16, n_head=2, path_pdrop=0.0, arch=(1, 1, 1), num_levels=2)
        c.model.strides, c.model.regress_ranges = (1, 2), ((0, 4), (4, 10000))
        c.train.sampled_grad_ratio = 0.0
    full = detector_lib.build_detector(c)
    c.train.sampled_grad_ratio = 1.0
    sampled = detector_lib.build_detector(c)
    assert sampled.sampled_grad_ratio == 1.0
    params = jax.jit(lambda r: state_lib.init_params(full, c, r))(jax.random.key(0))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x + 0.05 * rng.normal(size=x.shape).astype(np.float32), params)
    frames_shape, mask_shape = detector_lib.input_shapes(c, 2)
    frames = jnp.asarray(rng.integers(0, 256, frames_shape), jnp.uint8)
    mask = jnp.ones(mask_shape, bool)

    def grad_of(model):
        def loss(p):
            out = model.apply({"params": p}, frames, mask, train=True,
                              rngs={"dropout": jax.random.key(1)})
            return jnp.sum(jnp.sin(out["cls_logits"])) + jnp.sum(out["reg"] ** 2)
        return jax.jit(jax.grad(loss)).lower(params).compile(compiler_options=FAST)(params)

    g_full, g_sampled = grad_of(full), grad_of(sampled)
    adapter = g_full["backbone"]["blocks_0"]["adapter"]["down"]["kernel"]
    assert np.abs(np.asarray(adapter)).max() > 1e-6
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_full)[0], jax.tree.leaves(g_sampled)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=2e-4,
                                   err_msg=jax.tree_util.keystr(path))

    c.model.backbone.adapter_chunk_local = False
    window_tia = detector_lib.build_detector(c)
    with pytest.raises(ValueError, match="adapter_chunk_local"):
        jax.eval_shape(lambda p: window_tia.apply({"params": p}, frames, mask, train=True,
                                                  rngs={"dropout": jax.random.key(1)}), params)
