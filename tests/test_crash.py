"""Crash safety, preemption and the non-finite guard, on real `python -m tadjax.main` processes.

Each test starts the command in a subprocess on a tiny synthetic dataset (4 training videos of
32-px frames, a 1-block ViT of width 32), kills or signals it while it trains, starts it again,
and compares what the interrupted run ends with against an uninterrupted one, bitwise.

Compile time dominates, so the subprocesses use cheap XLA options and share a persistent
compilation cache ($TADJAX_CACHE or ~/.cache/tadjax, `jax_test_cache/`): every start after the
first loads the compiled steps from it. Bitwise equality holds between runs with the same flags.
"""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, load_config_file

STEPS_PER_EPOCH = 2            # 4 training videos, batch 2
END_STEP = 6 * STEPS_PER_EPOCH
CHECKPOINT_EVERY = 3

OVERRIDES = {
    "data.name": "crash", "data.window": 64, "data.batch_size": 2, "data.img_size": 32,
    "data.train_short_side": 36, "data.eval_short_side": 32,
    "model.backbone.depth": 1, "model.backbone.embed_dim": 32, "model.backbone.num_heads": 2,
    "model.backbone.mlp_dim": 64, "model.head.channels": 32,
    "model.pretrained": "",  # a smaller ViT than the demo's shipped weights: random init
    "train.epochs": 6, "train.end_epoch": 6, "train.log_every_steps": 1,
    "train.checkpoint_every_steps": CHECKPOINT_EVERY, "eval.batch_size": 2,
}
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
TIMEOUT = 600  # seconds for any one wait (a cold compile on a loaded 2-core machine is slow)


def _cache_dir() -> str:
    root = os.environ.get("TADJAX_CACHE") or pathlib.Path.home() / ".cache" / "tadjax"
    return str(pathlib.Path(root) / "jax_test_cache")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """(overrides with the data paths, tfds_dir) for a tiny dataset, built once in this process so
    that concurrent subprocesses find it ready."""
    from tadjax.data import loader, synthetic
    root = tmp_path_factory.mktemp("crash_data")
    ann = synthetic.generate(root, seed=3, num_train=4, num_val=2, size=32,
                             video_seconds=(6.0, 9.0), action_seconds=(1.0, 3.0),
                             gap_seconds=(0.5, 2.0))
    overrides = dict(OVERRIDES, **{"data.annotations": str(ann),
                                   "data.videos": str(root / "videos"),
                                   "data.tfds_dir": str(root / "tfds")})
    config = load_config_file(REPO / "configs" / "demo.py", "quick")
    for key, value in overrides.items():
        node = config
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    loader.build_or_load(config.data)
    return overrides


class Proc:
    """One `python -m tadjax.main` process, its log and the metrics lines it wrote."""

    def __init__(self, workdir, overrides, log_name, config=None, extra=()):
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.metrics = self.workdir / "metrics.jsonl"
        self.metrics_offset = self.metrics.stat().st_size if self.metrics.exists() else 0
        self.log_path = self.workdir / log_name
        env = dict(os.environ, XLA_FLAGS=FAST_XLA, JAX_PLATFORMS="cpu",
                   JAX_COMPILATION_CACHE_DIR=_cache_dir(),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
        args = [sys.executable, "-m", "tadjax.main",
                "--config", str(config or REPO / "configs" / "demo.py") + ":quick",
                "--workdir", str(self.workdir)]
        args += [f"--config.{k}={v}" for k, v in overrides.items()] + list(extra)
        self._log = open(self.log_path, "w")
        self.popen = subprocess.Popen(args, cwd=REPO, env=env, stdout=self._log,
                                      stderr=subprocess.STDOUT)

    def rows(self) -> list[dict]:
        """The metrics rows this process wrote."""
        return _rows(self.workdir, self.metrics_offset)

    def last_step(self) -> int:
        rows = self.rows()
        return rows[-1]["step"] if rows else 0

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def wait_until(self, predicate, what: str):
        t0 = time.time()
        while not predicate():
            if self.popen.poll() is not None:
                pytest.fail(f"process ended (rc {self.popen.returncode}) before {what}:\n"
                            + self.log()[-3000:])
            if time.time() - t0 > TIMEOUT:
                self.popen.kill()
                pytest.fail(f"timed out waiting for {what}:\n" + self.log()[-3000:])
            time.sleep(0.02)

    def wait(self) -> int:
        try:
            rc = self.popen.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            pytest.fail("process did not finish:\n" + self.log()[-3000:])
        self._log.close()
        return rc


def _rows(workdir, offset: int = 0) -> list[dict]:
    """Training rows of workdir/metrics.jsonl from byte `offset` (a torn last line is ignored)."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    with open(path) as f:
        f.seek(offset)
        text = f.read()
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return [r for r in rows if "loss" in r]


def _checkpoints(workdir) -> tuple[list[int], list[str]]:
    """(complete checkpoint steps, names of temporary directories) under workdir/checkpoints."""
    d = pathlib.Path(workdir) / "checkpoints"
    names = [p.name for p in d.iterdir()] if d.exists() else []
    return sorted(int(n) for n in names if n.isdigit()), [n for n in names if "tmp" in n]


def _resumed_step(log: str) -> int | None:
    m = re.search(r"resumed from \S+ at step (\d+)", log)
    return int(m.group(1)) if m else None


def _load_state(workdir, step):
    """The saved train state as numpy arrays, with no model needed (orbax reads the metadata)."""
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(pathlib.Path(workdir) / "checkpoints" / str(step) / "state")


def _assert_trees_equal(a, b):
    import jax
    fa = jax.tree_util.tree_flatten_with_path(a)[0]
    fb = jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (path, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                      err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_sigkill_three_times_and_sigterm_resume_to_the_uninterrupted_result(dataset, tmp_path):
    reference = Proc(tmp_path / "reference", dataset, "log.txt")
    # Let the reference compile (and fill the cache) before the others start.
    reference.wait_until(lambda: reference.last_step() >= 1, "the reference's first step")
    workdir = tmp_path / "interrupted"
    rng = np.random.default_rng(2024)
    kill_steps = sorted(rng.choice(np.arange(2, END_STEP - 3), size=3, replace=False).tolist())
    left_tmp = []
    expected_resume = None
    for i, k in enumerate(kill_steps):
        p = Proc(workdir, dataset, f"log_kill{i}.txt")
        if i == 1:
            # Kill while an asynchronous save is being written: its temporary directory exists.
            p.wait_until(lambda: p.last_step() >= k and _checkpoints(workdir)[1],
                         f"step {k} and a checkpoint being written")
        else:
            p.wait_until(lambda: p.last_step() >= k, f"step {k}")
        p.popen.send_signal(signal.SIGKILL)
        assert p.wait() == -signal.SIGKILL
        # The run resumed where the previous one's latest complete checkpoint was.
        assert _resumed_step(p.log()) == expected_resume, (i, expected_resume)
        steps, tmp = _checkpoints(workdir)
        left_tmp += tmp
        expected_resume = steps[-1] if steps else None
        assert expected_resume is None or expected_resume <= p.last_step()
    # At least one kill cut a checkpoint off mid-write, and the next start ignored it.
    assert left_tmp, "no kill landed during a checkpoint write"

    # SIGTERM: a checkpoint at the current step, exit code 0.
    term_at = min(END_STEP - 2, (expected_resume or 0) + 2)
    p = Proc(workdir, dataset, "log_term.txt")
    p.wait_until(lambda: p.last_step() >= term_at, f"step {term_at}")
    p.popen.send_signal(signal.SIGTERM)
    assert p.wait() == 0, p.log()[-3000:]
    assert _resumed_step(p.log()) == expected_resume
    m = re.search(r"SIGTERM: saving a checkpoint at step (\d+)", p.log())
    assert m, p.log()[-3000:]
    saved = int(m.group(1))
    assert saved == p.last_step() >= term_at
    assert _checkpoints(workdir)[0][-1] == saved

    final = Proc(workdir, dataset, "log_final.txt")
    assert final.wait() == 0, final.log()[-3000:]
    assert _resumed_step(final.log()) == saved
    assert reference.wait() == 0, reference.log()[-3000:]
    assert _checkpoints(workdir)[1] == []  # orbax removed the cut-off temporary directories

    # Same parameters, optimizer state, EMA, loss normaliser, RNG and step, bitwise.
    a, b = _load_state(tmp_path / "reference", END_STEP), _load_state(workdir, END_STEP)
    assert int(a["step"]) == END_STEP
    _assert_trees_equal(a, b)
    # And the same loss at every step (the last time each step was run), the same evaluation.
    ref_loss = {r["step"]: r["loss"] for r in reference.rows()}
    got_loss = {}
    for r in _rows(workdir):
        got_loss[r["step"]] = r["loss"]
    assert sorted(ref_loss) == list(range(1, END_STEP + 1))
    assert got_loss == ref_loss
    read = lambda w: json.loads((w / "eval" / "metrics.json").read_text())["mAP"]
    assert read(tmp_path / "reference") == read(workdir)


# ------------------------------------------------------------------------- non-finite guard

class _ToyDetector:
    """A stand-in for the detector with ActionFormer-shaped outputs and two parameters; its
    logits are log(mean frame value), so an all-black batch gives -inf logits (a NaN loss)."""

    def __init__(self, num_points, num_classes):
        self.num_points, self.num_classes = num_points, num_classes

    def apply(self, variables, frames, mask, *, train, rngs):
        import jax.numpy as jnp
        p = variables["params"]["head"]
        b = frames.shape[0]
        brightness = jnp.log(frames.astype(jnp.float32).mean(axis=(1, 2, 3, 4)))  # [B]
        cls = p["cls"][None, None, :] + brightness[:, None, None]
        cls = jnp.broadcast_to(cls, (b, self.num_points, self.num_classes))
        reg = jnp.broadcast_to(p["reg"][None, None, :], (b, self.num_points, 2))
        return {"cls_logits": cls, "reg": reg,
                "point_mask": jnp.ones((b, self.num_points), bool)}


def test_non_finite_step_skips_the_update_but_advances_the_step(tiny_synthetic, tmp_path):
    import jax
    import jax.numpy as jnp
    import optax
    from conftest import tiny_demo_config
    from tadjax.models import detector
    from tadjax.train import state as state_lib

    config = tiny_demo_config(tiny_synthetic, tmp_path)
    points = detector.points_for(config)
    c = int(config.model.head.num_classes)
    model = _ToyDetector(len(points), c)
    params = {"head": {"cls": jnp.zeros((c,)), "reg": jnp.ones((2,))}}
    mask = {"head": {"cls": True, "reg": True}}
    tx = optax.adam(0.1)
    state = state_lib.create_state(params, tx, mask, rng=jax.random.key(0), init_loss_norm=5.0)
    step = state_lib.make_train_step(model, config, tx, mask, points)
    frames_shape, mask_shape = detector.input_shapes(config, 2)
    m = int(config.data.max_gt)
    gt = np.zeros((2, m, 2), np.float32)
    gt[:, 0] = (3.0, 20.0)
    valid = np.zeros((2, m), bool)
    valid[:, 0] = True

    def batch(value):
        return {"frames": jnp.full(frames_shape, value, jnp.uint8), "mask": jnp.ones(mask_shape, bool),
                "gt_segments": jnp.asarray(gt), "gt_labels": jnp.zeros((2, m), jnp.int32),
                "gt_valid": jnp.asarray(valid)}

    before = jax.device_get(state)
    state, metrics = step(state, batch(0))     # black frames: log(0) = -inf logits
    after_bad = jax.device_get(state)
    assert not bool(metrics["finite"])
    assert not np.isfinite(float(metrics["loss"])) or not np.isfinite(float(metrics["grad_norm"]))
    assert int(after_bad["step"]) == 1
    _assert_trees_equal({k: v for k, v in before.items() if k != "step"},
                        {k: v for k, v in after_bad.items() if k != "step"})

    state, metrics = step(state, batch(128))   # a normal batch trains again
    after_good = jax.device_get(state)
    assert bool(metrics["finite"]) and int(after_good["step"]) == 2
    assert not np.array_equal(after_good["params"]["head"]["cls"], before["params"]["head"]["cls"])
    assert float(after_good["loss_norm"]) != float(before["loss_norm"])


@pytest.mark.slow
def test_too_many_non_finite_steps_stop_with_the_last_good_checkpoint(dataset, tmp_path):
    # A real cause: a learning rate of 1e30. Step 1 runs at lr 0 (warm-up), step 2 makes the
    # weights ~1e30, after which every forward pass overflows.
    config = tmp_path / "huge_lr.py"
    config.write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('demo', {str(REPO / 'configs' / 'demo.py')!r})\n"
        "demo = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(demo)\n\n"
        "def get_config(arg=None):\n"
        "    c = demo.get_config(arg)\n"
        "    with c.unlocked():\n"
        "        for g in c.train.param_groups:\n"
        "            g['lr'] = 1e30\n"
        "    return c\n")
    overrides = dict(dataset, **{"train.checkpoint_every_steps": 1, "train.max_bad_steps": 3})
    p = Proc(tmp_path / "run", overrides, "log.txt", config=config)
    assert p.wait() != 0
    log = p.log()
    rows = p.rows()
    finite = [bool(r["finite"]) for r in rows]
    first_bad = finite.index(False) + 1
    assert finite[first_bad - 1:] == [False] * 3, finite   # stopped after 3 in a row
    assert rows[-1]["skipped_steps"] == 3
    last_good = first_bad - 1
    msg = (f"3 steps in a row (from step {first_bad}) had a non-finite loss or gradient and "
           f"were skipped (config.train.max_bad_steps=3); the last good checkpoint is step "
           f"{last_good} in {tmp_path / 'run' / 'checkpoints'}, untouched")
    assert "NonFiniteError" in log and msg in log, log[-3000:]
    # No checkpoint was written during the streak; the last one is complete and finite.
    steps, tmp = _checkpoints(tmp_path / "run")
    assert steps[-1] == last_good and tmp == []
    import jax
    state = _load_state(tmp_path / "run", last_good)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))
