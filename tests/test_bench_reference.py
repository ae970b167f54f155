"""`bench reference` runs both sides of the comparison on the demo's small backbone."""
import pytest

from tadjax.tools import bench_reference
from tadjax.tools.bench import load_config

REPO_CONFIG = "configs/demo.py"


@pytest.mark.slow
@pytest.mark.parametrize("side", ["tadjax", "torch"])
def test_reference_sides_run_and_report(side):
    import os
    config = load_config(os.path.join(os.path.dirname(__file__), "..", REPO_CONFIG), [])
    fn = bench_reference.run_tadjax if side == "tadjax" else bench_reference.run_torch
    out = fn(config, 32, 1)
    assert out["step_seconds"] > 0 and len(out["step_seconds_all"]) == 1
    assert out["peak_rss_bytes"] >= out["peak_rss_bytes_steps"] > 0
