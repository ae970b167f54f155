"""ETAD detector head (spec etad.md §2): LSTM neck, start/end head, sampled proposal map, three
cascaded refinement stages on 1-D RoI-aligned features. Used as the `head` of
`tadjax.models.detector.Detector` when `config.model.name == "etad"`.

Data flow for features [B, T, C_in] (channels-last; T = D = the anchor map size, 128):

  neck   layer1 (conv k3 g4, GN16, ReLU) -> x1 [B,T,256]; forward LSTM(x1), backward LSTM(x1);
         layer2_f / layer2_d / layer2_b (conv k3 g4, GN16, ReLU) concatenated (f, d, b) -> layer3
         (conv k1 g4, GN16, ReLU) -> x [B,T,256]
  tem    conv k3 g4 (bias), ReLU, conv k1 -> sigmoid (p_start, p_end) [B,T,2]
  anchors  training: K = int(0.06·T(T+1)/2) random valid anchors per video (495 for T=128),
         redrawn every step; inference: all T(T+1)/2. Normalised [start, end] in [0, 1].
  stage i  x_i = x + ReLU(conv k3 g4 (x)); reduce conv k3 -> 128, ReLU; RoI align of the anchor
         extended by 0.5·length on each side into 24 bins (torchvision aligned=False semantics,
         adaptive sampling); heads on the RoI: iou (cls, reg), boundary classes (start, end),
         (Δc, Δlog w)/2 and Δs / Δe from the 6 outer bins; with num_classes > 1 an extra class
         head (our addition: the synthetic set has several classes and no video-level
         classifier). The next stage's anchors are the stop_gradient'ed refinement.

Outputs (dict): "tem" [B,T,2] probabilities, "anchors" [B,S=3,K,2] (anchors each stage saw),
"iou" [B,S,K,2], "reg" [B,S,K,6] = (Δs, Δe, Δc, Δw, cls_s, cls_e) with cls_* probabilities,
"cls_logits" [B,S,K,num_classes] (absent when num_classes == 1).

Parameter paths: `layer1/{conv,norm}`, `mem_f/{ih,hh}/{kernel,bias}`, `mem_b/...`,
`layer2_{f,d,b}/...`, `layer3/...`, `tem_conv1`, `tem_conv2`, `stage_{i}/{residual,reduce,roi_fc,
iou_fc_{j},cls_se_fc_{j},reg_cw_fc_{j},reg_s_fc_{j},reg_e_fc_{j},cls_fc_{j}}`.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

XAVIER = nn.initializers.xavier_uniform()


# ----------------------------------------------------------------------------- anchors

def anchor_map(t: int) -> np.ndarray:
    """All valid anchors of the D×T map (D = T): (d, s) with s + d < T -> [s/T, (s+d+1)/T].
    float32 [T(T+1)/2, 2], ordered by duration index d, then start s."""
    d, s = np.meshgrid(np.arange(t), np.arange(t), indexing="ij")
    valid = s + d < t
    return np.stack([s[valid] / t, (s[valid] + d[valid] + 1) / t], axis=1).astype(np.float32)


def num_train_anchors(t: int, ratio: float) -> int:
    return int(t * (t + 1) // 2 * ratio)


def sample_anchors(key, batch: int, anchors: jax.Array, count: int) -> jax.Array:
    """[B, count, 2]: per video, `count` distinct anchors drawn uniformly in random order."""
    u = jax.random.uniform(key, (batch, anchors.shape[0]))
    idx = jnp.argsort(u, axis=1)[:, :count]
    return anchors[idx]


def refine(anchors: jax.Array, reg: jax.Array) -> jax.Array:
    """Next-stage anchors from (Δs, Δe, Δc, Δw): the mean of the start/end and the
    centre/width refinements (spec §2.4.6). anchors [..., 2], reg [..., >= 4]."""
    s, e = anchors[..., 0], anchors[..., 1]
    length = e - s
    centre = (s + e) / 2
    s1, e1 = s + length * reg[..., 0], e + length * reg[..., 1]
    c2 = centre + length * reg[..., 2]
    l2 = length * jnp.exp(reg[..., 3])
    return jnp.stack([(s1 + c2 - l2 / 2) / 2, (e1 + c2 + l2 / 2) / 2], axis=-1)


# ----------------------------------------------------------------------------- RoI align

def roi_align_1d(feats: jax.Array, rois: jax.Array, bins: int, max_samples: int = 16) -> jax.Array:
    """torchvision roi_align (aligned=False, sampling_ratio=-1) along time, as a weighted sum.

    feats [T, C]; rois [K, 2] in feature-index units (index t sits at coordinate t) ->
    [K, bins, C]. len = max(e - s, 1), G = ceil(len / bins) samples per bin (capped at
    max_samples), sample y = s + k·len/bins + (j + 0.5)·len/bins/G; a sample is 0 outside
    [-1, T], else the linear interpolation at clip(y, 0, T-1); a bin is the mean of its samples.
    Each bin is a weight vector over the T positions (a tent at every sample), so memory is
    K·bins·T rather than K·bins·G·C.
    """
    t = feats.shape[0]
    start, end = rois[:, 0], rois[:, 1]
    length = jnp.maximum(end - start, 1.0)
    bin_size = length / bins
    g = jnp.clip(jnp.ceil(length / bins), 1, max_samples)  # [K]
    positions = jnp.arange(t, dtype=feats.dtype)
    base = start[:, None] + jnp.arange(bins)[None, :] * bin_size[:, None]  # [K, bins]
    weights = jnp.zeros(base.shape + (t,), feats.dtype)
    for j in range(max_samples):
        y = base + (j + 0.5) * (bin_size / g)[:, None]
        use = (j < g)[:, None] & (y >= -1.0) & (y <= t)
        yc = jnp.clip(y, 0.0, t - 1.0)
        tent = jnp.maximum(0.0, 1.0 - jnp.abs(yc[..., None] - positions))
        weights = weights + jnp.where(use[..., None], tent, 0.0)
    weights = weights / g[:, None, None]
    return jnp.einsum("kbt,tc->kbc", weights, feats)


# ----------------------------------------------------------------------------- layers

class ConvNormAct(nn.Module):
    """Conv1d (no bias) + GroupNorm(16, eps 1e-5) + ReLU, channels-last."""

    features: int
    kernel: int = 3
    groups: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        pad = self.kernel // 2
        x = nn.Conv(self.features, (self.kernel,), padding=((pad, pad),),
                    feature_group_count=self.groups, use_bias=False, kernel_init=XAVIER,
                    dtype=self.dtype, param_dtype=jnp.float32, name="conv")(x)
        x = nn.GroupNorm(num_groups=16, epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32,
                         name="norm")(x)
        return nn.relu(x)


class LSTM(nn.Module):
    """One-layer LSTM over axis 1, PyTorch gate order (i, f, g, o), biases b_ih + b_hh, zero
    initial state, every weight U(-1/sqrt(H), 1/sqrt(H)) as PyTorch's default."""

    hidden: int
    reverse: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # [B, T, I] -> [B, T, H]
        bound = 1.0 / math.sqrt(self.hidden)
        init = nn.initializers.uniform(2 * bound)

        def shifted(key, shape, dtype):
            return init(key, shape, dtype) - bound

        def dense(name, inputs):
            return nn.Dense(4 * self.hidden, kernel_init=shifted, bias_init=shifted,
                            dtype=self.dtype, param_dtype=jnp.float32, name=name)(inputs)

        if self.reverse:
            x = x[:, ::-1]
        gates_x = dense("ih", x)  # [B, T, 4H]
        hh = nn.Dense(4 * self.hidden, kernel_init=shifted, bias_init=shifted, dtype=self.dtype,
                      param_dtype=jnp.float32, name="hh")
        b = x.shape[0]
        h0 = jnp.zeros((b, self.hidden), gates_x.dtype)
        if self.is_initializing():
            hh(h0)
        kernel = self.variables["params"]["hh"]["kernel"].astype(gates_x.dtype)
        bias = self.variables["params"]["hh"]["bias"].astype(gates_x.dtype)

        def step(carry, gx):
            h, c = carry
            z = gx + h @ kernel + bias
            i, f, g, o = jnp.split(z, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        _, hs = jax.lax.scan(step, (h0, h0), jnp.swapaxes(gates_x, 0, 1))
        hs = jnp.swapaxes(hs, 0, 1)
        return hs[:, ::-1] if self.reverse else hs


class Stage(nn.Module):
    """One proposal-refinement stage on neck features x [B, T, 256] and anchors [B, K, 2]."""

    num_classes: int = 1
    roi_size: int = 24
    extend_ratio: float = 0.5
    roi_dim: int = 128
    mid_dim: int = 512
    fc_dim: int = 128
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, anchors):
        b, t, c = x.shape
        conv = dict(kernel_init=XAVIER, dtype=self.dtype, param_dtype=jnp.float32)
        x = x + nn.relu(nn.Conv(c, (3,), padding=((1, 1),), feature_group_count=4,
                                name="residual", **conv)(x))
        x = nn.relu(nn.Conv(self.roi_dim, (3,), padding=((1, 1),), name="reduce", **conv)(x))
        start, end = anchors[..., 0] * t, anchors[..., 1] * t
        length = end - start
        rois = jnp.stack([start - self.extend_ratio * length, end + self.extend_ratio * length], -1)
        roi = jax.vmap(lambda f, r: roi_align_1d(f, r, self.roi_size))(
            x.astype(jnp.float32), rois.astype(jnp.float32)).astype(self.dtype)  # [B,K,bins,C]
        k = anchors.shape[1]
        channel_major = jnp.swapaxes(roi, -1, -2)  # [B, K, C, bins]: flatten as c·bins + bin
        h = nn.relu(nn.Dense(self.mid_dim, name="roi_fc", **conv)(
            channel_major.reshape(b, k, -1)))
        hidden = (self.fc_dim,) * 3
        side = self.roi_size // 4

        def mlp(prefix, inp, out, hid=hidden):  # Dense + ReLU per hidden width, then Dense
            for j, width in enumerate(hid):
                inp = nn.relu(nn.Dense(width, name=f"{prefix}_{j}", **conv)(inp))
            return nn.Dense(out, name=f"{prefix}_{len(hid)}", **conv)(inp)

        iou = jax.nn.sigmoid(mlp("iou_fc", h, 2))
        cls_se = jax.nn.sigmoid(mlp("cls_se_fc", h, 2))
        reg_cw = mlp("reg_cw_fc", h, 2) / 2
        before = channel_major[..., :side].reshape(b, k, -1)
        after = channel_major[..., -side:].reshape(b, k, -1)
        reg_s = mlp("reg_s_fc", before, 1, (self.mid_dim,) + hidden)
        reg_e = mlp("reg_e_fc", after, 1, (self.mid_dim,) + hidden)
        reg = jnp.concatenate([reg_s, reg_e, reg_cw, cls_se], axis=-1)
        out = {"iou": iou.astype(jnp.float32), "reg": reg.astype(jnp.float32)}
        if self.num_classes > 1:
            out["cls_logits"] = mlp("cls_fc", h, self.num_classes).astype(jnp.float32)
        return out


class ETADHead(nn.Module):
    """The ETAD detector on features [B, T, C_in] (see the module docstring).

    Attributes: num_classes (1: class-agnostic, as the reference with a video-level classifier),
    max_seq_len (T, the map size), proposal_ratio (training anchors, 0.06), num_stages (3),
    roi_size (24), hidden (256), dtype.
    """

    num_classes: int = 1
    max_seq_len: int = 128
    proposal_ratio: float = 0.06
    num_stages: int = 3
    roi_size: int = 24
    hidden: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, feats, mask=None, *, train: bool):
        del mask  # the anchor map covers the whole grid (resize mode / full windows)
        b, t, _ = feats.shape
        if t != self.max_seq_len:
            raise ValueError(f"ETADHead: features have {t} steps, the anchor map expects "
                             f"max_seq_len={self.max_seq_len}")
        h = self.hidden
        x = feats.astype(self.dtype)
        x1 = ConvNormAct(h, dtype=self.dtype, name="layer1")(x)
        xf = LSTM(h, dtype=self.dtype, name="mem_f")(x1)
        xb = LSTM(h, reverse=True, dtype=self.dtype, name="mem_b")(x1)
        x = jnp.concatenate([ConvNormAct(h // 2, dtype=self.dtype, name="layer2_f")(xf),
                             ConvNormAct(h, dtype=self.dtype, name="layer2_d")(x1),
                             ConvNormAct(h // 2, dtype=self.dtype, name="layer2_b")(xb)], axis=-1)
        x = ConvNormAct(h, kernel=1, dtype=self.dtype, name="layer3")(x)

        conv = dict(kernel_init=XAVIER, dtype=self.dtype, param_dtype=jnp.float32)
        tem = nn.relu(nn.Conv(h, (3,), padding=((1, 1),), feature_group_count=4,
                              name="tem_conv1", **conv)(x))
        tem = jax.nn.sigmoid(nn.Conv(2, (1,), name="tem_conv2", **conv)(tem).astype(jnp.float32))

        all_anchors = jnp.asarray(anchor_map(t))
        if train:
            anchors = sample_anchors(self.make_rng("dropout"), b, all_anchors,
                                     num_train_anchors(t, self.proposal_ratio))
        else:
            anchors = jnp.broadcast_to(all_anchors, (b,) + all_anchors.shape)
        outs = []
        for i in range(self.num_stages):
            out = Stage(self.num_classes, self.roi_size, dtype=self.dtype, name=f"stage_{i}")(
                x, anchors)
            out["anchors"] = anchors
            outs.append(out)
            anchors = jax.lax.stop_gradient(refine(anchors, out["reg"]))
        result = {k: jnp.stack([o[k] for o in outs], axis=1) for k in outs[0]}
        result["tem"] = tem
        return result
