"""Softmax attention over the tokens of each chunk, head-major, with a hand-written backward pass.

    softmax(q·kᵀ / sqrt(d)) · v   for q, k, v [rows, tokens, heads, d]  ->  [rows, tokens, heads, d]

Why not `jax.nn.dot_product_attention`: on XLA:CPU its token-major layout ([B, T, N, H] einsums)
ran a VideoMAE-S chunk group about 3x slower than the same arithmetic head-major here, and its
autodiff backward re-reads the [heads, tokens, tokens] score tensors more often than needed.
This version computes the scores head-major, keeps the probabilities P as the only large residual
(one chunk group's worth when the caller maps over chunk groups under remat), and back-propagates
with the textbook formulas

    dV = Pᵀ·dO,  dP = dO·Vᵀ,  dS = P ⊙ (dP − rowsum(dO ⊙ O)),  dQ = dS·K / sqrt(d),  dK = dSᵀ·Q / sqrt(d)

(tests/test_vit.py checks values and gradients against `jax.nn.dot_product_attention`).

The row term rowsum(dO ⊙ O) equals rowsum(dP ⊙ P) (both are Σ_k P·dP over a query's keys). The
first reads the output O, a small [tokens, d] product per head; the second only P and dP, so a
backward pass that recomputes the attention (remat) without needing its output lets XLA drop the
recompute's P·V matmul altogether (`row_from_probs=True`; vit.unit_pieces' split units).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _heads_first(x: jax.Array) -> jax.Array:  # [rows, tokens, heads, d] -> [rows, heads, tokens, d]
    return jnp.swapaxes(x, 1, 2)


def _forward(q, k, v):
    """Head-major (q, k, v [rows, heads, tokens, d]) -> (out, probabilities)."""
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    scores = jnp.einsum("rnqd,rnkd->rnqk", q * scale, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("rnqk,rnkd->rnqd", probs, v)
    return out, probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention_heads_first(q, k, v, row_from_probs=False):
    return _forward(q, k, v)[0]


def _attention_fwd(q, k, v, row_from_probs):
    out, probs = _forward(q, k, v)
    return out, (q, k, v, probs, None if row_from_probs else out)


def _attention_bwd(row_from_probs, residuals, d_out):
    q, k, v, probs, out = residuals
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    d_v = jnp.einsum("rnqk,rnqd->rnkd", probs, d_out)
    d_probs = jnp.einsum("rnqd,rnkd->rnqk", d_out, v, preferred_element_type=jnp.float32)
    if row_from_probs:   # the output is not read: a recompute may skip P·V
        row = jnp.sum(d_probs * probs.astype(jnp.float32), axis=-1, keepdims=True)
    else:
        row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_scores = (probs.astype(jnp.float32) * (d_probs - row)).astype(q.dtype)
    d_q = jnp.einsum("rnqk,rnkd->rnqd", d_scores, k) * scale
    d_k = jnp.einsum("rnqk,rnqd->rnkd", d_scores, q) * scale
    return d_q, d_k, d_v


_attention_heads_first.defvjp(_attention_fwd, _attention_bwd)


def chunk_attention(q: jax.Array, k: jax.Array, v: jax.Array, row_from_probs: bool = False
                    ) -> jax.Array:
    """Full (non-causal) softmax attention, q, k, v [rows, tokens, heads, d] -> [rows, tokens, heads, d];
    the same values as `jax.nn.dot_product_attention(q, k, v)`. row_from_probs: the backward
    pass's row term from P and dP instead of the output (see the module docstring)."""
    if not q.shape == k.shape == v.shape or q.ndim != 4:
        raise ValueError(f"chunk_attention expects q, k, v of one shape [rows, tokens, heads, d], "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    out = _attention_heads_first(_heads_first(q), _heads_first(k), _heads_first(v),
                                 bool(row_from_probs))
    return _heads_first(out)
