"""Two processes x two CPU devices (gloo collectives on 127.0.0.1) train like one process.

Each process feeds its own share of every global batch (`Run.data_shard`, `Run.global_batch`),
the parameters are split FSDP-style over all 4 devices (so across the processes), and orbax saves
and restores the sharded state collectively. The losses and parameters after 2 steps match a
single-device run with the same global batches, and the restored state equals the saved one.
"""
import pytest
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

AXES = (("data", 1), ("fsdp", -1), ("snippet", 1))
BATCH = 4
TIMEOUT_S = 900


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(port: int, process_id: int, out_dir: str):
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=process_id, initialization_timeout=120)
    from jax.experimental import multihost_utils

    from tadjax import tree
    from tadjax.train import checkpoint as ckpt_lib
    from tadjax.train.trainer import Run
    from test_sharding import FAST, STEPS, random_batches, tiny_config

    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    config = tiny_config(AXES, batch=BATCH)
    run = Run(config, None, with_data=False)
    tx, _ = run.make_tx(steps_per_epoch=4)
    state = run.init_state(tx)
    step = run.make_train_step(tx)
    index, count = run.data_shard()
    assert count == 2 and index == jax.process_index()
    rows = BATCH // count
    losses, compiled = [], None
    for batch in random_batches(config, STEPS):
        local = {k: v[index * rows:(index + 1) * rows] for k, v in batch.items()}
        batch = run.global_batch(local)
        if compiled is None:
            compiled = step.lower(state, batch).compile(compiler_options=FAST)
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))
    kernel = state["params"]["backbone"]["blocks_0"]["mlp"]["fc1"]["kernel"]
    assert not kernel.is_fully_addressable  # really split across the two processes

    ckpt = ckpt_lib.Checkpointer(os.path.join(out_dir, "checkpoints"))
    ckpt.save(STEPS, state)
    ckpt.close()
    ckpt = ckpt_lib.Checkpointer(os.path.join(out_dir, "checkpoints"))
    restored = ckpt.restore(None, run.abstract_state(tx))
    ckpt.close()

    saved = multihost_utils.process_allgather(state, tiled=True)
    back = multihost_utils.process_allgather(restored, tiled=True)
    same = all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(back)))
    if jax.process_index() == 0:
        np.savez(os.path.join(out_dir, "params.npz"),
                 **{k: np.asarray(v) for k, v in tree.flatten(saved["params"]).items()})
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump({"losses": losses, "restored_equal": same,
                       "restored_step": int(back["step"])}, f)
    jax.distributed.shutdown()


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    from test_sharding import tiny_config, train_two_steps
    import jax

    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(HERE.parent))
    procs = [subprocess.Popen([sys.executable, __file__, str(port), str(i), str(tmp_path)],
                              env=env, cwd=HERE.parent, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i}:\n" + (outputs[i] if i < len(outputs) else "")[-4000:]

    result = json.loads((tmp_path / "result.json").read_text())
    assert result["restored_equal"] and result["restored_step"] == 2
    losses, params, _, _ = train_two_steps(tiny_config(batch=BATCH), jax.devices()[:1])
    np.testing.assert_allclose(result["losses"], losses, rtol=1e-5, atol=1e-5)
    multi = np.load(tmp_path / "params.npz")
    assert sorted(multi.files) == sorted(params)
    for key in params:
        np.testing.assert_allclose(multi[key], params[key], rtol=1e-5, atol=1e-5, err_msg=key)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
