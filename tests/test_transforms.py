import numpy as np
import pytest

from tadjax.data import transforms as T


def clip(t=6, h=40, w=56, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def test_random_resized_crop_box_bounds_and_fallback():
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, h, w = T.random_resized_crop_box(182, 242, rng)
        assert 0 <= top and top + h <= 182 and 0 <= left and left + w <= 242
        assert 0.08 * 182 * 242 * 0.9 <= h * w <= 182 * 242
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # Impossible areas: centred square of the short side.
    assert T.random_resized_crop_box(100, 160, rng, area_range=(2.0, 3.0)) == (0, 30, 100, 100)
    a = T.random_resized_crop_box(182, 242, np.random.default_rng(5))
    assert a == T.random_resized_crop_box(182, 242, np.random.default_rng(5))


def test_train_augment_draws_once_per_clip():
    """Each frame of a clip gets exactly what it would get alone with the same draws."""
    frames = clip(t=5)
    cfg = T.TrainAugment(short_side=40, out_size=32, flip_prob=0.5)
    for seed in range(6):
        whole = T.train_augment(frames, np.random.default_rng(seed), cfg)
        assert whole.shape == (5, 32, 32, 3) and whole.dtype == np.uint8
        for i in range(5):
            alone = T.train_augment(frames[i:i + 1], np.random.default_rng(seed), cfg)
            np.testing.assert_array_equal(whole[i], alone[0])
    same = T.train_augment(np.repeat(frames[:1], 4, 0), np.random.default_rng(0), cfg)
    assert (same == same[:1]).all()


def test_resize_and_crop():
    frames = clip(t=2, h=30, w=40)
    assert T.resize(frames, (30, 40)) is frames
    const = np.full((2, 30, 40, 3), 77, np.uint8)
    assert (T.resize(const, (13, 17)) == 77).all()
    assert T.resize_short_side(frames, 15).shape == (2, 15, 20, 3)
    # Crop + resize in one call equals crop then resize.
    np.testing.assert_array_equal(T.resize(frames, (10, 12), box=(3, 5, 20, 24)),
                                  T.resize(np.ascontiguousarray(T.crop(frames, (3, 5, 20, 24))), (10, 12)))
    assert T.center_crop_box(120, 160, 100) == (10, 30, 100, 100)
    np.testing.assert_array_equal(T.hflip(frames)[:, :, 0], frames[:, :, -1])


def test_eval_augment():
    frames = clip(t=3, h=120, w=160)
    out = T.eval_augment(frames, size=60)  # short side 60 -> 60 x 80 -> centre 60 x 60
    expected = T.resize(frames, (60, 80))[:, :, 10:70]
    np.testing.assert_array_equal(out, expected)
    already = clip(t=2, h=60, w=90)
    np.testing.assert_array_equal(T.eval_augment(already, size=60), already[:, :, 15:75])
    with pytest.raises(ValueError, match="uint8"):
        T.eval_augment(frames.astype(np.float32))


def test_color_jitter_hand_cases():
    frames = clip(t=3)
    np.testing.assert_array_equal(T.apply_color_jitter(frames, T.ColorJitterDraw()), frames)
    x = np.array([[[[100, 200, 0]]]], np.uint8)
    np.testing.assert_array_equal(T.apply_color_jitter(x, T.ColorJitterDraw(brightness=1.5)), [[[[150, 255, 0]]]])
    # Saturation 0: every pixel becomes its gray level.
    gray = T.apply_color_jitter(frames, T.ColorJitterDraw(saturation=0.0))
    expected = np.rint(frames.astype(np.float64) @ [0.299, 0.587, 0.114])
    np.testing.assert_allclose(gray[..., 0], expected, atol=1)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    # Contrast 0: every pixel of a frame becomes the frame's mean gray level.
    flat = T.apply_color_jitter(frames, T.ColorJitterDraw(contrast=0.0))
    for f, o in zip(frames, flat):
        assert np.abs(o.astype(float) - (f.astype(np.float64) @ [0.299, 0.587, 0.114]).mean()).max() <= 0.5 + 1e-6
    # Hue: rotation by a full turn is the identity; gray pixels are unchanged by any rotation.
    np.testing.assert_allclose(T.hue_matrix(1.0), np.eye(3), atol=1e-5)
    grays = np.repeat(np.arange(0, 256, 5, dtype=np.uint8)[None, None, :, None], 3, axis=3)
    np.testing.assert_array_equal(T.apply_color_jitter(grays, T.ColorJitterDraw(hue=0.37)), grays)


def test_draw_color_jitter_ranges():
    rng = np.random.default_rng(0)
    for _ in range(50):
        d = T.draw_color_jitter(rng)
        assert 0.5 <= d.brightness <= 1.5 and 0.5 <= d.contrast <= 1.5 and 0.5 <= d.saturation <= 1.5
        assert -0.1 <= d.hue <= 0.1 and sorted(d.order) == [0, 1, 2, 3]
