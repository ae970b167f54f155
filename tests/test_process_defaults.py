"""tadjax's process defaults (tadjax/__init__.py). XLA:CPU flags: added to XLA_FLAGS at import,
never over a flag the user set, none with TADJAX_XLA_DEFAULTS=0. glibc malloc arenas: limited at
import, unless the user set MALLOC_ARENA_MAX, or with TADJAX_MALLOC_DEFAULTS=0."""
import os
import platform
import subprocess
import sys

import pytest

import tadjax


def flags_after_import(**env):
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "TADJAX_XLA_DEFAULTS")}
    out = subprocess.run([sys.executable, "-c", "import os, tadjax; print(os.environ.get("
                          "'XLA_FLAGS', '<unset>'))"], env={**base, **env}, capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()


def test_defaults_added_to_the_users_flags():
    assert flags_after_import() == " ".join(tadjax.CPU_XLA_FLAGS)
    got = flags_after_import(XLA_FLAGS="--xla_force_host_platform_device_count=4")
    assert got == "--xla_force_host_platform_device_count=4 " + " ".join(tadjax.CPU_XLA_FLAGS)


def test_a_flag_the_user_set_is_kept_and_defaults_can_be_off():
    assert flags_after_import(XLA_FLAGS="--xla_cpu_use_fusion_emitters=true") == \
        "--xla_cpu_use_fusion_emitters=true"
    assert flags_after_import(TADJAX_XLA_DEFAULTS="0") == "<unset>"


ARENAS = r"""
import ctypes, threading
import tadjax
bufs, barrier = [], threading.Barrier(6)
def work():
    barrier.wait()          # all six threads alive at once: each may get an arena
    for _ in range(20):
        bufs.append(bytearray(200_000))
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(6)]
[t.start() for t in threads]
[t.join() for t in threads]
ctypes.CDLL("libc.so.6").malloc_stats()   # one "Arena i:" section per arena, on stderr
"""


def arenas_after_import(**env):
    base = {k: v for k, v in os.environ.items()
            if k not in ("MALLOC_ARENA_MAX", "TADJAX_MALLOC_DEFAULTS", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", ARENAS], env={**base, **env},
                         capture_output=True, text=True, check=True)
    return out.stderr.count("Arena ")


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc malloc only")
def test_malloc_arenas_limited_unless_the_user_chose():
    assert arenas_after_import() == tadjax.malloc_arenas() == max(1, os.cpu_count() // 8)
    assert arenas_after_import(TADJAX_MALLOC_DEFAULTS="0") > tadjax.malloc_arenas()
    assert arenas_after_import(MALLOC_ARENA_MAX="5") == 5
