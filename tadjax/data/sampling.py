"""Which frames to decode for a clip, and how seconds map onto the detector's feature grid.

Two sampling schemes, as in AdaTAD (OpenTAD):

* **Snippet windows** (THUMOS14). The video's frames are grouped into snippets of `snippet_stride`
  raw frames; snippet k starts at raw frame `k * snippet_stride + offset_frames`. The detector sees
  windows of `window_size` consecutive snippets (grid positions). With `scale_factor` s > 1 the
  backbone gets s frames per snippet, at raw-frame stride `snippet_stride / s`; the grid is
  unchanged. Training takes one random window ("random truncation"), testing slides windows with
  an overlap. Windows shorter than `window_size` are padded by repeating the last frame ("edge")
  and the mask is False there.
* **Resize** (ActivityNet-1.3). The whole video is sampled at `num_samples` frames spread uniformly
  and the grid has `length` positions covering the whole duration; the mask is all True.

Grid conventions (both exact and invertible; all times in seconds, grid coordinates are floats):

* Snippet grid: grid coordinate g is raw frame `g * snippet_stride + offset_frames`, and raw frame
  f is time `f / fps`. So `g = (t * fps - offset_frames) / snippet_stride - window_start` and
  `t = ((g + window_start) * snippet_stride + offset_frames) / fps`, where `window_start` is the
  window's first snippet. Position k is the point g = k, i.e. the start of its snippet.
  `fps` is the frame rate the annotation times refer to; OpenTAD uses `frame_count / duration`
  from the annotation file. OpenTAD also truncates the frame number to an integer before dividing
  by the stride; we keep it exact (the truncation moves boundaries by up to 1/stride grid units).
  `offset_frames` is 0 for end-to-end training from frames (features computed elsewhere may
  centre each snippet at a later frame, e.g. half the feature extractor's clip).
* Resize grid: grid coordinate g is time `g / length * duration`; position k covers
  `[k, k + 1) / length * duration` and the frame decoded for it is at its centre. Times are
  clipped to [0, duration] on the way in (ground truth may overrun the video).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

# ---------------------------------------------------------------------------------------------
# Seconds <-> grid


def seconds_to_grid(seconds, *, fps: float, snippet_stride: int, offset_frames: float = 0.0, window_start: float = 0.0):
    """Times in seconds -> coordinates on a snippet grid (relative to `window_start`)."""
    t = np.asarray(seconds, dtype=np.float64)
    return (t * fps - offset_frames) / snippet_stride - window_start


def grid_to_seconds(grid, *, fps: float, snippet_stride: int, offset_frames: float = 0.0, window_start: float = 0.0):
    """Coordinates on a snippet grid (relative to `window_start`) -> times in seconds."""
    g = np.asarray(grid, dtype=np.float64)
    return ((g + window_start) * snippet_stride + offset_frames) / fps


def seconds_to_resized(seconds, *, duration: float, length: int, clip: bool = True):
    """Times in seconds -> coordinates on a resize grid of `length` positions over `duration`."""
    t = np.asarray(seconds, dtype=np.float64)
    if clip:
        t = np.clip(t, 0.0, duration)
    return t / duration * length


def resized_to_seconds(grid, *, duration: float, length: int):
    """Coordinates on a resize grid -> times in seconds."""
    return np.asarray(grid, dtype=np.float64) / length * duration


# ---------------------------------------------------------------------------------------------
# Frame indices


def num_snippets(num_frames: int, snippet_stride: int, offset_frames: int = 0) -> int:
    """Grid length of a whole video: snippets starting at offset, offset + stride, ... < num_frames."""
    return max(0, math.ceil((num_frames - offset_frames) / snippet_stride))


def _frame_step(snippet_stride: int, scale_factor: int) -> int:
    if snippet_stride % scale_factor:
        raise ValueError(f"snippet_stride {snippet_stride} must be divisible by scale_factor {scale_factor}")
    return snippet_stride // scale_factor


def window_frame_indices(
    num_frames: int, start: int, length: int, *, snippet_stride: int, scale_factor: int = 1,
    offset_frames: int = 0, valid: int | None = None,
) -> np.ndarray:
    """Raw frame indices (int64 [length * scale_factor]) for grid positions start .. start+length-1.

    Frames past `valid` positions, and past the end of the video, repeat the last valid frame
    ("edge" padding).
    """
    step = _frame_step(snippet_stride, scale_factor)
    valid = length if valid is None else valid
    k = np.arange(length * scale_factor)
    k = np.minimum(k, valid * scale_factor - 1)
    frames = offset_frames + start * snippet_stride + k * step
    # The last frame that lies on the sampling lattice of the video.
    last = offset_frames + ((num_frames - 1 - offset_frames) // step) * step
    return np.minimum(frames, last).astype(np.int64)


def resize_frame_indices(num_frames: int, num_samples: int) -> np.ndarray:
    """`num_samples` frames spread over a video: centres stride/2 - 0.5 + k*stride, rounded, clipped.

    stride = num_frames / num_samples; short videos repeat frames.
    """
    stride = num_frames / num_samples
    centres = stride / 2 - 0.5 + np.arange(num_samples) * stride
    return np.clip(np.round(centres), 0, num_frames - 1).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Windows


@dataclasses.dataclass
class Window:
    """One clip for the detector.

    start: first grid position on the video's grid; length: grid positions (window_size);
    frame_indices: raw frames to decode, int64 [length * scale_factor]; mask: bool [length], False
    on padding; segments: float64 [M, 2] ground truth in grid units relative to `start`;
    labels: int32 [M].
    """

    start: int
    length: int
    frame_indices: np.ndarray
    mask: np.ndarray
    segments: np.ndarray
    labels: np.ndarray


def sliding_window_starts(num_positions: int, window_size: int, overlap: float = 0.5) -> list[int]:
    """Starts of test windows: stride window_size*(1-overlap), last window right-aligned to the end.

    For overlap 0.5 these are OpenTAD's windows, without its duplicate last window when the video
    length is a multiple of the stride; for overlaps below 0.5 OpenTAD's loop
    (`range(max(1, N // stride))`) can leave the end of the video uncovered, this one never does.
    A video shorter than one window gets one window at 0.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    stride = max(1, int(round(window_size * (1 - overlap))))
    starts, start = [], 0
    while True:
        if start + window_size >= num_positions:
            starts.append(max(0, num_positions - window_size))
            return starts
        starts.append(start)
        start += stride


def _empty_segments():
    return np.zeros((0, 2), np.float64), np.zeros((0,), np.int32)


def _clip_to_window(segments, labels, start, length, thresh):
    """Ground truth clipped to [start, start+length), relative to start; keeps >= thresh of its length."""
    if len(segments) == 0:
        return _empty_segments() + (np.zeros((0,)),)
    lo = np.maximum(segments[:, 0], start)
    hi = np.minimum(segments[:, 1], start + length)
    full = np.maximum(segments[:, 1] - segments[:, 0], 1e-9)
    cover = np.maximum(hi - lo, 0.0) / full
    keep = (cover >= thresh) & (hi >= lo)
    clipped = np.stack([lo, hi], axis=1)[keep] - start
    return clipped, labels[keep], cover


def eval_windows(
    num_frames: int, *, window_size: int = 768, snippet_stride: int = 4, scale_factor: int = 1,
    overlap: float = 0.5, offset_frames: int = 0,
) -> list[Window]:
    """Sliding windows over a whole video for evaluation (no ground truth attached)."""
    n = num_snippets(num_frames, snippet_stride, offset_frames)
    if n <= 0:
        raise ValueError(f"video of {num_frames} frames has no snippets (offset {offset_frames})")
    windows = []
    for start in sliding_window_starts(n, window_size, overlap):
        valid = min(window_size, n - start)
        windows.append(Window(
            start=start, length=window_size,
            frame_indices=window_frame_indices(num_frames, start, window_size, snippet_stride=snippet_stride,
                                               scale_factor=scale_factor, offset_frames=offset_frames, valid=valid),
            mask=np.arange(window_size) < valid,
            segments=np.zeros((0, 2)), labels=np.zeros((0,), np.int32)))
    return windows


def train_window(
    num_frames: int, segments: np.ndarray, labels: np.ndarray, rng: np.random.Generator, *,
    window_size: int = 768, snippet_stride: int = 4, scale_factor: int = 1, offset_frames: int = 0,
    trunc_thresh: float = 0.75, max_tries: int = 200, crop_ratio: tuple[float, float] | None = (0.9, 1.0),
) -> Window:
    """A random training window ("random truncation"); `segments` are in grid units of the whole video.

    Video longer than the window: up to `max_tries` uniformly random starts until one keeps at
    least one ground truth with >= `trunc_thresh` of its length inside; ground truth is clipped to
    the window and instances below the threshold are dropped. If no try succeeds (e.g. every action
    is longer than window_size / trunc_thresh), the start that covers most of one instance is used
    and that instance is kept, clipped (OpenTAD would return a window without ground truth).
    Video not longer than the window: a random crop of length in [crop_ratio[0], crop_ratio[1]] of
    the video (same threshold rule, `max_tries` tries, else the whole video), edge-padded with a
    False mask. Videos without ground truth get a random window.
    """
    segments = np.asarray(segments, np.float64).reshape(-1, 2)
    labels = np.asarray(labels, np.int32).reshape(-1)
    n = num_snippets(num_frames, snippet_stride, offset_frames)
    if n <= 0:
        raise ValueError(f"video of {num_frames} frames has no snippets (offset {offset_frames})")

    def make(start, valid, segs, labs):
        return Window(
            start=int(start), length=window_size,
            frame_indices=window_frame_indices(num_frames, start, window_size, snippet_stride=snippet_stride,
                                               scale_factor=scale_factor, offset_frames=offset_frames, valid=valid),
            mask=np.arange(window_size) < valid, segments=segs, labels=labs)

    if n > window_size:
        for _ in range(max_tries):
            start = int(rng.integers(0, n - window_size + 1))
            segs, labs, _ = _clip_to_window(segments, labels, start, window_size, trunc_thresh)
            if len(segs) or len(segments) == 0:
                return make(start, window_size, segs, labs)
        # Fallback: centre the window on the shortest instance (the one that can be covered most)
        # and keep what reaches the threshold, or at least that instance, clipped.
        i = int(np.argmin(segments[:, 1] - segments[:, 0]))
        centre = 0.5 * (segments[i, 0] + segments[i, 1])
        start = int(np.clip(round(centre - window_size / 2), 0, n - window_size))
        _, _, cover = _clip_to_window(segments, labels, start, window_size, 0.0)
        segs, labs, _ = _clip_to_window(segments, labels, start, window_size, min(trunc_thresh, cover.max()))
        return make(start, window_size, segs, labs)

    # Short video: random crop, then pad.
    if crop_ratio is not None and len(segments):
        lo_r, hi_r = crop_ratio
        for _ in range(max_tries):
            length = int(rng.integers(max(1, math.ceil(lo_r * n)), max(1, math.floor(hi_r * n)) + 1))
            start = int(rng.integers(0, n - length + 1))
            segs, labs, _ = _clip_to_window(segments, labels, start, length, trunc_thresh)
            if len(segs):
                return make(start, length, segs, labs)
    segs, labs, _ = _clip_to_window(segments, labels, 0, n, 0.0)
    keep = (segs[:, 1] - segs[:, 0]) > 0 if len(segs) else np.zeros((0,), bool)
    return make(0, n, segs[keep], labs[keep])


def resize_window(
    num_frames: int, num_samples: int, length: int, segments_seconds: np.ndarray | None = None,
    labels: np.ndarray | None = None, *, duration: float | None = None, min_relative_length: float = 0.0,
) -> Window:
    """The whole video as one clip (ActivityNet): `num_samples` frames, a grid of `length` positions.

    Ground truth is converted from seconds with `seconds_to_resized` (clipped to the video).
    `min_relative_length` > 0 drops instances with duration / video duration <= it (OpenTAD's
    `filter_gt` uses 0.01 in training).
    """
    segs, labs = _empty_segments()
    if segments_seconds is not None and len(segments_seconds):
        if duration is None:
            raise ValueError("resize_window needs the video duration to convert ground truth")
        s = np.asarray(segments_seconds, np.float64).reshape(-1, 2)
        labs = np.asarray(labels, np.int32).reshape(-1)
        keep = (s[:, 1] - s[:, 0]) / duration > min_relative_length
        segs = seconds_to_resized(s[keep], duration=duration, length=length)
        labs = labs[keep]
    return Window(start=0, length=length, frame_indices=resize_frame_indices(num_frames, num_samples),
                  mask=np.ones((length,), bool), segments=segs, labels=labs)
