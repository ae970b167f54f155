"""Mesh, partition rules and sharded training steps.

The equivalence test runs this file as a script in a subprocess with 8 CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8): for data-parallel, FSDP, snippet-sharded
and accumulating meshes, the losses and parameters after 2 steps equal those of one device with
the same global batch.
"""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from tadjax.train import sharding

HERE = pathlib.Path(__file__).resolve().parent
STEPS = 2
# Cheap LLVM code generation (as tests/test_vit.py): the steps of tiny models compile faster.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
GLOBAL_BATCH = 8
# (name, mesh axes, per_device_batch)
MESHES = [
    ("one_device", (("data", 1), ("fsdp", 1), ("snippet", 1)), 0),
    ("data8", (("data", -1), ("fsdp", 1), ("snippet", 1)), 0),
    ("fsdp8", (("data", 1), ("fsdp", -1), ("snippet", 1)), 0),
    # The chunks of each video on 4 devices, and 2 micro-steps of 2 videos per device.
    ("data2_snippet4_accumulate", (("data", 2), ("fsdp", 1), ("snippet", -1)), 2),
]


# ----------------------------------------------------------------------------- pure functions

def test_mesh_shape_fills_one_axis():
    assert sharding.mesh_shape((("data", -1), ("fsdp", 2), ("snippet", 1)), 8) == \
        {"data": 4, "fsdp": 2, "snippet": 1}
    assert sharding.mesh_shape((("data", 2), ("snippet", 4)), 8) == {"data": 2, "snippet": 4}
    with pytest.raises(ValueError, match="only one axis"):
        sharding.mesh_shape((("data", -1), ("snippet", -1)), 8)
    with pytest.raises(ValueError, match="not a multiple"):
        sharding.mesh_shape((("data", -1), ("snippet", 3)), 8)
    with pytest.raises(ValueError, match="but 8 are available"):
        sharding.mesh_shape((("data", 2), ("snippet", 2)), 8)


def test_spec_rules():
    sizes = {"data": 2, "fsdp": 4, "snippet": 2}
    rules = [(r"^head/.*bias$", ()),
             (r"qkv/kernel$", (None, "fsdp")),
             (r"fc1/kernel$", (("fsdp", "snippet"),)),
             (r".*", "fsdp+snippet")]
    # Explicit specs.
    assert sharding.spec_for("head/cls/bias", (20,), rules, sizes) == P()
    assert sharding.spec_for("blocks_0/attn/qkv/kernel", (96, 288), rules, sizes) == P(None, "fsdp")
    assert sharding.spec_for("blocks_0/mlp/fc1/kernel", (96, 384), rules, sizes) == \
        P(("fsdp", "snippet"))
    # FSDP-style: the largest dimension divisible by 4 x 2 = 8 devices; ties go to the first.
    assert sharding.spec_for("blocks_0/mlp/fc2/kernel", (384, 96), rules, sizes) == \
        P(("fsdp", "snippet"), None)
    assert sharding.spec_for("patch_embed/kernel", (2, 16, 16, 3, 100), rules, sizes) == \
        P(None, ("fsdp", "snippet"), None, None, None)
    assert sharding.spec_for("x/bias", (100,), rules, sizes) == P()        # nothing divides
    assert sharding.spec_for("x/scalar", (), rules, sizes) == P()
    assert sharding.spec_for("x/kernel", (16, 8), [(".*", "fsdp")], {"fsdp": 1}) == P()
    with pytest.raises(ValueError, match="not divisible by 4 devices"):
        sharding.spec_for("a/qkv/kernel", (96, 30), rules, sizes)
    with pytest.raises(ValueError, match="lacks"):
        sharding.spec_for("a/b", (8,), [(".*", "model")], sizes)


def test_optimizer_state_and_ema_follow_parameter_rules():
    params = {"backbone": {"w": np.zeros((8, 3), np.float32), "b": np.zeros((3,), np.float32)},
              "head": {"w": np.zeros((3, 16), np.float32)}}
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)).init(params)
    state = {"step": np.int32(0), "params": params, "opt": opt, "ema": params}
    rules = [(r"^head/", (None, "fsdp")), (r".*", "fsdp")]
    specs = sharding.state_specs(state, rules=rules, mesh_sizes={"fsdp": 4})
    flat = {k: v for k, v in zip(
        [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
            state)[0]], jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))}
    mu = [k for k in flat if "mu" in k and "'head'" in k]
    assert mu and all(flat[k] == P(None, "fsdp") for k in mu)
    assert all(flat[k] == P("fsdp", None) for k in flat if "'backbone'" in k and "'w'" in k)
    assert all(flat[k] == P() for k in flat if "'b'" in k or "count" in k or k == "['step']")
    assert flat["['ema']['head']['w']"] == P(None, "fsdp")


def test_batch_shardings_name_the_field_that_does_not_divide():
    mesh = sharding.make_mesh(_mesh_cfg((("data", 1), ("snippet", 1))))
    cfg = _mesh_cfg((("data", 1), ("snippet", 1)))
    sh = sharding.batch_shardings(mesh, cfg, {"frames": np.zeros((2, 32, 4, 4, 3)),
                                              "mask": np.zeros((2, 16))})
    assert sh["frames"].spec == P(("data",), "snippet") and sh["mask"].spec == P(("data",))
    assert sharding.batch_shard_of_process(mesh, cfg) == (0, 1)


def _mesh_cfg(axes, batch_axes=("data",), snippet_axis="snippet", rules=()):
    import ml_collections
    return ml_collections.ConfigDict(dict(axes=axes, batch_axes=batch_axes,
                                          snippet_axis=snippet_axis, rules=rules))


# ----------------------------------------------------------------------------- 8 CPU devices

def tiny_config(axes=(("data", 1), ("fsdp", 1), ("snippet", 1)), per_device_batch=0,
                batch=GLOBAL_BATCH):
    """The demo config, made smaller, deterministic (no dropout) and on a given mesh."""
    sys.path.insert(0, str(HERE))
    from conftest import tiny_demo_config
    c = tiny_demo_config(("synthetic", ""), pathlib.Path("/nonexistent"), **{
        "data.batch_size": batch, "data.window": 64, "data.img_size": 32,
        "model.head.path_pdrop": 0.0, "model.backbone.drop_path_rate": 0.0,
        "model.backbone.depth": 1, "model.backbone.remat_policy": "full",
        "model.backbone.scan_blocks": True, "model.head.channels": 32,
        "train.per_device_batch": per_device_batch, "data.max_gt": 4})
    with c.unlocked():  # a 3-level head compiles faster
        c.model.head.arch = (1, 1, 2)
        c.model.head.num_levels = 3
        c.model.strides = (1, 2, 4)
        c.model.regress_ranges = ((0, 4), (4, 8), (8, 10000))
    c.mesh.axes = axes
    return c


def random_batches(config, steps, seed=0):
    from tadjax.models import detector
    rng = np.random.default_rng(seed)
    b = int(config.data.batch_size)
    frames_shape, mask_shape = detector.input_shapes(config, b)
    m, t = int(config.data.max_gt), mask_shape[1]
    out = []
    for _ in range(steps):
        start = rng.uniform(0, t - 4, (b, m))
        segs = np.stack([start, start + rng.uniform(1, t / 2, (b, m))], -1).clip(0, t)
        out.append({"frames": rng.integers(0, 256, frames_shape, dtype=np.uint8),
                    "mask": np.arange(t)[None, :] < rng.integers(t // 2, t + 1, (b, 1)),
                    "gt_segments": segs.astype(np.float32),
                    "gt_labels": rng.integers(0, int(config.model.head.num_classes), (b, m)).astype(np.int32),
                    "gt_valid": rng.uniform(size=(b, m)) < 0.7})
    return out


def train_two_steps(config, devices=None):
    """(losses, flat params) after STEPS steps on random global batches."""
    from tadjax import tree
    from tadjax.train.trainer import Run
    run = Run(config, None, with_data=False, devices=devices)
    tx, _ = run.make_tx(steps_per_epoch=4)
    state = run.init_state(tx)
    step = run.make_train_step(tx)
    losses, compiled = [], None
    for batch in random_batches(config, STEPS):
        batch = run.global_batch(batch)
        # Traced under the run's mesh, as the trainer does: the ViT's row_axes constraints apply.
        with jax.set_mesh(run.mesh):
            if compiled is None:
                compiled = step.lower(state, batch).compile(compiler_options=FAST)
            state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))
    params = {k: np.asarray(jax.device_get(v)) for k, v in tree.flatten(state["params"]).items()}
    shards = {k: str(v.sharding.spec) for k, v in tree.flatten(state["params"]).items()}
    return losses, params, shards, run.accum_steps()


def _worker(out_dir):
    assert jax.device_count() == 8, jax.devices()
    results = {}
    for name, axes, per_device in MESHES:
        devices = jax.devices()[:1] if name == "one_device" else None
        losses, params, shards, accum = train_two_steps(tiny_config(axes, per_device), devices)
        np.savez(os.path.join(out_dir, f"{name}.npz"), **params)
        results[name] = {"losses": losses, "accum": accum,
                         "kernel_spec": shards["backbone/blocks_0/mlp/fc1/kernel"]}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f)


@pytest.mark.slow
def test_sharded_steps_match_one_device(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(HERE.parent))
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, cwd=HERE.parent,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    base = np.load(tmp_path / "one_device.npz")
    assert results["one_device"]["accum"] == 1
    assert results["data2_snippet4_accumulate"]["accum"] == 2   # 8 videos / 2 batch devices / 2
    assert results["fsdp8"]["kernel_spec"] != results["one_device"]["kernel_spec"]
    for name, _, _ in MESHES[1:]:
        np.testing.assert_allclose(results[name]["losses"], results["one_device"]["losses"],
                                   rtol=1e-5, atol=1e-5, err_msg=name)
        other = np.load(tmp_path / f"{name}.npz")
        assert sorted(other.files) == sorted(base.files)
        for key in base.files:
            np.testing.assert_allclose(other[key], base[key], rtol=1e-5, atol=1e-5,
                                       err_msg=f"{name}: {key}")
    # The runs did train: the loss changed between the steps.
    assert results["one_device"]["losses"][0] != results["one_device"]["losses"][1]


if __name__ == "__main__":
    _worker(sys.argv[1])
