"""Clip augmentation in numpy: uint8 RGB frames `[T, H, W, 3]` in, uint8 `[T, h, w, 3]` out.

Every random choice is drawn once per clip (one crop box, one flip, one colour-jitter draw for all
frames), from an explicit `np.random.Generator`.

Training (AdaTAD, 160 px): short side 182 -> random resized crop (area [0.08, 1], aspect [3/4, 4/3],
10 tries, fallback centre square) resized to 160 x 160 -> horizontal flip p=0.5 -> colour jitter
(brightness, contrast, saturation factors in [0.5, 1.5], hue shift in [-0.1, 0.1] of a turn, in a
random order per clip). Evaluation: short side 160 -> centre crop 160.

Differences from the reference (mmaction2 + imgaug), on purpose:
* Resizing uses Pillow's bilinear filter (OpenCV is not a dependency). When shrinking, Pillow
  widens the filter (antialiasing) where OpenCV's INTER_LINEAR samples 2x2 pixels; enlarging is
  the same.
* The hue shift is a rotation of the chroma plane in YIQ space, a linear stand-in for shifting
  the HSV hue channel; the reference's order of the four jitter ops is fixed per pipeline
  instance, here it is drawn per clip.
* The RandAugment step (imgaug "default", 2 of 15 ops) is not implemented.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from tadjax.data.video import output_size

_BILINEAR = Image.Resampling.BILINEAR


def _check_clip(frames: np.ndarray):
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")


def resize(frames: np.ndarray, size: tuple[int, int], box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Bilinear resize of every frame to (height, width); `box` = (top, left, height, width) crops first."""
    _check_clip(frames)
    if box is not None:  # crop first, so no pixel outside the box leaks in through the filter
        frames = np.ascontiguousarray(crop(frames, box))
    h, w = int(size[0]), int(size[1])
    t, fh, fw, _ = frames.shape
    if (fh, fw) == (h, w):
        return frames
    out = np.empty((t, h, w, 3), np.uint8)
    for i in range(t):
        out[i] = np.asarray(Image.fromarray(frames[i]).resize((w, h), _BILINEAR))
    return out


def resize_short_side(frames: np.ndarray, short_side: int) -> np.ndarray:
    """Resize so the short side is `short_side`, keeping the aspect ratio (long side rounded)."""
    _check_clip(frames)
    return resize(frames, output_size(frames.shape[1], frames.shape[2], short_side))


def crop(frames: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The (top, left, height, width) box of every frame (a view)."""
    top, left, h, w = box
    return frames[:, top:top + h, left:left + w]


def center_crop_box(height: int, width: int, size: int | tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a centred crop; offsets rounded down like mmaction's CenterCrop."""
    ch, cw = (size, size) if isinstance(size, (int, np.integer)) else size
    if ch > height or cw > width:
        raise ValueError(f"centre crop {ch}x{cw} larger than frame {height}x{width}")
    return (height - ch) // 2, (width - cw) // 2, ch, cw


def center_crop(frames: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    return crop(frames, center_crop_box(frames.shape[1], frames.shape[2], size))


def random_resized_crop_box(
    height: int, width: int, rng: np.random.Generator, *, area_range=(0.08, 1.0),
    aspect_range=(3 / 4, 4 / 3), max_tries: int = 10,
) -> tuple[int, int, int, int]:
    """(top, left, h, w): area fraction uniform in area_range, log-aspect (w/h) uniform; else centre square."""
    for _ in range(max_tries):
        area = rng.uniform(*area_range) * height * width
        aspect = np.exp(rng.uniform(np.log(aspect_range[0]), np.log(aspect_range[1])))
        cw = int(round(np.sqrt(area * aspect)))
        ch = int(round(np.sqrt(area / aspect)))
        if 0 < cw <= width and 0 < ch <= height:
            top = int(rng.integers(0, height - ch + 1))
            left = int(rng.integers(0, width - cw + 1))
            return top, left, ch, cw
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def hflip(frames: np.ndarray) -> np.ndarray:
    return frames[:, :, ::-1]


_GRAY = np.array([0.299, 0.587, 0.114], np.float32)
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float64)


def hue_matrix(turns: float) -> np.ndarray:
    """3x3 matrix M with rgb' = rgb @ M: rotates the YIQ chroma plane by `turns` of a full circle."""
    a = 2 * np.pi * turns
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    m = np.linalg.inv(_RGB_TO_YIQ) @ rot @ _RGB_TO_YIQ
    return m.T.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ColorJitterDraw:
    """One clip's colour jitter: factors (1 = unchanged), hue in turns, and the order of the 4 ops."""

    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0
    order: tuple[int, ...] = (0, 1, 2, 3)  # 0 brightness, 1 contrast, 2 saturation, 3 hue


def draw_color_jitter(rng: np.random.Generator, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.1) -> ColorJitterDraw:
    return ColorJitterDraw(
        brightness=float(rng.uniform(1 - brightness, 1 + brightness)),
        contrast=float(rng.uniform(1 - contrast, 1 + contrast)),
        saturation=float(rng.uniform(1 - saturation, 1 + saturation)),
        hue=float(rng.uniform(-hue, hue)),
        order=tuple(int(i) for i in rng.permutation(4)))


def apply_color_jitter(frames: np.ndarray, draw: ColorJitterDraw, chunk: int = 64) -> np.ndarray:
    """Applies `draw` to every frame; values are clipped to [0, 255] after each op and rounded at the end.

    Contrast blends with each frame's mean gray level; saturation with each pixel's gray level.
    """
    _check_clip(frames)
    out = np.empty_like(frames)
    hue = hue_matrix(draw.hue)
    for s in range(0, frames.shape[0], chunk):
        x = frames[s:s + chunk].astype(np.float32)
        for op in draw.order:
            if op == 0:
                x *= draw.brightness
            elif op == 1:
                mean = (x @ _GRAY).mean(axis=(1, 2), keepdims=True)[..., None]
                x = (x - mean) * draw.contrast + mean
            elif op == 2:
                gray = (x @ _GRAY)[..., None]
                x = (x - gray) * draw.saturation + gray
            else:
                x = x @ hue
            np.clip(x, 0, 255, out=x)
        out[s:s + chunk] = np.rint(x)
    return out


@dataclasses.dataclass(frozen=True)
class TrainAugment:
    """Training augmentation settings (defaults: AdaTAD 160 px)."""

    short_side: int = 182
    out_size: int = 160
    area_range: tuple[float, float] = (0.08, 1.0)
    aspect_range: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    color_jitter: bool = True
    brightness: float = 0.5
    contrast: float = 0.5
    saturation: float = 0.5
    hue: float = 0.1


def train_augment(frames: np.ndarray, rng: np.random.Generator, cfg: TrainAugment = TrainAugment()) -> np.ndarray:
    """Short-side resize (skipped if already there), one random resized crop, flip, colour jitter."""
    _check_clip(frames)
    if min(frames.shape[1:3]) != cfg.short_side:
        frames = resize_short_side(frames, cfg.short_side)
    box = random_resized_crop_box(frames.shape[1], frames.shape[2], rng, area_range=cfg.area_range,
                                  aspect_range=cfg.aspect_range)
    frames = resize(frames, (cfg.out_size, cfg.out_size), box=box)
    if rng.uniform() < cfg.flip_prob:
        frames = hflip(frames)
    if cfg.color_jitter:
        draw = draw_color_jitter(rng, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
        frames = apply_color_jitter(frames, draw)
    return np.ascontiguousarray(frames)


def eval_augment(frames: np.ndarray, size: int = 160) -> np.ndarray:
    """Short side `size` (skipped if already there), then the centred size x size crop."""
    _check_clip(frames)
    if min(frames.shape[1:3]) != size:
        frames = resize_short_side(frames, size)
    return np.ascontiguousarray(center_crop(frames, size))
