"""tadjax's process defaults (tadjax/__init__.py). XLA:CPU flags: added to XLA_FLAGS at import,
never over a flag the user set, none with TADJAX_XLA_DEFAULTS=0. glibc malloc arenas and
thresholds: set at import, unless the user set them (MALLOC_ARENA_MAX, MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_, GLIBC_TUNABLES), or with TADJAX_MALLOC_DEFAULTS=0."""
import os
import platform
import subprocess
import sys

import pytest

import tadjax


def run_after_import(code, env, unset):
    """stdout and stderr of `code` run by a fresh Python with `env`, none of `unset` inherited."""
    base = {k: v for k, v in os.environ.items() if k not in unset}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True,
                         text=True, check=True)
    return out.stdout, out.stderr


def flags_after_import(**env):
    out, _ = run_after_import("import os, tadjax; print(os.environ.get('XLA_FLAGS', '<unset>'))",
                              env, ("XLA_FLAGS", "TADJAX_XLA_DEFAULTS"))
    return out.strip()


def test_defaults_added_to_the_users_flags():
    assert flags_after_import() == " ".join(tadjax.CPU_XLA_FLAGS)
    got = flags_after_import(XLA_FLAGS="--xla_force_host_platform_device_count=4")
    assert got == "--xla_force_host_platform_device_count=4 " + " ".join(tadjax.CPU_XLA_FLAGS)


def test_a_flag_the_user_set_is_kept_and_defaults_can_be_off():
    assert flags_after_import(XLA_FLAGS="--xla_cpu_use_fusion_emitters=true") == \
        "--xla_cpu_use_fusion_emitters=true"
    assert flags_after_import(TADJAX_XLA_DEFAULTS="0") == "<unset>"


# More threads, all alive at once, than tadjax's arena limit (or 5): without a limit each gets
# an arena of its own.
ARENAS = r"""
import ctypes, threading
import tadjax
n = max(tadjax.malloc_arenas(), 5) + 1
bufs, barrier = [], threading.Barrier(n)
def work():
    barrier.wait()
    for _ in range(20):
        bufs.append(bytearray(200_000))
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(n)]
[t.start() for t in threads]
[t.join() for t in threads]
ctypes.CDLL("libc.so.6").malloc_stats()   # one "Arena i:" section per arena, on stderr
"""


def arenas_after_import(**env):
    _, err = run_after_import(ARENAS, env,
                              ("MALLOC_ARENA_MAX", "TADJAX_MALLOC_DEFAULTS", "GLIBC_TUNABLES"))
    return err.count("Arena ")


glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc malloc only")


@glibc_only
def test_malloc_arenas_limited_unless_the_user_chose():
    assert arenas_after_import() == tadjax.malloc_arenas() == max(1, os.cpu_count() // 8)
    assert arenas_after_import(TADJAX_MALLOC_DEFAULTS="0") > tadjax.malloc_arenas()
    assert arenas_after_import(MALLOC_ARENA_MAX="5") == 5


# A 16 MB buffer allocated, written through and freed three times: the minor page faults of each
# round, and the buffer's size in pages.
REUSE = r"""
import ctypes, resource
import tadjax
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 16 << 20
def faults_of_one_buffer():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(*[faults_of_one_buffer() for _ in range(3)], size // resource.getpagesize())
"""


def faults_per_round(**env):
    out, _ = run_after_import(REUSE, env, ("TADJAX_MALLOC_DEFAULTS", "GLIBC_TUNABLES",
                                           "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
    *faults, pages = map(int, out.split())
    return [f / pages for f in faults]   # the fraction of the buffer's pages faulted in


@glibc_only
def test_freed_buffers_are_reused_without_faulting_unless_the_user_chose():
    # tadjax's thresholds: the buffer comes from the heap and stays there once freed, so only
    # the first round faults its pages in.
    first, *again = faults_per_round()
    assert first > 0.9 and max(again) < 0.05
    # glibc's own: the first buffer is mapped and unmapped, which raises the mmap threshold;
    # the second comes from heap pages never touched before; only the third reuses memory.
    assert min(faults_per_round(TADJAX_MALLOC_DEFAULTS="0")[:2]) > 0.9
    # a threshold the user set is kept: a 128 KiB mmap threshold maps every buffer afresh, and
    # a 128 KiB trim threshold hands the freed heap top back each time.
    assert min(faults_per_round(MALLOC_MMAP_THRESHOLD_="131072")) > 0.9
    assert min(faults_per_round(GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")) > 0.9
