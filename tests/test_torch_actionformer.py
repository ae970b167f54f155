"""The PyTorch ActionFormer port (tadjax/tools/torch_actionformer.py) computes what the flax model
and tadjax's detection loss compute: outputs, losses and input gradients, with flax's parameters
copied in by `load_flax_params`.

The flax parameter trees have the paths and shapes of `ActionFormer.init` (from `jax.eval_shape`)
and random values drawn with numpy: compiling flax's initialisers costs more than the rest of this
file, and random LayerNorm / drop-path / head scales and biases check more than their 1 / 0 / 1e-4
initial values would.
"""
import ast
import copy
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tadjax.detection.assignment import assign_targets_batch  # noqa: E402
from tadjax.detection.losses import detection_loss as jax_detection_loss  # noqa: E402
from tadjax.detection.points import make_points  # noqa: E402
from tadjax.models.actionformer import ActionFormer as FlaxActionFormer  # noqa: E402
from tadjax import tree as tree_lib  # noqa: E402
from tadjax.tools import torch_actionformer as ta  # noqa: E402

# Cheap XLA settings: these small programs need compiling fast, not running fast.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

C_IN, WIDTH, HEADS, NUM_CLASSES = 8, 64, 4, 5
NORMALIZER = 7.5


def _config(arch, path_pdrop, window):
    return dict(num_classes=NUM_CLASSES, channels=WIDTH, arch=arch, n_head=HEADS,
                mha_win_size=window, path_pdrop=path_pdrop, num_levels=arch[2] + 1)


def _inputs(length, valid):
    """Random features (padded positions too: the first conv sees them in both models) and a
    mask; the second video has a padded tail of odd length (the strided masks round up)."""
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(len(valid), length, C_IN)).astype(np.float32)
    mask = np.arange(length)[None, :] < np.asarray(valid)[:, None]
    return feats, mask


@functools.lru_cache(maxsize=None)
def _param_shapes(arch, length):
    model = FlaxActionFormer(**_config(arch, 0.1, -1))
    x = jax.ShapeDtypeStruct((1, length, C_IN), jnp.float32)
    m = jax.ShapeDtypeStruct((1, length), jnp.bool_)
    shapes = jax.eval_shape(lambda k, x, m: model.init(k, x, m, train=False)["params"],
                            jax.random.PRNGKey(0), x, m)
    return tree_lib.flatten(shapes)


def _flax_params(arch, length, path_pdrop, seed=0):
    """A flax parameter tree of `FlaxActionFormer(**_config(arch, path_pdrop, ...))`: kernels
    uniform(+-1/sqrt(fan_in)) as the flax init, every scale 1 + N(0, 0.3^2), every bias
    N(0, 0.3^2)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, s in _param_shapes(arch, length).items():
        if "drop_path" in path and not path_pdrop > 0:
            continue
        if len(s.shape) >= 2:
            bound = 1.0 / np.sqrt(np.prod(s.shape[:-1]))
            value = rng.uniform(-bound, bound, s.shape)
        else:
            value = 0.3 * rng.normal(size=s.shape) + (path.split("/")[-1].startswith("scale"))
        flat[path] = np.asarray(value, np.float32)
    return tree_lib.unflatten(flat)


def _torch_model(arch, path_pdrop, window, params):
    model = ta.ActionFormer(C_IN, **_config(arch, path_pdrop, window))
    return ta.load_flax_params(model, params).eval()


def _assert_close(actual, expected, rtol=1e-4):
    """Elementwise |a - e| <= rtol * (|e| + max|e|): relative, with the tensor's scale as floor."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


# The full pyramid: 2 embedding convs, 2 stem blocks, 5 strided blocks, 6 levels.
ARCH, T, VALID = (2, 2, 5), 64, (64, 45)


def _compare_outputs(out, expected):
    """Torch outputs vs flax outputs (numpy) on the valid points; returns the point mask."""
    valid = np.asarray(expected["point_mask"])
    np.testing.assert_array_equal(out["point_mask"].numpy(), valid)
    assert valid[0].all() and not valid[1].all()
    cls, reg = out["cls_logits"].detach().numpy(), out["reg"].detach().numpy()
    assert cls.dtype == np.float32 and reg.dtype == np.float32
    cls_expected, reg_expected = (np.asarray(expected[k])[valid] for k in ("cls_logits", "reg"))
    _assert_close(cls[valid], cls_expected)
    _assert_close(reg[valid], reg_expected)
    # Nontrivial: logits spread over classes and points; regression both active and inactive.
    assert cls_expected.std() > 0.1
    assert 0.2 < (reg_expected > 0).mean() < 1.0
    return valid


def test_outputs_match_flax():
    """Full pyramid, global attention, no drop path (the loss test below covers a local window
    and path_pdrop > 0, whose AffineDropPath scales only exist then)."""
    path_pdrop, window = 0.0, -1
    params = _flax_params(ARCH, T, path_pdrop)
    feats, mask = _inputs(T, VALID)
    model = FlaxActionFormer(**_config(ARCH, path_pdrop, window))
    apply = lambda p, x, m: model.apply({"params": p}, x, m, train=False)
    args = (params, jnp.asarray(feats), jnp.asarray(mask))
    expected = jax.jit(apply).lower(*args).compile(compiler_options=FAST)(*args)

    torch_model = _torch_model(ARCH, path_pdrop, window, params)
    assert (torch_model.stem[0].drop_path_attn is not None) == (path_pdrop > 0)
    with torch.no_grad():
        out = torch_model(torch.from_numpy(feats), torch.from_numpy(mask))

    valid = _compare_outputs(out, expected)
    assert valid.shape == (2, T * 63 // 32)


# Loss and gradients on a shorter pyramid (2 embedding convs, 1 stem block, 2 strided blocks:
# every block type) to keep the backward pass's compilation short.
LOSS_ARCH, LOSS_T, LOSS_VALID = (2, 1, 2), 32, (32, 21)
LOSS_POINTS = make_points(LOSS_T, strides=(1, 2, 4), regress_ranges=((0, 4), (4, 8), (8, 10000)))


def _random_gts(seed=1, num_gts=4):
    """Segments inside each video's valid part, lengths 2..20 (positives on every level); the
    second video's last row is padding."""
    rng = np.random.default_rng(seed)
    segments = np.zeros((len(LOSS_VALID), num_gts, 2), np.float32)
    for b, valid in enumerate(LOSS_VALID):
        length = rng.uniform(2.0, 20.0, num_gts)
        start = rng.uniform(0.0, valid - length)
        segments[b] = np.stack([start, start + length], -1)
    labels = rng.integers(0, NUM_CLASSES, (len(LOSS_VALID), num_gts)).astype(np.int32)
    gt_valid = np.ones((len(LOSS_VALID), num_gts), bool)
    gt_valid[1, -1] = False
    return segments, labels, gt_valid


def test_loss_and_input_gradients_match_flax():
    path_pdrop, window = 0.1, 5
    params = _flax_params(LOSS_ARCH, LOSS_T, path_pdrop, seed=1)
    feats, mask = _inputs(LOSS_T, LOSS_VALID)
    gts = _random_gts()
    model = FlaxActionFormer(**_config(LOSS_ARCH, path_pdrop, window))
    points = jnp.asarray(LOSS_POINTS)

    def loss(x, params, m, segments, labels, gt_valid):
        out = model.apply({"params": params}, x, m, train=False)
        total, aux = jax_detection_loss(out, points, segments, labels, gt_valid,
                                        num_classes=NUM_CLASSES, normalizer=NORMALIZER,
                                        normalizer_momentum=None)
        targets = assign_targets_batch(points, segments, labels, gt_valid, NUM_CLASSES)
        return total, (aux, targets, out)

    args = (jnp.asarray(feats), params, jnp.asarray(mask), *(jnp.asarray(a) for a in gts))
    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(*args).compile(
        compiler_options=FAST)
    (j_total, (j_aux, targets, j_out)), j_grad = grad_fn(*args)
    cls_targets, reg_targets = (torch.from_numpy(np.array(a)) for a in targets)

    torch_model = _torch_model(LOSS_ARCH, path_pdrop, window, params)
    x = torch.from_numpy(feats).requires_grad_(True)
    out = torch_model(x, torch.from_numpy(mask))
    total, cls_loss, reg_loss = ta.detection_loss(out, torch.from_numpy(LOSS_POINTS),
                                                  cls_targets, reg_targets, NORMALIZER)
    total.backward()
    _compare_outputs(out, j_out)  # local attention, path_pdrop > 0 (eval mode)

    # Nontrivial: positives on every level and in both videos, both losses clearly nonzero.
    positive = (cls_targets.sum(-1) > 0).numpy() & out["point_mask"].numpy()
    assert float(j_aux["num_pos"]) == positive.sum() >= 10
    assert positive[0].any() and positive[1].any()
    assert set(LOSS_POINTS[positive.any(0), 3].tolist()) == {1.0, 2.0, 4.0}
    assert float(j_aux["cls_loss"]) > 0.05 and float(j_aux["reg_loss"]) > 0.05
    for mine, theirs in ((total, j_total), (cls_loss, j_aux["cls_loss"]),
                         (reg_loss, j_aux["reg_loss"])):
        np.testing.assert_allclose(mine.item(), float(theirs), rtol=1e-4)

    j_grad = np.asarray(j_grad)
    assert np.abs(j_grad[:, :LOSS_VALID[1]]).min() > 0
    # Only the first padded frame reaches a valid output (through the first conv).
    assert np.all(j_grad[1, LOSS_VALID[1] + 1:] == 0) and np.any(j_grad[1, LOSS_VALID[1]])
    _assert_close(x.grad.numpy(), j_grad)

    # The adaptive weight (loss_weight <= 0) makes the weighted reg loss equal the cls loss.
    _, cls_loss, reg_loss = ta.detection_loss(out, LOSS_POINTS, cls_targets, reg_targets,
                                              NORMALIZER, loss_weight=0.0)
    np.testing.assert_allclose(reg_loss.item(), cls_loss.item(), rtol=1e-6)


def test_abs_pe_and_label_smoothing_match_flax():
    """The ActivityNet configs' extras: the absolute position embedding (training length, and a
    longer input in eval mode, where both resize the table) and label smoothing in the loss."""
    params = _flax_params(LOSS_ARCH, LOSS_T, 0.0, seed=2)
    feats, mask = _inputs(LOSS_T, LOSS_VALID)
    gts = _random_gts(seed=3)
    points = jnp.asarray(LOSS_POINTS)
    eps = 0.1
    for max_seq_len in (LOSS_T, LOSS_T // 2):   # the table as it is, then resized
        cfg = dict(_config(LOSS_ARCH, 0.0, -1), use_abs_pe=True, max_seq_len=max_seq_len)
        model = FlaxActionFormer(**cfg)

        def loss(x, params, m, segments, labels, gt_valid):
            out = model.apply({"params": params}, x, m, train=False)
            total, aux = jax_detection_loss(out, points, segments, labels, gt_valid,
                                            num_classes=NUM_CLASSES, normalizer=NORMALIZER,
                                            normalizer_momentum=None, label_smoothing=eps)
            targets = assign_targets_batch(points, segments, labels, gt_valid, NUM_CLASSES)
            return total, (targets, out)

        args = (jnp.asarray(feats), params, jnp.asarray(mask), *(jnp.asarray(a) for a in gts))
        (j_total, (targets, j_out)), j_grad = jax.jit(
            jax.value_and_grad(loss, has_aux=True)).lower(*args).compile(
                compiler_options=FAST)(*args)
        torch_model = ta.load_flax_params(ta.ActionFormer(C_IN, **cfg), params).eval()
        x = torch.from_numpy(feats).requires_grad_(True)
        out = torch_model(x, torch.from_numpy(mask))
        _compare_outputs(out, j_out)
        cls_t, reg_t = (torch.from_numpy(np.array(a)) for a in targets)
        total, _, _ = ta.detection_loss(out, LOSS_POINTS, cls_t, reg_t, NORMALIZER,
                                        label_smoothing=eps)
        total.backward()
        np.testing.assert_allclose(total.item(), float(j_total), rtol=1e-4)
        _assert_close(x.grad.numpy(), np.asarray(j_grad))
    # Nontrivial: the embedding and the smoothing each change the result.
    plain = ta.load_flax_params(ta.ActionFormer(C_IN, **_config(LOSS_ARCH, 0.0, -1)),
                                params).eval()
    with torch.no_grad():
        out_plain = plain(torch.from_numpy(feats), torch.from_numpy(mask))
        assert not torch.allclose(out_plain["cls_logits"], out["cls_logits"], atol=1e-3)
        unsmoothed, _, _ = ta.detection_loss(out, LOSS_POINTS, cls_t, reg_t, NORMALIZER)
    assert abs(unsmoothed.item() - total.item()) > 1e-3 * abs(total.item())
    # Training on a longer input than the table is an error, as in flax.
    with pytest.raises(ValueError, match="max_seq_len"):
        torch_model.train()(torch.from_numpy(feats), torch.from_numpy(mask))


def test_bad_parameter_tree_names_the_path():
    params = {"params": _flax_params(ARCH, T, 0.1)}
    torch_model = ta.ActionFormer(C_IN, **_config(ARCH, 0.1, -1))
    ta.load_flax_params(torch_model, params)  # the full tree loads ({'params': ...} or not)
    assert torch_model.head.scale[2].item() == float(params["params"]["head"]["scale_2"])

    fresh = ta.ActionFormer(C_IN, **_config(ARCH, 0.1, -1))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    p = copy.deepcopy(params["params"])
    del p["embed_0"]["conv"]["kernel"]
    p["branch_4"]["attn"]["extra"] = {"kernel": np.zeros((3,), np.float32)}
    p["neck"]["norm_2"]["scale"] = np.zeros((WIDTH + 1,), np.float32)
    with pytest.raises(ValueError) as err:
        ta.load_flax_params(fresh, p)
    message = str(err.value)
    assert "missing: embed_0/conv/kernel" in message
    assert "unused: branch_4/attn/extra/kernel" in message
    assert f"neck/norm_2/scale: got ({WIDTH + 1},), expected ({WIDTH},)" in message
    for k, v in fresh.state_dict().items():  # nothing was copied
        assert torch.equal(v, before[k]), k

    # A model without drop-path scales does not take a tree that has them.
    with pytest.raises(ValueError, match="unused: stem_0/drop_path_attn/scale"):
        ta.load_flax_params(ta.ActionFormer(C_IN, **_config(ARCH, 0.0, -1)), params)


def test_initialisation_and_train_mode_drop_path():
    torch.manual_seed(0)
    model = ta.ActionFormer(C_IN, **_config(ARCH, 0.1, -1))
    state = model.state_dict()
    assert torch.all(state["head.cls_head.bias"] == -np.log(99.0))
    bound = 1 / np.sqrt(3 * WIDTH)
    assert 0 < state["head.reg_head.bias"].abs().max() <= bound  # PyTorch's default bias
    assert torch.all(state["stem.0.drop_path_attn.scale"] == 1e-4)
    assert all(s.item() == 1.0 for s in model.head.scale)
    for name in ("query", "key", "value", "proj"):
        assert not state[f"branch.1.attn.{name}.bias"].any()
    assert not state["stem.0.mlp.fc1.bias"].any()
    kernel = state["embed.0.conv.weight"]
    assert 0.9 * (1 / np.sqrt(3 * C_IN)) < kernel.abs().max() <= 1 / np.sqrt(3 * C_IN)
    # Input dropout (the ActivityNet configs' Dropout1d): whole channels of a sample, in training.
    model = ta.ActionFormer(C_IN, NUM_CLASSES, channels=WIDTH, arch=(1, 0, 1), num_levels=2,
                            input_pdrop=0.5).train()
    x = torch.ones(64, 8, C_IN)
    dropped = model.input_dropout(x.transpose(1, 2)).transpose(1, 2)
    per_channel = dropped[:, 0, :]
    assert torch.all(dropped == per_channel[:, None, :])   # the same along time
    assert set(per_channel.unique().tolist()) == {0.0, 2.0}
    assert 0.3 < float((per_channel == 0).float().mean()) < 0.7

    drop = ta.AffineDropPath(16, rate=0.5).train()
    with torch.no_grad():
        drop.scale.fill_(2.0)
    x = torch.randn(64, 10, 16)
    y = drop(x)
    kept = y.flatten(1).abs().sum(1) > 0
    assert 5 < int(kept.sum()) < 59  # whole samples dropped, others kept and rescaled
    torch.testing.assert_close(y[kept], x[kept] * 2.0 / 0.5)
    torch.testing.assert_close(drop.eval()(x), x * 2.0)


def test_module_imports_only_torch_numpy_and_stdlib():
    tree = ast.parse(inspect.getsource(ta))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported == {"__future__", "math", "typing", "numpy", "torch"}
