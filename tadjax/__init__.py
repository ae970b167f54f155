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

# glibc malloc: fewer arenas than its default of 8 per CPU core. Each thread that allocates gets
# an arena of its own up to that limit, and memory freed in one arena is only reused there:
# what compiling a step frees (on the compiling thread) stays resident beside what XLA:CPU's
# worker threads then allocate. tadjax allows one arena per 8 cores (one on small hosts).
# 768-frame ViT-S adapter step (`bench reference`): 1.37 vs 1.44 GB peak resident memory,
# 0.54 vs 0.63 GB held between steps (2 arenas: 1.42 / 0.56 GB). The cost:
# on 2 cores XLA compiles ~12% slower (the demo's train step: 56-62 vs 48-54 s), its threads
# contending for the one lock; MALLOC_ARENA_MAX=2 compiles at full speed. The steps contend too
# (256-frame step: 3-5x glibc's default's context switches in every process; slower in about
# half of them, 21 vs 17.7 s; 2 or 3 arenas did not avoid it): XLA's two worker threads block
# on the arena's lock inside free() (YNNPACK's temporaries, XLA's parallel-task contexts,
# oneDNN's sgemm workspace; a perf context-switch profile, README). MALLOC_ARENA_MAX
# or a glibc.malloc.arena_max tunable set by the user is kept; TADJAX_MALLOC_DEFAULTS=0
# leaves all of glibc's defaults (this and the thresholds below).
# With the one arena, two thresholds: buffers up to 32 MB (glibc's largest mmap threshold) come
# from the heap, and its top is handed back to the system only past 1 GB free. glibc's
# defaults (a threshold that rises with the buffers freed, a trim threshold twice it) made the
# 768-frame ViT-S adapter step hand memory back and fault it in afresh within every step:
# 6.19M minor page faults and 20.5 s of system time per 89-97 s step, against 205k faults,
# 1.8 s and 76-79 s steps with these (peak 1.396 vs 1.382 GB; a scratch script, one arena,
# README; side by side, `bench reference --frames 768`: 209k faults per step, time ratio 0.78
# against 0.92 before, peak 1.386 GB). At 256 frames they changed neither the faults nor the
# memory. The price is memory
# a run freed staying resident (up to 1 GB above the heap's live top) rather than the pages
# being faulted again; `release_freed_memory()` still hands it back, as the trainer does after
# compiling. MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ or the matching glibc tunables
# set by the user are kept.
M_TRIM_THRESHOLD = -1   # mallopt parameter numbers (glibc malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 1 << 30


def _glibc():
    """glibc's C library (OSError where there is none, e.g. macOS or musl)."""
    import ctypes
    return ctypes.CDLL("libc.so.6")


def malloc_arenas() -> int:
    """The arena limit tadjax sets: one per 8 CPU cores, at least one."""
    return max(1, (_os.cpu_count() or 1) // 8)


def _set_malloc_defaults():
    if _os.environ.get("TADJAX_MALLOC_DEFAULTS", "1") == "0":
        return
    tunables = _os.environ.get("GLIBC_TUNABLES", "")
    settings = ((M_ARENA_MAX, malloc_arenas(), "MALLOC_ARENA_MAX", "arena_max"),
                (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES, "MALLOC_MMAP_THRESHOLD_", "mmap_threshold"),
                (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES, "MALLOC_TRIM_THRESHOLD_", "trim_threshold"))
    try:
        libc = _glibc()
        for param, value, env_var, tunable in settings:
            if env_var not in _os.environ and tunable not in tunables:
                libc.mallopt(param, value)
    except (OSError, AttributeError):   # not glibc
        pass


_set_malloc_defaults()


def release_freed_memory() -> bool:
    """Hands the C heap's free pages back to the system (glibc's malloc_trim), e.g. the memory
    compiling a step used and freed, which otherwise stays resident for the whole run. The
    trainer calls it once its train step is compiled. False where there is no glibc."""
    try:
        _glibc().malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False
