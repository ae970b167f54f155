r"""The embedded default: AdaTAD (tiny VideoMAE-style ViT with TIA + ActionFormer) on the synthetic set.

  python -m tadjax.main --config configs/demo.py --workdir workdirs/demo

Needs no download: the synthetic dataset (real H.264 mp4 files) is generated once into
~/.cache/tadjax (or $TADJAX_CACHE). Sized for a 2-core CPU: 64-px frames, a 4-block ViT of width
96, windows of 128 positions at 2 raw frames each. Running the same command again resumes.

Train on your own ActivityNet-style data by overriding the annotation file and the video folder:
  python -m tadjax.main --config configs/demo.py --workdir workdirs/mine \
      --config.data.annotations=/data/my.json --config.data.videos=/data/videos \
      --config.data.train_subset=training --config.data.eval_subset=validation \
      --config.model.head.num_classes=N
The `arg` (configs/demo.py:quick) selects a shorter schedule used by the tests.
"""
import ml_collections

from tadjax.config import (DEMO_BACKBONE, eval_config, finalize, mesh_config, model_config,
                           synthetic_data, train_config)
from tadjax.data.synthetic import CLASSES


def get_config(arg=None):
    quick = arg == "quick"
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = synthetic_data()
    c.model = model_config(
        variant="S", num_classes=len(CLASSES), channels=128, drop_path_rate=0.0,
        init_loss_norm=20.0, remat_policy="none", scan_blocks=False, adapter_mode="adapter",
        backbone_overrides=dict(embed_dim=96, depth=4, num_heads=3, mlp_dim=384, patch_size=16),
        head_overrides=dict(n_head=4))
    # As AdaTAD starts from VideoMAE: a frozen pre-trained ViT with a trained TIA after every
    # block. The weights are the synthetic world's stand-in for VideoMAE, shipped with the
    # package and made by `python -m tadjax.tools.pretrain_synthetic --config configs/demo.py
    # --out tadjax/assets/synthetic_vit_demo` (token-level motion labels of rendered clips, never
    # the detection videos). A ViT trained from scratch on the demo's budget stays at the class
    # prior: --config.model.pretrained="" --config.model.backbone.adapter_mode=adapter_full.
    c.model.pretrained = DEMO_BACKBONE
    c.train = train_config(epochs=40 if not quick else 6, end_epoch=40 if not quick else 6,
                           warmup_epochs=2 if not quick else 1, adapter_lr=1e-3, head_lr=1e-3,
                           adapter_mode="adapter")
    c.train.ema_decay = 0.99
    c.train.log_every_steps = 10
    c.train.checkpoint_every_steps = 100
    c.train.eval_start_epoch = 29 if not quick else 100
    c.train.eval_every_epochs = 10
    c.eval = eval_config(tious="thumos14")
    c.eval.batch_size = 8
    c.mesh = mesh_config()
    return finalize(c)
