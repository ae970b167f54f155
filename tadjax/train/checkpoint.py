"""Checkpoints with orbax's CheckpointManager.

One checkpoint per saved step under WORKDIR/checkpoints/<step>/ with three items:
  state   the train state pytree: step, params, opt, ema, loss_norm, rng
  data    the grain iterator state (so a resumed run sees exactly the same batches)
  config  the run's config as JSON (for eval/predict from a bare checkpoint)
Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
checkpoint cut off mid-write is never listed as the latest. We keep the last `keep` checkpoints
plus the `keep_best` best by evaluation metric.
"""
from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, keep_best: int = 1,
                 best_metric: str = "average_mAP", async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.best_metric = best_metric
        policies = [cm.LatestN(n=keep)]
        if keep_best:
            policies.append(cm.BestN(get_metric_fn=lambda m: m[best_metric], reverse=False,
                                     n=keep_best, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=cm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
            })

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self):
        return list(self.manager.all_steps())

    def best_step(self) -> int | None:
        """The step with the best evaluation metric so far (recorded in best.json), if any."""
        path = os.path.join(self.directory, "best.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            step = json.load(f)["step"]
        return step if step in self.all_steps() else None

    def _record_best(self, step: int, metrics: dict):
        path = os.path.join(self.directory, "best.json")
        value = float(metrics[self.best_metric])
        if os.path.exists(path):
            with open(path) as f:
                if json.load(f)["value"] >= value:
                    return
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"step": int(step), "metric": self.best_metric, "value": value}, f)
        os.replace(tmp, path)

    def save(self, step: int, state: Any, *, data_iterator=None, config_json: str | None = None,
             metrics: dict | None = None, force: bool = True) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config_json is not None:
            items["config"] = ocp.args.JsonSave(json.loads(config_json))
        saved = self.manager.save(int(step), args=ocp.args.Composite(**items),
                                  metrics=metrics, force=force)
        if saved and metrics is not None and jax.process_index() == 0:
            self._record_best(step, metrics)
        return saved

    def restore(self, step: int | None, abstract_state: Any, *, data_iterator=None) -> Any:
        """Restore state (into the shardings of `abstract_state`) and, in place, the iterator."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        self.check_compatible(step, abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def check_compatible(self, step: int, abstract_state: Any):
        """ValueError naming the differing paths when checkpoint `step` holds another tree
        (another architecture or config) than `abstract_state`."""
        try:
            stored = self.manager.item_metadata(step)["state"]
        except Exception:  # no readable metadata: let the restore itself report
            return
        problem = tree_mismatch(stored, abstract_state)
        if problem:
            raise ValueError(
                f"checkpoint {os.path.join(self.directory, str(step))} does not fit this config "
                f"(written by another architecture or config?): {problem}. Train in a fresh "
                "--workdir, or use the config the checkpoint was written with (saved beside it "
                "as config/).")

    def restore_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return restored["config"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def _path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def tree_mismatch(stored, expected, *, show: int = 5) -> str:
    """'' when the two trees have the same paths, shapes and dtypes, else a short description."""
    def leaves(tree):
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {_path_str(p): x for p, x in flat if x is not None}
    a, b = leaves(stored), leaves(expected)
    missing = sorted(set(b) - set(a))
    extra = sorted(set(a) - set(b))
    shapes = [f"{k} {tuple(a[k].shape)} in the checkpoint, {tuple(b[k].shape)} expected"
              for k in sorted(set(a) & set(b))
              if tuple(getattr(a[k], "shape", ())) != tuple(getattr(b[k], "shape", ()))]
    parts = []
    if missing:
        parts.append(f"{len(missing)} arrays missing from the checkpoint, e.g. {missing[:show]}")
    if extra:
        parts.append(f"{len(extra)} arrays in the checkpoint that this model lacks, e.g. {extra[:show]}")
    if shapes:
        parts.append(f"{len(shapes)} arrays with another shape, e.g. {'; '.join(shapes[:show])}")
    return "; ".join(parts)


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) describing `tree`, for restore targets."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=getattr(x, "sharding", None)), tree)
