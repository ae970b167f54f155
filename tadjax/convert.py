"""PyTorch VideoMAE / VideoMAEv2 checkpoints -> tadjax backbone parameters.

    flat, info = convert.read_checkpoint("vit-small-p16_videomae-k400.pth")   # {path: array}
    params, report = surgery.load_backbone(init_params["backbone"], flat)    # strict merge

Accepted namings (the format is detected per key; one file may only use one of them):

  original   VideoMAE / VideoMAEv2 release (`{"model": sd}` or `{"module": sd}`):
             `patch_embed.proj.*`, `blocks.N.{norm1,norm2}.*`, `blocks.N.attn.{qkv.weight,q_bias,
             v_bias,proj.*}`, `blocks.N.mlp.{fc1,fc2}.*`; pretraining files prefix the encoder
             with `encoder.` (their decoder is ignored).
  mmaction2  `backbone.` prefix, `patch_embed.projection.*`, `mlp.layers.0.0.*` (fc1) and
             `mlp.layers.1.*` (fc2) (`{"state_dict": sd, "meta": ...}`).
  opentad    AdaTAD detector checkpoints: `state_dict_ema` (used by default, as OpenTAD evaluates
             the EMA model) or `state_dict`, keys `module.backbone.model.backbone.<mmaction2 ViT>`,
             with TIAs `blocks.N.adapter.{down_proj,dwconv,conv,up_proj,gamma}` and the side
             variant's `ladders.adapters.J.*` (J-th tapped block). The detector head (projection,
             neck, rpn_head) is reported as not imported: tadjax's ActionFormer names differ.
  hf         Hugging Face `transformers` VideoMAEModel / VideoMAEForVideoClassification
             (`save_pretrained` directory with model.safetensors or pytorch_model.bin, or the file
             itself): `[videomae.]embeddings.patch_embeddings.projection.*`,
             `encoder.layer.N.attention.attention.{query,key,value}.weight` (concatenated into
             qkv), `q_bias`, `v_bias`, `attention.output.dense`, `layernorm_before/after`,
             `intermediate.dense`, `output.dense`.
  tadjax     a directory written by `python -m tadjax.tools.convert` (orbax), read back as is.

Leading DDP `module.` prefixes are removed everywhere. Keys that exist in these checkpoints but
have no counterpart in tadjax's backbone are *ignored* and listed (`fc_norm`, the final `norm`,
classification heads, the pretraining decoder, mmaction's data preprocessor): AdaTAD never uses
them. The fixed sinusoid `pos_embed` buffer is checked against tadjax's table (a learned table
cannot be represented and fails) and gives the pretraining grid. Anything else is *unexpected*.

Layout changes: Linear [out, in] -> kernel [in, out]; Conv3d [C, 3, t, p, p] -> [t, p, p, 3, C];
TIA depthwise Conv1d [C_r, 1, 3] -> [3, 1, C_r]; 1x1 Conv1d [C_r, C_r, 1] -> [C_r(in), C_r(out)];
LayerNorm weight -> scale; gamma [1] -> ().

torch (and safetensors for .safetensors files) is imported only here, and only when a PyTorch
file is read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from typing import Any, Mapping

import numpy as np

log = logging.getLogger(__name__)

FORMATS = ("original", "mmaction2", "opentad", "hf", "tadjax")
# Wrappers around the state dict, in order of preference (EMA first: OpenTAD evaluates it).
STATE_DICT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module", "model_state")
METADATA_FILE = "tadjax_import.json"


@dataclasses.dataclass
class Checkpoint:
    """A PyTorch checkpoint read into tadjax's backbone naming (backbone-relative paths).

    params:   {"blocks_0/attn/qkv/kernel": float32 array, ...}
    format:   one of FORMATS
    source:   the file (or directory) read; sha256: of the file read
    wrapper:  which entry of the file held the state dict ("state_dict_ema", ...; "" if none)
    ignored:  original key names dropped on purpose, with the reason
    unknown:  original key names no rule knows (become "unexpected" in the merge report)
    pretrain_grid: side of the token grid of the stored position table (224 // patch), if known
    hf_config: the Hugging Face config.json, if there was one
    """

    params: dict[str, np.ndarray]
    format: str
    source: str
    sha256: str
    wrapper: str = ""
    ignored: dict[str, str] = dataclasses.field(default_factory=dict)
    unknown: list[str] = dataclasses.field(default_factory=list)
    pretrain_grid: int | None = None
    hf_config: dict | None = None

    def summary(self) -> str:
        n = sum(int(v.size) for v in self.params.values())
        lines = [f"{self.source}: format {self.format}"
                 + (f" (entry {self.wrapper!r})" if self.wrapper else "")
                 + f", {len(self.params)} tensors, {n:,} parameters, sha256 {self.sha256}"]
        if self.pretrain_grid:
            lines.append(f"  position table for a {self.pretrain_grid}x{self.pretrain_grid} grid")
        if self.ignored:
            reasons: dict[str, list[str]] = {}
            for k, why in self.ignored.items():
                reasons.setdefault(why, []).append(k)
            for why, keys in reasons.items():
                lines.append(f"  ignored ({why}): {len(keys)} keys, e.g. {', '.join(keys[:3])}")
        if self.unknown:
            lines.append(f"  unknown keys ({len(self.unknown)}): {', '.join(self.unknown[:20])}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Files


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _hf_weights_file(directory: str) -> str:
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{directory}: no model.safetensors or pytorch_model.bin (a Hugging Face "
                            "save_pretrained directory), and no tadjax checkpoint "
                            f"({METADATA_FILE})")


def _to_numpy(value) -> np.ndarray:
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float32).cpu().numpy() if value.is_floating_point() \
            else value.detach().cpu().numpy()
    return np.asarray(value)


def load_torch_file(path: str, *, trust_pickle: bool = False) -> dict:
    """The raw object of a .pth/.pt/.bin/.safetensors file (tensors as torch tensors)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:  # weights_only refuses arbitrary Python objects (e.g. mmengine meta)
        if trust_pickle:
            raise ValueError(f"{path}: cannot read as a PyTorch checkpoint ({type(e).__name__}: {e})") from e
        raise ValueError(
            f"{path}: torch.load(weights_only=True) refused it ({type(e).__name__}: "
            f"{str(e).splitlines()[0]}). If you trust this file, pass trust_pickle=True "
            "(--trust-pickle) to unpickle its Python objects.") from e


def unwrap_state_dict(obj: Any, source: str, prefer_ema: bool = True) -> tuple[dict, str]:
    """(state dict, wrapper key) from a loaded checkpoint object."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    order = STATE_DICT_KEYS if prefer_ema else tuple(k for k in STATE_DICT_KEYS if "ema" not in k) + (
        "state_dict_ema", "model_ema")
    for key in order:
        if isinstance(obj.get(key), Mapping):
            return dict(obj[key]), key
    return dict(obj), ""


# ---------------------------------------------------------------------------------------------
# Key normalisation: every format -> the original VideoMAE naming ("canonical")

_IGNORED = [  # (regex on the canonical key, reason)
    (r"^fc_norm\.", "fc_norm: AdaTAD pools features without it"),
    (r"^norm\.", "final LayerNorm: AdaTAD's backbone output has none"),
    (r"^(head|classifier|cls_head)\.", "classification head"),
    (r"^(decoder|encoder_to_decoder)\.|^mask_token$|^decoder_pos_embed$", "pretraining decoder"),
    (r"^data_preprocessor\.", "data preprocessor buffers"),
    (r"^(projection|neck|rpn_head|roi_head)\.", "detector head: tadjax's ActionFormer names differ"),
]

_HF_RENAMES = [
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.(q_bias|v_bias)$", r"blocks.\1.attn.\2"),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^layernorm\.", "norm."),
]
_HF_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")


def detect_format(keys) -> str:
    keys = [re.sub(r"^(module\.)+", "", k) for k in keys]
    if any(k.startswith("backbone.model.backbone.") for k in keys):
        return "opentad"
    if any(k.startswith("backbone.") for k in keys):
        return "mmaction2"
    if any(k.startswith(("embeddings.patch_embeddings.", "videomae.embeddings.", "encoder.layer."))
           for k in keys):
        return "hf"
    if any(k.startswith(("patch_embed.", "blocks.", "encoder.patch_embed.", "encoder.blocks."))
           for k in keys):
        return "original"
    raise ValueError("cannot tell the checkpoint's naming: no key looks like a VideoMAE backbone "
                     f"(first keys: {list(keys)[:8]})")


def canonical_state_dict(sd: Mapping[str, np.ndarray], fmt: str, source: str
                         ) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
    """(canonical {key: array}, ignored {original key: reason}, unknown original keys)."""
    out: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    ignored: dict[str, str] = {}
    hf_qkv: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for original, value in sd.items():
        key = re.sub(r"^(module\.)+", "", original)
        if fmt == "opentad":
            if key.startswith("backbone.model.backbone."):
                key = key[len("backbone.model.backbone."):]
            elif key.startswith("backbone.model."):  # e.g. backbone.model.cls_head
                key = key[len("backbone.model."):]
            elif key.startswith("backbone."):
                key = key[len("backbone."):]
        elif fmt == "mmaction2":
            key = key[len("backbone."):] if key.startswith("backbone.") else key
        elif fmt == "hf":
            key = key[len("videomae."):] if key.startswith("videomae.") else key
            m = _HF_QKV.match(key)
            if m:
                hf_qkv.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = value
                origin.setdefault(f"blocks.{m.group(1)}.attn.qkv.{m.group(3)}", original)
                continue
            for pattern, repl in _HF_RENAMES:
                key = re.sub(pattern, repl, key)
        elif fmt == "original":
            if key.startswith("encoder.") and not key.startswith("encoder_to_decoder"):
                key = key[len("encoder."):]
        if fmt in ("mmaction2", "opentad"):
            key = key.replace("patch_embed.projection.", "patch_embed.proj.")
            key = re.sub(r"\.mlp\.layers\.0\.0\.", ".mlp.fc1.", key)
            key = re.sub(r"\.mlp\.layers\.1\.", ".mlp.fc2.", key)
        reason = next((why for pattern, why in _IGNORED if re.search(pattern, key)), None)
        if reason is not None:
            ignored[original] = reason
            continue
        if key in out:
            raise ValueError(f"{source}: keys {origin[key]!r} and {original!r} both map to {key!r}")
        out[key] = value
        origin[key] = original
    for (layer, kind), parts in sorted(hf_qkv.items()):
        key = f"blocks.{layer}.attn.qkv.{kind}"
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"{source}: layer {layer} has {kind}s for {sorted(parts)} only; "
                             "expected query, key and value")
        if kind == "bias":  # a plain biased Linear: q, k, v biases; the k bias must be 0 here
            if np.any(parts["key"] != 0):
                raise ValueError(f"{source}: layer {layer} has a non-zero key bias, which the "
                                 "VideoMAE attention (q_bias, 0, v_bias) cannot represent")
            out[f"blocks.{layer}.attn.q_bias"] = parts["query"]
            out[f"blocks.{layer}.attn.v_bias"] = parts["value"]
            continue
        out[key] = np.concatenate([parts["query"], parts["key"], parts["value"]], axis=0)
    return out, ignored, origin


# ---------------------------------------------------------------------------------------------
# Canonical -> tadjax paths

_ADAPTER_NAMES = {"down_proj": "down", "up_proj": "up", "dwconv": "dwconv", "conv": "pwconv"}


def _linear(prefix: str, leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    if leaf == "weight":
        return f"{prefix}/kernel", value.T
    return f"{prefix}/bias", value


def _map_key(key: str, value: np.ndarray, side_blocks) -> tuple[str, np.ndarray] | None:
    """Canonical key -> (tadjax path, array), or None when no rule applies."""
    if key == "patch_embed.proj.weight":
        if value.ndim != 5:
            raise ValueError(f"patch_embed.proj.weight: expected a Conv3d weight [C, 3, t, p, p], "
                             f"got shape {value.shape}")
        return "patch_embed/kernel", value.transpose(2, 3, 4, 1, 0)
    if key == "patch_embed.proj.bias":
        return "patch_embed/bias", value
    m = re.match(r"^blocks\.(\d+)\.(.+)$", key)
    if m:
        block, rest = f"blocks_{m.group(1)}", m.group(2)
        n = re.match(r"^(norm1|norm2)\.(weight|bias)$", rest)
        if n:
            return f"{block}/{n.group(1)}/{'scale' if n.group(2) == 'weight' else 'bias'}", value
        if rest == "attn.qkv.weight":
            return f"{block}/attn/qkv/kernel", value.T
        if rest in ("attn.q_bias", "attn.v_bias"):
            return f"{block}/attn/{rest.split('.')[1]}", value
        n = re.match(r"^(attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)$", rest)
        if n:
            return _linear(f"{block}/{n.group(1).replace('.', '/')}", n.group(2), value)
        n = re.match(r"^adapter\.(.+)$", rest)
        if n:
            mapped = _map_adapter(n.group(1), value)
            return None if mapped is None else (f"{block}/adapter/{mapped[0]}", mapped[1])
        return None
    m = re.match(r"^ladders\.adapters\.(\d+)\.(.+)$", key)
    if m:
        j = int(m.group(1))
        if side_blocks is None or j >= len(side_blocks):
            return None
        mapped = _map_adapter(m.group(2), value)
        return None if mapped is None else (f"side_adapters_{side_blocks[j]}/{mapped[0]}", mapped[1])
    return None


def _map_adapter(rest: str, value: np.ndarray) -> tuple[str, np.ndarray] | None:
    if rest == "gamma":
        return "gamma", value.reshape(())
    m = re.match(r"^(down_proj|up_proj|dwconv|conv)\.(weight|bias)$", rest)
    if not m:
        return None
    name, leaf = _ADAPTER_NAMES[m.group(1)], m.group(2)
    if leaf == "bias":
        return f"{name}/bias", value
    if name == "dwconv":  # [C_r, 1, 3] -> [3, 1, C_r]
        return "dwconv/kernel", value.transpose(2, 1, 0)
    if name == "pwconv":  # [C_out, C_in, 1] -> [C_in, C_out]
        return "pwconv/kernel", value[:, :, 0].T
    return f"{name}/kernel", value.T


def to_tadjax(canonical: Mapping[str, np.ndarray], origin: Mapping[str, str], *, source: str,
              side_blocks=None) -> tuple[dict[str, np.ndarray], list[str], int | None]:
    """(backbone-relative {path: float32 array}, unknown original keys, pretrain grid or None)."""
    params: dict[str, np.ndarray] = {}
    unknown: list[str] = []
    grid = None
    for key, value in canonical.items():
        value = np.asarray(value)
        if key == "pos_embed":
            grid = check_position_table(value, source)
            continue
        mapped = _map_key(key, value, side_blocks)
        if mapped is None:
            unknown.append(origin.get(key, key))
            continue
        path, array = mapped
        params[path] = np.array(array, dtype=np.float32, order="C")  # (keeps 0-d arrays 0-d)
    # A checkpoint trained without qkv bias: (q_bias, v_bias) = 0 is the same function.
    blocks = {p.split("/")[0] for p in params if p.startswith("blocks_") and "/attn/qkv/" in p}
    if blocks and not any(p.endswith("/attn/q_bias") for p in params):
        dim = next(v.shape[0] for p, v in params.items() if p.endswith("/attn/qkv/kernel"))
        for b in blocks:
            params[f"{b}/attn/q_bias"] = np.zeros((dim,), np.float32)
            params[f"{b}/attn/v_bias"] = np.zeros((dim,), np.float32)
        log.info("%s: no q_bias/v_bias (trained without qkv bias): set to zero", source)
    return params, unknown, grid


def check_position_table(table: np.ndarray, source: str, time_tokens: int = 8) -> int:
    """The pretraining grid side of a stored sinusoid table [1, N, C] / [N, C]; fails if learned."""
    from tadjax.models import vit

    table = np.asarray(table, np.float64).reshape(-1, table.shape[-1])
    positions, dim = table.shape
    grid = int(round((positions / time_tokens) ** 0.5))
    if grid * grid * time_tokens != positions:
        raise ValueError(f"{source}: pos_embed has {positions} positions, not {time_tokens} x g x g")
    expected = vit.sinusoid_table(positions, dim)
    err = float(np.max(np.abs(table - expected)))
    if err > 1e-4:
        raise ValueError(f"{source}: pos_embed is not the fixed sinusoid table (max difference "
                         f"{err:.3g}); tadjax's ViT uses the fixed table and cannot load a learned one")
    return grid


# ---------------------------------------------------------------------------------------------
# Entry point


def write_tadjax_dir(out_dir: str, params, meta: dict) -> None:
    """Writes a backbone tree as OUT_DIR/params (orbax) + OUT_DIR/tadjax_import.json (`meta`),
    the layout `read_checkpoint` reads back. OUT_DIR must not exist yet."""
    import orbax.checkpoint as ocp

    os.makedirs(out_dir)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(os.path.abspath(out_dir), "params"), params)
    checkpointer.wait_until_finished()
    with open(os.path.join(out_dir, METADATA_FILE), "w") as f:
        json.dump(meta, f, indent=1)


def _read_tadjax_dir(path: str) -> Checkpoint:
    import orbax.checkpoint as ocp

    from tadjax import tree

    with open(os.path.join(path, METADATA_FILE)) as f:
        meta = json.load(f)
    restored = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(path), "params"))
    flat = {k: np.asarray(v) for k, v in tree.flatten(restored).items()}
    return Checkpoint(params=flat, format="tadjax", source=path, sha256=meta.get("sha256", ""),
                      wrapper=meta.get("wrapper", ""), pretrain_grid=meta.get("pretrain_grid"),
                      hf_config=meta.get("hf_config"))


def read_checkpoint(path: str | os.PathLike, *, side_blocks=None, prefer_ema: bool = True,
                    trust_pickle: bool = False, state_dict: Mapping | None = None) -> Checkpoint:
    """Reads a PyTorch VideoMAE checkpoint (file or Hugging Face directory) or a tadjax import.

    `side_blocks`: the block indices of the side adapters in the target model (the J-th OpenTAD
    ladder adapter belongs to the J-th of them). `state_dict`: an in-memory state dict instead of
    reading `path` (which then only names it in messages).
    """
    path = os.fspath(path)
    hf_config = None
    if state_dict is None:
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, METADATA_FILE)):
                return _read_tadjax_dir(path)
            cfg_path = os.path.join(path, "config.json")
            if os.path.isfile(cfg_path):
                with open(cfg_path) as f:
                    hf_config = json.load(f)
            path = _hf_weights_file(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {path!r} does not exist")
        digest = sha256_of(path)
        log.info("reading %s (sha256 %s)", path, digest)
        raw = load_torch_file(path, trust_pickle=trust_pickle)
    else:
        digest, raw = "", state_dict
    sd, wrapper = unwrap_state_dict(raw, path, prefer_ema=prefer_ema)
    sd = {k: _to_numpy(v) for k, v in sd.items() if hasattr(v, "shape")}
    fmt = detect_format(sd)
    canonical, ignored, origin = canonical_state_dict(sd, fmt, path)
    params, unknown, grid = to_tadjax(canonical, origin, source=path, side_blocks=side_blocks)
    if grid is None and hf_config and "image_size" in hf_config and "patch_size" in hf_config:
        grid = int(hf_config["image_size"]) // int(hf_config["patch_size"])
    ckpt = Checkpoint(params=params, format=fmt, source=path, sha256=digest, wrapper=wrapper,
                      ignored=ignored, unknown=unknown, pretrain_grid=grid, hf_config=hf_config)
    log.info("%s", ckpt.summary())
    return ckpt


def infer_backbone_config(ckpt: Checkpoint, num_heads: int | None = None) -> dict:
    """ViT attributes (embed_dim, depth, num_heads, mlp_dim, patch_size, pretrain_img_size and
    `variant` when the size is a named one) from the weights (num_heads from the HF config, the
    named variant of that width, or the argument)."""
    from tadjax.models import vit

    p = ckpt.params
    if "patch_embed/kernel" not in p:
        raise ValueError(f"{ckpt.source}: no patch embedding in the checkpoint")
    tubelet, patch, _, _, dim = p["patch_embed/kernel"].shape
    depth = 1 + max(int(m.group(1)) for k in p for m in [re.match(r"^blocks_(\d+)/", k)] if m)
    mlp_dim = p["blocks_0/mlp/fc1/kernel"].shape[1]
    variant = next((name for name, v in vit.VARIANTS.items()
                    if (v["embed_dim"], v["depth"], v["mlp_dim"], v["patch_size"]) ==
                    (dim, depth, mlp_dim, patch)), None)
    if num_heads is None and ckpt.hf_config:
        num_heads = ckpt.hf_config.get("num_attention_heads")
    if num_heads is None and variant is not None:
        num_heads = vit.VARIANTS[variant]["num_heads"]
    if num_heads is None:
        raise ValueError(f"{ckpt.source}: a {dim}-wide, {depth}-block ViT is not a named size; "
                         "give the number of attention heads (--num-heads)")
    grid = ckpt.pretrain_grid or 224 // patch
    out = dict(embed_dim=int(dim), depth=int(depth), num_heads=int(num_heads), mlp_dim=int(mlp_dim),
               patch_size=int(patch), tubelet=int(tubelet), pretrain_img_size=int(grid * patch))
    if variant is not None:
        out["variant"] = variant
    return out
