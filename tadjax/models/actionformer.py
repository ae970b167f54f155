"""ActionFormer detector head as configured for AdaTAD (flax linen, channels-last [B, T, C]).

features [B, T, C_in] + mask [B, T] (True = valid)
  -> projection: `embed_i` ConvModules, optional absolute PE, `stem_i` transformer blocks at
     stride 1 and `branch_i` transformer blocks at stride 2 (a pyramid of 1 + len(branch) levels
     of lengths T, T/2, ..., T/32)
  -> neck: one LayerNorm per level (`neck/norm_l`)
  -> head: classification and regression towers shared across levels (`head/...`)
  -> levels concatenated along time: cls_logits [B, P, num_classes], reg [B, P, 2] (left/right
     distances in stride units, >= 0), point_mask [B, P], with P = sum of level lengths, in the
     order of `tadjax.detection.points.make_points`.

Parameter tree (public API; names are stable):
  embed_{i}/conv/kernel [3, C_in|C, C], embed_{i}/norm/{scale,bias}
  {stem,branch}_{i}/ln1, ln2                      LayerNorm (eps 1e-5)
  {stem,branch}_{i}/attn/{query,key,value}_conv/kernel [3, 1, C]   depthwise, no bias
  {stem,branch}_{i}/attn/{query,key,value}_norm   LayerNorm (eps 1e-5)
  {stem,branch}_{i}/attn/{query,key,value,proj}/{kernel [C, C], bias}
  {stem,branch}_{i}/mlp/fc1 [C, 4C], mlp/fc2 [4C, C]
  {stem,branch}_{i}/drop_path_{attn,mlp}/scale [C]   (only when path_pdrop > 0, as the reference)
  neck/norm_{l}/{scale,bias}
  head/{cls,reg}_tower_{i}/conv/kernel [3, C, C], head/{cls,reg}_tower_{i}/norm/{scale,bias}
  head/cls_head/{kernel [3, C, num_classes], bias}, head/reg_head/{kernel [3, C, 2], bias}
  head/scale_{l} []                                  per-level regression scale

Initialisation follows the reference: conv/dense weights use PyTorch's default
kaiming-uniform(a=sqrt(5)), i.e. uniform(+-1/sqrt(fan_in)); projection biases are 0; LayerNorms
1/0; the AffineDropPath scales 1e-4; the head's Scales 1; the reg_head bias keeps PyTorch's default
uniform(+-1/sqrt(fan_in)); the cls_head bias is the prior -log((1 - 0.01) / 0.01).

Masking matches the reference (OpenTAD): the input features are *not* masked before the first
conv, and the neck / head outputs at masked positions are not zeroed (use `point_mask`). So the
last valid position of a level can see values computed at padded positions (raw padded input
features in `embed_0`, LayerNorm biases of padded positions in the k=3 convs that follow a
LayerNorm). With zero padded features and zero LayerNorm biases the output on valid points is
exactly that of the unpadded sequence (tested).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# The absolute position embedding's table is the ViT's (the same sin/cos formula).
from tadjax.models.vit import sinusoid_table  # noqa: F401 (also importable from here)

# PyTorch's default Conv1d / Linear weight init, kaiming_uniform(a=sqrt(5)): the bound is
# sqrt(6 / ((1 + a^2) * fan_in)) = 1 / sqrt(fan_in), i.e. variance 1 / (3 * fan_in).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int):
    """PyTorch's default bias init: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def layer_norm(eps: float, dtype, name: str) -> nn.LayerNorm:
    """LayerNorm over channels; two-pass variance (as PyTorch), statistics in float32."""
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def _mask(mask, dtype):
    return mask[..., None].astype(dtype)


class ConvModule(nn.Module):
    """Conv1d(k, no bias) -> mask -> LayerNorm(eps 1e-6) -> ReLU -> mask."""
    features: int
    kernel_size: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        pad = self.kernel_size // 2
        x = nn.Conv(self.features, (self.kernel_size,), padding=[(pad, pad)], use_bias=False,
                    kernel_init=torch_default_kernel_init, dtype=self.dtype, name="conv")(x)
        m = _mask(mask, x.dtype)
        x = layer_norm(1e-6, self.dtype, "norm")(x * m)
        return nn.relu(x) * m


class MaskedMHCA(nn.Module):
    """Masked multi-head conv attention (global, or local with a banded mask).

    q, k, v: depthwise conv (k=3, stride 1 or 2, no bias) -> mask (nearest-downsampled) ->
    LayerNorm (eps 1e-5) -> 1x1 projection. Softmax attention with scale 1/sqrt(head_dim); keys at
    masked positions are excluded and their values zeroed; the output projection is multiplied by
    the (downsampled) query mask. `window_size` > 1 restricts query i to keys j with
    |i - j| <= window_size // 2; otherwise attention is global.
    """
    n_head: int
    stride: int = 1
    window_size: int = -1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        batch, _, channels = x.shape
        if channels % self.n_head:
            raise ValueError(f"MaskedMHCA: {channels} channels not divisible by "
                             f"n_head={self.n_head}")
        if self.stride not in (1, 2):
            raise ValueError(f"MaskedMHCA: stride must be 1 or 2, got {self.stride}")
        head_dim = channels // self.n_head
        # Nearest-neighbour downsampling of the mask to T / stride picks positions i * stride.
        out_mask = mask[:, ::self.stride]
        m = _mask(out_mask, x.dtype)

        def conv_norm(name):
            y = nn.Conv(channels, (3,), strides=(self.stride,), padding=[(1, 1)],
                        feature_group_count=channels, use_bias=False,
                        kernel_init=torch_default_kernel_init, dtype=self.dtype,
                        name=f"{name}_conv")(x)
            return layer_norm(1e-5, self.dtype, f"{name}_norm")(y * m)

        def dense(name):
            return nn.Dense(channels, kernel_init=torch_default_kernel_init,
                            bias_init=nn.initializers.zeros, dtype=self.dtype, name=name)

        q = dense("query")(conv_norm("query"))
        k = dense("key")(conv_norm("key"))
        v = dense("value")(conv_norm("value"))
        length = q.shape[1]
        q, k, v = (t.reshape(batch, length, self.n_head, head_dim) for t in (q, k, v))

        logits = jnp.einsum("bqhd,bkhd->bhqk", q * (1.0 / math.sqrt(head_dim)), k)
        allowed = out_mask[:, None, None, :]
        if self.window_size > 1:
            idx = jnp.arange(length)
            band = jnp.abs(idx[:, None] - idx[None, :]) <= self.window_size // 2
            allowed = allowed & band[None, None]
        # A finite floor instead of -inf: a query with no valid key (an all-padding window) then
        # gets a uniform average of zeroed values, i.e. 0, instead of NaN.
        logits = jnp.where(allowed, logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v * out_mask[:, :, None, None].astype(v.dtype))
        out = dense("proj")(out.reshape(batch, length, channels))
        return out * m, out_mask


class AffineDropPath(nn.Module):
    """Per-channel learnable scale (init 1e-4), then per-sample stochastic depth in training."""
    rate: float
    init_scale: float = 1e-4

    @nn.compact
    def __call__(self, x, *, train: bool):
        scale = self.param("scale", nn.initializers.constant(self.init_scale), (x.shape[-1],))
        x = x * scale.astype(x.dtype)
        if train and self.rate > 0:
            keep = 1.0 - self.rate
            shape = (x.shape[0],) + (1,) * (x.ndim - 1)
            kept = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
            x = jnp.where(kept, x / keep, jnp.zeros_like(x))
        return x


class Mlp(nn.Module):
    """1x1 conv C -> 4C, exact GELU, 1x1 conv 4C -> C (dropouts are 0 in the reference)."""
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        x = nn.Dense(self.hidden, kernel_init=torch_default_kernel_init,
                     bias_init=nn.initializers.zeros, dtype=self.dtype, name="fc1")(x)
        x = nn.gelu(x, approximate=False)
        return nn.Dense(channels, kernel_init=torch_default_kernel_init,
                        bias_init=nn.initializers.zeros, dtype=self.dtype, name="fc2")(x)


class TransformerBlock(nn.Module):
    """Pre-LN block: x' = skip(x)*m' + DropPath(MHCA(LN1(x))); x'' = x' + DropPath(MLP(LN2(x'))*m').

    skip is the identity at stride 1 and MaxPool1d(kernel 3, stride 2, pad 1) at stride 2. With
    path_pdrop == 0 the reference uses no AffineDropPath at all (no 1e-4 scale either).
    """
    n_head: int
    stride: int = 1
    window_size: int = -1
    path_pdrop: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, *, train: bool):
        channels = x.shape[-1]
        h = layer_norm(1e-5, self.dtype, "ln1")(x)
        out, out_mask = MaskedMHCA(self.n_head, self.stride, self.window_size, dtype=self.dtype,
                                   name="attn")(h, mask)
        m = _mask(out_mask, out.dtype)
        skip = x
        if self.stride > 1:
            skip = nn.max_pool(x, (3,), strides=(self.stride,), padding=((1, 1),))
        if self.path_pdrop > 0:
            out = AffineDropPath(self.path_pdrop, name="drop_path_attn")(out, train=train)
        out = skip * m + out

        h = layer_norm(1e-5, self.dtype, "ln2")(out)
        h = Mlp(4 * channels, dtype=self.dtype, name="mlp")(h) * m
        if self.path_pdrop > 0:
            h = AffineDropPath(self.path_pdrop, name="drop_path_mlp")(h, train=train)
        return out + h, out_mask


class Neck(nn.Module):
    """FPNIdentity: one LayerNorm (eps 1e-6) per level, nothing else."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, feats):
        return [layer_norm(1e-6, self.dtype, f"norm_{l}")(f)
                for l, f in enumerate(feats)]


class Head(nn.Module):
    """Shared classification / regression towers and predictors, applied to every level.

    The levels run as one sequence: concatenated along time with one zero position between
    neighbours, which is exactly the zero padding each k=3 conv would give a level on its own
    (the gaps are masked, so every ConvModule zeroes them again, and the predictors see zeros
    there). One conv per layer instead of one per level: the same outputs, a sixth of the ops
    to compile, and one weight gradient per conv instead of a per-level sum.
    """
    num_classes: int
    num_convs: int = 2
    cls_prior_prob: float = 0.01
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, feats, masks):
        channels = feats[0].shape[-1]
        cls_tower = [ConvModule(channels, dtype=self.dtype, name=f"cls_tower_{i}")
                     for i in range(self.num_convs)]
        reg_tower = [ConvModule(channels, dtype=self.dtype, name=f"reg_tower_{i}")
                     for i in range(self.num_convs)]
        fan_in = 3 * channels
        if self.cls_prior_prob > 0:
            cls_bias = nn.initializers.constant(
                -math.log((1.0 - self.cls_prior_prob) / self.cls_prior_prob))
        else:
            cls_bias = torch_default_bias_init(fan_in)
        cls_head = nn.Conv(self.num_classes, (3,), padding=[(1, 1)],
                           kernel_init=torch_default_kernel_init, bias_init=cls_bias,
                           dtype=self.dtype, name="cls_head")
        reg_head = nn.Conv(2, (3,), padding=[(1, 1)], kernel_init=torch_default_kernel_init,
                           bias_init=torch_default_bias_init(fan_in), dtype=self.dtype,
                           name="reg_head")
        batch = feats[0].shape[0]
        gap = jnp.zeros((batch, 1, channels), feats[0].dtype)
        gap_mask = jnp.zeros((batch, 1), bool)
        x = jnp.concatenate([p for f in feats for p in (f, gap)][:-1], axis=1)
        mask = jnp.concatenate([p for m in masks for p in (m, gap_mask)][:-1], axis=1)
        c, r = x, x
        for conv in cls_tower:
            c = conv(c, mask)
        for conv in reg_tower:
            r = conv(r, mask)
        c = cls_head(c).astype(jnp.float32)
        r = reg_head(r).astype(jnp.float32)
        cls_out, reg_out, start = [], [], 0
        for level, feat in enumerate(feats):
            end = start + feat.shape[1]
            scale = self.param(f"scale_{level}", nn.initializers.constant(1.0), ())
            cls_out.append(c[:, start:end])
            reg_out.append(nn.relu(r[:, start:end] * scale))
            start = end + 1
        return cls_out, reg_out


def _resize_linear(table: np.ndarray, length: int) -> np.ndarray:
    """PyTorch `interpolate(mode='linear', align_corners=False)` along axis 0."""
    src = (np.arange(length) + 0.5) * (table.shape[0] / length) - 0.5
    src = np.clip(src, 0, table.shape[0] - 1)
    grid = np.arange(table.shape[0])
    return np.stack([np.interp(src, grid, table[:, c]) for c in range(table.shape[1])],
                    axis=1).astype(np.float32)


class ActionFormer(nn.Module):
    """Projection + neck + head. See the module docstring for the parameter tree and outputs."""
    num_classes: int
    channels: int = 512
    arch: Sequence[int] = (2, 2, 5)  # (embedding convs, stem blocks, strided branch blocks)
    n_head: int = 4
    mha_win_size: int | Sequence[int] = -1  # -1: global attention; one value or one per level
    path_pdrop: float = 0.1
    input_pdrop: float = 0.0
    use_abs_pe: bool = False
    max_seq_len: int = 768
    num_levels: int = 6
    head_convs: int = 2
    cls_prior_prob: float = 0.01
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, feats, mask, *, train: bool):
        n_embed, n_stem, n_branch = (int(a) for a in self.arch)
        if self.num_levels != n_branch + 1:
            raise ValueError(f"ActionFormer: num_levels={self.num_levels} but arch={self.arch} "
                             f"makes {n_branch + 1} levels")
        if feats.ndim != 3:
            raise ValueError(f"ActionFormer: feats must be [B, T, C], got shape {feats.shape}")
        batch, length, _ = feats.shape
        if mask.shape != (batch, length):
            raise ValueError(f"ActionFormer: mask must be [B, T] = {(batch, length)}, "
                             f"got {mask.shape}")
        if length % (2 ** n_branch):
            raise ValueError(f"ActionFormer: sequence length T={length} must be divisible by "
                             f"{2 ** n_branch} (the largest stride); pad the features")
        windows = self.mha_win_size
        if isinstance(windows, int):
            windows = (windows,) * (n_branch + 1)
        if len(windows) != n_branch + 1:
            raise ValueError(f"ActionFormer: mha_win_size needs {n_branch + 1} values, "
                             f"got {windows}")
        mask = mask.astype(bool)

        x = feats.astype(self.dtype)
        if self.input_pdrop > 0:
            # Dropout1d: whole channels of a sample are dropped (mask shared along time).
            x = nn.Dropout(self.input_pdrop, broadcast_dims=(1,), deterministic=not train,
                           name="input_dropout")(x)
        for i in range(n_embed):
            x = ConvModule(self.channels, dtype=self.dtype, name=f"embed_{i}")(x, mask)

        if self.use_abs_pe:
            table = sinusoid_table(self.max_seq_len, self.channels) / math.sqrt(self.channels)
            if length > self.max_seq_len:
                if train:
                    raise ValueError(f"ActionFormer: T={length} exceeds max_seq_len="
                                     f"{self.max_seq_len} with an absolute position embedding")
                table = _resize_linear(table, length)
            x = x + jnp.asarray(table[:length], x.dtype)[None] * _mask(mask, x.dtype)

        for i in range(n_stem):
            x, mask = TransformerBlock(self.n_head, 1, windows[0], self.path_pdrop,
                                       dtype=self.dtype, name=f"stem_{i}")(x, mask, train=train)
        levels, masks = [x], [mask]
        for i in range(n_branch):
            x, mask = TransformerBlock(self.n_head, 2, windows[1 + i], self.path_pdrop,
                                       dtype=self.dtype, name=f"branch_{i}")(x, mask, train=train)
            levels.append(x)
            masks.append(mask)

        levels = Neck(dtype=self.dtype, name="neck")(levels)
        cls_out, reg_out = Head(self.num_classes, self.head_convs, self.cls_prior_prob,
                                dtype=self.dtype, name="head")(levels, masks)
        return {
            "cls_logits": jnp.concatenate(cls_out, axis=1),
            "reg": jnp.concatenate(reg_out, axis=1),
            "point_mask": jnp.concatenate(masks, axis=1),
        }
