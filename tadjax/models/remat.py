"""Rematerialisation (activation checkpointing) policies, chosen by name in the config.

The unit of rematerialisation is one transformer block together with its adapter, as the
reference's `with_cp=True` (spec §2.5). On XLA:CPU a remat'ed block inside an unrolled Python loop
did not lower peak memory, a `lax.scan` over remat'ed blocks did; see `VisionTransformer.scan_blocks`.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

_POLICIES = {
    # Save nothing: recompute the whole block in the backward pass (the reference's behaviour).
    "full": None,
    # Keep matmul outputs that have no batch dimension (weights x activations); recompute the rest.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Keep every matmul output, including the attention score/value products.
    "dots_all": jax.checkpoint_policies.dots_saveable,
}

REMAT_POLICIES = ("none", "full", "dots", "dots_all", "offload")


def remat(fn: Callable, policy: str, static_argnums: tuple[int, ...] = (),
          prevent_cse: bool = True) -> Callable:
    """`fn` wrapped in `jax.checkpoint` with the named policy; "none" returns `fn` unchanged.

    prevent_cse=False is safe (and cheaper) when `fn` is the body of a `lax.scan`.

    "offload" keeps the same matmul outputs as "dots" but moves them to pinned host memory
    (useful on accelerators; XLA:CPU has no separate host memory space).
    """
    if policy == "none":
        return fn
    if policy == "offload":
        chosen = jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    elif policy in _POLICIES:
        chosen = _POLICIES[policy]
    else:
        raise ValueError(f"unknown remat_policy {policy!r}; expected one of {REMAT_POLICIES}")
    return jax.checkpoint(fn, policy=chosen, static_argnums=static_argnums, prevent_cse=prevent_cse)


def remat_narrow_input(fn: Callable, save_dtype, grad_keys: tuple[str, ...] | None = None
                       ) -> Callable:
    """fn(params, x, *rest) rematerialised as policy "full", with x kept for the backward pass in
    `save_dtype` (e.g. bfloat16: half the memory of float32 block inputs).

    The forward values are exact; the backward pass recomputes fn from x rounded to save_dtype,
    so the gradients are those at the rounded input (relative error ~ 2^-8 for bfloat16).
    `params` is a dict: only its entries named in `grad_keys` (None: all) are differentiated;
    the others get zero cotangents without any weight-gradient arithmetic (they must not need a
    gradient: frozen weights). `rest` (keys, rates) gets no gradient.
    """
    def split(params):
        if grad_keys is None:
            return params, {}
        return ({k: v for k, v in params.items() if k in grad_keys},
                {k: v for k, v in params.items() if k not in grad_keys})

    @jax.custom_vjp
    def narrow(trained, frozen, x, *rest):
        return fn({**frozen, **trained}, x, *rest)

    save_dtype = jnp.dtype(save_dtype)
    # Kept as raw bits (an unsigned integer of the same width): XLA:CPU otherwise moves the
    # conversion out of the scan over blocks and stacks the kept inputs in float32 after all.
    bits = jnp.dtype(f"uint{8 * save_dtype.itemsize}")

    def forward(trained, frozen, x, *rest):
        kept = jax.lax.bitcast_convert_type(x.astype(save_dtype), bits)
        return narrow(trained, frozen, x, *rest), (trained, frozen, kept, rest)

    def backward(saved, grad_out):
        trained, frozen, kept, rest = saved
        # fn maps the residual stream to itself: x had grad_out's dtype.
        x = jax.lax.bitcast_convert_type(kept, save_dtype).astype(grad_out.dtype)
        _, vjp = jax.vjp(lambda t, x: fn({**frozen, **t}, x, *rest), trained, x)
        grad_trained, grad_x = vjp(grad_out)
        return (grad_trained, None, grad_x) + (None,) * len(rest)

    narrow.defvjp(forward, backward)

    def wrapped(params, x, *rest):
        trained, frozen = split(params)
        return narrow(trained, frozen, x, *rest)

    return wrapped
