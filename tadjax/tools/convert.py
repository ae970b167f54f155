r"""Convert a PyTorch VideoMAE / VideoMAEv2 checkpoint into a tadjax backbone checkpoint.

  python -m tadjax.tools.convert vit-small-p16_videomae-k400.pth checkpoints/videomae_s
  python -m tadjax.tools.convert hf_videomae_dir/ checkpoints/hf_s --num-heads 6
  python -m tadjax.tools.convert best.pth checkpoints/adatad_s   # an OpenTAD AdaTAD checkpoint

Reads every naming `tadjax.convert` accepts (original release, mmaction2, OpenTAD with its EMA
weights, Hugging Face), prints what was read, ignored and not understood, and writes OUT_DIR:

  OUT_DIR/params/             orbax checkpoint of the backbone tree (blocks_0/attn/qkv/kernel, ...)
  OUT_DIR/tadjax_import.json  source file, its SHA-256, detected naming, the ViT sizes

Keys no rule understands make the command fail (name them with --allow-unexpected REGEX to drop
them). Start training from it with the config field `model.pretrained`:

  python -m tadjax.main --config configs/adatad_thumos_s.py --config.model.pretrained=OUT_DIR ...

(or pass the .pth file itself there: it is converted on the fly).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys

import numpy as np


def _parser():
    p = argparse.ArgumentParser(prog="python -m tadjax.tools.convert", description=__doc__.split("\n")[0])
    p.add_argument("input", help="checkpoint file (.pth/.pt/.bin/.safetensors) or Hugging Face directory")
    p.add_argument("out_dir", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads, for a ViT size that is not a named one (S/B/L/H/g)")
    p.add_argument("--no-ema", action="store_true", help="OpenTAD: take state_dict, not state_dict_ema")
    p.add_argument("--allow-unexpected", action="append", default=[], metavar="REGEX",
                   help="drop keys no rule understands when they match (repeatable)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="unpickle Python objects in the file (only for files you trust)")
    p.add_argument("--overwrite", action="store_true")
    return p


def convert_file(input_path: str, out_dir: str, *, num_heads: int | None = None,
                 prefer_ema: bool = True, allow_unexpected=(), trust_pickle: bool = False,
                 overwrite: bool = False) -> dict:
    """Converts `input_path` into OUT_DIR (see the module docstring); returns the metadata."""
    from tadjax import convert, tree

    ckpt = convert.read_checkpoint(input_path, prefer_ema=prefer_ema, trust_pickle=trust_pickle)
    print(ckpt.summary(), file=sys.stderr)
    unknown = [k for k in ckpt.unknown if not any(re.search(p, k) for p in allow_unexpected)]
    if unknown:
        raise ValueError(f"{input_path}: {len(unknown)} keys no rule understands: "
                         f"{', '.join(unknown[:50])} (drop them with --allow-unexpected REGEX)")
    backbone = convert.infer_backbone_config(ckpt, num_heads=num_heads)
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists (pass --overwrite to replace it)")
        shutil.rmtree(out_dir)
    params = tree.unflatten({k: np.asarray(v, np.float32) for k, v in ckpt.params.items()})
    adapters = sorted({k.split("/")[0] for k in ckpt.params if "/adapter/" in k or k.startswith("side_")})
    meta = {
        "source": os.path.abspath(ckpt.source), "sha256": ckpt.sha256, "format": ckpt.format,
        "wrapper": ckpt.wrapper, "backbone": {k: v for k, v in backbone.items() if k != "variant"},
        "variant": backbone.get("variant"), "pretrain_grid": backbone["pretrain_img_size"] // backbone["patch_size"],
        "num_tensors": len(ckpt.params),
        "num_parameters": int(sum(v.size for v in ckpt.params.values())),
        "with_adapters": adapters, "ignored": ckpt.ignored, "hf_config": ckpt.hf_config,
    }
    convert.write_tadjax_dir(out_dir, params, meta)
    return meta


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    meta = convert_file(args.input, args.out_dir, num_heads=args.num_heads, prefer_ema=not args.no_ema,
                        allow_unexpected=args.allow_unexpected, trust_pickle=args.trust_pickle,
                        overwrite=args.overwrite)
    b = meta["backbone"]
    print(f"wrote {args.out_dir}: {meta['num_parameters']:,} parameters ({meta['format']} naming, "
          f"variant {meta['variant'] or 'custom'}: C={b['embed_dim']} depth={b['depth']} "
          f"heads={b['num_heads']} patch={b['patch_size']}), sha256 {meta['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
