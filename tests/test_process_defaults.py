"""tadjax's process defaults (tadjax/__init__.py). XLA:CPU flags: added to XLA_FLAGS at import,
never over a flag the user set, none with TADJAX_XLA_DEFAULTS=0. glibc malloc arenas: limited at
import, unless the user set MALLOC_ARENA_MAX, or with TADJAX_MALLOC_DEFAULTS=0."""
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


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc malloc only")
def test_malloc_arenas_limited_unless_the_user_chose():
    assert arenas_after_import() == tadjax.malloc_arenas() == max(1, os.cpu_count() // 8)
    assert arenas_after_import(TADJAX_MALLOC_DEFAULTS="0") > tadjax.malloc_arenas()
    assert arenas_after_import(MALLOC_ARENA_MAX="5") == 5
