"""Anchor points of the ActionFormer pyramid (one per feature position per level).

Level l has stride s_l and T / s_l points at grid positions i * s_l (no half-stride offset), each
carrying the regression range [lo_l, hi_l] (grid units) it is responsible for. The levels are
concatenated in the same order as the model's outputs (`ActionFormer` concatenates level 0 first).

Columns of the [P, 4] array: position (grid units), lo, hi, stride.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

STRIDES = (1, 2, 4, 8, 16, 32)
REGRESS_RANGES = ((0, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, 10000))


def level_lengths(seq_len: int, strides: Sequence[int] = STRIDES) -> list[int]:
    """Number of points of each level for a level-0 sequence of `seq_len` positions."""
    seq_len = int(seq_len)
    for s in strides:
        if seq_len % int(s):
            raise ValueError(f"points: seq_len={seq_len} is not divisible by stride {s} "
                             f"(strides={tuple(strides)}); pad the sequence to a multiple of "
                             f"{max(strides)}")
    return [seq_len // int(s) for s in strides]


def make_points(seq_len: int, strides: Sequence[int] = STRIDES,
                regress_ranges: Sequence[Sequence[float]] = REGRESS_RANGES) -> np.ndarray:
    """[P, 4] float32 array (position, lo, hi, stride), levels concatenated, P = sum T / s_l."""
    if len(strides) != len(regress_ranges):
        raise ValueError(f"points: {len(strides)} strides but {len(regress_ranges)} regression "
                         "ranges; give one range per level")
    rows = []
    for n, s, (lo, hi) in zip(level_lengths(seq_len, strides), strides, regress_ranges):
        level = np.empty((n, 4), np.float32)
        level[:, 0] = np.arange(n, dtype=np.float32) * s
        level[:, 1] = lo
        level[:, 2] = hi
        level[:, 3] = s
        rows.append(level)
    return np.concatenate(rows, axis=0)
