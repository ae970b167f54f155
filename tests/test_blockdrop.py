"""Block drop and LoRA on parameter trees: equivalence with the runtime skip mask, merge parity,
jit composition, and loading by config alone."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, load_config_file
from tadjax import surgery, tree
from tadjax.models import detector as detector_lib
from tadjax.models import vit
from tadjax.train import state as state_lib

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
TINY = dict(embed_dim=32, depth=4, num_heads=2, mlp_dim=64, patch_size=8, pretrain_img_size=32,
            adapter_mode="adapter_full")


def compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST)(*args)


def random_params(model, x, seed=0, std=0.1):
    """Every leaf random (scales/gamma around 1): no zero-initialised branch hides a bug."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(seed)

    def draw(name, leaf):
        centre = 1.0 if re.search(r"(scale|gamma)$", name) else 0.0
        return jnp.asarray(centre + std * rng.normal(size=leaf.shape), jnp.float32)
    return tree.map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def tiny_full():
    model = vit.VisionTransformer(**TINY, drop_path_rate=0.5)
    x = jax.random.normal(jax.random.key(1), (2, 32, 16, 16, 3), jnp.float32)
    return model, random_params(model, x), x


def test_dropped_tree_equals_skip_mask(tiny_full):
    full, params, x = tiny_full
    rng = jax.random.key(7)
    # Full model, blocks 1 and 2 skipped at run time (scanned blocks, gated by lax.cond), in
    # train mode so that drop-path keys and rates must follow the original block index too.
    full_scan = full.clone(scan_blocks=True)
    mask = surgery.block_mask(4, [0, 3])
    want = compiled(lambda p, x, m, r: full_scan.apply({"params": p}, x, train=True,
                                                       block_mask=m, rngs={"dropout": r}),
                    params, x, mask, rng)
    small = surgery.drop_blocks(params, [1, 2], prefix="")
    assert surgery.kept_blocks(small, prefix="") == (0, 3)
    assert sorted(k for k in small if k.startswith("blocks_")) == ["blocks_0", "blocks_3"]
    reduced = full.clone(block_indices=surgery.kept_blocks(small, prefix=""))
    got, inter = compiled(lambda p, x, r: reduced.apply({"params": p}, x, train=True,
                                                        rngs={"dropout": r},
                                                        mutable=["intermediates"]),
                          small, x, rng)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)
    # Every held block's output is returned by original index; the last one is the features'
    # source (mean over the 2x2 spatial tokens).
    outputs, = inter["intermediates"]["block_outputs"]
    assert sorted(outputs) == ["0", "3"]
    last = np.asarray(outputs["3"]).reshape(2, 2, 8, 4, 32).mean(axis=3).reshape(2, 16, 32)
    np.testing.assert_allclose(np.asarray(got), last, atol=1e-6, rtol=0)


def test_drop_blocks_errors_and_untouched_leaves(tiny_full):
    _, params, _ = tiny_full
    with pytest.raises(KeyError, match=r"blocks \[7\]"):
        surgery.drop_blocks(params, [7], prefix="")
    with pytest.raises(ValueError, match="no block"):
        surgery.drop_blocks(params, [0, 1, 2, 3], prefix="")
    small = surgery.drop_blocks({"backbone": params, "head": {"w": jnp.ones(2)}}, [2])
    assert set(small) == {"backbone", "head"}
    assert surgery.kept_blocks(small) == (0, 1, 3)
    np.testing.assert_array_equal(small["backbone"]["blocks_3"]["attn"]["qkv"]["kernel"],
                                  params["blocks_3"]["attn"]["qkv"]["kernel"])
    assert surgery.kept_blocks(params, prefix="") == (0, 1, 2, 3)  # input not mutated


def test_lora_init_merge_and_jit_composition(tiny_full):
    full, params, x = tiny_full
    rank = 4
    fresh = surgery.add_lora(params, jax.random.key(3), rank, prefix="")
    flat = tree.flatten(fresh)
    lora_paths = sorted(p for p in flat if "lora" in p)
    assert lora_paths == sorted(f"blocks_{i}/attn/{t}/{n}" for i in range(4)
                                for t in ("qkv", "proj") for n in ("lora_a", "lora_b"))
    assert flat["blocks_0/attn/qkv/lora_a"].shape == (32, rank)
    assert flat["blocks_0/attn/qkv/lora_b"].shape == (rank, 96)
    assert flat["blocks_2/attn/proj/lora_b"].shape == (rank, 32)
    assert all(not np.any(flat[p]) for p in lora_paths if p.endswith("lora_b"))
    a = np.concatenate([np.ravel(flat[p]) for p in lora_paths if p.endswith("lora_a")])
    assert a.size == 4 * 2 * 32 * rank
    assert abs(a.std() - rank ** -0.5) < 0.05 and abs(a.mean()) < 0.05
    with pytest.raises(ValueError, match="already has LoRA"):
        surgery.add_lora(fresh, jax.random.key(0), rank, prefix="")

    # A non-zero B, so that the merge has something to merge.
    trained = tree.map_with_path(
        lambda p, v: v + 0.05 * jax.random.normal(jax.random.key(len(p)), v.shape)
        if p.endswith("lora_b") else v, fresh)
    lora_model = full.clone(lora_rank=rank)
    plain = full
    unmerged = compiled(lambda p, x: lora_model.apply({"params": p}, x), trained, x)
    merged_tree = surgery.merge_lora(trained)
    assert not surgery.has_lora(merged_tree) and surgery.has_lora(trained)
    assert tree.flatten(merged_tree).keys() == tree.flatten(params).keys()
    merged = compiled(lambda p, x: plain.apply({"params": p}, x), merged_tree, x)
    ref = compiled(lambda p, x: plain.apply({"params": p}, x), params, x)
    assert np.abs(np.asarray(unmerged) - np.asarray(ref)).max() > 1e-3  # LoRA does something
    np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=1e-5, rtol=0)

    # drop, add and merge compose under jit and give the eager result.
    def surgery_fn(p, key):
        small = surgery.drop_blocks(p, [1], prefix="")
        return surgery.merge_lora(surgery.add_lora(small, key, rank, prefix=""))
    jitted = jax.jit(surgery_fn)(params, jax.random.key(5))
    eager = surgery_fn(params, jax.random.key(5))
    assert surgery.kept_blocks(jitted, prefix="") == (0, 2, 3)
    for (pa, va), (pb, vb) in zip(tree.flatten(jitted).items(), tree.flatten(eager).items()):
        assert pa == pb
        np.testing.assert_allclose(np.asarray(va), np.asarray(vb), atol=1e-6, rtol=0)


def test_dropped_detector_tree_loads_by_config_alone():
    config = load_config_file(REPO / "configs" / "demo.py", "quick")
    model = detector_lib.build_detector(config)
    params = jax.eval_shape(lambda r: state_lib.init_params(model, config, r), jax.random.key(0))
    small = surgery.drop_blocks(params, [1])
    small = surgery.add_lora(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), small),
                             jax.random.key(0), 8)
    reduced = surgery.reduced_config(config, surgery.kept_blocks(small), lora_rank=8)
    assert tuple(reduced.model.backbone.block_indices) == (0, 2, 3)
    assert config.model.backbone.get("block_indices") is None  # the original is untouched
    want = jax.eval_shape(lambda r: state_lib.init_params(detector_lib.build_detector(reduced),
                                                          reduced, r), jax.random.key(0))
    # Strict: same paths, same shapes, nothing missing or unexpected.
    tree.merge_params(want, tree.flatten(small), source="dropped tree")
    assert tree.flatten(want).keys() == tree.flatten(small).keys()
