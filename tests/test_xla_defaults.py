"""tadjax's XLA:CPU defaults (tadjax/__init__.py): added to XLA_FLAGS at import, never over a
flag the user set, none with TADJAX_XLA_DEFAULTS=0."""
import os
import subprocess
import sys

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
