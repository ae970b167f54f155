"""The tadjax command.

  python -m tadjax.main --config configs/demo.py --workdir /tmp/demo
  python -m tadjax.main --config configs/demo.py --workdir /tmp/demo --mode eval
  python -m tadjax.main --config configs/adatad_thumos_s.py --config.data.videos=/data/thumos/videos ...

Modes: train (with periodic evaluation; restarting in the same workdir resumes) and eval (the
latest checkpoint of the workdir, or --step). Config files are `get_config(arg)` returning a locked
ConfigDict, so a mistyped --config.key is an error, not a silently ignored flag.
"""
from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/X.py[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, results).")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "What to do.")
flags.DEFINE_integer("step", None, "eval: checkpoint step (default: latest).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs).")
flags.mark_flags_as_required(["config"])


def _default_workdir(config_path: str) -> str:
    name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
    return os.path.join("workdirs", name)


def main(argv):
    del argv
    logging.getLogger().setLevel(logging.INFO)
    import jax
    if FLAGS.distributed:
        jax.distributed.initialize()
    from tadjax.train import trainer
    config = FLAGS.config
    workdir = FLAGS.workdir or _default_workdir(flags.FLAGS["config"].config_filename)
    logging.info("workdir %s; %d devices (%d local) on %s; process %d of %d", workdir,
                 jax.device_count(), jax.local_device_count(), jax.default_backend(),
                 jax.process_index(), jax.process_count())
    if FLAGS.mode == "train":
        summary = trainer.train_and_evaluate(config, workdir)
    else:
        summary = trainer.evaluate(config, workdir, step=FLAGS.step)
    if jax.process_index() == 0:
        print(format_summary(summary), flush=True)


def format_summary(summary: dict) -> str:
    lines = ["tIoU     mAP"]
    for k, v in summary["mAP"].items():
        lines.append(f"{k:<8} {100 * v:6.2f}")
    lines.append(f"average  {100 * summary['average_mAP']:6.2f}")
    return "\n".join(lines)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
