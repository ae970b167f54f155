"""Decode + augment throughput of the input pipeline (one process, no batching)."""
from __future__ import annotations

import time

import numpy as np

from tadjax.data import sampling, transforms, video


def decode_throughput(paths, size: int = 160, frames: int = 64, *, snippet_stride: int = 4, seed: int = 0,
                      train: bool = True) -> dict:
    """Reads `frames` frames (a random window at `snippet_stride`) from each video and augments them.

    Frames are decoded at the augmentation's short side (size * 182 / 160 in training, `size` in
    evaluation) by the decoder, then go through `train_augment` (or `eval_augment`) to size x size.
    Returns frames_per_second over the whole run, and the split between decoding and augmenting.
    """
    rng = np.random.default_rng(seed)
    short = int(round(size * 182 / 160)) if train else size
    cfg = transforms.TrainAugment(short_side=short, out_size=size)
    decode_s = augment_s = 0.0
    total = 0
    for path in paths:
        info = video.video_info(path)
        window = sampling.train_window(info.num_frames, np.zeros((0, 2)), [], rng, window_size=frames,
                                       snippet_stride=snippet_stride)
        t0 = time.perf_counter()
        clip = video.read_frames(path, window.frame_indices, size=short)
        t1 = time.perf_counter()
        out = transforms.train_augment(clip, rng, cfg) if train else transforms.eval_augment(clip, size)
        t2 = time.perf_counter()
        assert out.shape == (len(window.frame_indices), size, size, 3)
        decode_s += t1 - t0
        augment_s += t2 - t1
        total += out.shape[0]
    seconds = decode_s + augment_s
    return {"frames": total, "seconds": seconds, "frames_per_second": total / seconds if seconds else 0.0,
            "decode_seconds": decode_s, "augment_seconds": augment_s}
