"""Parameter counts, FLOPs and compiled memory of a config's training step, from abstract shapes.

  python -m tadjax.tools.report --config configs/adatad_thumos_s.py [--config.x=y ...] [--json]

Nothing is allocated: parameters come from jax.eval_shape and the training step is lowered and
compiled on jax.ShapeDtypeStruct inputs, so any model size can be reported on a laptop. FLOPs are
XLA's cost analysis of the whole compiled step (forward, backward through the frozen blocks for the
adapters, optimizer update); memory is XLA's compiled memory analysis per device, for the mesh
of the config (or --mesh) over the visible devices. Fake devices to size a mesh you do not have:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python -m tadjax.tools.report --config configs/adatad_thumos_g_1536_224.py --json

peak_bytes_per_device = arguments + outputs + temporaries - aliased (donated) bytes: everything
the compiled step holds at once on one device (the state, the batch and XLA's temporary buffers).
"""
from __future__ import annotations

import json
import sys
import time

import argparse


def parse_mesh(spec: str) -> tuple:
    """'data=2,snippet=-1' -> (("data", 2), ("snippet", -1))."""
    axes = []
    for part in spec.split(","):
        name, sep, size = part.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--mesh: expected name=size pairs separated by commas, got {spec!r}")
        axes.append((name.strip(), int(size)))
    return tuple(axes)


def _count(tree, mask=None):
    import jax
    import numpy as np
    leaves = jax.tree.leaves(tree)
    if mask is None:
        return int(sum(int(np.prod(x.shape)) for x in leaves))
    return int(sum(int(np.prod(x.shape)) for x, m in zip(leaves, jax.tree.leaves(mask)) if m))


def report(config, *, compile_step: bool = True, batch_size: int | None = None,
           mesh: str | None = None) -> dict:
    import jax
    from tadjax.train.trainer import Run

    if mesh:
        with config.unlocked():
            config.mesh.axes = parse_mesh(mesh)
    if batch_size:
        with config.unlocked():
            config.data.batch_size = int(batch_size)
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
        b = int(config.data.batch_size)
        batch = run.abstract_batch()
        frames_shape = batch["frames"].shape
        step = run.make_train_step(tx)
        t0 = time.time()
        # Traced under the mesh, so that the backbone's row_axes constraints apply.
        with jax.set_mesh(run.mesh):
            compiled = step.lower(abstract_state, batch).compile()
        out["compile_seconds"] = time.time() - t0
        out["train_step_flops"] = train_step_flops(config, abstract_state, batch, tx, run)
        out["batch_size"] = b
        out["frames"] = frames_shape[1]
        out["img_size"] = frames_shape[2]
        out.update(memory_figures(compiled))
        out["devices"] = int(run.mesh.size)
        out["mesh"] = dict(run.mesh.shape)
        out["accum_steps"] = run.accum_steps()
    return out


def train_step_flops(config, abstract_state, batch, tx, run) -> float:
    """FLOPs of one training step from XLA's cost analysis of the lowered (unoptimised) HLO.

    XLA's cost analysis counts a while loop's body once, not once per iteration, so a scanned
    backbone (or chunk-grouped blocks, a `lax.map`) would be under-counted by its depth: FLOPs are
    taken from the same step with the blocks unrolled and ungrouped (the arithmetic is the same,
    except that chunk grouping recomputes each group's forward once more in the backward pass:
    see VisionTransformer.chunk_group). Lowering is cheap: nothing is compiled or allocated.
    """
    from tadjax.train import state as state_lib
    from tadjax.train.trainer import Run
    backbone = config.model.backbone
    saved = {k: backbone.get(k) for k in ("scan_blocks", "chunk_group") if backbone.get(k)}
    if saved:
        with config.unlocked():
            for k in saved:
                backbone[k] = type(saved[k])(0)
        try:
            run = Run(config, None, with_data=False)
        finally:
            with config.unlocked():
                backbone.update(saved)
    step = state_lib.make_train_step(run.model, config, tx, run.mask, run.points)
    cost = step.lower(abstract_state, batch).cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


def memory_figures(compiled) -> dict:
    """Per-device memory of a compiled step (XLA's memory analysis; {} if the backend has none).

    XLA:CPU's own `peak_memory_in_bytes` leaves out the temporaries, so the peak reported here is
    arguments + outputs + temporaries - aliased (donated) bytes; XLA's figure is kept beside it.
    """
    mem = compiled.memory_analysis()
    if mem is None:
        return {}
    figures = {
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "generated_code_bytes": int(mem.generated_code_size_in_bytes),
        "xla_peak_bytes": int(getattr(mem, "peak_memory_in_bytes", 0) or 0),
    }
    peak = (figures["argument_bytes"] + figures["output_bytes"] + figures["temp_bytes"]
            - figures["alias_bytes"])
    return {"memory": figures, "peak_bytes_per_device": int(peak)}


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def main(argv=None):
    # argparse + a private absl FlagValues for the config (see tools.bench.load_config): importing
    # this module must not define global absl flags, which would clash with tadjax.main's.
    from tadjax.tools.bench import load_config
    parser = argparse.ArgumentParser(prog="python -m tadjax.tools.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config file (configs/X.py[:arg])")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--compile", dest="compile", action="store_true", default=True,
                        help="compile the training step for FLOPs and memory (default)")
    parser.add_argument("--nocompile", dest="compile", action="store_false",
                        help="parameter counts only")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="per-step batch (default: the config's global batch)")
    parser.add_argument("--mesh", default=None, help="mesh axes overriding config.mesh.axes, e.g. "
                        "'data=1,fsdp=1,snippet=-1' (-1: the remaining devices)")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    config = load_config(args.config, overrides)
    out = report(config, compile_step=args.compile, batch_size=args.batch_size, mesh=args.mesh)
    out["config"] = args.config
    if args.json:
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
        mem = out["memory"]
        print(f"compiled memory per device on {out['devices']} device(s) {out['mesh']}: peak "
              f"{out['peak_bytes_per_device'] / 2**30:.2f} GiB (arguments "
              f"{mem['argument_bytes'] / 2**30:.2f}, temporaries {mem['temp_bytes'] / 2**30:.2f}, "
              f"outputs {mem['output_bytes'] / 2**30:.2f}, donated "
              f"{mem['alias_bytes'] / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
