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


def test_time_steps_counts_each_steps_page_faults_waits_and_cpu():
    """A step that maps 64 MiB afresh (no huge pages), writes one byte in each page and sleeps
    5 times: at least one minor fault per page (16,384 with 4 KiB pages) and >= 5 voluntary
    context switches per step; the CPU seconds are those of the touching, under the step's time
    (50 ms of it asleep)."""
    import mmap
    import time

    def step():
        block = mmap.mmap(-1, 64 * 2**20)
        if hasattr(block, "madvise") and hasattr(mmap, "MADV_NOHUGEPAGE"):
            block.madvise(mmap.MADV_NOHUGEPAGE)
        np.frombuffer(block, np.uint8)[::mmap.PAGESIZE] = 1
        block.close()
        for _ in range(5):
            time.sleep(0.01)

    out = bench.time_steps(step, 3)
    assert out["minor_faults_per_step"] >= 64 * 2**20 // mmap.PAGESIZE, out
    assert out["context_switches_per_step"] >= 5, out
    assert 0 < out["cpu_seconds_per_step"] < out["step_seconds"], out


def test_with_frames_sets_the_grid_or_refuses_what_the_config_cannot_take():
    """Window configs take any frame count (grid = frames / scale_factor); resize configs (the
    ActivityNet ones: every video to 192 positions) take multiples of the grid, else a clear
    error rather than a zero-length grid."""
    window = bench.with_frames(bench.load_config("configs/adatad_thumos_s.py", []), 256)
    assert window.data.window * window.data.scale_factor == 256
    resize = bench.with_frames(bench.load_config("configs/adatad_anet_s.py", []), 384)
    assert (resize.data.resize_length, resize.data.scale_factor) == (192, 2)
    with pytest.raises(ValueError, match="--frames 64.*multiple of 192"):
        bench.with_frames(bench.load_config("configs/adatad_anet_s.py", []), 64)
