"""Temporal-Informative Adapter: a PyTorch reference of spec §3.2, initialisation, the identity at
zero up-projection, mixing across chunks, the side variant and the trainable-parameter regexes."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tadjax import tree
from tadjax.models.adapters import (TemporalInformativeAdapter, adapter_width,
                                    temporal_depthwise_conv, tia_halos, tia_rows,
                                    trainable_regex)
from test_vit import apply, frames, random_params, run, tiny


def test_temporal_depthwise_conv_hand_computed():
    a = jnp.asarray([1.0, 2.0, 3.0]).reshape(1, 3, 1)
    kernel = jnp.asarray([1.0, 10.0, 100.0]).reshape(3, 1, 1)
    out = temporal_depthwise_conv(a, kernel, jnp.asarray([0.5]))
    # zero padding at both ends: [0·1 + 1·10 + 2·100, 1 + 20 + 300, 2 + 30 + 0·100] + 0.5
    np.testing.assert_array_equal(np.asarray(out).ravel(), [210.5, 321.5, 32.5])


def torch_tia(z, p, videos, chunks, t, h, w, residual):
    """Spec §3.2 with the reference's layout: [B·K, t·h·w, C] -> per-site sequences [B·h·w, C_r, L]."""
    T = lambda a: torch.from_numpy(np.asarray(a, np.float64))
    z = T(z)
    a = torch.nn.functional.gelu(z @ T(p["down"]["kernel"]) + T(p["down"]["bias"]))
    width = a.shape[-1]
    length = chunks * t
    seq = a.reshape(videos, chunks, t, h, w, width).reshape(videos, length, h, w, width)
    seq = seq.permute(0, 2, 3, 4, 1).reshape(videos * h * w, width, length)
    dw = torch.nn.functional.conv1d(seq, T(p["dwconv"]["kernel"]).permute(2, 1, 0),
                                    T(p["dwconv"]["bias"]), padding=1, groups=width)
    pw = torch.nn.functional.conv1d(dw, T(p["pwconv"]["kernel"]).T[:, :, None], T(p["pwconv"]["bias"]))
    seq = seq + pw
    a = seq.reshape(videos, h, w, width, length).permute(0, 4, 1, 2, 3)
    a = a.reshape(videos * chunks, t * h * w, width)
    out = float(p["gamma"]) * (a @ T(p["up"]["kernel"]) + T(p["up"]["bias"]))
    return (z + out if residual else out).numpy()


@pytest.mark.parametrize("residual", [True, False])
def test_tia_matches_torch_reference(residual):
    videos, chunks, t, h, w, c = 2, 3, 4, 2, 3, 16
    z = np.random.default_rng(0).normal(size=(videos * chunks, t * h * w, c)).astype(np.float32)
    module = TemporalInformativeAdapter(c, 0.25, residual=residual)
    params = random_params(_Wrap(module, videos, t), jnp.asarray(z), std=0.5)
    got = _Wrap(module, videos, t).apply({"params": params}, jnp.asarray(z))
    ref = torch_tia(z, params["adapter"], videos, chunks, t, h, w, residual)
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5, rtol=1e-5)


def test_tia_on_pieces_of_rows_with_their_halos_matches_torch_reference():
    """The TIA run piece by piece (1, 2 and 3 chunk rows, pieces crossing the border between the
    2 videos) with the edge activations of the neighbouring chunks (tia_halos) gives the
    reference's whole-sequence result; without halos, each chunk on its own (chunk_local)."""
    videos, chunks, t, h, w, c = 2, 3, 4, 2, 3, 16
    z = np.random.default_rng(1).normal(size=(videos * chunks, t * h * w, c)).astype(np.float32)
    module = TemporalInformativeAdapter(c, 0.25)
    p = random_params(_Wrap(module, videos, t), jnp.asarray(z), std=0.5)["adapter"]
    before, after = tia_halos(p, jnp.asarray(z), videos=videos, time_tokens=t)
    ref = torch_tia(z, p, videos, chunks, t, h, w, True)
    for cuts in ([0, 1, 3, 6], [0, 2, 4, 6], [0, 3, 6]):
        got = np.concatenate([tia_rows(p, jnp.asarray(z[i:j]), before[i:j], after[i:j],
                                       time_tokens=t) for i, j in zip(cuts, cuts[1:])])
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5, err_msg=str(cuts))
    # The first chunk of each video reads zeros before it, the last zeros after it.
    assert not np.any(np.asarray(before)[[0, 3]]) and not np.any(np.asarray(after)[[2, 5]])
    local = tia_rows(p, jnp.asarray(z), None, None, time_tokens=t)
    for row in range(videos * chunks):
        one = torch_tia(z[row:row + 1], p, 1, 1, t, h, w, True)
        np.testing.assert_allclose(np.asarray(local)[row:row + 1], one, atol=1e-5, rtol=1e-5)


class _Wrap:
    """Gives the TIA the (model, x) interface of `random_params` with its call keywords bound."""

    def __init__(self, module, videos, t):
        self.module, self.kw = module.clone(name="adapter", parent=None), dict(videos=videos, time_tokens=t)

    def init(self, key, x):
        return {"params": {"adapter": self.module.init(key, x, **self.kw)["params"]}}

    def apply(self, variables, x):
        return self.module.apply({"params": variables["params"]["adapter"]}, x, **self.kw)


def test_tia_initialisation():
    c = 384
    width = adapter_width(c, 0.25)
    z = jnp.zeros((1, 8, c))
    init = lambda key: TemporalInformativeAdapter(c).init(key, z, videos=1, time_tokens=8)["params"]
    p = run(init, jax.random.key(0))
    assert width == 96 and tree.count(p) == 83_905
    for name in ("up/kernel", "up/bias", "down/bias", "dwconv/bias", "pwconv/bias"):
        assert not np.any(np.asarray(tree.flatten(p)[name])), name
    assert float(p["gamma"]) == 1.0 and p["gamma"].shape == ()
    stds = {"down": 0.02, "dwconv": (2 / 3) ** 0.5, "pwconv": (2 / width) ** 0.5}
    tolerance = {"down": 0.03, "dwconv": 0.15, "pwconv": 0.05}  # ~3 sigma for the sample sizes
    for name, std in stds.items():
        sample = np.asarray(p[name]["kernel"]).std()
        assert abs(sample / std - 1) < tolerance[name], (name, sample, std)


def test_zero_up_projection_gives_the_plain_vit():
    x = frames((2, 32, 16, 16, 3))
    adapted = tiny(adapter_mode="adapter")
    params = tree.flatten(random_params(adapted, x))
    params = {k: (jnp.zeros_like(v) if "/adapter/up/" in k else v) for k, v in params.items()}
    plain = {k: v for k, v in params.items() if "/adapter/" not in k}
    y_adapted = apply(adapted, tree.unflatten(params), x)
    y_plain = apply(tiny(adapter_mode="none"), tree.unflatten(plain), x)
    np.testing.assert_array_equal(np.asarray(y_adapted), np.asarray(y_plain))


def test_only_adapters_carry_information_across_chunks():
    x = frames((2, 32, 16, 16, 3))
    perturbed = x.at[0, :16].add(1.0)  # video 0, chunk 0 only
    adapted = tiny(adapter_mode="adapter")
    params = random_params(adapted, x)  # up-projections non-zero
    plain_params = tree.unflatten({k: v for k, v in tree.flatten(params).items() if "/adapter/" not in k})
    for mode, p in (("adapter", params), ("none", plain_params)):
        model = tiny(adapter_mode=mode)
        before, after = apply(model, p, x), apply(model, p, perturbed)
        assert np.any(np.asarray(before[0, :8] != after[0, :8]))  # the perturbed chunk itself
        np.testing.assert_array_equal(before[1], after[1])  # the other video never changes
        neighbour_changed = np.any(np.asarray(before[0, 8:] != after[0, 8:]))
        assert neighbour_changed == (mode == "adapter"), mode


def test_side_mode_is_last_block_plus_parallel_side_adapters():
    x = frames((1, 32, 16, 16, 3))
    side = tiny(depth=3, adapter_mode="side", adapter_blocks=[0, 2])
    params = random_params(side, x)
    features, tokens = apply(side, params, x, return_tokens=True)

    # f_2 (last block): the side model with its up-projections at zero; f_0: a 1-block plain ViT.
    zero_up = tree.unflatten({k: (jnp.zeros_like(v) if re.search(r"side_.*/up/", k) else v)
                              for k, v in tree.flatten(params).items()})
    f_last = apply(side, zero_up, x, return_tokens=True)[1]
    first = {k: params[k] for k in ("patch_embed", "blocks_0")}
    f_first = apply(tiny(depth=1, adapter_mode="none"), first, x, return_tokens=True)[1]
    flat = lambda t: t.reshape(-1, *t.shape[2:])
    expected = flat(f_last)
    for i, f in ((0, f_first), (2, f_last)):
        tia = TemporalInformativeAdapter(32, residual=False)
        expected = expected + tia.apply({"params": params[f"side_adapters_{i}"]}, flat(f),
                                        videos=1, time_tokens=8)
    np.testing.assert_allclose(np.asarray(flat(tokens)), np.asarray(expected), atol=1e-5, rtol=0)
    pooled = expected.reshape(1, 2, 8, 4, 32).mean(axis=3).reshape(1, 16, 32)
    np.testing.assert_allclose(np.asarray(features), np.asarray(pooled), atol=1e-5, rtol=0)


def test_trainable_regex():
    paths = ["backbone/blocks_3/adapter/up/kernel", "backbone/blocks_3/attn/qkv/kernel",
             "backbone/patch_embed/kernel", "backbone/side_adapters_7/down/bias",
             "head/cls/kernel", "other/backbone/blocks_0/adapter/gamma"]
    match = lambda mode, **kw: [p for p in paths if any(re.search(r, p) for r in trainable_regex(mode, **kw))]
    assert match("adapter") == ["backbone/blocks_3/adapter/up/kernel"]
    assert match("side") == ["backbone/side_adapters_7/down/bias"]
    assert match("full") == match("none") == match("adapter_full") == paths[:4]
    assert match("frozen") == []
    assert match("adapter", prefix="other/backbone") == ["other/backbone/blocks_0/adapter/gamma"]
    with pytest.raises(ValueError, match="adapter mode"):
        trainable_regex("lora")
