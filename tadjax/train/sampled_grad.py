"""Sampled-gradient backbone training (ETAD, spec etad.md §1.3 and §7.4).

A video is cut into K snippets (for the ViT: 16-frame chunks) whose features are computed
independently: f[b, k] = fn(params, snippets[b, k], key[b, k]). `sampled_snippet_features` returns
all of them, but its backward pass back-propagates through a random subset of S snippets per video
only:

  forward  (stage 1)  all B·K snippets, `lax.map` over groups of B·group snippets, nothing saved
                      for the backward pass (residuals are the inputs: params, uint8 frames, key)
  backward (stage 3)  g = dL/df from the detector (stage 2 is the ordinary autodiff of the loss);
                      the S sampled snippets of every video are recomputed in a `lax.scan` over
                      groups, each group's VJP applied to its slice of g and summed into the
                      parameter cotangent. The other snippets' slices of g are dropped.

The parameter gradient is exactly that of L(F~) with F~[b, k] = f[b, k] for sampled k and
stop_gradient(f[b, k]) otherwise (`masked_reference_features` is that reference; it runs the
backward pass through every snippet). It is not rescaled by K/S (ETAD does not rescale either).
Peak memory of the backward pass is one group's activations instead of all K snippets'.

Requirements: snippet features must be independent (plain ViT, ViT with chunk-local adapters;
not AdaTAD's window-wide TIA, whose temporal conv crosses chunks: spec §7.3, we use option 1,
chunk-local adapters, `VisionTransformer.adapter_chunk_local`), and any randomness must come from
the per-snippet key, so that both passes draw the same dropout / drop-path masks:
key[b, k] = fold_in(dropout_key, b·K + k).

Sampling: S = group · ceil(ratio · K / group) (ETAD's 4·int(128·0.3/4 + 0.99) = 40 for group 4),
a fresh random subset per video and per step (`sample_indices`).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

SnippetFn = Callable[[Any, jax.Array, jax.Array], jax.Array]  # (params, snippet, key) -> feature


def num_sampled(num_snippets: int, ratio: float, group: int = 1) -> int:
    """S = group · ceil(ratio · K / group), clipped to [group, K] (K when group does not fit)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"sampled-gradient ratio must be in (0, 1], got {ratio}")
    if group < 1:
        raise ValueError(f"sampled-gradient group must be >= 1, got {group}")
    count = group * math.ceil(ratio * num_snippets / group - 1e-9)
    return int(min(max(count, group), num_snippets))


def split_key(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sampling key, dropout key) from one key."""
    k_sample, k_drop = jax.random.split(key)
    return k_sample, k_drop


def snippet_keys(dropout_key: jax.Array, batch: int, num_snippets: int) -> jax.Array:
    """[B, K] keys, key[b, k] = fold_in(dropout_key, b·K + k): the same in both passes."""
    ids = jnp.arange(batch * num_snippets, dtype=jnp.uint32)
    return jax.vmap(lambda i: jax.random.fold_in(dropout_key, i))(ids).reshape(batch, num_snippets)


def sample_indices(key: jax.Array, batch: int, num_snippets: int, count: int) -> jax.Array:
    """int32 [B, count]: for each video an independent uniformly random subset of its snippets."""
    u = jax.random.uniform(key, (batch, num_snippets))
    return jnp.argsort(u, axis=1)[:, :count].astype(jnp.int32)


def sample_mask(key: jax.Array, batch: int, num_snippets: int, ratio: float, group: int = 1):
    """bool [B, K]: the snippets whose gradient `sampled_snippet_features` back-propagates."""
    k_sample, _ = split_key(key)
    idx = sample_indices(k_sample, batch, num_snippets, num_sampled(num_snippets, ratio, group))
    return jnp.zeros((batch, num_snippets), bool).at[jnp.arange(batch)[:, None], idx].set(True)


def _all_features(fn: SnippetFn, params, snippets, keys, group: int):
    """Stage 1: f for all snippets, `lax.map` over groups of B·group snippets (no autodiff)."""
    b, k = snippets.shape[:2]
    flat = snippets.reshape((b * k,) + snippets.shape[2:])
    out = jax.lax.map(lambda xs: fn(params, xs[0], xs[1]), (flat, keys.reshape(b * k)),
                      batch_size=min(b * group, b * k))
    return out.reshape((b, k) + out.shape[1:])


def sampled_snippet_features(fn: SnippetFn, params, snippets: jax.Array, key: jax.Array, *,
                             ratio: float, group: int = 1) -> jax.Array:
    """Features [B, K, ...] of snippets [B, K, ...]; gradients to `params` from S sampled snippets.

    fn(params, snippet, key) -> feature is the per-snippet function (unbatched; it is vmapped).
    `key` (a typed PRNG key) gives both the sampled subset and every snippet's dropout key.
    `ratio` in (0, 1]; `group` = snippets per video in one step of the chunked loops (memory of
    the backward pass scales with B·group). No gradient flows to `snippets` or `key`.
    """
    b, k = snippets.shape[:2]
    count = num_sampled(k, ratio, group)
    batched = jax.vmap(fn, in_axes=(None, 0, 0))

    def keys_and_indices(key):
        k_sample, k_drop = split_key(key)
        return snippet_keys(k_drop, b, k), sample_indices(k_sample, b, k, count)

    @jax.custom_vjp
    def features(params, snippets, key):
        keys, _ = keys_and_indices(key)
        return _all_features(fn, params, snippets, keys, group)

    def fwd(params, snippets, key):
        return features(params, snippets, key), (params, snippets, key)

    def bwd(res, g):
        params, snippets, key = res
        keys, idx = keys_and_indices(key)
        rows = jnp.arange(b)[:, None]

        def take(x):  # [B, K, ...] -> [S / group, B·group, ...], video-major inside a step
            x = x[rows, idx]  # [B, S, ...]
            x = x.reshape((b, count // group, group) + x.shape[2:])
            x = jnp.swapaxes(x, 0, 1)
            return x.reshape((count // group, b * group) + x.shape[3:])

        def body(acc, xs):
            x, kk, gg = xs
            _, vjp = jax.vjp(lambda p: batched(p, x, kk), params)
            (dp,) = vjp(gg)
            return jax.tree.map(jnp.add, acc, dp), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, _ = jax.lax.scan(body, zeros, (take(snippets), take(keys), take(g)))
        return grads, None, None

    features.defvjp(fwd, bwd)
    return features(params, snippets, key)


def masked_reference_features(fn: SnippetFn, params, snippets: jax.Array, key: jax.Array, *,
                              ratio: float, group: int = 1) -> jax.Array:
    """The reference of `sampled_snippet_features`: where(mask, f, stop_gradient(f)) over all
    snippets. Same values and parameter gradient, but the backward pass runs through every
    snippet (JAX cannot tell that the unsampled cotangents are zero): for tests only."""
    b, k = snippets.shape[:2]
    _, k_drop = split_key(key)
    keys = snippet_keys(k_drop, b, k)
    f = jax.vmap(jax.vmap(fn, in_axes=(None, 0, 0)), in_axes=(None, 0, 0))(params, snippets, keys)
    mask = sample_mask(key, b, k, ratio, group)
    mask = mask.reshape(mask.shape + (1,) * (f.ndim - 2))
    return jnp.where(mask, f, jax.lax.stop_gradient(f))


SNIPPET_INDEPENDENT_MODES = ("adapter", "adapter_full", "full", "none", "frozen")


def backbone_features(backbone, params, frames: jax.Array, key: jax.Array, *, normalize,
                      ratio: float, group: int = 1) -> jax.Array:
    """Sampled-gradient features [B, K·t, C] float32 of a VisionTransformer on frames
    [B, K·chunk_frames, H, W, 3] (uint8 kept as is until each chunk is normalised).

    `backbone`: the VisionTransformer module (bound or not); `params`: its parameter tree;
    `normalize(frames) -> input`; snippet = one chunk of `backbone.chunk_frames` frames. The
    backbone must be chunk-independent: TIAs need `adapter_chunk_local=True`, and side adapters
    (window-wide by design) are not supported.
    """
    mode = backbone.adapter_mode
    if mode not in SNIPPET_INDEPENDENT_MODES:
        raise ValueError(f"sampled-gradient training needs chunk-independent snippet features; "
                         f"backbone adapter_mode={mode!r} is not supported (use adapter, "
                         f"adapter_full or full)")
    if mode in ("adapter", "adapter_full") and not backbone.adapter_chunk_local:
        raise ValueError("sampled-gradient training with TIA adapters needs "
                         "config.model.backbone.adapter_chunk_local=True: the window-wide TIA "
                         "mixes time across chunks, so a chunk's features depend on its "
                         "neighbours (ETAD spec §7.3)")
    b, num_frames = frames.shape[:2]
    cf = backbone.chunk_frames
    if num_frames % cf:
        raise ValueError(f"sampled-gradient training: {num_frames} frames is not a multiple of "
                         f"chunk_frames={cf}")
    snippets = frames.reshape((b, num_frames // cf, cf) + frames.shape[2:])
    bare = backbone.clone(parent=None)

    def snippet_fn(p, chunk, k):
        out = bare.apply({"params": p}, normalize(chunk[None]), train=True, rngs={"dropout": k})
        return out[0].astype(jnp.float32)  # [t, C]

    feats = sampled_snippet_features(snippet_fn, params, snippets, key, ratio=ratio, group=group)
    return feats.reshape(b, -1, feats.shape[-1])
