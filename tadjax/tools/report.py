"""Parameter counts, FLOPs and compiled memory of a config's training step, from abstract shapes.

  python -m tadjax.tools.report --config configs/adatad_thumos_s.py [--config.x=y ...] [--json]

Nothing is allocated: parameters come from jax.eval_shape and the training step is lowered and
compiled on jax.ShapeDtypeStruct inputs, so any model size can be reported on a laptop. FLOPs are
XLA's cost analysis of the whole compiled step (forward, backward through the frozen blocks for the
adapters, optimizer update); memory is XLA's compiled memory analysis per device.
"""
from __future__ import annotations

import json
import sys
import time

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
flags.DEFINE_bool("json", False, "Print one JSON line.")
flags.DEFINE_bool("compile", True, "Compile the training step for FLOPs and memory.")
flags.DEFINE_integer("batch_size", None, "Per-step batch (default: the config's global batch).")


def _count(tree, mask=None):
    import jax
    import numpy as np
    leaves = jax.tree.leaves(tree)
    if mask is None:
        return int(sum(int(np.prod(x.shape)) for x in leaves))
    return int(sum(int(np.prod(x.shape)) for x, m in zip(leaves, jax.tree.leaves(mask)) if m))


def report(config, *, compile_step: bool = True, batch_size: int | None = None) -> dict:
    import jax
    import jax.numpy as jnp
    from tadjax.models import detector as detector_lib
    from tadjax.train import state as state_lib
    from tadjax.train.trainer import Run

    run = Run(config, None, with_data=False)
    params = run.abstract_params
    backbone = params.get("backbone", {})
    adapters = {k: v for k, v in backbone.items() if "adapter" in k}
    blocks_adapters = sum(_count(b.get("adapter", {})) for k, b in backbone.items()
                          if k.startswith("blocks_"))
    out = {
        "params_total": _count(params),
        "params_trainable": _count(params, run.mask),
        "params_backbone": _count(backbone),
        "params_backbone_adapters": blocks_adapters + _count(adapters),
        "params_head": _count(params.get("head", {})),
    }
    out["params_backbone_vit"] = out["params_backbone"] - out["params_backbone_adapters"]
    if compile_step:
        tx, _ = run.make_tx(steps_per_epoch=100)
        abstract_state = run.abstract_state(tx)
        b = int(batch_size or config.data.batch_size)
        frames_shape, mask_shape = detector_lib.input_shapes(config, b)
        m = int(config.data.max_gt)
        batch = {
            "frames": jax.ShapeDtypeStruct(frames_shape, jnp.uint8),
            "mask": jax.ShapeDtypeStruct(mask_shape, jnp.bool_),
            "gt_segments": jax.ShapeDtypeStruct((b, m, 2), jnp.float32),
            "gt_labels": jax.ShapeDtypeStruct((b, m), jnp.int32),
            "gt_valid": jax.ShapeDtypeStruct((b, m), jnp.bool_),
        }
        step = state_lib.make_train_step(run.model, config, tx, run.mask, run.points)
        t0 = time.time()
        compiled = step.lower(abstract_state, batch).compile()
        out["compile_seconds"] = time.time() - t0
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        out["train_step_flops"] = float(cost.get("flops", float("nan")))
        out["batch_size"] = b
        out["frames"] = frames_shape[1]
        out["img_size"] = frames_shape[2]
        mem = compiled.memory_analysis()
        if mem is not None:
            out["memory"] = {
                "argument_bytes": int(mem.argument_size_in_bytes),
                "output_bytes": int(mem.output_size_in_bytes),
                "temp_bytes": int(mem.temp_size_in_bytes),
                "alias_bytes": int(mem.alias_size_in_bytes),
                "generated_code_bytes": int(mem.generated_code_size_in_bytes),
            }
            peak = getattr(mem, "peak_memory_in_bytes", 0) or 0
            if not peak:
                peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                        + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
            out["peak_bytes_per_device"] = int(peak)
        out["devices"] = jax.device_count()
    return out


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def main(argv):
    del argv
    out = report(FLAGS.config, compile_step=FLAGS.compile, batch_size=FLAGS.batch_size)
    out["config"] = flags.FLAGS["config"].config_filename
    if FLAGS.json:
        print(json.dumps(out))
        return
    print(f"parameters: total {_human(out['params_total'])} ({out['params_total']:,}), "
          f"trainable {_human(out['params_trainable'])} ({out['params_trainable']:,})")
    print(f"  backbone ViT {_human(out['params_backbone_vit'])}, adapters "
          f"{_human(out['params_backbone_adapters'])}, head {_human(out['params_head'])}")
    if "train_step_flops" in out:
        print(f"training step (batch {out['batch_size']}, {out['frames']} frames at "
              f"{out['img_size']} px): {_human(out['train_step_flops'])}FLOPs")
    if "peak_bytes_per_device" in out:
        print(f"compiled peak memory per device: {out['peak_bytes_per_device'] / 2**30:.2f} GiB "
              f"on {out['devices']} device(s)")


if __name__ == "__main__":
    app.run(main)
