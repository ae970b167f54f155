"""Building blocks for `configs/*.py` (each of which is `get_config(arg)` returning a locked ConfigDict).

The config has five sections:
  data   what the loader reads and how (see tadjax.data.defaults.default_data_config)
  model  backbone (VideoMAE + adapters), head (ActionFormer), targets and losses
  train  optimizer groups (regex on parameter paths), schedule in epochs, EMA, logging, checkpoints
  eval   post-processing and tIoU thresholds
  mesh   device mesh axes and partition rules (regex on parameter paths)
"""
from __future__ import annotations

import os

import ml_collections

# Dataset metadata shipped with the repository (class lists, block lists), found from any cwd.
THIRD_PARTY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "third_party")

# The demo's pre-trained backbone (tadjax.tools.pretrain_synthetic), shipped inside the package.
DEMO_BACKBONE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "synthetic_vit_demo")

# Parameters without weight decay in the head (minGPT-style grouping of the reference): biases,
# LayerNorm scales, the per-level Scale and the AffineDropPath scales.
HEAD_NO_DECAY = (r"bias$", r"norm[^/]*/scale$", r"/scale(_\d+)?$", r"layer_scale[^/]*$",
                 r"drop_path_scale[^/]*$")

# THUMOS14 learning rates of the adapter variant: TIA 2e-4 for S, 1e-4 for B/L/H/g; head 1e-4.
ADAPTER_LR = {"S": 2e-4, "B": 1e-4, "L": 1e-4, "H": 1e-4, "g": 1e-4}


def model_config(*, variant: str, num_classes: int, channels: int = 512, use_abs_pe: bool = False, adapter_mode: str = "adapter",
                 adapter_blocks="all", drop_path_rate: float = 0.1,
                 init_loss_norm: float = 100.0, label_smoothing: float = 0.0,
                 loss_weight: float = 1.0, remat_policy: str = "full",
                 scan_blocks: bool = True, chunk_group: int = 0, remat_input_dtype: str = "",
                 recompute_embedding: bool = False, keep_attention_residual: bool = False,
                 backbone_overrides=None, head_overrides=None):
    m = ml_collections.ConfigDict()
    m.dtype = "float32"
    m.backbone = ml_collections.ConfigDict({**dict(
        variant=variant, drop_path_rate=drop_path_rate, adapter_mode=adapter_mode,
        adapter_blocks=adapter_blocks, adapter_ratio=0.25, remat_policy=remat_policy,
        scan_blocks=scan_blocks,
        # Chunk rows per device whose attention + MLP a block computes at a time (0: all at
        # once); a memory option, the values do not change (VisionTransformer).
        chunk_group=chunk_group,
        # "" or e.g. "bfloat16": dtype of the block inputs kept for the backward pass (remat
        # "full" only; bfloat16 halves that memory, gradients then carry bfloat16 rounding).
        remat_input_dtype=remat_input_dtype,
        # False: keep block 0's output for the backward pass rather than computing it again
        # there from the frames (VisionTransformer.recompute_embedding; only where the TIAs
        # alone train through remat "full" chunk groups): a few % faster (one block forward
        # less) for one block input more (ViT-S, 768 frames, 160 px: 767 vs 743 MiB of
        # compiled temporaries).
        recompute_embedding=recompute_embedding,
        # True: each block also keeps its attention residual (x + attention, the MLP's input)
        # for the backward pass, whose recompute then skips the attention's P·V matmul and
        # projection (VisionTransformer.keep_attention_residual; same cases as above): less
        # time for one more activation per block (at 768 frames it does not fit the memory
        # goal of the side-by-side benchmark, so it is off by default).
        keep_attention_residual=keep_attention_residual,
        # "": head-major attention with a hand-written backward (models/attention.py); or an
        # implementation of jax.nn.dot_product_attention ("xla", "cudnn" for bfloat16 on GPUs).
        attention_impl="",
        # Mesh axes of the backbone's chunk rows (batch axes, then the snippet axis, as
        # mesh_config names them), applied while the step is traced under jax.set_mesh.
        row_axes=("data", "fsdp", "snippet"),
        # TIA temporal conv confined to each 16-frame chunk (needed by sampled-gradient training).
        adapter_chunk_local=False), **(backbone_overrides or {})})
    m.head = ml_collections.ConfigDict({**dict(
        num_classes=num_classes, channels=channels, arch=(2, 2, 5), n_head=4, mha_win_size=-1,
        path_pdrop=0.1, input_pdrop=0.0, use_abs_pe=use_abs_pe), **(head_overrides or {})})
    m.strides = (1, 2, 4, 8, 16, 32)
    m.regress_ranges = ((0, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, 10000))
    m.center_sample_radius = 1.5
    m.loss_weight = loss_weight
    m.label_smoothing = label_smoothing
    m.init_loss_norm = init_loss_norm
    # Start from pretrained backbone weights: a PyTorch VideoMAE checkpoint (.pth/.bin/.safetensors,
    # Hugging Face dir) or a `python -m tadjax.tools.convert` output; "" = random init.
    m.pretrained = ""
    m.pretrained_allow_missing = (r"(^|/)adapter/", r"(^|/)side_adapters_\d+/")  # regexes
    return m


def train_config(*, epochs: int, end_epoch: int, warmup_epochs: int,
                 adapter_lr: float | None, head_lr: float, backbone_lr: float | None = None,
                 adapter_mode: str = "adapter"):
    t = ml_collections.ConfigDict()
    t.epochs = epochs                      # length of the cosine schedule
    t.end_epoch = end_epoch                # where training stops (THUMOS: 60 of 100)
    t.warmup_epochs = warmup_epochs
    groups = []
    if adapter_mode in ("adapter", "side") and adapter_lr:
        groups.append(dict(name="adapter", regex=r"^backbone/.*adapter", lr=adapter_lr,
                           weight_decay=0.05, no_decay=()))
    if adapter_mode == "full" and backbone_lr:
        groups.append(dict(name="backbone", regex=r"^backbone/", lr=backbone_lr,
                           weight_decay=0.05, no_decay=()))
    groups.append(dict(name="head", regex=r"^head/", lr=head_lr, weight_decay=0.05,
                       no_decay=HEAD_NO_DECAY))
    t.param_groups = groups
    t.grad_clip = 1.0
    t.ema_decay = 0.999
    t.log_every_steps = 10
    t.checkpoint_every_steps = 200
    t.keep_checkpoints = 3
    t.keep_best = 1
    t.eval_start_epoch = 40
    t.eval_every_epochs = 2
    t.eval_at_start = False                # also evaluate the starting weights (step 0 of a fresh run)
    t.max_bad_steps = 20                   # consecutive non-finite updates before stopping
    # Videos per device and micro-step (0: the whole per-device share at once). Smaller values
    # accumulate gradients over several micro-steps; the global batch stays data.batch_size.
    t.per_device_batch = 0
    # ETAD-style sampled-gradient backbone training: fraction of 16-frame chunks back-propagated
    # (0 = full back-propagation), drawn in groups of `sampled_grad_group` chunks.
    t.sampled_grad_ratio = 0.0
    t.sampled_grad_group = 1
    return t


def eval_config(*, tious: str = "thumos14", mode: str = "multiclass"):
    e = ml_collections.ConfigDict()
    e.batch_size = 2
    e.tious = tious                        # preset name or "start:stop:num"
    e.pre_nms_thresh = 0.001
    e.pre_nms_topk = 2000
    e.nms_mode = mode                      # multiclass | class_agnostic
    e.nms_sigma = 0.7
    e.min_score = 0.0
    e.max_segments = 2000
    e.voting_thresh = 0.0                  # > 0: IoU voting (ActivityNet uses 0.9)
    e.classifier = ""                      # external video-level classifier JSON (ActivityNet)
    e.classifier_mode = "cuhk"
    e.classifier_topk = 2
    e.max_predictions = 0                  # 0: no cap; ActivityNet 200 (after fusion)
    return e


def mesh_config(*, data: int = -1, fsdp: int = 1, snippet: int = 1):
    """Device mesh and partition rules (see tadjax.train.sharding for the format).

    The default spreads the batch over all devices. Long-video configs with a small batch put the
    devices on "snippet" instead (chunks of one video on different devices). The parameters (and
    the optimizer state and EMA, which follow them) are split FSDP-style over the "fsdp" and
    "snippet" axes; with both of size 1 they are replicated.
    """
    mesh = ml_collections.ConfigDict()
    mesh.axes = (("data", data), ("fsdp", fsdp), ("snippet", snippet))  # -1: the rest
    mesh.batch_axes = ("data", "fsdp")     # the batch dimension of every input
    mesh.snippet_axis = "snippet"          # the frames' time axis ("" for none)
    mesh.rules = ((r".*", "fsdp+snippet"),)  # (regex on parameter path, spec)
    return mesh


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config.lock()
    return config


def _data(**overrides):
    from tadjax.data.defaults import default_data_config
    d = default_data_config()
    d.update(overrides)
    return d


def synthetic_data():
    """`config.data` of the demos: the synthetic set, windows of 128 positions at 2 raw frames
    each, 64-px frames, batches of 4."""
    return _data(
        annotations="synthetic", name="synthetic", train_subset="training",
        eval_subset="validation", mode="window", window=128, snippet_stride=2, scale_factor=1,
        img_size=64, train_short_side=72, eval_short_side=64, rrc_scale=(0.6, 1.0),
        # No horizontal flip: it would turn a diagonal motion into an anti-diagonal one, which
        # is another class of the synthetic set.
        flip=False, color_jitter=True, batch_size=4, max_gt=32, num_workers=0)


def adatad_thumos(size: str, *, frames: int = 768, img_size: int = 160, arg: str | None = None):
    """AdaTAD on THUMOS14: windows of 768 positions at 4 raw frames each (spec §5.1).

    `frames` = 768 (one frame per position) or 1536 (two per position, the same 3,072 raw frames);
    the detector always sees 768 positions. Train on the Validation subset, test on Test.
    """
    scale = frames // 768
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.data = _data(
        name="thumos14", annotations="data/thumos-14/annotations/thumos14.json",
        videos="data/thumos-14/videos", train_subset="Validation", eval_subset="Test",
        # OpenTAD evaluates on 211 test videos: 0270 (wrong annotations) and 1292 (empty) removed.
        blocked=os.path.join(THIRD_PARTY, "thumos14", "opentad_removed_videos.txt"),
        mode="window", window=768, snippet_stride=4, scale_factor=scale, img_size=img_size,
        train_short_side=int(round(img_size * 182 / 160)) if img_size == 160 else 256,
        eval_short_side=img_size, batch_size=2)
    g_half = size == "g" and img_size == 224
    # Attention + MLP of one chunk row per device at a time: on XLA:CPU as fast as 2 rows and
    # smaller (ViT-S 256 frames: 25.7 s, 1.24 GB vs 26.1 s, 1.35 GB for `bench reference`);
    # ViT-g's attention scores take 268 MB per row at 224 px. ViT-g at 224 px keeps its block inputs for the backward
    # pass in bfloat16: in float32 those of blocks 20-39 alone take 44 GB.
    c.model = model_config(
        variant=size, num_classes=20, channels=512,
        adapter_blocks=tuple(range(20, 40)) if g_half else "all", init_loss_norm=100.0,
        chunk_group=1, remat_input_dtype="bfloat16" if g_half else "",
        # ViT-g's configs are sized for memory: block 0's output is computed again (1 of 40
        # blocks) rather than kept (48 chunk rows x 968 tokens x 1408 channels, 262 MB a video).
        recompute_embedding=size == "g")
    c.train = train_config(epochs=100, end_epoch=50 if g_half else 60,
                           warmup_epochs=5, adapter_lr=ADAPTER_LR[size], head_lr=1e-4)
    if g_half:
        c.train.eval_start_epoch = 36
        # One video per device and micro-step (2 accumulated micro-steps for the batch of 2):
        # half the activations, 31 GB instead of 50 GB compiled peak on one device.
        c.train.per_device_batch = 1
    c.eval = eval_config(tious="thumos14")
    c.eval.batch_size = 1
    # Batch 2 of long videos: devices split the chunks of each video, not the batch.
    c.mesh = mesh_config(data=1, snippet=-1)
    return finalize(c)


def adatad_anet(size: str, *, img_size: int = 160, arg: str | None = None):
    """AdaTAD on ActivityNet-1.3: each video resized to 768 frames, 192 positions (spec §5.2);
    class-agnostic head fused with an external video-level classifier (CUHK by default)."""
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.data = _data(
        name="activitynet13", annotations="data/activitynet-1.3/annotations/activity_net.v1-3.min.json",
        videos="data/activitynet-1.3/videos", train_subset="training", eval_subset="validation",
        # OpenTAD's blocked.json (missing / blocked videos) is not redistributable here: pass it
        # with --config.data.blocked=PATH (see third_party/activitynet13/README.md).
        blocked=(), class_agnostic=True,
        mode="resize", resize_length=192, scale_factor=4, min_relative_length=0.01, img_size=img_size,
        train_short_side=182 if img_size == 160 else 256, eval_short_side=img_size, batch_size=16)
    # One chunk row at a time through attention + MLP, as the THUMOS configs: the same FLOPs,
    # and the S config's step (batch 16 x 768 frames, one device) compiles to a 13.7 GB peak
    # instead of 59.7 GB (`tools.report`); at 192 frames, batch 1 on CPU, 11.2 vs 15.5 s.
    c.model = model_config(
        variant=size, num_classes=1, channels=256, chunk_group=1,
        use_abs_pe=True, init_loss_norm=200.0, label_smoothing=0.1, loss_weight=2.0)
    c.train = train_config(epochs=15, end_epoch=15, warmup_epochs=5,
                           adapter_lr=1e-4, head_lr=1e-3)
    c.train.eval_start_epoch = 7
    c.train.eval_every_epochs = 1
    c.eval = eval_config(tious="activitynet", mode="class_agnostic")
    c.eval.min_score = 0.001
    c.eval.max_segments = 100
    c.eval.voting_thresh = 0.9
    c.eval.classifier = "data/activitynet-1.3/classifiers/cuhk_val_simp_7.json"
    c.eval.max_predictions = 200
    c.mesh = mesh_config()
    return finalize(c)
