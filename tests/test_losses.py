"""Focal loss, DIoU loss, the loss normaliser and the full detection loss on hand-computed cases."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tadjax.detection.losses import (detection_loss, diou_loss, sigmoid_focal_loss,
                                     update_normalizer)
from tadjax.detection.points import make_points


def _focal(x, t, alpha=0.25, gamma=2.0):
    """Closed form for a scalar logit x and (soft) target t."""
    p = 1.0 / (1.0 + math.exp(-x))
    ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    return (alpha * t + (1 - alpha) * (1 - t)) * (1 - p_t) ** gamma * ce


@pytest.mark.parametrize("x, t", [(0.5, 1.0), (-1.2, 0.0), (2.0, 0.0), (0.3, 0.3), (-4.595, 1.0)])
def test_focal_closed_form(x, t):
    np.testing.assert_allclose(float(sigmoid_focal_loss(jnp.float32(x), jnp.float32(t))),
                               _focal(x, t), rtol=1e-5)


def test_focal_extremes_and_alpha_off():
    out = np.asarray(sigmoid_focal_loss(jnp.array([100.0, -100.0, 100.0]),
                                        jnp.array([0.0, 1.0, 1.0])))
    # (1 - p_t) -> 1, BCE -> 100: alpha_t * 100; a confident correct logit costs ~0.
    np.testing.assert_allclose(out, [75.0, 25.0, 0.0], atol=1e-4)
    p = 1 / (1 + math.exp(-0.5))
    np.testing.assert_allclose(float(sigmoid_focal_loss(0.5, 1.0, alpha=-1)),
                               (1 - p) ** 2 * -math.log(p), rtol=1e-5)


def test_diou_loss_hand_cases():
    pred = jnp.array([[0.0, 4.0], [0.0, 1.0], [3.0, 7.0], [0.0, 10.0]])
    target = jnp.array([[2.0, 6.0], [3.0, 4.0], [3.0, 7.0], [2.0, 4.0]])
    # [0,4] vs [2,6]: IoU 2/6, centres 2 and 4, enclosing 6: 1 - (1/3 - 4/36) = 7/9.
    # [0,1] vs [3,4]: IoU 0, centre distance 3, enclosing 4: 1 + 9/16.
    # identical: 0.  [0,10] vs [2,4]: IoU 0.2, centres 5 and 3, enclosing 10: 1 - (0.2 - 0.04).
    np.testing.assert_allclose(np.asarray(diou_loss(pred, target)),
                               [7 / 9, 1 + 9 / 16, 0.0, 0.84], rtol=1e-6, atol=1e-7)
    # Degenerate (zero-length, same point) pair is finite thanks to the eps clamps.
    assert float(diou_loss(jnp.array([5.0, 5.0]), jnp.array([5.0, 5.0]))) == 1.0


def test_update_normalizer():
    assert float(update_normalizer(100.0, 3)) == pytest.approx(90.3)
    assert float(update_normalizer(100.0, 0)) == pytest.approx(90.1)  # max(num_pos, 1)
    assert float(update_normalizer(200.0, 10, momentum=0.5)) == pytest.approx(105.0)


# One video, T = 32 (63 points), 3 classes, GT [10, 20] of class 2. Its positives (see
# test_assignment) are (14, stride 2) with target (2, 3), (16, stride 2) with (3, 2) and
# (12, stride 4) with (0.5, 2).
POINTS = make_points(32)
P = len(POINTS)
# Cheap XLA settings: these tiny programs need compiling fast, not running fast.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_loss = jax.jit(detection_loss, static_argnames=("num_classes", "normalizer_momentum",
                                                 "label_smoothing", "loss_weight"),
                compiler_options=FAST)
X0 = -1.0


def _index(position, stride):
    return int(np.flatnonzero((POINTS[:, 0] == position) & (POINTS[:, 3] == stride))[0])


def _outputs(batch=1):
    reg = np.zeros((batch, P, 2), np.float32)
    reg[:, _index(14, 2)] = [2.0, 3.0]  # exact: DIoU loss 0
    reg[:, _index(16, 2)] = [1.0, 2.0]  # [14, 20] vs [10, 20]: IoU 0.6, centres 17/15: 0.44
    reg[:, _index(12, 4)] = [0.5, 2.0]  # exact
    return {"cls_logits": jnp.full((batch, P, 3), X0, jnp.float32), "reg": jnp.asarray(reg),
            "point_mask": jnp.ones((batch, P), bool)}


GT = dict(gt_segments=jnp.array([[[10.0, 20.0], [0.0, 0.0]]]), gt_labels=jnp.array([[2, 0]]),
          gt_valid=jnp.array([[True, False]]))


def _expected_cls_sum(num_points, num_pos, eps=0.0):
    pos_t, neg_t = 1 - eps + eps / 4, eps / 4
    return num_pos * _focal(X0, pos_t) + (num_points * 3 - num_pos) * _focal(X0, neg_t)


@pytest.mark.parametrize("normalizer, momentum, expected_norm",
                         [(None, None, 3.0), (100.0, 0.9, 90.3), (50.0, None, 50.0)])
def test_detection_loss_hand_case(normalizer, momentum, expected_norm):
    total, aux = _loss(_outputs(), POINTS, **GT, num_classes=3, normalizer=normalizer,
                                normalizer_momentum=momentum)
    assert float(aux["num_pos"]) == 3.0
    assert float(aux["normalizer"]) == pytest.approx(expected_norm)
    np.testing.assert_allclose(float(aux["cls_loss"]), _expected_cls_sum(P, 3) / expected_norm,
                               rtol=1e-5)
    np.testing.assert_allclose(float(aux["reg_loss"]), 0.44 / expected_norm, rtol=1e-5)
    np.testing.assert_allclose(float(total), float(aux["cls_loss"] + aux["reg_loss"]), rtol=1e-6)


def test_detection_loss_masked_point_smoothing_and_weight():
    out = _outputs()
    out["point_mask"] = out["point_mask"].at[0, _index(16, 2)].set(False)
    _, aux = _loss(out, POINTS, **GT, num_classes=3, label_smoothing=0.1,
                            loss_weight=2.0)
    # The masked positive neither counts nor contributes; its DIoU loss (0.44) is gone.
    assert float(aux["num_pos"]) == 2.0
    np.testing.assert_allclose(float(aux["cls_loss"]),
                               _expected_cls_sum(P - 1, 2, eps=0.1) / 2.0, rtol=1e-5)
    assert float(aux["reg_loss"]) == pytest.approx(0.0, abs=1e-6)
    out = _outputs()
    _, aux = _loss(out, POINTS, **GT, num_classes=3, loss_weight=2.0)
    np.testing.assert_allclose(float(aux["reg_loss"]), 2 * 0.44 / 3, rtol=1e-5)


def test_detection_loss_batch_with_padded_gt_and_no_positives():
    out = _outputs(batch=2)
    gt = dict(gt_segments=jnp.array([[[10.0, 20.0], [0.0, 0.0]], [[10.0, 20.0], [3.0, 9.0]]]),
              gt_labels=jnp.array([[2, 0], [2, 1]]),
              gt_valid=jnp.array([[True, False], [False, False]]))
    total, aux = _loss(out, POINTS, **gt, num_classes=3)
    assert float(aux["num_pos"]) == 3.0  # the second video's GTs are padding
    np.testing.assert_allclose(float(aux["cls_loss"]),
                               (_expected_cls_sum(P, 3) + _expected_cls_sum(P, 0)) / 3, rtol=1e-5)
    np.testing.assert_allclose(float(aux["reg_loss"]), 0.44 / 3, rtol=1e-5)

    # No positive at all: reg loss exactly 0 and finite gradients.
    empty = dict(gt_segments=jnp.zeros((1, 2, 2)), gt_labels=jnp.zeros((1, 2), int),
                 gt_valid=jnp.zeros((1, 2), bool))
    out = _outputs()
    loss_fn = lambda cls, reg: detection_loss(dict(out, cls_logits=cls, reg=reg), POINTS,
                                              **empty, num_classes=3, normalizer=100.0,
                                              normalizer_momentum=0.9)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True),
                      compiler_options=FAST)
    (total, aux), grads = grad_fn(out["cls_logits"], out["reg"])
    assert float(aux["reg_loss"]) == 0.0 and float(aux["num_pos"]) == 0.0
    assert float(aux["normalizer"]) == pytest.approx(90.1)
    assert np.all(np.isfinite(np.asarray(grads[0]))) and np.any(np.asarray(grads[0]))
    assert not np.any(np.asarray(grads[1]))


def test_adaptive_loss_weight():
    _, aux = _loss(_outputs(), POINTS, **GT, num_classes=3, loss_weight=0.0)
    # weight = cls_loss / max(reg_loss, 0.01), so the weighted reg loss equals the cls loss.
    np.testing.assert_allclose(float(aux["reg_loss"]), float(aux["cls_loss"]), rtol=1e-5)
