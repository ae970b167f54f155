"""`bench reference` runs both sides of the comparison on the demo's small backbone."""
import json
import os
import subprocess
import sys

import pytest

from tadjax.tools import bench_reference
from tadjax.tools.bench import load_config

REPO_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py")


def test_load_config_applies_overrides_given_from_python():
    """The overrides are read from load_config's arguments, not from the process's command line
    (pytest's here): applied, and a typo is an error."""
    config = load_config(REPO_CONFIG, ["--config.model.backbone.chunk_group=3",
                                       "--config.data.window=48"])
    assert config.model.backbone.chunk_group == 3 and config.data.window == 48
    assert load_config(REPO_CONFIG, []).model.backbone.chunk_group != 3
    with pytest.raises(AttributeError, match="chunk_grop"):
        load_config(REPO_CONFIG, ["--config.model.backbone.chunk_grop=3"])


@pytest.mark.slow
def test_reference_tadjax_side_runs_and_reports():
    out = bench_reference.run_tadjax(load_config(REPO_CONFIG, []), 32, 1)
    assert out["step_seconds"] > 0 and len(out["step_seconds_all"]) == 1
    assert out["peak_rss_bytes"] >= out["peak_rss_bytes_steps"] > 0


@pytest.mark.slow
def test_reference_torch_side_runs_in_a_process_without_jax():
    """The PyTorch side's own process: its peak memory must not include JAX's (~190 MB)."""
    sizes = bench_reference.sizes(load_config(REPO_CONFIG, []))
    proc = subprocess.run(
        [sys.executable, "-m", "tadjax.tools.bench", "reference", "--config", REPO_CONFIG,
         "--frames", "32", "--steps", "1", "--side", "torch", "--sizes", json.dumps(sizes),
         "--json"], capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["jax_imported"] is False
    assert out["step_seconds"] > 0 and out["peak_rss_bytes"] >= out["peak_rss_bytes_steps"] > 0


@pytest.mark.slow
def test_reference_rounds_alternate_and_report_the_median_ratio():
    """--rounds 2: four processes (each side twice); the figures are the rounds' median ratio,
    each side's median step time and its largest peak."""
    proc = subprocess.run(
        [sys.executable, "-m", "tadjax.tools.bench", "reference", "--config", REPO_CONFIG,
         "--frames", "32", "--steps", "1", "--rounds", "2", "--json"],
        capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["rounds"] == 2 and len(out["time_ratios"]) == 2
    j, t = out["tadjax"], out["torch"]
    assert len(j["step_seconds_rounds"]) == len(t["step_seconds_rounds"]) == 2
    ratios = [a / b for a, b in zip(j["step_seconds_rounds"], t["step_seconds_rounds"])]
    assert out["time_ratios"] == pytest.approx(ratios)
    assert out["time_ratio"] == pytest.approx(sum(ratios) / 2)    # the median of two
    assert len(j["context_switches_per_step_rounds"]) == len(t["minor_faults_per_step_rounds"]) == 2
    assert all(c > 0 for c in j["cpu_seconds_per_step_rounds"] + t["cpu_seconds_per_step_rounds"])
    assert j["step_seconds"] == pytest.approx(sum(j["step_seconds_rounds"]) / 2)
    assert out["memory_ratio_steps"] == pytest.approx(
        j["peak_rss_bytes_steps"] / t["peak_rss_bytes_steps"])


@pytest.mark.slow
def test_bench_step_reports_what_its_memory_is_made_of():
    """`bench step` on the demo: the train state's bytes equal the parameters' counted from the
    tree (params + two AdamW moments and an EMA of the trainable ones), and the peak covers the
    process after imports plus the state."""
    import jax
    import numpy as np
    from tadjax.train.trainer import Run
    proc = subprocess.run(
        [sys.executable, "-m", "tadjax.tools.bench", "step", "--config", REPO_CONFIG,
         "--frames", "32", "--steps", "1", "--json"],
        capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    run = Run(load_config(REPO_CONFIG, []), None, with_data=False)  # parameters: any length
    sizes = [int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(run.abstract_params)]
    mask = jax.tree.leaves(run.mask)
    trainable = sum(s for s, m in zip(sizes, mask) if m)
    expected = sum(sizes) + 3 * trainable      # params, mu, nu, EMA
    assert abs(out["state_bytes"] - expected) < 1024, (out["state_bytes"], expected)
    assert out["compiled_temp_bytes"] > 0
    assert out["peak_rss_bytes"] >= out["rss_bytes_after_imports"] + out["state_bytes"]


def test_detector_sizes_describe_the_configs_head():
    """The PyTorch side builds its head from `detector_sizes`: the flax head of the detector the
    config builds (its init's paths and shapes) loads into it path for path, shape for shape."""
    pytest.importorskip("torch")
    import jax
    import numpy as np
    from tadjax.tools import torch_actionformer
    from tadjax.models import detector as detector_lib
    config = load_config(REPO_CONFIG, [])
    size = bench_reference.detector_sizes(config, 32)
    assert size["length"] == 32 and size["lr_head"] == config.train.param_groups[1]["lr"]
    model = detector_lib.build_detector(config)
    feats = jax.ShapeDtypeStruct((1, size["length"], size["dim"]), np.float32)
    mask = jax.ShapeDtypeStruct((1, size["length"]), np.bool_)
    shapes = jax.eval_shape(lambda k, f, m: model.head.init(k, f, m, train=False)["params"],
                            jax.random.key(0), feats, mask)
    head = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
    module = torch_actionformer.ActionFormer(in_channels=size["dim"], **size["head"])
    torch_actionformer.load_flax_params(module, head)   # raises on any path or shape mismatch
    assert sum(p.numel() for p in module.parameters()) == sum(
        x.size for x in jax.tree.leaves(head))
    assert size["label_smoothing"] == 0.0 and not size["head"]["use_abs_pe"]
    # The ActivityNet configs' extras reach the PyTorch side.
    anet = bench_reference.detector_sizes(load_config(
        REPO_CONFIG, ["--config.model.head.use_abs_pe=true", "--config.model.head.input_pdrop=0.2",
                      "--config.model.label_smoothing=0.1"]), 32)
    assert anet["label_smoothing"] == 0.1
    assert anet["head"]["use_abs_pe"] and anet["head"]["input_pdrop"] == 0.2
    assert anet["head"]["max_seq_len"] == anet["length"]


@pytest.mark.slow
def test_reference_detector_torch_side_runs_in_a_process_without_jax(tmp_path):
    """`--detector`: the PyTorch side trains the whole detector on the targets tadjax assigned to
    `bench step`'s batch, in a process that imports no JAX; its positives are those targets'."""
    import numpy as np
    config = load_config(REPO_CONFIG, [])
    size = bench_reference.detector_sizes(config, 32)
    targets = str(tmp_path / "targets.npz")
    bench_reference.write_targets(config, 32, targets)
    positives = int((np.load(targets)["cls_targets"].sum(-1) > 0).sum())
    assert positives > 0
    proc = subprocess.run(
        [sys.executable, "-m", "tadjax.tools.bench", "reference", "--config", REPO_CONFIG,
         "--frames", "32", "--steps", "1", "--side", "torch", "--detector", "--sizes",
         json.dumps(size), "--targets", targets, "--json"],
        capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["jax_imported"] is False
    assert out["num_pos"] == positives and np.isfinite(out["loss"]) and out["loss"] > 0
    assert out["step_seconds"] > 0 and out["peak_rss_bytes"] >= out["peak_rss_bytes_steps"] > 0
