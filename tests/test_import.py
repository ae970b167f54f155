"""Checkpoint import: Hugging Face / original VideoMAE / mmaction2 / OpenTAD namings into the
tadjax parameter tree, strictness, position tables, and the convert command."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tadjax import convert, surgery, tree
from tadjax.models import adapters, vit

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
DIM, DEPTH, HEADS, MLP, PATCH, IMG = 64, 2, 2, 128, 16, 32


def tiny_hf(qkv_bias=True, seed=0):
    torch.manual_seed(seed)
    config = transformers.VideoMAEConfig(
        image_size=IMG, patch_size=PATCH, num_frames=16, tubelet_size=2, hidden_size=DIM,
        num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=MLP,
        hidden_act="gelu", qkv_bias=qkv_bias, use_mean_pooling=True, layer_norm_eps=1e-6,
        attn_implementation="eager")
    model = transformers.VideoMAEModel(config).eval()
    with torch.no_grad():  # random everything so that no zero-initialised tensor hides a bug
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            else:
                scale = "layernorm" in name and name.endswith("weight")
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if scale else 0.0))
    return model


def tiny_vit(**kw):
    return vit.VisionTransformer(embed_dim=DIM, depth=DEPTH, num_heads=HEADS, mlp_dim=MLP,
                                 patch_size=PATCH, pretrain_img_size=IMG, **kw)


def abstract(model):
    x = jax.ShapeDtypeStruct((1, 16, IMG, IMG, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf()


@pytest.fixture(scope="module")
def hf_state(hf_model):
    return {k: v.clone() for k, v in hf_model.state_dict().items()}


def features(model, params, clips):
    video = jnp.asarray(clips.permute(0, 1, 3, 4, 2).reshape(1, -1, IMG, IMG, 3).numpy())
    fn = jax.jit(lambda p, v: model.apply({"params": p}, v, return_tokens=True))
    return fn.lower(params, video).compile(compiler_options=FAST)(params, video)


# --------------------------------------------------------------------------- Hugging Face

def test_hf_save_pretrained_imports_exactly_and_matches_features(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path / "hf")  # model.safetensors + config.json
    assert (tmp_path / "hf" / "model.safetensors").exists()
    model = tiny_vit(adapter_mode="none")
    params, report = surgery.load_pretrained({"backbone": abstract(model)}, str(tmp_path / "hf"))
    assert report.ok and not report.allowed_missing and not report.allowed_unexpected
    assert len(report.loaded) == len(tree.flatten(abstract(model)))
    ckpt = convert.read_checkpoint(tmp_path / "hf")
    assert ckpt.format == "hf" and ckpt.unknown == [] and ckpt.pretrain_grid == IMG // PATCH
    assert ckpt.sha256 == convert.sha256_of(tmp_path / "hf" / "model.safetensors")

    clips = torch.randn(2, 16, 3, IMG, IMG)  # two chunks of one video
    with torch.no_grad():
        expected = hf_model(pixel_values=clips).last_hidden_state.numpy()
    feats, tokens = features(model, params["backbone"], clips)
    assert 1.0 < np.abs(expected).max() < 10.0
    np.testing.assert_allclose(np.asarray(tokens[0]), expected, atol=1e-5, rtol=0)
    pooled = expected.reshape(2, 8, 4, DIM).mean(axis=2).reshape(1, 16, DIM)
    np.testing.assert_allclose(np.asarray(feats), pooled, atol=1e-5, rtol=0)

    # The same weights as pytorch_model.bin and as VideoMAEForVideoClassification give the same tree.
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    again = convert.read_checkpoint(tmp_path / "pytorch_model.bin")
    clf = transformers.VideoMAEForVideoClassification(
        transformers.VideoMAEConfig(**{**hf_model.config.to_dict(), "num_labels": 3}))
    clf.videomae.load_state_dict(hf_model.state_dict())
    torch.save(clf.state_dict(), tmp_path / "clf.bin")
    wrapped = convert.read_checkpoint(tmp_path / "clf.bin")
    assert set(wrapped.ignored.values()) == {"fc_norm: AdaTAD pools features without it",
                                             "classification head"}
    for other in (again, wrapped):
        assert other.params.keys() == ckpt.params.keys()
        for k, v in ckpt.params.items():
            np.testing.assert_array_equal(other.params[k], v, err_msg=k)


def test_hf_without_qkv_bias_gets_zero_biases(tmp_path):
    hf = tiny_hf(qkv_bias=False, seed=1)
    torch.save(hf.state_dict(), tmp_path / "nobias.bin")
    ckpt = convert.read_checkpoint(tmp_path / "nobias.bin")
    assert np.all(ckpt.params["blocks_1/attn/q_bias"] == 0)
    clips = torch.randn(1, 16, 3, IMG, IMG)
    with torch.no_grad():
        expected = hf(pixel_values=clips).last_hidden_state.numpy()
    _, tokens = features(tiny_vit(adapter_mode="none"), tree.unflatten(
        {k: jnp.asarray(v) for k, v in ckpt.params.items()}), clips)
    np.testing.assert_allclose(np.asarray(tokens[0]), expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- other namings

def original_naming(hf_sd, depth=DEPTH):
    """The same weights in the original VideoMAE release naming (written here from HF's)."""
    sd = {"patch_embed.proj.weight": hf_sd["embeddings.patch_embeddings.projection.weight"],
          "patch_embed.proj.bias": hf_sd["embeddings.patch_embeddings.projection.bias"],
          "fc_norm.weight": torch.ones(DIM), "fc_norm.bias": torch.zeros(DIM),
          "head.weight": torch.randn(5, DIM), "head.bias": torch.zeros(5)}
    for i in range(depth):
        h, b = f"encoder.layer.{i}.", f"blocks.{i}."
        att = h + "attention.attention."
        sd[b + "attn.qkv.weight"] = torch.cat([hf_sd[att + n + ".weight"] for n in ("query", "key", "value")])
        sd[b + "attn.q_bias"], sd[b + "attn.v_bias"] = hf_sd[att + "q_bias"], hf_sd[att + "v_bias"]
        for src, dst in (("attention.output.dense", "attn.proj"), ("layernorm_before", "norm1"),
                         ("layernorm_after", "norm2"), ("intermediate.dense", "mlp.fc1"),
                         ("output.dense", "mlp.fc2")):
            sd[b + dst + ".weight"], sd[b + dst + ".bias"] = hf_sd[h + src + ".weight"], hf_sd[h + src + ".bias"]
    return sd


def mmaction_naming(orig):
    out = {}
    for k, v in orig.items():
        k = k.replace("patch_embed.proj.", "patch_embed.projection.")
        k = k.replace(".mlp.fc1.", ".mlp.layers.0.0.").replace(".mlp.fc2.", ".mlp.layers.1.")
        k = k.replace("head.", "cls_head.fc_cls.") if k.startswith("head.") else k
        out[("" if k.startswith("cls_head") else "backbone.") + k] = v
    return out


def sinusoid_buffer(grid):
    return torch.from_numpy(vit.sinusoid_table(8 * grid * grid, DIM))[None]


def random_adapter(prefix, c, r, gen):
    return {prefix + "down_proj.weight": torch.randn(r, c, generator=gen) * 0.2,
            prefix + "down_proj.bias": torch.randn(r, generator=gen) * 0.1,
            prefix + "dwconv.weight": torch.randn(r, 1, 3, generator=gen) * 0.5,
            prefix + "dwconv.bias": torch.randn(r, generator=gen) * 0.1,
            prefix + "conv.weight": torch.randn(r, r, 1, generator=gen) * 0.3,
            prefix + "conv.bias": torch.randn(r, generator=gen) * 0.1,
            prefix + "up_proj.weight": torch.randn(c, r, generator=gen) * 0.2,
            prefix + "up_proj.bias": torch.randn(c, generator=gen) * 0.1,
            prefix + "gamma": torch.tensor([0.7])}


def test_every_naming_gives_the_same_tree(hf_state, tmp_path):
    ref = convert.read_checkpoint("hf", state_dict=hf_state).params
    orig = original_naming(hf_state)
    pretrain = {"encoder." + k: v for k, v in orig.items() if not k.startswith(("head", "fc_norm"))}
    pretrain.update({"decoder.blocks.0.norm1.weight": torch.ones(8), "mask_token": torch.zeros(1, 1, 8),
                     "encoder_to_decoder.weight": torch.zeros(8, DIM)})
    mm = mmaction_naming(orig)
    mm["backbone.pos_embed"] = sinusoid_buffer(IMG // PATCH)
    opentad = {"module.backbone.model." + k: v for k, v in mm.items()}
    opentad["module.neck.norms.0.weight"] = torch.ones(4)
    files = {"original.pth": {"model": orig}, "pretrain.pth": {"model": pretrain},
             "mmaction2.pth": {"state_dict": mm, "meta": {"epoch": 3}},
             "opentad.pth": {"epoch": 5, "state_dict": opentad,
                             "state_dict_ema": {k: v.clone() for k, v in opentad.items()}}}
    expected_format = {"original.pth": "original", "pretrain.pth": "original",
                       "mmaction2.pth": "mmaction2", "opentad.pth": "opentad"}
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
        ckpt = convert.read_checkpoint(tmp_path / name)
        assert ckpt.format == expected_format[name], name
        assert ckpt.unknown == [], (name, ckpt.unknown)
        assert ckpt.params.keys() == ref.keys(), name
        for k, v in ref.items():
            np.testing.assert_array_equal(ckpt.params[k], v, err_msg=f"{name}: {k}")
    assert convert.read_checkpoint(tmp_path / "opentad.pth").wrapper == "state_dict_ema"
    assert convert.read_checkpoint(tmp_path / "opentad.pth", prefer_ema=False).wrapper == "state_dict"
    assert convert.read_checkpoint(tmp_path / "mmaction2.pth").pretrain_grid == IMG // PATCH
    ignored = convert.read_checkpoint(tmp_path / "pretrain.pth").ignored
    assert set(ignored) == {"decoder.blocks.0.norm1.weight", "mask_token", "encoder_to_decoder.weight"}


def test_opentad_adapters_compute_what_the_reference_computes(hf_state):
    """TIA weights in OpenTAD layout -> our adapter gives the reference formula's output."""
    c, r = DIM, DIM // 4
    gen = torch.Generator().manual_seed(0)
    sd = {"module.backbone.model." + k: v for k, v in
          mmaction_naming(original_naming(hf_state)).items() if k.startswith("backbone.")}
    for i in range(DEPTH):
        sd.update(random_adapter(f"module.backbone.model.backbone.blocks.{i}.adapter.", c, r, gen))
    ckpt = convert.read_checkpoint("opentad", state_dict={"state_dict_ema": sd})
    assert ckpt.unknown == []
    target = abstract(tiny_vit(adapter_mode="adapter"))
    params, report = surgery.load_subtree(target, ckpt.params)
    assert report.ok and len(report.loaded) == len(tree.flatten(target))

    # Reference TIA on [B·K, t·h·w, C] with K = 2 chunks, t = 8, h = w = 2 (spec §3.2).
    p = {k[len("module.backbone.model.backbone.blocks.1.adapter."):]: v for k, v in sd.items()
         if ".blocks.1.adapter." in k}
    z = torch.randn(2, 8 * 4, c, generator=gen)
    with torch.no_grad():
        a = torch.nn.functional.gelu(z @ p["down_proj.weight"].T + p["down_proj.bias"])
        seq = a.reshape(1, 16, 2, 2, r).permute(0, 2, 3, 4, 1).flatten(0, 2)  # [hw, r, L]
        u = torch.nn.functional.conv1d(seq, p["dwconv.weight"], p["dwconv.bias"], padding=1, groups=r)
        u = torch.nn.functional.conv1d(u, p["conv.weight"], p["conv.bias"])
        u = u.unflatten(0, (1, 2, 2)).permute(0, 4, 1, 2, 3).reshape(2, 32, r)
        expected = (((a + u) @ p["up_proj.weight"].T + p["up_proj.bias"]) * p["gamma"] + z).numpy()
    tia = adapters.TemporalInformativeAdapter(c, 0.25)
    got = tia.apply({"params": params["blocks_1"]["adapter"]}, jnp.asarray(z.numpy()), videos=1,
                    time_tokens=8)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=0)


def test_opentad_side_adapters_map_to_tapped_blocks(hf_state):
    gen = torch.Generator().manual_seed(1)
    sd = {"backbone.model.backbone." + k[len("backbone."):]: v for k, v in
          mmaction_naming(original_naming(hf_state)).items() if k.startswith("backbone.")}
    sd.update(random_adapter("backbone.model.backbone.ladders.adapters.0.", DIM, DIM // 4, gen))
    sd.update(random_adapter("backbone.model.backbone.ladders.adapters.1.", DIM, DIM // 4, gen))
    target = abstract(tiny_vit(adapter_mode="side", adapter_blocks=[0, 1]))
    ckpt = convert.read_checkpoint("side", state_dict=sd, side_blocks=[0, 1])
    params, report = surgery.load_subtree(target, ckpt.params)
    assert report.ok
    np.testing.assert_array_equal(
        params["side_adapters_1"]["dwconv"]["kernel"],
        sd["backbone.model.backbone.ladders.adapters.1.dwconv.weight"].numpy().transpose(2, 1, 0))
    # Without side adapters in the target, they are unknown keys, never silently dropped.
    assert len(convert.read_checkpoint("side", state_dict=sd).unknown) == 18


# --------------------------------------------------------------------------- strictness

def test_missing_unexpected_and_wrong_shapes_fail_listing_the_keys(hf_state, tmp_path):
    detector_like = {"backbone": abstract(tiny_vit(adapter_mode="adapter")), "head": {"w": jnp.zeros(3)}}
    path = tmp_path / "orig.pth"
    torch.save({"model": original_naming(hf_state)}, path)
    # Adapters are missing from a VideoMAE checkpoint: a failure unless allowed by name.
    with pytest.raises(ValueError, match=r"missing \(18\): blocks_0/adapter/down/bias, blocks_0/adapter/down/kernel"):
        surgery.load_pretrained(detector_like, str(path))
    params, report = surgery.load_pretrained(detector_like, str(path),
                                             allow_missing=surgery.ADAPTER_PATHS)
    assert len(report.allowed_missing) == 18 and params["head"]["w"].shape == (3,)
    np.testing.assert_array_equal(params["backbone"]["blocks_1"]["attn"]["q_bias"],
                                  hf_state["encoder.layer.1.attention.attention.q_bias"].numpy())

    bad = original_naming(hf_state)
    bad["blocks.1.mlp.fc2.weight"] = torch.zeros(DIM, MLP + 1)
    del bad["blocks.0.norm2.bias"]
    bad["blocks.0.attn.rel_pos_bias"] = torch.zeros(3)
    torch.save({"model": bad}, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as err:
        surgery.load_pretrained(detector_like, str(tmp_path / "bad.pth"),
                                allow_missing=surgery.ADAPTER_PATHS)
    msg = str(err.value)
    assert "missing (1): blocks_0/norm2/bias" in msg
    assert "unexpected (1): blocks.0.attn.rel_pos_bias" in msg
    assert f"wrong shape (1): blocks_1/mlp/fc2/kernel: expected ({MLP}, {DIM}), got ({MLP + 1}, {DIM})" in msg
    assert "bad.pth" in msg

    # A learned (non-sinusoid) position table cannot be represented.
    learned = mmaction_naming(original_naming(hf_state))
    learned["backbone.pos_embed"] = sinusoid_buffer(IMG // PATCH) + 0.5
    with pytest.raises(ValueError, match="not the fixed sinusoid table"):
        convert.read_checkpoint("learned", state_dict=learned)
    # A table for another pretraining grid is caught against the model's.
    other = mmaction_naming(original_naming(hf_state))
    other["backbone.pos_embed"] = sinusoid_buffer(3)
    torch.save(other, tmp_path / "grid3.pth")
    with pytest.raises(ValueError, match="3x3 token grid"):
        surgery.load_pretrained(detector_like, str(tmp_path / "grid3.pth"), pretrain_grid=2,
                                allow_missing=surgery.ADAPTER_PATHS)


def test_resample_position_table_matches_the_model_table():
    table = vit.sinusoid_table(8 * 14 * 14, 24)
    got = surgery.resample_position_table(table, time_tokens=8, grid=(14, 14), new_grid=(10, 10))
    np.testing.assert_allclose(got, vit.position_table(24, 8, 14, (10, 10)), atol=1e-6, rtol=0)
    assert surgery.resample_position_table(table, time_tokens=8, grid=(14, 14),
                                           new_grid=(14, 14)) is table


# --------------------------------------------------------------------------- convert command

def test_convert_command_writes_a_checkpoint_main_can_start_from(hf_model, tmp_path):
    from tadjax.tools import convert as convert_cmd

    hf_model.save_pretrained(tmp_path / "hf")
    out = tmp_path / "converted"
    assert convert_cmd.main([str(tmp_path / "hf"), str(out)]) == 0
    meta = json.loads((out / convert.METADATA_FILE).read_text())
    assert meta["sha256"] == convert.sha256_of(tmp_path / "hf" / "model.safetensors")
    assert meta["backbone"] == dict(embed_dim=DIM, depth=DEPTH, num_heads=HEADS, mlp_dim=MLP,
                                    patch_size=PATCH, tubelet=2, pretrain_img_size=IMG)
    back = convert.read_checkpoint(out)
    ref = convert.read_checkpoint(tmp_path / "hf")
    assert back.format == "tadjax" and back.params.keys() == ref.params.keys()
    for k, v in ref.params.items():
        np.testing.assert_array_equal(back.params[k], v)
    # And it loads like the original file.
    params, report = surgery.load_pretrained({"backbone": abstract(tiny_vit(adapter_mode="adapter"))},
                                             str(out), allow_missing=surgery.ADAPTER_PATHS)
    assert len(report.loaded) == len(ref.params)
