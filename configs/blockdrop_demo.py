r"""Progressive Block Drop on the embedded demo: drop 1 of the 4 ViT blocks (a quarter) of a model
trained with configs/demo.py, recovering with LoRA and cross-depth alignment to it.

  python -m tadjax.main --config configs/demo.py --workdir workdirs/demo        # M0 first
  python -m tadjax.main --config configs/blockdrop_demo.py --mode compress \
      --workdir workdirs/blockdrop_demo --config.compress.teacher=workdirs/demo

The `model`, `data` and `train` sections are the demo's (so M0's checkpoint restores); only
`compress` is new (see tadjax.compress). `configs/blockdrop_demo.py:quick` pairs with
`configs/demo.py:quick` and runs short rounds. Re-running the command resumes.
"""
import importlib.util
import os

from tadjax.compress import compress_config


def _demo_config(arg):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
    spec = importlib.util.spec_from_file_location("tadjax_configs_demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg=None):
    quick = arg == "quick"
    c = _demo_config(arg)
    with c.unlocked():
        # Width 96 -> rank 24 (C/4, as the reference's 96 for ViT-S). The tiny from-scratch demo
        # takes larger learning rates than the reference's 1e-4 on a pretrained VideoMAE.
        c.compress = compress_config(
            teacher="workdirs/demo_quick" if quick else "workdirs/demo", target="blocks:3",
            lora_rank=24, epochs=2 if quick else 10, warmup_epochs=1, horizon_epochs=2 if quick else 10,
            backbone_lr=5e-4, head_lr=5e-4)
        c.compress.ema_decay = 0.99
        c.compress.checkpoint_every_steps = 100
    c.lock()
    return c
