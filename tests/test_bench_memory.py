"""The bench's process-memory probes: the high-water mark restarts and then follows the process."""
import numpy as np
import pytest

from tadjax.tools import bench


def test_peak_rss_since_reset_follows_an_allocation():
    if not bench.reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs here")
    before = bench.peak_rss_bytes_since_reset()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    during = bench.peak_rss_bytes_since_reset()
    del block
    bench.reset_peak_rss()
    after = bench.peak_rss_bytes_since_reset()
    assert during - before >= 60 * 2**20, (before, during)
    assert during - after >= 60 * 2**20, (during, after)
