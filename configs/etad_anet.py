r"""ETAD on ActivityNet-1.3 (spec etad.md): T = 128 positions per video, VideoMAE-S with
chunk-local TIAs as the snippet encoder (the reference uses an R(2+1)D-34 TSP encoder, not
provided here), sampled-gradient training through 30 % of the 48 chunks, 6 % proposal sampling,
CUHK classifier fusion (top 2), Gaussian soft-NMS sigma 0.35, 100 proposals.

  python -m tadjax.main --config configs/etad_anet.py --workdir workdirs/etad_anet \
      --config.data.annotations=PATH/activity_net.v1-3.min.json --config.data.videos=PATH/videos \
      --config.eval.classifier=PATH/cuhk_val_simp_7.json --config.model.pretrained=VIDEOMAE_S.pth

Each video is resized to 768 frames (128 positions x 6 frames; 48 chunks of 16 frames -> 384
tokens, linearly resized to 128). Batch 4, AdamW wd 1e-4, detector lr 5e-4 (the reference's),
adapter lr 1e-4 (AdaTAD's), 6 epochs with a cosine schedule (the reference steps x0.1 after 5).
"""
import importlib.util
import os

from tadjax.config import THIRD_PARTY, _data, eval_config, finalize, mesh_config  # noqa: F401


def _demo():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "etad_demo.py")
    spec = importlib.util.spec_from_file_location("etad_demo_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    import ml_collections
    demo = _demo()
    c = ml_collections.ConfigDict()
    c.seed = 2023
    c.data = _data(
        name="activitynet13", annotations="data/activitynet-1.3/annotations/activity_net.v1-3.min.json",
        videos="data/activitynet-1.3/videos", train_subset="training", eval_subset="validation",
        blocked=(), class_agnostic=True, mode="resize", resize_length=128, scale_factor=6,
        min_relative_length=0.01, img_size=160, train_short_side=182, eval_short_side=160,
        batch_size=4)
    c.model = demo.etad_model(num_classes=1, backbone=dict(
        variant="S", drop_path_rate=0.1, adapter_mode="adapter", adapter_blocks="all",
        adapter_ratio=0.25, adapter_chunk_local=True, remat_policy="full", scan_blocks=True))
    c.train = demo.etad_train(epochs=6, warmup_epochs=1, backbone_regex=r"^backbone/.*adapter",
                              backbone_lr=1e-4, head_lr=5e-4, ratio=0.3, group=1)
    c.eval = eval_config(tious="activitynet", mode="class_agnostic")
    c.eval.nms_sigma = 0.35
    c.eval.max_segments = 100
    c.eval.classifier = "data/activitynet-1.3/classifiers/cuhk_val_simp_7.json"
    c.eval.max_predictions = 200
    c.mesh = mesh_config()
    return finalize(c)
