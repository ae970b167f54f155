"""`bench reference` runs both sides of the comparison on the demo's small backbone."""
import json
import os
import subprocess
import sys

import pytest

from tadjax.tools import bench_reference
from tadjax.tools.bench import load_config

REPO_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py")


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
