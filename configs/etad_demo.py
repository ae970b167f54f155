r"""ETAD on the synthetic set: the demo's frozen pre-trained tiny ViT with chunk-local TIAs, and
sampled-gradient training (30 % of the 16-frame chunks back-propagated), LSTM neck and three refinement
stages on a 128x128 proposal map (6 % of the anchors per step).

  python -m tadjax.main --config configs/etad_demo.py --workdir workdirs/etad_demo

Windows of 128 positions (128 frames at stride 2, 64 px), as configs/demo.py. The synthetic set
has 5 classes and no video-level classifier, so the ETAD head carries a per-proposal class head
(`num_classes` > 1; see tadjax.models.etad). `configs/etad_demo.py:quick` is a short schedule.
"""
import ml_collections

from tadjax.config import (DEMO_BACKBONE, eval_config, finalize, mesh_config, synthetic_data,
                           train_config)
from tadjax.data.synthetic import CLASSES


def etad_model(*, num_classes: int, backbone: dict, hidden: int = 256):
    m = ml_collections.ConfigDict()
    m.name = "etad"
    m.dtype = "float32"
    m.backbone = ml_collections.ConfigDict(backbone)
    m.head = ml_collections.ConfigDict(dict(num_classes=num_classes, proposal_ratio=0.06,
                                            num_stages=3, roi_size=24, hidden=hidden))
    m.init_loss_norm = 1.0  # unused by ETAD's mean-form losses
    m.pretrained = ""
    m.pretrained_allow_missing = (r"(^|/)adapter/",)
    return m


def etad_train(*, epochs: int, warmup_epochs: int, backbone_regex: str, backbone_lr: float,
               head_lr: float, ratio: float, group: int = 1):
    """tadjax.config.train_config with ETAD's groups (weight decay 1e-4 everywhere), EMA 0.99
    and encoder-gradient sampling: back-propagate through `ratio` of the 16-frame chunks
    (tadjax.train.sampled_grad); 0 = full back-propagation."""
    t = train_config(epochs=epochs, end_epoch=epochs, warmup_epochs=warmup_epochs,
                     adapter_lr=None, head_lr=head_lr)
    t.param_groups = [
        dict(name="backbone", regex=backbone_regex, lr=backbone_lr, weight_decay=1e-4, no_decay=()),
        dict(name="head", regex=r"^head/", lr=head_lr, weight_decay=1e-4, no_decay=())]
    t.ema_decay = 0.99
    t.keep_checkpoints = 2
    t.eval_start_epoch = epochs - 1
    t.eval_every_epochs = 1
    t.sampled_grad_ratio = ratio
    t.sampled_grad_group = group
    return t


def get_config(arg=None):
    quick = arg == "quick"
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = synthetic_data()
    c.model = etad_model(num_classes=len(CLASSES), hidden=128, backbone=dict(
        variant="S", embed_dim=96, depth=4, num_heads=3, mlp_dim=384, patch_size=16,
        drop_path_rate=0.0, adapter_mode="adapter", adapter_blocks="all", adapter_ratio=0.25,
        adapter_chunk_local=True, remat_policy="none", scan_blocks=False))
    # The demo's frozen pre-trained ViT (see configs/demo.py); its chunk-local TIAs train with
    # sampled gradients.
    c.model.pretrained = DEMO_BACKBONE
    c.train = etad_train(epochs=6 if quick else 40, warmup_epochs=1 if quick else 2,
                         backbone_regex=r"^backbone/.*adapter", backbone_lr=1e-3, head_lr=1e-3,
                         ratio=0.3)
    c.train.checkpoint_every_steps = 100
    c.train.eval_start_epoch = 100 if quick else 19
    c.train.eval_every_epochs = 10
    c.eval = eval_config(tious="thumos14")
    c.eval.batch_size = 2
    c.eval.nms_sigma = 0.35
    c.eval.max_segments = 200
    c.mesh = mesh_config()
    return finalize(c)
