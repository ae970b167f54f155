"""Diagnostic: train only the detection head on oracle features and evaluate it.

  python -m tadjax.tools.oracle_features --config configs/demo.py [--noise 0.3] [--steps 300] [--json]

Each grid position's feature is the one-hot of the ground-truth classes covering it (plus
Gaussian noise), taken from the config's training windows; the head, losses, decoding, soft-NMS
and evaluator are the ones training uses. A high mAP here means a low end-to-end mAP comes from
the backbone's features, not from the rest of the pipeline.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tadjax import evaluation
from tadjax.data import loader as loader_lib
from tadjax.detection import losses as losses_lib
from tadjax.detection import postprocess
from tadjax.models.detector import build_head


def oracle_features(record, start, length, stride, num_classes, noise, rng):
    fps = loader_lib.annotation_fps(record)
    feats = np.zeros((length, num_classes), np.float32)
    grid = np.asarray(record["segments"], np.float64).reshape(-1, 2) * fps / stride - start
    for (s, e), label in zip(grid, record["labels"]):
        a, b = int(max(0, np.floor(s))), int(min(length, np.ceil(e)))
        if b > a:
            feats[a:b, label] = 1.0
    return feats + noise * rng.normal(size=feats.shape).astype(np.float32), grid


def run(config, *, noise: float = 0.3, steps: int = 300, seed: int = 0) -> dict:
    from tadjax.train.trainer import Run
    d = config.data
    if d.mode != "window":
        raise ValueError("oracle_features supports window mode only")
    r = Run(config, None)
    length, stride = loader_lib.grid_length(d), int(d.snippet_stride)
    num_classes, max_gt, batch = int(config.model.head.num_classes), int(d.max_gt), int(d.batch_size)
    train = loader_lib.get_split(r.sources, d.train_subset).records
    train = [x for x in train if len(x["labels"])]
    val = r.eval_source().records
    head = build_head(dict(config.model.head.to_dict(), max_seq_len=length), jnp.float32)
    points = jnp.asarray(r.points)
    params = head.init(jax.random.key(seed), jnp.zeros((1, length, num_classes)),
                       jnp.ones((1, length), bool), train=False)["params"]
    tx = optax.adamw(1e-3, weight_decay=0.05)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, feats, segs, labels, valid, key):
        def loss_fn(p):
            out = head.apply({"params": p}, feats, jnp.ones(feats.shape[:2], bool), train=True,
                             rngs={"dropout": key})
            return losses_lib.detection_loss(out, points, segs, labels, valid,
                                             num_classes=num_classes,
                                             normalizer=float(config.model.init_loss_norm))[0]
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    rng = np.random.default_rng(seed)
    losses = []
    for i in range(steps):
        rows = []
        for rec in rng.choice(train, batch):
            n = int(rec["num_frames"]) // stride
            start = int(rng.integers(0, max(1, n - length)))
            feats, grid = oracle_features(rec, start, length, stride, num_classes, noise, rng)
            segs = np.zeros((max_gt, 2), np.float32)
            labels = np.zeros((max_gt,), np.int32)
            valid = np.zeros((max_gt,), bool)
            k = 0
            for (s, e), label in zip(grid, rec["labels"]):
                s, e = max(s, 0.0), min(e, length)
                if e - s > 0.5 and k < max_gt:
                    segs[k], labels[k], valid[k] = (s, e), label, True
                    k += 1
            rows.append((feats, segs, labels, valid))
        arrays = [jnp.asarray(np.stack(x)) for x in zip(*rows)]
        params, opt, loss = step(params, opt, *arrays, jax.random.key(i))
        losses.append(float(loss))
    predict = jax.jit(lambda p, f: head.apply({"params": p}, f, jnp.ones(f.shape[:2], bool),
                                              train=False))
    predictions = {}
    for rec in val:
        n = int(rec["num_frames"]) // stride
        parts = []
        for start in range(0, max(n, 1), length // 2):
            feats, _ = oracle_features(rec, start, length, stride, num_classes, noise, rng)
            out = jax.device_get(predict(params, jnp.asarray(feats[None])))
            det = postprocess.decode(out["cls_logits"][0], out["reg"][0], r.points,
                                     out["point_mask"][0])
            fps = loader_lib.annotation_fps(rec)
            parts.append(((det.segments + start) * stride / fps, det.scores, det.labels))
        det = postprocess.soft_nms(*(np.concatenate(x) for x in zip(*parts)))
        predictions[rec["video_id"]] = {"segments": det.segments, "scores": det.scores,
                                        "labels": det.labels}
    result = evaluation.evaluate_detection(r.eval_ground_truth(), predictions,
                                           evaluation.parse_thresholds(config.eval.tious))
    return {"noise": noise, "steps": steps, "first_losses": losses[:5], "last_losses": losses[-5:],
            "mAP": result["mAP"], "average_mAP": result["average_mAP"]}


def main(argv=None):
    from tadjax.tools.bench import load_config
    p = argparse.ArgumentParser(prog="python -m tadjax.tools.oracle_features", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--json", action="store_true")
    args, overrides = p.parse_known_args(argv)
    out = run(load_config(args.config, overrides), noise=args.noise, steps=args.steps)
    print(json.dumps(out) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
