"""PyTorch port of tadjax's ActionFormer detector head and its training loss.

The PyTorch side of the whole-detector benchmark. This module imports only torch, numpy and the
standard library, so the process that runs it stays free of JAX (tadjax.tools does not import
it either).

* `ActionFormer` computes what `tadjax.models.actionformer.ActionFormer` computes (float32):
  the same blocks, masking (including the finite-floor attention mask and the unmasked padded
  inputs of the first conv), initialisation and outputs. Inputs are channels-last,
  feats [B, T, C_in] and a bool mask [B, T] (True = valid); the output is a dict with
  cls_logits [B, P, C], reg [B, P, 2] and point_mask [B, P]. Activations are kept channels-last
  between layers; the 1-D convs run channels-first (`Conv1d`).
* `load_flax_params` copies a flax parameter tree of that model into this one. The torch names
  mirror the flax paths: a ModuleList entry `embed.0` is flax's `embed_0`, so
  `embed.0.conv.weight` <- `embed_0/conv/kernel`, `head.scale.3` <- `head/scale_3`.
* `sigmoid_focal_loss`, `diou_loss`, `detection_loss` follow `tadjax.detection.losses` but take
  targets that are already assigned (`tadjax.detection.assignment.assign_targets_batch`) and a
  loss normaliser that is already updated.

The ActivityNet configurations' extras are here too: `use_abs_pe` (the sinusoid table over
`max_seq_len` positions divided by sqrt(channels), added to the embedded features at valid
positions; linearly resized to longer inputs in eval mode, an error in training, as in flax),
`input_pdrop` (whole input channels of a sample dropped in training: `nn.Dropout1d`, flax's
`Dropout(broadcast_dims=(1,))`) and `detection_loss(..., label_smoothing=eps)`. The sinusoid
table is computed here again (a few lines of numpy) because this module must not import
tadjax.models, which imports JAX.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ActionFormer", "load_flax_params", "sigmoid_focal_loss", "diou", "diou_loss",
           "decode_offsets", "detection_loss"]

DIOU_EPS = 1e-7


def _conv(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """A Conv1d applied to channels-last x [B, T, C] -> [B, T', C']."""
    return conv(x.transpose(1, 2)).transpose(1, 2)


def _mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] bool -> [B, T, 1] multiplier."""
    return mask.unsqueeze(-1).to(dtype)


class ConvModule(nn.Module):
    """Conv1d(k, no bias) -> mask -> LayerNorm(eps 1e-6) -> ReLU -> mask."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size,
                              padding=kernel_size // 2, bias=False)
        self.norm = nn.LayerNorm(out_channels, eps=1e-6)

    def forward(self, x, mask):
        m = _mask(mask, x.dtype)
        x = self.norm(_conv(self.conv, x) * m)
        return F.relu(x) * m


class MaskedMHCA(nn.Module):
    """Masked multi-head convolutional attention, global or banded (local).

    Each of q, k, v: depthwise k=3 conv (stride 1 or 2, no bias), masked with the strided mask,
    LayerNorm (eps 1e-5), then a linear projection. Keys at masked positions get the logit
    floor float32.min (not -inf: a query whose window holds no valid key averages zeroed
    values, giving 0 instead of NaN) and their values are zeroed; the projected output is
    multiplied by the strided mask. With window_size > 1, query i sees keys j with
    |i - j| <= window_size // 2.
    """

    def __init__(self, channels: int, n_head: int, stride: int = 1, window_size: int = -1):
        super().__init__()
        if channels % n_head:
            raise ValueError(f"MaskedMHCA: {channels} channels not divisible by n_head={n_head}")
        if stride not in (1, 2):
            raise ValueError(f"MaskedMHCA: stride must be 1 or 2, got {stride}")
        self.n_head, self.stride, self.window_size = n_head, stride, window_size
        self.head_dim = channels // n_head
        for name in ("query", "key", "value"):
            setattr(self, f"{name}_conv", nn.Conv1d(channels, channels, 3, stride=stride,
                                                    padding=1, groups=channels, bias=False))
            setattr(self, f"{name}_norm", nn.LayerNorm(channels, eps=1e-5))
        self.query = nn.Linear(channels, channels)
        self.key = nn.Linear(channels, channels)
        self.value = nn.Linear(channels, channels)
        self.proj = nn.Linear(channels, channels)
        for linear in (self.query, self.key, self.value, self.proj):
            nn.init.zeros_(linear.bias)

    def forward(self, x, mask):
        batch, _, channels = x.shape
        out_mask = mask[:, ::self.stride]  # nearest downsampling picks positions i * stride
        m = _mask(out_mask, x.dtype)

        def project(name):
            y = _conv(getattr(self, f"{name}_conv"), x)
            y = getattr(self, f"{name}_norm")(y * m)
            y = getattr(self, name)(y)
            return y.view(batch, -1, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, L, D]

        q, k, v = project("query"), project("key"), project("value")
        length = q.shape[2]
        logits = (q * (1.0 / math.sqrt(self.head_dim))) @ k.transpose(-2, -1)  # [B, H, L, L]
        allowed = out_mask[:, None, None, :]
        if self.window_size > 1:
            idx = torch.arange(length, device=x.device)
            band = (idx[:, None] - idx[None, :]).abs() <= self.window_size // 2
            allowed = allowed & band
        logits = logits.float().masked_fill(~allowed, torch.finfo(torch.float32).min)
        weights = logits.softmax(dim=-1).to(v.dtype)
        out = weights @ (v * out_mask[:, None, :, None].to(v.dtype))
        out = self.proj(out.transpose(1, 2).reshape(batch, length, channels))
        return out * m, out_mask


class AffineDropPath(nn.Module):
    """Per-channel learnable scale (init 1e-4), then per-sample stochastic depth in training."""

    def __init__(self, channels: int, rate: float, init_scale: float = 1e-4):
        super().__init__()
        self.rate = float(rate)
        self.scale = nn.Parameter(torch.full((channels,), float(init_scale)))

    def forward(self, x):
        x = x * self.scale.to(x.dtype)
        if self.training and self.rate > 0:
            keep = 1.0 - self.rate
            shape = (x.shape[0],) + (1,) * (x.ndim - 1)
            kept = torch.rand(shape, device=x.device) < keep
            x = torch.where(kept, x / keep, torch.zeros_like(x))
        return x


class Mlp(nn.Module):
    """Linear C -> 4C, exact GELU, Linear 4C -> C (zero-initialised biases)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-LN block: x' = skip(x)*m' + DropPath(MHCA(LN1(x))); x'' = x' + DropPath(MLP(LN2(x'))*m').

    skip is the identity at stride 1 and MaxPool1d(3, stride 2, padding 1) at stride 2. With
    path_pdrop == 0 there is no AffineDropPath (and no 1e-4 scale).
    """

    def __init__(self, channels: int, n_head: int, stride: int = 1, window_size: int = -1,
                 path_pdrop: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(channels, eps=1e-5)
        self.attn = MaskedMHCA(channels, n_head, stride, window_size)
        self.pool = nn.MaxPool1d(3, stride=stride, padding=1) if stride > 1 else None
        self.ln2 = nn.LayerNorm(channels, eps=1e-5)
        self.mlp = Mlp(channels, 4 * channels)
        if path_pdrop > 0:
            self.drop_path_attn = AffineDropPath(channels, path_pdrop)
            self.drop_path_mlp = AffineDropPath(channels, path_pdrop)
        else:
            self.drop_path_attn = self.drop_path_mlp = None

    def forward(self, x, mask):
        out, out_mask = self.attn(self.ln1(x), mask)
        m = _mask(out_mask, out.dtype)
        skip = x if self.pool is None else _conv(self.pool, x)
        if self.drop_path_attn is not None:
            out = self.drop_path_attn(out)
        out = skip * m + out
        h = self.mlp(self.ln2(out)) * m
        if self.drop_path_mlp is not None:
            h = self.drop_path_mlp(h)
        return out + h, out_mask


class Neck(nn.Module):
    """FPNIdentity: one LayerNorm (eps 1e-6) per level."""

    def __init__(self, channels: int, num_levels: int):
        super().__init__()
        self.norm = nn.ModuleList(nn.LayerNorm(channels, eps=1e-6) for _ in range(num_levels))

    def forward(self, feats):
        return [norm(f) for norm, f in zip(self.norm, feats)]


class Head(nn.Module):
    """Classification and regression towers and predictors shared by all levels; a learnable
    scale per level on the regression output, then ReLU."""

    def __init__(self, channels: int, num_classes: int, num_levels: int, num_convs: int = 2,
                 cls_prior_prob: float = 0.01):
        super().__init__()
        self.cls_tower = nn.ModuleList(ConvModule(channels, channels) for _ in range(num_convs))
        self.reg_tower = nn.ModuleList(ConvModule(channels, channels) for _ in range(num_convs))
        self.cls_head = nn.Conv1d(channels, num_classes, 3, padding=1)
        self.reg_head = nn.Conv1d(channels, 2, 3, padding=1)  # PyTorch's default bias init
        if cls_prior_prob > 0:
            nn.init.constant_(self.cls_head.bias,
                              -math.log((1.0 - cls_prior_prob) / cls_prior_prob))
        self.scale = nn.ParameterList(nn.Parameter(torch.ones(())) for _ in range(num_levels))

    def forward(self, feats, masks):
        cls_out, reg_out = [], []
        for level, (feat, mask) in enumerate(zip(feats, masks)):
            c, r = feat, feat
            for conv in self.cls_tower:
                c = conv(c, mask)
            for conv in self.reg_tower:
                r = conv(r, mask)
            cls_out.append(_conv(self.cls_head, c).float())
            reg_out.append(F.relu(_conv(self.reg_head, r).float() * self.scale[level]))
        return cls_out, reg_out


def sinusoid_table(length: int, channels: int) -> np.ndarray:
    """[length, channels] float32: sin on even channels, cos on odd, angle pos / 10000^(2(j//2)/C)."""
    pos = np.arange(length, dtype=np.float64)[:, None]
    j = np.arange(channels)
    angle = pos / np.power(10000.0, 2 * (j // 2) / channels)[None, :]
    return np.where(j % 2 == 0, np.sin(angle), np.cos(angle)).astype(np.float32)


class ActionFormer(nn.Module):
    """Projection (embedding convs, stride-1 stem blocks, stride-2 branch blocks) + neck + head.

    Mirrors `tadjax.models.actionformer.ActionFormer(num_classes, channels, arch, n_head,
    mha_win_size, path_pdrop, num_levels, head_convs, cls_prior_prob, input_pdrop, use_abs_pe,
    max_seq_len)`; `in_channels` is the
    feature width flax infers at init. forward(feats [B, T, C_in], mask [B, T] bool) -> dict
    cls_logits [B, P, num_classes] float32, reg [B, P, 2] float32 (>= 0, stride units),
    point_mask [B, P] bool, levels concatenated in `make_points` order. T must be divisible by
    2 ** arch[2]. Outputs at masked points are not zeroed (use point_mask).
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 512,
                 arch: Sequence[int] = (2, 2, 5), n_head: int = 4,
                 mha_win_size: int | Sequence[int] = -1, path_pdrop: float = 0.1,
                 num_levels: int = 6, head_convs: int = 2, cls_prior_prob: float = 0.01,
                 input_pdrop: float = 0.0, use_abs_pe: bool = False, max_seq_len: int = 768):
        super().__init__()
        self.input_dropout = nn.Dropout1d(input_pdrop) if input_pdrop > 0 else None
        self.max_seq_len = int(max_seq_len)
        if use_abs_pe:
            table = sinusoid_table(self.max_seq_len, channels) / math.sqrt(channels)
            self.register_buffer("abs_pe", torch.from_numpy(table), persistent=False)
        else:
            self.abs_pe = None
        n_embed, n_stem, n_branch = (int(a) for a in arch)
        if num_levels != n_branch + 1:
            raise ValueError(f"ActionFormer: num_levels={num_levels} but arch={tuple(arch)} "
                             f"makes {n_branch + 1} levels")
        windows = mha_win_size
        if isinstance(windows, int):
            windows = (windows,) * (n_branch + 1)
        windows = tuple(int(w) for w in windows)
        if len(windows) != n_branch + 1:
            raise ValueError(f"ActionFormer: mha_win_size needs {n_branch + 1} values, "
                             f"got {windows}")
        self.n_branch = n_branch
        self.embed = nn.ModuleList(ConvModule(in_channels if i == 0 else channels, channels)
                                   for i in range(n_embed))
        self.stem = nn.ModuleList(TransformerBlock(channels, n_head, 1, windows[0], path_pdrop)
                                  for _ in range(n_stem))
        self.branch = nn.ModuleList(
            TransformerBlock(channels, n_head, 2, windows[1 + i], path_pdrop)
            for i in range(n_branch))
        self.neck = Neck(channels, n_branch + 1)
        self.head = Head(channels, num_classes, n_branch + 1, head_convs, cls_prior_prob)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        if feats.ndim != 3:
            raise ValueError(f"ActionFormer: feats must be [B, T, C], got shape "
                             f"{tuple(feats.shape)}")
        batch, length, _ = feats.shape
        if tuple(mask.shape) != (batch, length):
            raise ValueError(f"ActionFormer: mask must be [B, T] = {(batch, length)}, "
                             f"got {tuple(mask.shape)}")
        if length % (2 ** self.n_branch):
            raise ValueError(f"ActionFormer: sequence length T={length} must be divisible by "
                             f"{2 ** self.n_branch} (the largest stride); pad the features")
        mask = mask.bool()
        x = feats.to(self.neck.norm[0].weight.dtype)
        if self.input_dropout is not None:   # [B, C, T]: whole channels of a sample
            x = self.input_dropout(x.transpose(1, 2)).transpose(1, 2)
        for conv in self.embed:
            x = conv(x, mask)
        if self.abs_pe is not None:
            table = self.abs_pe
            if length > self.max_seq_len:
                if self.training:
                    raise ValueError(f"ActionFormer: T={length} exceeds max_seq_len="
                                     f"{self.max_seq_len} with an absolute position embedding")
                table = F.interpolate(table.T[None], size=length, mode="linear",
                                      align_corners=False)[0].T
            x = x + table[:length][None].to(x.dtype) * _mask(mask, x.dtype)
        for block in self.stem:
            x, mask = block(x, mask)
        levels, masks = [x], [mask]
        for block in self.branch:
            x, mask = block(x, mask)
            levels.append(x)
            masks.append(mask)
        cls_out, reg_out = self.head(self.neck(levels), masks)
        return {"cls_logits": torch.cat(cls_out, dim=1), "reg": torch.cat(reg_out, dim=1),
                "point_mask": torch.cat(masks, dim=1)}


# ---------------------------------------------------------------------------------------------
# flax parameters -> torch

def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_flatten(value, path))
        else:
            out[path] = value
    return out


def _flax_module_path(torch_name: str) -> str:
    """'head.cls_tower.1.conv' -> 'head/cls_tower_1/conv' (ModuleList index -> '_i' suffix)."""
    parts: list[str] = []
    for seg in torch_name.split("."):
        if seg.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{seg}"
        else:
            parts.append(seg)
    return "/".join(parts)


def _flax_layout(module: nn.Module, name: str, param: torch.Tensor):
    """(flax path, flax shape, array-in-flax-layout -> array-in-torch-layout) of one parameter."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    shape = tuple(param.shape)
    if isinstance(owner, nn.ParameterList):  # head.scale.{l}: scalars head/scale_{l}
        return _flax_module_path(name), shape, lambda a: a
    prefix = _flax_module_path(owner_name)
    if isinstance(owner, nn.Conv1d) and leaf == "weight":
        # torch [out, in / groups, k] <-> flax [k, in / groups, out]
        return f"{prefix}/kernel", shape[::-1], lambda a: np.transpose(a, (2, 1, 0))
    if isinstance(owner, nn.Linear) and leaf == "weight":
        return f"{prefix}/kernel", shape[::-1], lambda a: np.transpose(a)  # [out, in] <-> [in, out]
    if isinstance(owner, nn.LayerNorm) and leaf == "weight":
        return f"{prefix}/scale", shape, lambda a: a
    if leaf in ("bias", "scale"):
        return f"{prefix}/{leaf}", shape, lambda a: a
    raise TypeError(f"load_flax_params: no flax layout known for torch parameter {name!r} "
                    f"({type(owner).__name__})")


def load_flax_params(module: ActionFormer, params: Mapping) -> ActionFormer:
    """Copies the flax parameter tree `params` (nested dict of arrays, e.g. `variables['params']`
    of `tadjax.models.actionformer.ActionFormer`; a `{'params': ...}` wrapper is accepted) into
    `module`, transposing conv kernels [k, in, out] -> [out, in, k] and Dense kernels
    [in, out] -> [out, in]. Nothing is copied unless the whole tree matches: a ValueError names
    every missing path, unused path and shape mismatch. Returns `module`.
    """
    if set(params.keys()) == {"params"} and isinstance(params["params"], Mapping):
        params = params["params"]
    flat = _flatten(params)
    plan, missing, mismatched, seen = [], [], [], set()
    for name, param in module.named_parameters():
        path, flax_shape, to_torch = _flax_layout(module, name, param)
        if path not in flat:
            missing.append(path)
            continue
        seen.add(path)
        array = np.asarray(flat[path])
        if tuple(array.shape) != flax_shape:
            mismatched.append(f"{path}: got {tuple(array.shape)}, expected {flax_shape}")
            continue
        plan.append((path, param, to_torch))
    unused = sorted(set(flat) - seen)
    if missing or unused or mismatched:
        lines = ([f"  missing: {p}" for p in missing] + [f"  unused: {p}" for p in unused]
                 + [f"  shape mismatch: {m}" for m in mismatched])
        raise ValueError("load_flax_params: the flax parameter tree does not match the torch "
                         "ActionFormer (check channels, arch, num_classes, head_convs, "
                         "path_pdrop > 0 for drop_path scales):\n" + "\n".join(lines))
    with torch.no_grad():
        for path, param, to_torch in plan:
            array = np.asarray(flat[path]).astype(np.float32)  # also bfloat16 -> float32
            param.copy_(torch.from_numpy(np.array(to_torch(array))).to(param.dtype))
    return module


# ---------------------------------------------------------------------------------------------
# losses

def sigmoid_focal_loss(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
    """Elementwise sigmoid focal loss in float32: alpha_t * (1 - p_t)^gamma * BCE(logits, t);
    alpha < 0 disables the alpha weighting."""
    x = torch.as_tensor(logits).float()
    t = torch.as_tensor(targets, device=x.device).float()
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1.0 - p) * (1.0 - t)
    loss = ce * (1.0 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1.0 - alpha) * (1.0 - t)) * loss
    return loss


def diou(pred_segments, target_segments, eps: float = DIOU_EPS):
    """Distance-IoU of paired segments [..., 2] (start, end): IoU - d_centre^2 / enclosing^2."""
    pred = torch.as_tensor(pred_segments).float()
    target = torch.as_tensor(target_segments, device=pred.device).float()
    ps, pe = pred[..., 0], pred[..., 1]
    ts, te = target[..., 0], target[..., 1]
    inter = (torch.minimum(pe, te) - torch.maximum(ps, ts)).clamp(min=0.0)
    union = (pe - ps) + (te - ts) - inter
    iou = inter / union.clamp(min=eps)
    enclosing = torch.maximum(pe, te) - torch.minimum(ps, ts)
    centre_dist = 0.5 * (ts + te) - 0.5 * (ps + pe)
    return iou - centre_dist * centre_dist / (enclosing * enclosing).clamp(min=eps)


def diou_loss(pred_segments, target_segments, eps: float = DIOU_EPS):
    """Elementwise 1 - DIoU of paired segments [..., 2] (start, end)."""
    return 1.0 - diou(pred_segments, target_segments, eps)


def decode_offsets(points, offsets):
    """Offsets [..., P, 2] in stride units at points [P, 4] -> segments [..., P, 2] (grid units)."""
    points = torch.as_tensor(points, device=offsets.device).float()
    pos, stride = points[:, 0], points[:, 3]
    return torch.stack([pos - offsets[..., 0] * stride, pos + offsets[..., 1] * stride], dim=-1)


def detection_loss(outputs: Mapping[str, torch.Tensor], points, cls_targets, reg_targets,
                   normalizer, loss_weight: float = 1.0, alpha: float = 0.25,
                   gamma: float = 2.0, label_smoothing: float = 0.0):
    """Focal + DIoU loss of a batch, as `tadjax.detection.losses.detection_loss` with
    `normalizer_momentum=None`.

    Args:
      outputs: `ActionFormer` outputs (cls_logits [B, P, C], reg [B, P, 2], point_mask [B, P]).
      points: [P, 4] (position, lo, hi, stride), as `make_points` (tensor or array).
      cls_targets [B, P, C] multi-hot, reg_targets [B, P, 2] stride units: the targets of
        `assign_targets_batch` (no gradient flows into them).
      normalizer: the loss normaliser, already updated for this batch (a float); None means
        max(num_pos, 1).
      loss_weight: weight of the regression loss; <= 0: the adaptive weight
        cls_loss / max(reg_loss, 0.01) (no gradient through the weight).
      label_smoothing: eps; the classification targets become t * (1 - eps) + eps / (C + 1),
        negatives too (the positives are counted before).

    Returns:
      (total, cls_loss, reg_loss) scalars; reg_loss already multiplied by the weight.
    """
    cls_logits = outputs["cls_logits"].float()
    reg = outputs["reg"].float()
    valid = outputs["point_mask"].bool()
    device = cls_logits.device
    points = torch.as_tensor(points, device=device).float()
    cls_targets = torch.as_tensor(cls_targets, device=device).float().detach()
    reg_targets = torch.as_tensor(reg_targets, device=device).float().detach()
    if cls_logits.shape[1] != points.shape[0]:
        raise ValueError(f"detection_loss: outputs have {cls_logits.shape[1]} points but "
                         f"`points` has {points.shape[0]}; build them for the same seq_len")
    if cls_targets.shape != cls_logits.shape or reg_targets.shape != reg.shape:
        raise ValueError(f"detection_loss: targets {tuple(cls_targets.shape)}, "
                         f"{tuple(reg_targets.shape)} do not match the outputs "
                         f"{tuple(cls_logits.shape)}, {tuple(reg.shape)}")

    positive = (cls_targets.sum(-1) > 0) & valid
    if normalizer is None:
        norm = positive.sum().float().clamp(min=1.0)
    else:
        norm = torch.as_tensor(float(normalizer), dtype=torch.float32, device=device)

    if label_smoothing:
        num_classes = cls_targets.shape[-1]
        cls_targets = cls_targets * (1.0 - label_smoothing) + label_smoothing / (num_classes + 1)
    focal = sigmoid_focal_loss(cls_logits, cls_targets, alpha, gamma)
    cls_loss = torch.where(valid[..., None], focal, torch.zeros_like(focal)).sum() / norm

    per_point = diou_loss(decode_offsets(points, reg), decode_offsets(points, reg_targets))
    reg_loss = torch.where(positive, per_point, torch.zeros_like(per_point)).sum() / norm

    if loss_weight > 0:
        weight = loss_weight
    else:
        weight = (cls_loss / reg_loss.clamp(min=0.01)).detach()
    reg_loss = reg_loss * weight
    return cls_loss + reg_loss, cls_loss, reg_loss
