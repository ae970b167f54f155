import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def thumos_json():
    path = SHARED / "data" / "thumos14.json"
    if not path.exists():
        pytest.fail(f"{path} is missing: tests expect ../shared beside the checkout")
    return path


def load_config_file(path, arg=None):
    """get_config(arg) of a config file by path (as tadjax.main does)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"config_{abs(hash(str(path)))}", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory):
    """A small synthetic dataset (real mp4 files): 8 training and 4 validation videos."""
    from tadjax.data import synthetic
    out = tmp_path_factory.mktemp("tiny_synthetic")
    ann = synthetic.generate(out, seed=3, num_train=8, num_val=4, size=64,
                             video_seconds=(16.0, 28.0), action_seconds=(1.0, 8.0))
    return str(ann), str(out / "videos")


def tiny_demo_config(tiny_synthetic, tmp_path, **overrides):
    """The demo config on the tiny dataset, with a smaller window and schedule."""
    ann, videos = tiny_synthetic
    c = load_config_file(REPO / "configs" / "demo.py", "quick")
    c.data.annotations = ann
    c.data.videos = videos
    c.data.name = "tiny"
    c.data.tfds_dir = str(tmp_path / "tfds")
    c.data.window = 64
    c.data.batch_size = 2
    c.eval.batch_size = 4
    c.train.epochs = 4
    c.train.end_epoch = 4
    c.train.warmup_epochs = 1
    c.train.eval_start_epoch = 100
    c.train.checkpoint_every_steps = 1000
    for key, value in overrides.items():
        node = c
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return c
