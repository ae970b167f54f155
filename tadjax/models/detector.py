"""The AdaTAD detector: VideoMAE backbone (+ TIA) -> 1-D features -> ActionFormer head.

Parameter tree (the public API):
  backbone/...   the ViT and its adapters (see tadjax.models.vit)
  head/...       the ActionFormer projection, neck and heads (see tadjax.models.actionformer)
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from tadjax.models import actionformer, vit

# 0-255 RGB normalisation of the reference (mmaction ActionDataPreprocessor).
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def normalize_frames(frames, dtype):
    """0-255 RGB frames -> (x - MEAN) / STD in `dtype`."""
    x = frames.astype(jnp.float32)
    x = (x - jnp.asarray(MEAN, jnp.float32)) / jnp.asarray(STD, jnp.float32)
    return x.astype(dtype)


class Detector(nn.Module):
    backbone: nn.Module
    head: nn.Module
    feature_length: int  # T: length of the 1-D sequence the head sees
    dtype: Any = jnp.float32
    # > 0: training back-propagates through this fraction of the 16-frame chunks only
    # (tadjax.train.sampled_grad; config.train.sampled_grad_ratio / sampled_grad_group).
    sampled_grad_ratio: float = 0.0
    sampled_grad_group: int = 1

    def features(self, frames, *, train: bool):
        """uint8 or float frames [B, T_f, H, W, 3] (0-255 RGB) -> features [B, T, C] float32."""
        if train and self.sampled_grad_ratio > 0 and not self.is_initializing():
            from tadjax.train import sampled_grad
            feats = sampled_grad.backbone_features(
                self.backbone, self.variables["params"]["backbone"], frames,
                self.make_rng("dropout"), normalize=functools.partial(normalize_frames, dtype=self.dtype),
                ratio=self.sampled_grad_ratio, group=self.sampled_grad_group)
            return vit.resize_features(feats, self.feature_length)
        feats = self.backbone(frames, train=train,  # [B, T_f // 2, C]
                              normalize=functools.partial(normalize_frames, dtype=self.dtype))
        return vit.resize_features(feats.astype(jnp.float32), self.feature_length)

    def __call__(self, frames, mask, *, train: bool):
        feats = self.features(frames, train=train)
        return self.head(feats, mask, train=train)


def build_backbone(cfg, dtype) -> nn.Module:
    kwargs = dict(cfg.to_dict()) if hasattr(cfg, "to_dict") else dict(cfg)
    variant = kwargs.pop("variant")
    kwargs.setdefault("dtype", dtype)
    for k, v in list(kwargs.items()):
        if isinstance(v, list):
            kwargs[k] = tuple(v)
    return vit.from_variant(variant, **kwargs)


def build_head(cfg, dtype) -> nn.Module:
    kwargs = dict(cfg.to_dict()) if hasattr(cfg, "to_dict") else dict(cfg)
    for k, v in list(kwargs.items()):
        if isinstance(v, list):
            kwargs[k] = tuple(v)
    kwargs.setdefault("dtype", dtype)
    return actionformer.ActionFormer(**kwargs)


def build_detector(config) -> Detector:
    """The detector for a full config: the grid length T comes from `config.data`."""
    model_cfg = config.model
    dtype = DTYPES[model_cfg.dtype]
    from tadjax.data import loader as loader_lib  # here: the data stack is heavy to import
    length = loader_lib.grid_length(config.data)
    head_cfg = dict(model_cfg.head.to_dict(), max_seq_len=length)
    name = model_name(config)
    if name == "etad":
        from tadjax.models import etad
        head = etad.ETADHead(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in head_cfg.items()}, dtype=dtype)
    elif name == "adatad":
        head = build_head(head_cfg, dtype)
    else:
        raise ValueError(f"unknown config.model.name {name!r}; expected 'adatad' or 'etad'")
    return Detector(backbone=build_backbone(model_cfg.backbone, dtype),
                    head=head, feature_length=length, dtype=dtype,
                    **sampled_grad_options(config))


def model_name(config) -> str:
    """"adatad" (ActionFormer head, the default) or "etad" (tadjax.models.etad head)."""
    return str(config.model.get("name", "adatad") or "adatad")


def sampled_grad_options(config) -> dict:
    """Detector keywords of sampled-gradient training (config.train.sampled_grad_*; 0 = off)."""
    t = config.train
    return dict(sampled_grad_ratio=float(t.get("sampled_grad_ratio", 0.0) or 0.0),
                sampled_grad_group=int(t.get("sampled_grad_group", 1) or 1))


def input_shapes(config, batch_size: int):
    """Shapes (frames, mask) of a batch for `config`, without reading data."""
    d = config.data
    from tadjax.data import loader as loader_lib
    frames = loader_lib.num_input_frames(d)
    size = int(d.img_size)
    return (batch_size, frames, size, size, 3), (batch_size, loader_lib.grid_length(d))


def points_for(config) -> np.ndarray:
    from tadjax.detection import points as points_lib
    m = config.model
    if model_name(config) == "etad":  # anchors live in the ETAD head, not on points
        return np.zeros((0, 4), np.float32)
    from tadjax.data import loader as loader_lib
    return points_lib.make_points(loader_lib.grid_length(config.data), strides=tuple(m.strides),
                                  regress_ranges=tuple(tuple(r) for r in m.regress_ranges))
