"""A dense layer with an optional low-rank (LoRA) branch: y = x W + b + (x A) B.

Block drop (tadjax.compress) fine-tunes the attention of a compressed ViT through LoRA on
`attn/qkv` and `attn/proj` (spec blockdrop §4.1): A [in, r] starts as N(0, 1/r), B [r, out] as
zeros, so a fresh LoRA leaves the function unchanged; there is no alpha/r scaling. Parameter
names: `kernel`, `bias` (as nn.Dense) plus `lora_a`, `lora_b`. With `rank=0` the layer is exactly
nn.Dense (same parameters, same result). `tadjax.surgery.merge_lora` folds the branch back into
the kernel (kernel += A @ B) and removes the two leaves, so the merged tree runs on a model built
with rank 0.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def lora_a_init(rank: int) -> Callable:
    """A ~ N(0, 1/rank): standard normal divided by sqrt(rank)."""
    return nn.initializers.normal(stddev=float(rank) ** -0.5)


class LoRADense(nn.Module):
    features: int
    rank: int = 0
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        x = x.astype(self.dtype)
        y = jnp.dot(x, kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        if self.rank > 0:
            a = self.param("lora_a", lora_a_init(self.rank), (x.shape[-1], self.rank),
                           self.param_dtype)
            b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features),
                           self.param_dtype)
            y = y + jnp.dot(jnp.dot(x, a.astype(self.dtype)), b.astype(self.dtype))
        return y
