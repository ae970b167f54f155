"""The tadjax command.

  python -m tadjax.main --config configs/demo.py --workdir /tmp/demo
  python -m tadjax.main --config configs/demo.py --workdir /tmp/demo --mode eval
  python -m tadjax.main --config configs/adatad_thumos_s.py --config.data.videos=/data/thumos/videos ...

Modes: train (with periodic evaluation; restarting in the same workdir resumes), eval (the
latest checkpoint of the workdir, or --step) and predict (raw videos, no annotations; see
tadjax/predict.py):
  python -m tadjax.main --mode predict --checkpoint workdirs/demo --videos clips/ --out preds/
and compress (Progressive Block Drop of a trained model, see tadjax/compress.py):
  python -m tadjax.main --config configs/blockdrop_demo.py --mode compress --workdir workdirs/bd
Config files are `get_config(arg)` returning a locked ConfigDict, so a mistyped --config.key is
an error, not a silently ignored flag.
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
flags.DEFINE_enum("mode", "train", ["train", "eval", "predict", "compress"], "What to do.")
flags.DEFINE_integer("step", None, "eval: checkpoint step (default: latest).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs).")
flags.DEFINE_string("videos", None, "predict: a video file or a directory of videos.")
flags.DEFINE_string("checkpoint", None, "predict: a workdir, its checkpoints/ or checkpoints/<step>.")
flags.DEFINE_string("out", None, "predict: output directory (results.json, CSV, SRT, PNG).")
flags.DEFINE_float("match_fps", None, "predict: scale the snippet stride to this training frame rate.")
flags.DEFINE_float("min_score", 0.3, "predict: score threshold of the SRT cues and timeline bars.")


def _default_workdir(config_path: str) -> str:
    name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
    return os.path.join("workdirs", name)


def main(argv):
    del argv
    logging.getLogger().setLevel(logging.INFO)
    # Libraries that log through absl (orbax: several INFO lines per checkpoint, grain) stay at
    # warnings, so the run's own lines remain readable; tadjax logs through the root logger.
    logging.getLogger("absl").setLevel(logging.WARNING)
    import jax
    if FLAGS.mode == "predict":
        return _predict()
    if FLAGS.config is None:
        raise app.UsageError("--config is required for train and eval")
    if FLAGS.distributed:
        jax.distributed.initialize()
    from tadjax.train import trainer
    config = FLAGS.config
    workdir = FLAGS.workdir or _default_workdir(flags.FLAGS["config"].config_filename)
    logging.info("workdir %s; %d devices (%d local) on %s; process %d of %d", workdir,
                 jax.device_count(), jax.local_device_count(), jax.default_backend(),
                 jax.process_index(), jax.process_count())
    if FLAGS.mode == "compress":  # Progressive Block Drop (tadjax/compress.py)
        from tadjax import compress
        report = compress.compress(config, workdir)
        if report is not None and jax.process_index() == 0:
            print(compress.format_table(report["rounds"]), flush=True)
        return
    if FLAGS.mode == "train":
        summary = trainer.train_and_evaluate(config, workdir)
    else:
        summary = trainer.evaluate(config, workdir, step=FLAGS.step)
    if summary is None:  # preempted (SIGTERM): a checkpoint was saved, exit 0 and resume later
        return
    if jax.process_index() == 0:
        print(format_summary(summary), flush=True)


def _predict():
    """--mode predict: the checkpoint carries its config, so --config is not needed."""
    from tadjax import predict
    missing = [f"--{n}" for n in ("videos", "checkpoint", "out") if getattr(FLAGS, n) is None]
    if missing:
        raise app.UsageError(f"--mode predict needs {', '.join(missing)}")
    paths = predict.run_predict(FLAGS.checkpoint, FLAGS.videos, FLAGS.out, step=FLAGS.step,
                                match_fps=FLAGS.match_fps, min_score=FLAGS.min_score)
    print(f"wrote {paths['results']}, {paths['csv']} and {len(paths['videos'])} x (.srt, .png)")


def format_summary(summary: dict) -> str:
    lines = ["tIoU     mAP"]
    for k, v in summary["mAP"].items():
        lines.append(f"{k:<8} {100 * v:6.2f}")
    lines.append(f"average  {100 * summary['average_mAP']:6.2f}")
    return "\n".join(lines)


def parse_flags(argv):
    """absl flag parsing; a --config.KEY the config does not have ends with one clear line."""
    try:
        return FLAGS(argv)
    except (KeyError, AttributeError) as e:  # ml_collections: a missing key of a locked config
        text = e
        while isinstance(text, BaseException) and text.args:  # AttributeError(KeyError(msg))
            text = text.args[0]
        text = str(text)
        name, _, hint = text.partition("\n")
        name = name.strip("'\"")
        overrides = [a[2:].split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        flag = next((o for o in overrides if name in o.split(".")[1:]), "config")
        sys.stderr.write(f"FATAL Flags parsing error: --{flag}: the config has no field "
                         f"{name!r}. {hint}\n".replace(" . ", " ").rstrip() + "\n")
        sys.exit(1)


def run():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
