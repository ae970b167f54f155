"""Video files: metadata, frames by index, finding a video's file. The only module that imports decord.

Frames come back as RGB uint8 arrays `[T, H, W, 3]` (channels-last). Decoding follows the reference
pipeline (decord `VideoReader(...).get_batch(indices)`, accurate seeking); resizing at decode time is
done by decord's own scaler (ffmpeg's), so a 160-px clip never exists at full resolution in Python
memory, with Pillow as the fallback where decord's scaler fails.

A video that is missing, truncated or otherwise unreadable raises `VideoError`, whose message names
the file. Callers that would rather go on without it pass `on_error="skip"`: the function then logs
a warning naming the file and the reason, and returns None.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import pathlib
from typing import Sequence, Union

import numpy as np

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv")

Source = Union[str, os.PathLike, bytes]
# `size` for read_frames: None (native), an int (short side, aspect kept) or (height, width).
Size = Union[None, int, Sequence[int]]


class VideoError(Exception):
    """A video file is missing, unreadable or cannot deliver the requested frames."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"video {name}: {reason}")
        self.name = name
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float  # decord's average frame rate
    height: int
    width: int

    @property
    def duration(self) -> float:
        """Seconds covered by the frames: num_frames / fps."""
        return self.num_frames / self.fps if self.fps > 0 else float("nan")


def _name(source: Source, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return os.fspath(source)


def _open(source: Source, name: str, width: int = -1, height: int = -1):
    import decord  # the one place decord is imported

    if isinstance(source, (bytes, bytearray, memoryview)):
        uri = io.BytesIO(bytes(source))
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise VideoError(name, "file not found")
        uri = path
    try:
        return decord.VideoReader(uri, num_threads=1, width=width, height=height)
    except Exception as e:  # decord raises DECORDError/RuntimeError with an ffmpeg message
        raise VideoError(name, f"cannot open ({type(e).__name__}: {str(e).strip().splitlines()[0]})") from e


def _fail(error: VideoError, on_error: str):
    if on_error == "skip":
        log.warning("skipping %s", error)
        return None
    raise error


def _check_on_error(on_error: str):
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def video_info(source: Source, *, name: str | None = None, on_error: str = "raise") -> VideoInfo | None:
    """Frame count, average fps and frame size of a video file (path or the file's bytes)."""
    _check_on_error(on_error)
    name = _name(source, name)
    try:
        reader = _open(source, name)
        num_frames = len(reader)
        if num_frames <= 0:
            raise VideoError(name, "no frames")
        height, width = reader[0].shape[:2]
        return VideoInfo(num_frames=num_frames, fps=float(reader.get_avg_fps()), height=int(height), width=int(width))
    except VideoError as e:
        return _fail(e, on_error)
    except Exception as e:
        return _fail(VideoError(name, f"cannot decode ({type(e).__name__}: {e})"), on_error)


def output_size(height: int, width: int, size: Size) -> tuple[int, int]:
    """The (height, width) that `read_frames(..., size=size)` returns for a video of height x width.

    An int is the target short side; the long side keeps the aspect ratio, rounded to the nearest
    pixel (the larger side of a square stays equal to the short side).
    """
    if size is None:
        return height, width
    if isinstance(size, (int, np.integer)):
        short = int(size)
        if short <= 0:
            raise ValueError(f"short side must be positive, got {short}")
        if height <= width:
            return short, max(short, int(round(width * short / height)))
        return max(short, int(round(height * short / width))), short
    h, w = (int(s) for s in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {size}")
    return h, w


def read_frames(
    source: Source,
    indices: Sequence[int] | np.ndarray,
    size: Size = None,
    *,
    name: str | None = None,
    on_error: str = "raise",
) -> np.ndarray | None:
    """Decodes the frames at `indices` (any order, repeats allowed) as uint8 `[T, H, W, 3]` RGB.

    `size`: None keeps the native size, an int resizes the short side to it (aspect kept) and
    (h, w) resizes to exactly that. Indices outside [0, num_frames) are an error (edge padding is
    the sampler's job, see `tadjax.data.sampling`).
    """
    _check_on_error(on_error)
    name = _name(source, name)
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    try:
        reader = _open(source, name)
        n = len(reader)
        if indices.size and (indices.min() < 0 or indices.max() >= n):
            raise VideoError(name, f"frame indices {indices.min()}..{indices.max()} outside [0, {n})")
        h0, w0 = reader[0].shape[:2]
        height, width = output_size(h0, w0, size)
        if indices.size == 0:
            return np.zeros((0, height, width, 3), np.uint8)
        # Decode each distinct frame once, in increasing order (cheap seeking), then gather.
        unique, inverse = np.unique(indices, return_inverse=True)
        frames = None
        if (height, width) != (h0, w0):
            frames = _decode_scaled(source, name, unique, height, width)
        if frames is None:
            frames = _decode_native(reader, source, name, unique, h0, w0)
            if (height, width) != (h0, w0):
                from tadjax.data.transforms import resize
                frames = resize(frames, (height, width))
        if frames.shape[0] != unique.size:
            raise VideoError(name, f"decoded {frames.shape[0]} of {unique.size} frames")
        return np.ascontiguousarray(frames[inverse])
    except VideoError as e:
        return _fail(e, on_error)
    except Exception as e:
        return _fail(VideoError(name, f"cannot decode frames ({type(e).__name__}: {e})"), on_error)


def _decode_native(reader, source, name, unique, height, width):
    try:
        frames = reader.get_batch(unique.tolist()).asnumpy()
        if frames.shape[1:] == (height, width, 3):
            return frames
    except Exception:  # decord 0.6.0 fails or returns 4-channel frames at some sizes:
        pass           # fall back to PyAV, which raises a VideoError naming the file if it fails too
    return _decode_sequential(source, name, unique)


def _decode_sequential(source, name, unique):
    """Fallback for frame sizes decord cannot copy out: PyAV, decoding from the start."""
    import av

    uri = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else os.fspath(source)
    wanted = {int(i): k for k, i in enumerate(unique)}
    out = [None] * len(unique)
    with av.open(uri) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                out[wanted[i]] = frame.to_ndarray(format="rgb24")
            if i >= unique[-1]:
                break
    if any(f is None for f in out):
        raise VideoError(name, f"PyAV decoded fewer frames than the {unique[-1] + 1} needed")
    return np.stack(out)


def _decode_scaled(source, name, unique, height, width):
    """Frames resized by decord's scaler, or None where it misbehaves.

    decord 0.6.0 returns 4-channel frames or fails to copy them out for some frame widths (8, 12,
    16, 24, 48 and 72 px seen, at native size too); such reads fall back to native decoding (PyAV
    if decord fails there too) + Pillow.
    """
    reader = _open(source, name, width=width, height=height)
    if reader[0].shape != (height, width, 3):
        return None
    try:
        frames = reader.get_batch(unique.tolist()).asnumpy()
    except Exception:
        return None
    return frames if frames.shape[1:] == (height, width, 3) else None


def probe_video(source: Source, *, name: str | None = None) -> VideoInfo:
    """`video_info` plus decoding the first and last frames: catches most truncated files."""
    info = video_info(source, name=name)
    read_frames(source, [0, info.num_frames - 1], name=name)
    return info


def candidate_paths(video_dir: str | os.PathLike, video_id: str, filename: str | None = None) -> list[pathlib.Path]:
    """The paths `find_video` tries, in order."""
    root = pathlib.Path(video_dir)
    tried = []
    if filename:
        tried.append(root / filename)
    stems = [video_id] if video_id.startswith("v_") else [video_id, "v_" + video_id]
    for stem in stems:
        for ext in VIDEO_EXTENSIONS:
            tried.append(root / (stem + ext))
    return tried


def find_video(video_dir: str | os.PathLike, video_id: str, filename: str | None = None) -> pathlib.Path:
    """The file of `video_id` in `video_dir`: `filename` if given, else `<id>.<ext>` or `v_<id>.<ext>`.

    ActivityNet files are named `v_<youtube id>.mp4`; THUMOS files `<id>.mp4`. Raises
    FileNotFoundError listing every path tried.
    """
    tried = candidate_paths(video_dir, video_id, filename)
    for path in tried:
        if path.is_file():
            return path
    root = pathlib.Path(video_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"video {video_id}: video directory {root} does not exist")
    names = ", ".join(p.name for p in tried)
    raise FileNotFoundError(f"video {video_id}: no file in {root}; tried {names}")
