"""The synthetic benchmark: real mp4 videos of small objects whose *motion* is the action class.

Each video shows a static textured background with per-frame sensor noise and a slow illumination
drift, and on it a few identical objects (a yellow disk with a dark rim, ~12 px on 64-px frames):

* **Actors.** An action instance is one object that appears at the first frame of the action,
  moves with the class's motion pattern and vanishes after its last frame, so boundaries are
  sharp. Classes differ only in the motion: oscillation along one of four axes (horizontal,
  vertical, the two diagonals) or a circle. Amplitude, period, phase and centre are random.
* **Distractors.** The same objects, static or drifting in a random walk, which also appear and
  disappear at random times: neither "an object is there" nor "an object just appeared" tells
  that an action is going on.

The frame is a torus: positions wrap around the edges (an object crossing the right edge comes
back on the left). With the motion's centre uniform on the torus, every object's position at any
frame is uniform over the frame whatever its class, so a single frame carries no information about
the class (by construction; `tests/test_synthetic.py` also checks it empirically). Two frames do:
the displacement's direction tells the axis.

Actions last from under a second to tens of seconds (log-uniform), several per video without
overlap; videos last tens of seconds at 10, 12 or 15 fps, so a detector needs several windows per
video. Everything is drawn from `np.random.default_rng([seed, subset, index])`: the same seed and
parameters give byte-identical JSON and identical decoded frames.

`generate(out_dir, ...)` writes `out_dir/annotations.json` (ActivityNet-style, subsets `training`
and `validation`, with fps, frame count and file name per video) and `out_dir/videos/<id>.mp4`
(H.264, yuv420p, fixed GOP, no B-frames). `default_dataset()` generates the default set once into
a cache folder and returns it.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import fractions
import hashlib
import json
import os
import pathlib
import shutil
import tempfile

import numpy as np

from tadjax.data import annotations as annotations_lib

VERSION = 1
CLASSES = ("horizontal", "vertical", "diagonal", "antidiagonal", "circle")
SUBSETS = ("training", "validation")

OBJECT_FILL = np.array([250, 215, 40], np.float32)
OBJECT_RIM = np.array([25, 20, 60], np.float32)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Generation parameters; lengths in seconds, sizes in pixels for `size`-px frames."""

    num_train: int = 48
    num_val: int = 20
    size: int = 64
    fps_choices: tuple[int, ...] = (10, 12, 15)
    video_seconds: tuple[float, float] = (30.0, 90.0)
    action_seconds: tuple[float, float] = (0.6, 25.0)  # log-uniform
    gap_seconds: tuple[float, float] = (1.0, 8.0)  # uniform, between actions and at the start
    object_radius: float = 6.0
    amplitude: tuple[float, float] = (7.0, 12.0)  # px, path half-length (circle: radius)
    period_seconds: tuple[float, float] = (1.2, 2.4)
    max_distractors: int = 3  # each video has 1..max_distractors distractor tracks (0: none)
    distractor_on_seconds: tuple[float, float] = (2.0, 20.0)
    distractor_off_seconds: tuple[float, float] = (1.0, 12.0)
    walk_speed: float = 6.0  # px/s, typical speed of random-walk distractors
    noise_std: float = 5.0
    texture_contrast: float = 40.0
    gop_seconds: float = 2.0
    crf: int = 20

    def params(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


# ---------------------------------------------------------------------------------------------
# Motion


def action_offsets(label: int, t: np.ndarray, amplitude: float, period: float, phase: float) -> np.ndarray:
    """Offsets (dx, dy) in px from the motion centre at times `t` (s) for class `label`: float [T, 2]."""
    a = 2 * np.pi * np.asarray(t, np.float64) / period + phase
    s = amplitude * np.sin(a)
    if label == 0:  # horizontal
        return np.stack([s, np.zeros_like(s)], -1)
    if label == 1:  # vertical
        return np.stack([np.zeros_like(s), s], -1)
    if label == 2:  # diagonal: down-right / up-left (image y grows downwards)
        return np.stack([s, s], -1) / np.sqrt(2)
    if label == 3:  # antidiagonal: up-right / down-left
        return np.stack([s, -s], -1) / np.sqrt(2)
    if label == 4:  # circle
        return amplitude * np.stack([np.cos(a), np.sin(a)], -1)
    raise ValueError(f"unknown synthetic class {label}")


def action_track(label: int, num_frames: int, fps: float, size: int, cfg: SyntheticConfig, rng: np.random.Generator):
    """Positions (x, y) on the torus, float [num_frames, 2], of one action instance."""
    centre = rng.uniform(0, size, 2)
    amplitude = rng.uniform(*cfg.amplitude)
    period = rng.uniform(*cfg.period_seconds)
    phase = rng.uniform(0, 2 * np.pi)
    t = np.arange(num_frames) / fps
    return np.mod(centre + action_offsets(label, t, amplitude, period, phase), size)


def _walk_track(num_frames, fps, size, cfg, rng, static):
    start = rng.uniform(0, size, 2)
    if static:
        return np.broadcast_to(start, (num_frames, 2)).copy()
    # Velocity: an Ornstein-Uhlenbeck process (correlation time ~1 s) with typical speed walk_speed.
    keep = np.exp(-1.0 / fps)
    kick = cfg.walk_speed * np.sqrt(1 - keep**2)
    v = np.empty((num_frames, 2))
    v[0] = rng.normal(0, cfg.walk_speed, 2)
    kicks = rng.normal(0, kick, (num_frames, 2))
    for i in range(1, num_frames):
        v[i] = keep * v[i - 1] + kicks[i]
    return np.mod(start + np.cumsum(v / fps, axis=0) - v[0] / fps, size)


# ---------------------------------------------------------------------------------------------
# Rendering


def render_background(size: int, cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """A static texture: random gratings plus smooth colour blobs around a muted base colour; float [S, S, 3]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    base = rng.uniform(70, 150, 3)
    tex = np.zeros((size, size, 3))
    for _ in range(3):
        freq = rng.uniform(3, 12)
        angle = rng.uniform(0, np.pi)
        wave = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
        tex += wave[..., None] * rng.uniform(0.3, 1.0, 3)
    coarse = rng.normal(0, 1, (9, 9, 3))
    # Bilinear upsampling of a coarse grid: smooth blobs.
    grid = np.linspace(0, 8, size)
    i0 = np.minimum(grid.astype(int), 7)
    f = (grid - i0)[:, None]
    rows = coarse[i0] * (1 - f[..., None]) + coarse[i0 + 1] * f[..., None]
    blobs = rows[:, i0] * (1 - f[None, :, :]) + rows[:, i0 + 1] * f[None, :, :]
    tex = tex / 3 + blobs
    tex = tex / (np.abs(tex).max() + 1e-9) + rng.normal(0, 0.25, (size, size, 3))  # plus fine grain
    return base + cfg.texture_contrast * tex


def render_objects(frames: np.ndarray, positions: np.ndarray, radius: float) -> np.ndarray:
    """Draws identical disks (fill + rim, antialiased, wrapping around the edges) in place.

    frames: float [T, H, W, 3]; positions: float [T, K, 2] as (x, y) in px, NaN where an object is
    absent. Overlapping objects merge (the union is drawn).
    """
    t, h, w, _ = frames.shape
    if positions.shape[1] == 0:
        return frames
    positions = np.where(np.isnan(positions), np.float32(1e6), positions).astype(np.float32)
    px = positions[..., 0][..., None]  # [T, K, 1]
    py = positions[..., 1][..., None]
    # Pixel centres are at integer coordinates + 0.5; distances wrap around (torus). Absent
    # objects sit far away (1e6 is a multiple of 64, so they must not wrap: clip afterwards).
    dx = np.mod(np.arange(w, dtype=np.float32) + 0.5 - px + w / 2, w) - w / 2  # [T, K, W]
    dy = np.mod(np.arange(h, dtype=np.float32) + 0.5 - py + h / 2, h) - h / 2  # [T, K, H]
    absent = (positions[..., 0] >= 1e5)[..., None, None]
    dist2 = np.where(absent, np.float32(np.inf), dy[..., :, None] ** 2 + dx[..., None, :] ** 2)
    dist = np.sqrt(dist2.min(axis=1))  # [T, H, W]
    outer = np.clip(radius + 0.5 - dist, 0, 1)[..., None]
    inner = np.clip(radius - 1.5 + 0.5 - dist, 0, 1)[..., None]
    frames *= 1 - outer
    frames += outer * OBJECT_RIM
    frames *= 1 - inner
    frames += inner * OBJECT_FILL
    return frames


# ---------------------------------------------------------------------------------------------
# One video


@dataclasses.dataclass
class VideoPlan:
    video_id: str
    subset: str
    fps: int
    num_frames: int
    actions: list  # (start frame, end frame exclusive, label)
    seed: tuple


def _plan_actions(num_frames, fps, cfg, rng):
    actions = []
    f = 0
    lo, hi = np.log(cfg.action_seconds[0]), np.log(cfg.action_seconds[1])
    while True:
        f += int(round(rng.uniform(*cfg.gap_seconds) * fps))
        length = max(3, int(round(np.exp(rng.uniform(lo, hi)) * fps)))
        if f + length > num_frames - int(cfg.gap_seconds[0] * fps):
            break
        actions.append((f, f + length, int(rng.integers(len(CLASSES)))))
        f += length
    return actions


def plan_video(subset_index: int, index: int, seed: int, cfg: SyntheticConfig) -> VideoPlan:
    rng = np.random.default_rng([seed, subset_index, index, 0])
    fps = int(cfg.fps_choices[rng.integers(len(cfg.fps_choices))])
    num_frames = int(round(rng.uniform(*cfg.video_seconds) * fps))
    actions = _plan_actions(num_frames, fps, cfg, rng)
    prefix = "train" if subset_index == 0 else "val"
    return VideoPlan(video_id=f"syn_{prefix}_{index:04d}", subset=SUBSETS[subset_index], fps=fps,
                     num_frames=num_frames, actions=actions, seed=(seed, subset_index, index))


def render_video(plan: VideoPlan, cfg: SyntheticConfig):
    """Yields the video's frames as uint8 [T, S, S, 3] chunks."""
    rng = np.random.default_rng(list(plan.seed) + [1])
    size, n, fps = cfg.size, plan.num_frames, plan.fps
    background = render_background(size, cfg, rng)
    noise_bank = rng.normal(0, cfg.noise_std, (16, size, size, 3)).astype(np.float32)
    noise_pick = rng.integers(0, len(noise_bank), n)
    drift_period = rng.uniform(10, 30)
    illumination = 1 + 0.06 * np.sin(2 * np.pi * np.arange(n) / fps / drift_period + rng.uniform(0, 2 * np.pi))

    # Object tracks: one column per actor / distractor track, NaN when absent.
    tracks = []
    for start, end, label in plan.actions:
        col = np.full((n, 2), np.nan)
        col[start:end] = action_track(label, end - start, fps, size, cfg, rng)
        tracks.append(col)
    for _ in range(int(rng.integers(min(1, cfg.max_distractors), cfg.max_distractors + 1))):
        col = np.full((n, 2), np.nan)
        f = int(rng.uniform(0, cfg.distractor_off_seconds[1]) * fps)
        while f < n:
            on = int(rng.uniform(*cfg.distractor_on_seconds) * fps) + 1
            seg = min(on, n - f)
            col[f:f + seg] = _walk_track(seg, fps, size, cfg, rng, static=bool(rng.uniform() < 0.4))
            f += on + int(rng.uniform(*cfg.distractor_off_seconds) * fps) + 1
        tracks.append(col)
    positions = np.stack(tracks, axis=1)  # [T, K, 2]

    chunk = 64
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        frames = background[None].astype(np.float32) * illumination[s:e, None, None, None].astype(np.float32)
        frames = frames + noise_bank[noise_pick[s:e]]
        active = ~np.isnan(positions[s:e, :, 0]).all(axis=0)
        render_objects(frames, positions[s:e][:, active], cfg.object_radius)
        yield np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def encode_video(path: str | os.PathLike, chunks, fps: int, size: int, cfg: SyntheticConfig):
    """Writes frames to an H.264 mp4 (yuv420p, GOP of gop_seconds, no B-frames, one thread)."""
    import av

    gop = max(1, int(round(cfg.gop_seconds * fps)))
    with av.open(os.fspath(path), "w") as container:
        stream = container.add_stream("libx264", rate=fractions.Fraction(fps))
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1  # deterministic and cheap for tiny frames
        stream.options = {"crf": str(cfg.crf), "preset": "veryfast",
                          "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0"}
        for chunk in chunks:
            for frame in chunk:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _write_one(plan: VideoPlan, cfg: SyntheticConfig, video_dir: str) -> str:
    path = os.path.join(video_dir, plan.video_id + ".mp4")
    encode_video(path, render_video(plan, cfg), plan.fps, cfg.size, cfg)
    return path


# ---------------------------------------------------------------------------------------------
# Pre-training clips

# Token classes of `pretraining_clip`: nothing, a distractor, or the class of an actor.
PRETRAIN_CLASSES = ("background", "distractor") + CLASSES


def _disk_pixels(positions: np.ndarray, radius: float, size: int) -> np.ndarray:
    """bool [T, S, S]: pixels whose centre lies within `radius` of the object (torus distance);
    positions float [T, 2] as (x, y), NaN where the object is absent."""
    present = ~np.isnan(positions[:, 0])
    p = np.where(present[:, None], positions, 0.0)
    centres = np.arange(size) + 0.5
    dx = np.mod(centres[None] - p[:, :1] + size / 2, size) - size / 2  # [T, S]
    dy = np.mod(centres[None] - p[:, 1:] + size / 2, size) - size / 2
    return ((dy[:, :, None] ** 2 + dx[:, None, :] ** 2) <= radius**2) & present[:, None, None]


def pretraining_clip(rng: np.random.Generator, cfg: SyntheticConfig = SyntheticConfig(), *,
                     frames: int = 16, snippet_stride: int = 2, patch: int = 16, tubelet: int = 2,
                     max_objects: int = 3, min_pixels: int = 20):
    """One short clip of the synthetic world with a motion label for every backbone token.

    The stand-in, for this world, of the large labelled video corpora real backbones are
    pre-trained on (tadjax.tools.pretrain_synthetic): `frames` frames `snippet_stride` raw frames
    apart (10, 12 or 15 fps as in the data set), a background as in the videos, 1..max_objects
    objects, each an actor of a random class (probability 0.6) or a static / random-walk
    distractor, some appearing or vanishing inside the clip; object sizes vary by 0.9-1.5x (the
    data set's random crops zoom in up to ~1.45x). Returns (frames uint8 [frames, S, S, 3],
    labels int32 [frames // tubelet, S // patch, S // patch]): the index in PRETRAIN_CLASSES of
    the object covering most pixels of the token's patch over its `tubelet` frames (at least
    `min_pixels`), else 0. No mp4 round trip: clips are rendered in memory.
    """
    size = cfg.size
    if frames % tubelet or size % patch:
        raise ValueError(f"pretraining_clip: frames={frames} must be a multiple of tubelet={tubelet} "
                         f"and size={size} of patch={patch}")
    fps = float(rng.choice(cfg.fps_choices)) / snippet_stride
    background = render_background(size, cfg, rng)
    out = (background[None] * (1 + 0.06 * rng.uniform(-1, 1))
           + rng.normal(0, cfg.noise_std, (frames, size, size, 3))).astype(np.float32)
    radius = cfg.object_radius * rng.uniform(0.9, 1.5)
    zoom = radius / cfg.object_radius
    tracks, labels = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        if rng.uniform() < 0.6:
            label = int(rng.integers(len(CLASSES)))
            offsets = action_offsets(label, np.arange(frames) / fps, rng.uniform(*cfg.amplitude) * zoom,
                                     rng.uniform(*cfg.period_seconds), rng.uniform(0, 2 * np.pi))
            track = np.mod(rng.uniform(0, size, 2) + offsets, size)
            labels.append(2 + label)
        else:
            track = _walk_track(frames, fps, size, cfg, rng, static=bool(rng.uniform() < 0.4))
            labels.append(1)
        if rng.uniform() < 0.3:  # appears or vanishes inside the clip
            cut = int(rng.integers(1, frames))
            if rng.uniform() < 0.5:
                track[:cut] = np.nan
            else:
                track[cut:] = np.nan
        tracks.append(track)
    positions = np.stack(tracks, axis=1)
    render_objects(out, positions, radius)
    t, g = frames // tubelet, size // patch
    counts = np.zeros((len(PRETRAIN_CLASSES), t, g, g))
    counts[0] = min_pixels  # ties go to the background
    for k, label in enumerate(labels):
        pixels = _disk_pixels(positions[:, k], radius, size)
        counts[label] += pixels.reshape(t, tubelet, g, patch, g, patch).sum(axis=(1, 3, 5))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), counts.argmax(axis=0).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Data set


def plans(seed: int, cfg: SyntheticConfig) -> list[VideoPlan]:
    return ([plan_video(0, i, seed, cfg) for i in range(cfg.num_train)]
            + [plan_video(1, i, seed, cfg) for i in range(cfg.num_val)])


def annotation_set(video_plans: list[VideoPlan], source: str = "") -> annotations_lib.AnnotationSet:
    videos = {}
    for p in video_plans:
        segs = np.array([[s / p.fps, e / p.fps] for s, e, _ in p.actions], np.float64).reshape(-1, 2)
        labels = np.array([lab for _, _, lab in p.actions], np.int32)
        videos[p.video_id] = annotations_lib.VideoAnnotation(
            video_id=p.video_id, subset=p.subset, duration=p.num_frames / p.fps, fps=float(p.fps),
            num_frames=p.num_frames, segments=segs, labels=labels, filename=p.video_id + ".mp4")
    return annotations_lib.AnnotationSet(classes=list(CLASSES), videos=videos, source=source)


def generate(out_dir: str | os.PathLike, *, seed: int = 0, num_train: int | None = None, num_val: int | None = None,
             size: int | None = None, config: SyntheticConfig | None = None, workers: int = 1,
             **overrides) -> pathlib.Path:
    """Writes the data set to out_dir (annotations.json, videos/*.mp4); returns the JSON's path.

    `config` (default `SyntheticConfig()`) with the given fields replaced; other keyword arguments
    override further fields (e.g. `video_seconds=(5, 8)`). `workers` > 1 encodes videos in that
    many processes (same output).
    """
    fields = {k: v for k, v in dict(num_train=num_train, num_val=num_val, size=size).items() if v is not None}
    cfg = dataclasses.replace(config or SyntheticConfig(), **fields, **overrides)
    out = pathlib.Path(out_dir)
    video_dir = out / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    video_plans = plans(seed, cfg)
    if workers > 1:
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_one, video_plans, [cfg] * len(video_plans), [str(video_dir)] * len(video_plans)))
    else:
        for p in video_plans:
            _write_one(p, cfg, str(video_dir))
    path = out / "annotations.json"
    annotations_lib.write_annotations(path, annotation_set(video_plans, str(path)),
                                      version=f"tadjax-synthetic-{VERSION}")
    return path


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("TADJAX_CACHE") or pathlib.Path.home() / ".cache" / "tadjax")


def dataset_key(seed: int, cfg: SyntheticConfig) -> str:
    blob = json.dumps({"seed": seed, **cfg.params()}, sort_keys=True).encode()
    return f"synthetic-{VERSION}-{hashlib.sha256(blob).hexdigest()[:12]}"


def default_dataset(cache_dir: str | os.PathLike | None = None, *, seed: int = 0, workers: int | None = None,
                    **overrides) -> tuple[pathlib.Path, pathlib.Path]:
    """(annotations_path, video_dir) of the synthetic data set, generated once and cached.

    The cache folder is `<cache_dir or $TADJAX_CACHE or ~/.cache/tadjax>/synthetic-<version>-<hash>`,
    the hash covering the seed and every parameter. It is written to a temporary folder beside it
    and renamed into place, so an interrupted run leaves no partial cache.
    """
    cfg = SyntheticConfig(**overrides)
    root = pathlib.Path(cache_dir) if cache_dir is not None else cache_root()
    final = root / dataset_key(seed, cfg)
    if not (final / "annotations.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=root))
        try:
            if workers is None:
                workers = min(4, os.cpu_count() or 1)
            generate(tmp, seed=seed, config=cfg, workers=workers)
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "annotations.json").is_file():  # not a concurrent winner: a real error
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final / "annotations.json", final / "videos"
