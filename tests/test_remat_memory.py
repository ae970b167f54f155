"""Rematerialisation policies lower the compiled memory of the training step.

XLA's memory analysis of the compiled step, from abstract shapes (nothing is allocated): the
temporaries fall strictly from no remat to saving dots to saving nothing.
"""
import pytest
import pathlib
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_sharding import FAST, tiny_config  # noqa: E402

from tadjax.train.trainer import Run  # noqa: E402



def step_temp_bytes(policy: str) -> int:
    config = tiny_config(batch=2)
    config.model.backbone.remat_policy = policy
    config.model.backbone.depth = 4
    run = Run(config, None, with_data=False, devices=jax.devices()[:1])
    tx, _ = run.make_tx(steps_per_epoch=4)
    step = run.make_train_step(tx)
    compiled = step.lower(run.abstract_state(tx), run.abstract_batch()).compile(
        compiler_options=FAST)
    return int(compiled.memory_analysis().temp_size_in_bytes)


@pytest.mark.slow
def test_temporaries_fall_from_none_to_dots_to_full():
    none, dots, full = (step_temp_bytes(p) for p in ("none", "dots", "full"))
    assert none > dots > full, {"none": none, "dots": dots, "full": full}
