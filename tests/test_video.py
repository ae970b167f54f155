import logging

import numpy as np
import pytest

from tadjax.data import synthetic, video
from tadjax.data.synthetic import SyntheticConfig

NUM_FRAMES, FPS, H, W = 20, 12, 32, 48


@pytest.fixture(scope="module")
def gray_ramp(tmp_path_factory):
    """An mp4 whose frame i is uniformly gray at level 10 * i + 20."""
    path = tmp_path_factory.mktemp("video") / "ramp.mp4"
    frames = np.stack([np.full((H, W, 3), 10 * i + 20, np.uint8) for i in range(NUM_FRAMES)])
    import fractions

    import av
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fractions.Fraction(FPS))
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.options = {"crf": "10", "x264-params": "bframes=0"}
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    return path


def level(frames):
    return np.round((frames.reshape(len(frames), -1).mean(1) - 20) / 10).astype(int)


def test_video_info(gray_ramp):
    info = video.video_info(gray_ramp)
    assert info == video.VideoInfo(num_frames=NUM_FRAMES, fps=FPS, height=H, width=W)
    assert info.duration == pytest.approx(NUM_FRAMES / FPS)
    assert video.video_info(gray_ramp.read_bytes()) == info


def test_read_frames_order_repeats_and_sizes(gray_ramp):
    frames = video.read_frames(gray_ramp, [5, 3, 5, 19, 0])
    assert frames.shape == (5, H, W, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(level(frames), [5, 3, 5, 19, 0])
    # Short side 16 -> 16 x 24: a width where decord's scaler fails, so Pillow resizes.
    small = video.read_frames(gray_ramp, [2, 7], size=16)
    assert small.shape == (2, 16, 24, 3)
    np.testing.assert_array_equal(level(small), [2, 7])
    assert video.read_frames(gray_ramp, [2], size=(20, 40)).shape == (1, 20, 40, 3)  # decord scales
    assert video.read_frames(gray_ramp, [2], size=(10, 20)).shape == (1, 10, 20, 3)
    from_bytes = video.read_frames(gray_ramp.read_bytes(), [5, 3, 5])
    np.testing.assert_array_equal(from_bytes, frames[:3])
    assert video.read_frames(gray_ramp, []).shape == (0, H, W, 3)


def test_output_size():
    assert video.output_size(240, 320, 160) == (160, 213)
    assert video.output_size(320, 240, 160) == (213, 160)
    assert video.output_size(100, 100, 50) == (50, 50)
    assert video.output_size(100, 100, (30, 40)) == (30, 40)
    assert video.output_size(100, 100, None) == (100, 100)


def test_out_of_range_index_names_file(gray_ramp):
    with pytest.raises(video.VideoError, match="ramp.mp4.*outside"):
        video.read_frames(gray_ramp, [0, NUM_FRAMES])


def test_missing_and_corrupt_videos(tmp_path, gray_ramp, caplog):
    missing = tmp_path / "missing.mp4"
    with pytest.raises(video.VideoError, match="missing.mp4: file not found"):
        video.video_info(missing)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video" * 100)
    truncated = tmp_path / "truncated.mp4"
    data = gray_ramp.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    for bad in (garbage, truncated):
        with pytest.raises(video.VideoError, match=bad.name):
            video.read_frames(bad, [0])
        with pytest.raises(video.VideoError, match=bad.name):
            video.probe_video(bad)
    with pytest.raises(video.VideoError, match="<10 bytes>"):
        video.video_info(b"0123456789")
    with caplog.at_level(logging.WARNING, logger="tadjax.data.video"):
        assert video.read_frames(garbage, [0], on_error="skip") is None
        assert video.video_info(missing, on_error="skip") is None
    assert "garbage.mp4" in caplog.text and "missing.mp4" in caplog.text
    with pytest.raises(ValueError, match="on_error"):
        video.video_info(gray_ramp, on_error="ignore")


def test_find_video(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"")
    (tmp_path / "v_b.mp4").write_bytes(b"")
    (tmp_path / "c.mkv").write_bytes(b"")
    (tmp_path / "custom.webm").write_bytes(b"")
    assert video.find_video(tmp_path, "a") == tmp_path / "a.mp4"
    assert video.find_video(tmp_path, "b") == tmp_path / "v_b.mp4"
    assert video.find_video(tmp_path, "v_b") == tmp_path / "v_b.mp4"
    assert video.find_video(tmp_path, "c") == tmp_path / "c.mkv"
    assert video.find_video(tmp_path, "zzz", filename="custom.webm") == tmp_path / "custom.webm"
    with pytest.raises(FileNotFoundError, match=r"video d: no file in .*tried d\.mp4, d\.mkv.*v_d\.mp4"):
        video.find_video(tmp_path, "d")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        video.find_video(tmp_path / "nope", "a")


def test_synthetic_video_roundtrip(tmp_path):
    """encode_video + read_frames: decoded frames match the rendered ones up to compression."""
    cfg = SyntheticConfig(num_train=1, num_val=0, video_seconds=(2.0, 2.0), crf=0)
    plan = synthetic.plans(0, cfg)[0]
    rendered = np.concatenate(list(synthetic.render_video(plan, cfg)))
    path = tmp_path / "v.mp4"
    synthetic.encode_video(path, [rendered], plan.fps, cfg.size, cfg)
    info = video.video_info(path)
    assert (info.num_frames, info.fps, info.height, info.width) == (plan.num_frames, plan.fps, 64, 64)
    decoded = video.read_frames(path, np.arange(plan.num_frames))
    # crf 0 is lossless in YUV: luma survives up to rounding; chroma is subsampled 2x2 (4:2:0).
    gray = np.array([0.299, 0.587, 0.114])
    assert np.abs(decoded @ gray - rendered @ gray).mean() < 1.5


def test_decode_throughput_runs(gray_ramp):
    from tadjax.tools.bench_loader import decode_throughput

    r = decode_throughput([gray_ramp, gray_ramp], size=32, frames=4, snippet_stride=2)
    assert r["frames"] == 8 and r["frames_per_second"] > 0
    assert r["seconds"] == r["decode_seconds"] + r["augment_seconds"]
