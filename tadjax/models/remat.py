"""Rematerialisation (activation checkpointing) policies, chosen by name in the config.

The unit of rematerialisation is one transformer block together with its adapter, as the
reference's `with_cp=True` (spec §2.5). On XLA:CPU a remat'ed block inside an unrolled Python loop
did not lower peak memory, a `lax.scan` over remat'ed blocks did; see `VisionTransformer.scan_blocks`.
"""
from __future__ import annotations

from typing import Callable

import jax

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
