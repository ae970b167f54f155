"""Temporal-Informative Adapter (TIA) of AdaTAD, and which backbone parameters train in each mode.

A TIA sits after a complete ViT block (spec §3). With z the block output, seen as a video-long
sequence of L = K·8 temporal tokens at each of the h·w spatial sites:

    a  = GELU_exact(z W_down + b_down)                      # C -> C_r = floor(ratio·C)
    a' = a + PW(DW(a))                                      # DW: depthwise, k=3, over all L tokens
    TIA(z) = z + gamma · (a' W_up + b_up)                   # W_up, b_up = 0 at init: identity

The depthwise convolution crosses the 16-frame chunk boundaries (that is the point of the adapter);
zeros are padded only at the two ends of the window. The side ("ladder") variant uses the same
module without the outer `z +` residual.

Since the conv reaches one temporal token into each neighbouring chunk, the TIA of any set of
whole chunk rows needs from outside them only the bottleneck activations of those two edge tokens
(`tia_halos`); `tia_rows` then runs it row-locally, which lets the backbone compute it a few rows
at a time together with the next block's attention (vit.Block.mix_rows).

Parameter names (the public path API): `down/{kernel,bias}` [C, C_r], `dwconv/{kernel,bias}`
with the kernel laid out like a flax 1-D depthwise conv, [3, 1, C_r] (PyTorch [C_r, 1, 3] transposed),
`pwconv/{kernel,bias}` [C_r, C_r] (a 1x1 conv as a dense layer), `up/{kernel,bias}` [C_r, C], and
the scalar `gamma` of shape ().
"""
from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

ADAPTER_MODES = ("adapter", "adapter_full", "frozen", "full", "side", "none")


def trunc_normal(std: float, bound: float = 2.0):
    """PyTorch/mmengine `trunc_normal_(std=std, a=-bound, b=bound)`: the cut-offs are absolute
    values, so for std=0.02 this is a plain N(0, std) in practice (not cut at ±2 std)."""
    return nn.initializers.truncated_normal(std, lower=-bound / std, upper=bound / std)


def adapter_width(embed_dim: int, ratio: float) -> int:
    """C_r = floor(ratio · C), as the reference's `int(C * ratio)`."""
    width = int(embed_dim * ratio)
    if width < 1:
        raise ValueError(f"adapter_ratio={ratio} gives an empty bottleneck for embed_dim={embed_dim}")
    return width


def temporal_depthwise_conv(a: jax.Array, kernel: jax.Array, bias: jax.Array,
                            before: jax.Array | None = None, after: jax.Array | None = None
                            ) -> jax.Array:
    """Depthwise cross-correlation with kernel 3 along axis 1.

    a: [B, L, ..., C]; kernel: [3, 1, C] (flax depthwise layout); bias: [C].
    out[:, l] = k[0]·a[:, l-1] + k[1]·a[:, l] + k[2]·a[:, l+1] + b, where a[:, -1] is `before`
    and a[:, L] is `after` ([B, ..., C]: the neighbouring elements of a longer sequence that `a`
    is a piece of), zeros where they are None (zero padding at both ends).
    Written with shifts instead of a convolution so no transpose of the large activation is needed.
    """
    k = kernel.reshape(3, kernel.shape[-1]).astype(a.dtype)
    length = a.shape[1]

    def edge(e):
        if e is None:
            return jnp.zeros_like(jax.lax.slice_in_dim(a, 0, 1, axis=1))
        return jnp.expand_dims(e.astype(a.dtype), 1)

    prev = jnp.concatenate([edge(before), jax.lax.slice_in_dim(a, 0, length - 1, axis=1)], 1)
    nxt = jnp.concatenate([jax.lax.slice_in_dim(a, 1, length, axis=1), edge(after)], 1)
    return prev * k[0] + a * k[1] + nxt * k[2] + bias.astype(a.dtype)


# ----------------------------------------------------------------------------- the TIA's arithmetic
# Pure functions of the TIA's parameter dict ({down, dwconv, pwconv, up, gamma}, the paths of the
# module below), so that a caller holding the parameters (a checkpointed unit of the backbone) can
# run the TIA on a few chunk rows at a time. The module computes through them too.

def _dense(p, x: jax.Array, dtype) -> jax.Array:
    """flax nn.Dense(dtype=dtype, param_dtype=float32) with parameters p = {kernel, bias}."""
    x = x.astype(dtype)
    y = jax.lax.dot_general(x, p["kernel"].astype(dtype), (((x.ndim - 1,), (0,)), ((), ())))
    return y + p["bias"].astype(dtype)


def tia_bottleneck(p, z: jax.Array, dtype=jnp.float32) -> jax.Array:
    """a = GELU_exact(z W_down + b_down): [..., C] -> [..., C_r]."""
    return nn.gelu(_dense(p["down"], z, dtype), approximate=False)


def tia_halos(p, z: jax.Array, *, videos: int, time_tokens: int, dtype=jnp.float32):
    """(before, after), each [rows, h·w, C_r]: for every chunk row of z [videos·K, t·h·w, C],
    the bottleneck activations of the temporal token just before its first and just after its
    last one in the same video (zeros at the video's two ends): what the depthwise conv of that
    row reads from its neighbouring chunks. Computed from the two edge slices of each row only."""
    rows, tokens, channels = z.shape
    sites = tokens // time_tokens
    edges = z.reshape(rows, time_tokens, sites, channels)
    first = tia_bottleneck(p, edges[:, 0], dtype)       # [rows, h·w, C_r]
    last = tia_bottleneck(p, edges[:, -1], dtype)
    per_video = (videos, rows // videos) + first.shape[1:]
    first, last = first.reshape(per_video), last.reshape(per_video)
    before = jnp.pad(last[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0)))   # row k reads row k-1
    after = jnp.pad(first[:, 1:], ((0, 0), (0, 1), (0, 0), (0, 0)))    # row k reads row k+1
    return before.reshape((rows,) + before.shape[2:]), after.reshape((rows,) + after.shape[2:])


def tia_rows(p, z: jax.Array, before: jax.Array | None, after: jax.Array | None, *,
             time_tokens: int, residual: bool = True, dtype=jnp.float32) -> jax.Array:
    """The TIA on whole chunk rows z [R, t·h·w, C] (any R of them), their neighbours' edge
    activations given as `before`/`after` [R, h·w, C_r] (tia_halos; None: zeros, i.e. each row
    on its own, the chunk-local conv). Returns z's shape."""
    rows, tokens, channels = z.shape
    a = tia_bottleneck(p, z, dtype)
    a = a.reshape(rows, time_tokens, tokens // time_tokens, a.shape[-1])
    u = temporal_depthwise_conv(a, p["dwconv"]["kernel"], p["dwconv"]["bias"], before, after)
    u = _dense(p["pwconv"], u, dtype)
    out = _dense(p["up"], (a + u).reshape(rows, tokens, a.shape[-1]), dtype)
    out = out * p["gamma"].astype(out.dtype)
    return z + out if residual else out


def tia(p, z: jax.Array, *, videos: int, time_tokens: int, chunk_local: bool = False,
        residual: bool = True, dtype=jnp.float32) -> jax.Array:
    """The TIA on z [videos·K, t·h·w, C] (see TemporalInformativeAdapter)."""
    halos = ((None, None) if chunk_local else
             tia_halos(p, z, videos=videos, time_tokens=time_tokens, dtype=dtype))
    return tia_rows(p, z, *halos, time_tokens=time_tokens, residual=residual, dtype=dtype)


class TemporalDepthwiseConv(nn.Module):
    """Depthwise Conv1d (k=3, pad 1, with bias) along axis 1; init N(0, sqrt(2/3)) as the reference
    (PyTorch weight [C, 1, 3] is stored here as [3, 1, C])."""

    channels: int

    @nn.compact
    def __call__(self, a: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.normal(math.sqrt(2.0 / 3.0)),
                            (3, 1, self.channels), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.channels,), jnp.float32)
        return temporal_depthwise_conv(a, kernel, bias)


class TemporalInformativeAdapter(nn.Module):
    """TIA on the token stream of one ViT block.

    Attributes:
      embed_dim: ViT width C.
      ratio: bottleneck ratio; C_r = floor(ratio · C) (1/4 in AdaTAD, 1/8 in the g side config).
      residual: True for the serial TIA (z + ...), False for the side/ladder adapter.
      chunk_local: confine the temporal conv to each 16-frame chunk (zero padding at chunk
        borders, ETAD spec §7.3 option 1): chunks become independent, which sampled-gradient
        training (tadjax.train.sampled_grad) needs to be exact.
      dtype: computation dtype (parameters stay float32).
    """

    embed_dim: int
    ratio: float = 0.25
    residual: bool = True
    chunk_local: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, *, videos: int, time_tokens: int) -> jax.Array:
        """z: [videos·K, t·h·w, C] with t = time_tokens (8 for 16-frame chunks, tubelet 2).

        The K chunks of each video are contiguous and in temporal order along axis 0, and tokens
        inside a chunk are t-major, so [videos, K·t, h·w, C] is a free reshape whose axis 1 is
        the video-long temporal axis. Returns z's shape.
        """
        rows, tokens, channels = z.shape
        if channels != self.embed_dim:
            raise ValueError(f"TIA expects {self.embed_dim} channels, got {channels}")
        if rows % videos or tokens % time_tokens:
            raise ValueError(f"TIA: input {z.shape} does not split into {videos} videos with "
                             f"{time_tokens} temporal tokens per chunk")
        width = adapter_width(self.embed_dim, self.ratio)

        def dense(features, name, kernel_init):
            return nn.Dense(features, dtype=self.dtype, param_dtype=jnp.float32, name=name,
                            kernel_init=kernel_init, bias_init=nn.initializers.zeros)

        layers = [(dense(width, "down", trunc_normal(0.02)), channels),
                  (TemporalDepthwiseConv(width, name="dwconv"), width),
                  (dense(width, "pwconv", nn.initializers.normal(math.sqrt(2.0 / width))), width),
                  (dense(channels, "up", nn.initializers.zeros), width)]
        self.param("gamma", nn.initializers.ones, (), jnp.float32)
        if self.is_initializing():  # the layers create their parameters on a first call
            for layer, inputs in layers:
                layer(jnp.zeros((1, 1, inputs), self.dtype))
        return tia(self.variables["params"], z, videos=videos, time_tokens=time_tokens,
                   chunk_local=self.chunk_local, residual=self.residual, dtype=self.dtype)


def trainable_regex(mode: str, prefix: str = "backbone") -> list[str]:
    """Regexes (re.search on '/'-joined parameter paths) of the backbone parameters that train.

    They match where the module lets gradients reach: "adapter" -> the TIAs only (the ViT weights
    are stop_gradient'ed inside the module), "side" -> the side adapters only, "full" and
    "adapter_full" (TIAs and a trainable ViT, e.g. without pretrained weights) -> every backbone
    parameter, "frozen" -> nothing. "none" (a plain ViT, e.g. for feature extraction or
    parity tests) builds the same module as "full" and trains the same. `prefix` is the backbone's name in the
    caller's parameter tree.
    """
    p = re.escape(prefix)
    table = {
        "adapter": [rf"^{p}/blocks_\d+/adapter/"],
        "side": [rf"^{p}/side_adapters_\d+/"],
        "full": [rf"^{p}/"],
        "adapter_full": [rf"^{p}/"],
        "frozen": [],
        "none": [rf"^{p}/"],
    }
    if mode not in table:
        raise ValueError(f"unknown adapter mode {mode!r}; expected one of {ADAPTER_MODES}")
    return table[mode]
