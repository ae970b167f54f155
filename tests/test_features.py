"""Feature export: rows on the config's snippet grid, equal to the detector's own features of the
evaluation windows (window mode, stitched) and of the resized video (resize mode)."""
import json

import av
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, load_config_file
from tadjax.data import sampling, transforms
from tadjax.data import video as video_lib
from tadjax.models import detector as detector_lib
from tadjax.tools import export_features


def write_video(path, num_frames, fps=10, size=(40, 56)):
    h, w = size
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.height, stream.width, stream.pix_fmt = h, w, "yuv420p"
        for t in range(num_frames):
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def tiny_config(**data):
    c = load_config_file(REPO / "configs" / "demo.py", "quick")
    c.data.update(dict(window=16, snippet_stride=2, img_size=32, eval_short_side=32, **data))
    c.model.backbone.update(dict(depth=1, embed_dim=32, num_heads=2, mlp_dim=64))
    c.model.head.channels = 32
    c.eval.batch_size = 3
    return c


def backbone_params(config):
    model = detector_lib.build_detector(config)
    x = jnp.zeros((1, 16, 32, 32, 3), jnp.float32)
    shapes = jax.eval_shape(model.backbone.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(1)
    return model, jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.2, jnp.float32), shapes)


def direct(model, params, path, indices, num_frames_hw):
    frames = video_lib.read_frames(str(path), indices, size=32)
    frames = transforms.eval_augment(frames, 32)
    return np.asarray(model.apply({"params": {"backbone": params}}, jnp.asarray(frames[None]),
                                  train=False, method=type(model).features))[0]


def test_window_mode_rows_follow_the_snippet_grid(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, num_frames=99)  # 50 positions at stride 2: windows at 0, 16, 32, 34
    config = tiny_config()
    model, params = backbone_params(config)
    meta = export_features.export_features(config, {"backbone": params}, [path], str(tmp_path / "out"),
                                           progress=False)
    feats = np.load(tmp_path / "out" / "clip.npy")
    assert feats.shape == (50, 32) and meta["videos"]["clip"]["num_positions"] == 50
    assert (meta["snippet_stride"], meta["offset_frames"], meta["mode"]) == (2, 0, "window")
    assert json.loads((tmp_path / "out" / "features.json").read_text()) == meta
    for start in (0, 16, 34):  # the last (right-aligned) window wins where it overlaps
        idx = sampling.window_frame_indices(99, start, 16, snippet_stride=2, valid=16)
        np.testing.assert_allclose(feats[start:start + 16], direct(model, params, path, idx, None),
                                   atol=1e-5, rtol=0)


def test_resize_mode_has_resize_length_rows(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, num_frames=45)
    config = tiny_config(mode="resize", resize_length=8, scale_factor=2)
    model, params = backbone_params(config)
    export_features.export_features(config, {"backbone": params}, [path], str(tmp_path / "out"),
                                    progress=False)
    feats = np.load(tmp_path / "out" / "clip.npy")
    assert feats.shape == (8, 32)
    idx = sampling.resize_frame_indices(45, 16)
    np.testing.assert_allclose(feats, direct(model, params, path, idx, None), atol=1e-5, rtol=0)
