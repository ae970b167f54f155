r"""Supervised pre-training of a config's ViT on the synthetic world: the demo's "VideoMAE".

  python -m tadjax.tools.pretrain_synthetic --config configs/demo.py --out DIR [--steps 2000]

AdaTAD never trains its backbone from scratch: it starts from a VideoMAE pre-trained on large video
corpora, freezes it and trains the adapters. The synthetic set has no such model, and a randomly
initialised ViT does not learn motion from the detection loss within a CPU demo's budget (it
stayed at the class prior in every variant tried). This command makes the stand-in: the config's
backbone (without adapters) learns to label every token of short rendered clips with the motion
of the object under it (`tadjax.data.synthetic.pretraining_clip`: background, distractor, or one
of the five action classes), a dense signal that trains in minutes. Clips are drawn from their own
random stream, never from the detection videos.

OUT_DIR has the layout of `tadjax.tools.convert` (orbax `params/` + `tadjax_import.json`, with
the command's settings and held-out token accuracies), so `--config.model.pretrained=OUT_DIR`
loads it. `configs/demo.py` starts from the copy shipped in `tadjax/assets/synthetic_vit_demo`,
made by the command above with its defaults.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import sys
import time

import numpy as np


def _parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.py", help="config whose model.backbone is trained")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--steps", type=int, default=2000)  # the shipped demo weights
    p.add_argument("--batch", type=int, default=16, help="clips per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval_clips", type=int, default=256, help="held-out clips for the final accuracies")
    p.add_argument("--log_every", type=int, default=100)
    p.add_argument("--overwrite", action="store_true")
    return p


def backbone_settings(config) -> dict:
    """The config's backbone without adapters (what a pre-trained checkpoint holds)."""
    b = dict(config.model.backbone.to_dict())
    b["adapter_mode"] = "none"
    return b


def clip_settings(config) -> dict:
    """pretraining_clip keywords matching the config's data and backbone."""
    from tadjax.models import vit

    b = config.model.backbone
    variant = vit.VARIANTS[b.variant]
    return dict(frames=int(b.get("chunk_frames") or 16),
                snippet_stride=int(config.data.snippet_stride),
                patch=int(b.get("patch_size") or variant["patch_size"]),
                tubelet=int(b.get("tubelet") or 2))


def make_batch(seed: int, index: int, batch: int, settings: dict, size: int):
    """Batch `index` of the stream `seed`: frames uint8 [B, T, S, S, 3], labels int32 [B, t, h, w]."""
    from tadjax.data import synthetic

    cfg = synthetic.SyntheticConfig(size=size)
    rng = np.random.default_rng([seed, 7, index])
    clips = [synthetic.pretraining_clip(rng, cfg, **settings) for _ in range(batch)]
    return np.stack([c[0] for c in clips]), np.stack([c[1] for c in clips])


def token_metrics(pred: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracies of token predictions: on actors' tokens (their class exactly), on object tokens
    (any object found), on background tokens."""
    actor, obj, bg = labels >= 2, labels >= 1, labels == 0
    return {"actor_class_accuracy": float((pred[actor] == labels[actor]).mean()) if actor.any() else 0.0,
            "object_recall": float((pred[obj] >= 1).mean()) if obj.any() else 0.0,
            "background_accuracy": float((pred[bg] == 0).mean()) if bg.any() else 0.0}


def pretrain(config, out_dir: str, *, steps: int, batch: int, lr: float, warmup: int, seed: int,
             eval_clips: int, log_every: int, overwrite: bool = False, log=print) -> dict:
    """Trains, evaluates on held-out clips and writes OUT_DIR; returns the metadata written."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from tadjax import convert
    from tadjax.data import synthetic
    from tadjax.models import detector

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists (pass --overwrite to replace it)")
    b = backbone_settings(config)
    settings = clip_settings(config)
    size = int(config.data.img_size)
    backbone = detector.build_backbone(b, jnp.float32)
    num_classes = len(synthetic.PRETRAIN_CLASSES)

    class TokenClassifier(nn.Module):
        backbone: nn.Module

        @nn.compact
        def __call__(self, frames, train: bool):
            _, tokens = self.backbone(
                detector.normalize_frames(frames, jnp.float32), train=train, return_tokens=True)
            return nn.Dense(num_classes, name="classifier")(tokens)  # [B, K, t·h·w, classes]

    model = TokenClassifier(backbone=backbone)
    frames0, _ = make_batch(seed, 0, 2, settings, size)
    key = jax.random.PRNGKey(seed)
    params = jax.jit(lambda k: model.init({"params": k, "dropout": k}, frames0, False))(key)["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.05))
    opt_state = tx.init(params)

    def logits_of(p, frames, rng, train):
        out = model.apply({"params": p}, frames, train, rngs={"dropout": rng})
        return out.reshape(frames.shape[0], -1, num_classes)

    @jax.jit
    def step(p, s, frames, labels, rng):
        def loss_fn(p):
            logits = logits_of(p, frames, rng, True)
            y = labels.reshape(labels.shape[0], -1)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    predict = jax.jit(lambda p, frames: logits_of(p, frames, key, False).argmax(-1))

    log(f"pre-training {config.model.backbone.variant}-type ViT "
        f"({sum(x.size for x in jax.tree.leaves(params['backbone'])):,} backbone parameters) on "
        f"{steps} x {batch} synthetic clips of {settings['frames']} frames at {size} px")
    start = time.time()
    losses = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # renders the next batch during a step
        pending = pool.submit(make_batch, seed, 1, batch, settings, size)
        for i in range(steps):
            frames, labels = pending.result()
            pending = pool.submit(make_batch, seed, i + 2, batch, settings, size)
            params, opt_state, loss = step(params, opt_state, frames, labels, jax.random.fold_in(key, i))
            losses.append(float(loss))
            if not np.isfinite(losses[-1]):
                raise FloatingPointError(f"pre-training loss is {losses[-1]} at step {i}")
            if (i + 1) % log_every == 0 or i + 1 == steps:
                el = time.time() - start
                log(f"step {i + 1}/{steps}  loss {np.mean(losses[-log_every:]):.4f}  "
                    f"{el / (i + 1):.2f} s/step  eta {el / (i + 1) * (steps - i - 1) / 60:.1f} min")

    # Held-out clips: another stream of the same world.
    preds, labels = [], []
    for j in range(max(1, eval_clips // batch)):
        frames, y = make_batch(seed + 1_000_003, j, batch, settings, size)
        preds.append(np.asarray(predict(params, frames)))
        labels.append(y.reshape(y.shape[0], -1))
    metrics = token_metrics(np.concatenate(preds), np.concatenate(labels))
    log("held-out tokens: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))

    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    b_meta = {k: (list(v) if isinstance(v, tuple) else v) for k, v in b.items()}
    meta = {
        "source": "tadjax.tools.pretrain_synthetic", "sha256": "", "format": "tadjax",
        "wrapper": "", "variant": b.get("variant"), "backbone": b_meta,
        "pretrain_grid": int(b.get("pretrain_img_size") or 224) // settings["patch"],
        "num_parameters": int(sum(x.size for x in jax.tree.leaves(params["backbone"]))),
        "settings": dict(steps=steps, batch=batch, lr=lr, warmup=warmup, seed=seed, img_size=size,
                         **settings),
        "final_loss": float(np.mean(losses[-log_every:])), "held_out": metrics,
        "seconds": round(time.time() - start, 1),
    }
    convert.write_tadjax_dir(out_dir, jax.device_get(params["backbone"]), meta)
    log(f"wrote {out_dir}")
    return meta


def main(argv=None) -> int:
    from tadjax.tools.bench import load_config

    args, overrides = _parser().parse_known_args(argv)
    config = load_config(args.config, overrides)  # plus --config.x=y overrides
    pretrain(config, args.out, steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup,
             seed=args.seed, eval_clips=args.eval_clips, log_every=args.log_every,
             overwrite=args.overwrite, log=lambda m: print(m, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
