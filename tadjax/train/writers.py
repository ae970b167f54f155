"""Metric writers: TensorBoard event files and a JSON-lines file in the workdir.

Why not `clu.metric_writers`: in clu 0.0.12 the package's `__init__` imports TensorFlow for its
summary writer, and TensorFlow (~300 MB wheel, seconds of import, a second thread pool fighting
XLA's) is deliberately not a tadjax dependency. These writers keep clu's `MetricWriter` method names
(`write_scalars`, `write_hparams`, `flush`, `close`) so a user with TensorFlow installed can pass a
clu writer wherever a tadjax writer is accepted. TensorBoard events are written with tensorboardX,
which produces the same event-file format without TensorFlow.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Mapping


def _scalar(v: Any) -> float:
    try:
        return float(v)
    except TypeError:
        return float(getattr(v, "item")())


class JsonlWriter:
    """Appends one JSON object per write_scalars call to WORKDIR/metrics.jsonl."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self._f = open(path, "a", buffering=1)  # line-buffered: a crash loses no written line

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        row = {"step": int(step), "time": time.time()}
        for k, v in scalars.items():
            x = _scalar(v)
            row[k] = x if math.isfinite(x) else str(x)
        self._f.write(json.dumps(row) + "\n")

    def write_hparams(self, hparams: Mapping[str, Any]):
        self._f.write(json.dumps({"hparams": {k: str(v) for k, v in hparams.items()}}) + "\n")

    def flush(self):
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self):
        if not self._f.closed:
            self.flush()
            self._f.close()


class TensorboardWriter:
    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter  # imported lazily: only the main process writes
        self._w = SummaryWriter(logdir=logdir, flush_secs=30)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        for k, v in scalars.items():
            self._w.add_scalar(k, _scalar(v), global_step=int(step))

    def write_hparams(self, hparams: Mapping[str, Any]):
        self._w.add_text("hparams", json.dumps({k: str(v) for k, v in hparams.items()}, indent=1))

    def flush(self):
        self._w.flush()

    def close(self):
        self._w.close()


class LoggingWriter:
    """Scalars to the log; nothing to buffer, so hparams, flush and close are no-ops."""
    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        body = ", ".join(f"{k}={_scalar(v):.6g}" for k, v in sorted(scalars.items()))
        logging.info("[%d] %s", step, body)

    def write_hparams(self, hparams):
        pass

    def flush(self):
        pass

    def close(self):
        pass


class MultiWriter:
    def __init__(self, writers):
        self.writers = list(writers)

    def write_scalars(self, step, scalars):
        for w in self.writers:
            w.write_scalars(step, scalars)

    def write_hparams(self, hparams):
        for w in self.writers:
            w.write_hparams(hparams)

    def flush(self):
        for w in self.writers:
            w.flush()

    def close(self):
        for w in self.writers:
            w.close()


def create_writer(workdir: str, *, just_logging: bool = False, log: bool = True) -> MultiWriter:
    """Main process: TensorBoard events + metrics.jsonl (+ logging). Others: nothing."""
    writers = [LoggingWriter()] if log else []
    if not just_logging:
        writers.append(JsonlWriter(os.path.join(workdir, "metrics.jsonl")))
        writers.append(TensorboardWriter(os.path.join(workdir, "tensorboard")))
    return MultiWriter(writers)
