"""tadjax: end-to-end temporal action detection in JAX/Flax."""
import os as _os

__version__ = "0.1.0"

# XLA:CPU defaults, set before JAX starts its backend (XLA reads XLA_FLAGS then; importing
# jax first is fine, running anything first is not). XLA:CPU's MLIR fusion emitters leave
# about 50 MB more resident per process than its LLVM ones (the compiled 256-frame ViT-S
# adapter step: +139 vs +85 MB of resident memory after compiling; its step time the same,
# 27.6 vs 27.3 s), which counts against the memory of long-video training on CPU hosts. Only
# XLA:CPU reads these flags (GPU and TPU ignore them). A flag already in XLA_FLAGS is left as
# the user set it; TADJAX_XLA_DEFAULTS=0 sets none.
CPU_XLA_FLAGS = ("--xla_cpu_use_fusion_emitters=false",)


def _set_xla_defaults():
    if _os.environ.get("TADJAX_XLA_DEFAULTS", "1") == "0":
        return
    flags = _os.environ.get("XLA_FLAGS", "")
    for flag in CPU_XLA_FLAGS:
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}".strip()
    _os.environ["XLA_FLAGS"] = flags


_set_xla_defaults()
