"""3-Augment against the official augment.py ops, written here with PIL / torchvision.

The official ``augment.py`` imports ``timm.data.transforms._pil_interp``, gone from current
timm, so its classes are restated with the same calls: ``gray_scale`` = ``Grayscale(3)``,
``Solarization`` = ``ImageOps.solarize(img)``, ``GaussianBlur`` = ``img.filter(
ImageFilter.GaussianBlur(radius))``, ``--src`` = ``Resize(size, 3)`` + ``RandomCrop(size,
padding=4, padding_mode='reflect')``.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

from deit_jax import augment
from deit_jax.augment import tf_random, three_augment


def _images():
    rng = np.random.RandomState(0)
    noise = rng.randint(0, 256, (37, 53, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:41, :29]
    # Smooth ramps with sharp wrap-around edges: blur differences show on both.
    ramps = np.stack([(xx * 9) % 256, (yy * 7) % 256, ((xx + yy) * 5) % 256], -1)
    return noise, ramps.astype(np.uint8)


def _seed(i):
    return tf.constant([i, 7], tf.int64)


@pytest.mark.parametrize("which", [0, 1])
def test_grayscale_and_solarize_equal_pil(which):
    image = _images()[which]
    pil = Image.fromarray(image)
    np.testing.assert_array_equal(three_augment.grayscale(image).numpy(),
                                  np.asarray(T.Grayscale(3)(pil)))
    np.testing.assert_array_equal(three_augment.solarize(image).numpy(),
                                  np.asarray(ImageOps.solarize(pil)))


@pytest.mark.parametrize("radius", [0.1, 0.45, 1.0, 1.37, 1.9, 2.0])
def test_gaussian_blur_equals_pil_bit_for_bit(radius):
    for k, image in enumerate(_images()):
        expected = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))
        got = three_augment.gaussian_blur(image, radius).numpy()
        np.testing.assert_array_equal(got, expected)
        if radius >= 1.0 and k == 0:
            assert np.abs(got.astype(int) - image).mean() > 20  # it really blurs the noise


def test_simple_random_crop_matches_torchvision():
    image = _images()[0]
    size = 24
    for i in range(6):
        new_h, new_w, top, left = (int(v) for v in three_augment.simple_random_crop_params(
            _seed(i), 37, 53, size=size))
        assert (new_h, new_w) == (24, int(24 * 53 / 37))
        assert 0 <= top <= new_h + 8 - size and 0 <= left <= new_w + 8 - size
        resized = T.Resize(size, interpolation=T.InterpolationMode.BICUBIC)(
            Image.fromarray(image))
        assert resized.size == (new_w, new_h)
        # The pad + crop alone is exact ...
        expected = np.asarray(TF.crop(TF.pad(resized, 4, padding_mode="reflect"), top, left,
                                      size, size))
        got = three_augment.pad_crop(np.asarray(resized), top, left, size=size).numpy()
        np.testing.assert_array_equal(got, expected)
        # ... and with the resize, within augment._resize's 1 grey level of PIL.
        full = three_augment.simple_random_crop(image, _seed(i), size=size).numpy()
        assert np.abs(full.astype(int) - expected).max() <= 1
    tops = {int(three_augment.simple_random_crop_params(_seed(i), 37, 53, size=size)[2])
            for i in range(60)}
    assert tops == set(range(0, 9))  # uniform over 0 .. 2 * padding (height = size)


def test_three_augment_picks_each_op_with_probability_one_third():
    image = _images()[0]
    pil = Image.fromarray(image)
    counts = np.zeros(3)
    for i in range(90):
        op, radius = (v.numpy() for v in three_augment.three_augment_draws(_seed(i)))
        assert 0.1 <= radius <= 2.0
        counts[op] += 1
        got = three_augment.three_augment(image, _seed(i)).numpy()
        expected = [T.Grayscale(3)(pil), ImageOps.solarize(pil),
                    pil.filter(ImageFilter.GaussianBlur(float(radius)))][op]
        np.testing.assert_array_equal(got, np.asarray(expected))  # PIL gets the same radius
    assert counts.min() >= 18  # 30 expected each; binomial(90, 1/3) sd 4.5


def _official_photometric(cropped, op, radius, order, factors):
    """new_data_aug_generator after the crop, the draws fixed: op, ColorJitter, normalise."""
    pil = Image.fromarray(cropped)
    pil = [T.Grayscale(3)(pil), ImageOps.solarize(pil),
           pil.filter(ImageFilter.GaussianBlur(radius))][op]
    adjust = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
    for k in order:  # torchvision ColorJitter: the factors in a random order
        pil = adjust[k](pil, float(factors[k]))
    x = np.asarray(pil, np.float32) / 255.0
    return (x - np.array(augment.IMAGENET_MEAN, np.float32)) / np.array(augment.IMAGENET_STD,
                                                                         np.float32)


def test_train_transform_equals_the_official_composition():
    # The crop + flip is augment.crop_flip (tested in test_augment.py against torchvision,
    # its bicubic resize PIL's to a few grey levels); everything after it is exact.
    image = np.asarray(Image.fromarray(_images()[0]).resize((96, 80)))
    seen_ops = set()
    for i in range(12):
        seed = _seed(i)
        got = three_augment.train_transform(image, seed, img_size=48).numpy()
        s_crop, s_flip, s_choice, s_color = tf_random.split_seed(seed, 4)
        crop = augment.crop_flip_params(s_crop, s_flip, 80, 96)
        op, radius = (v.numpy() for v in three_augment.three_augment_draws(s_choice))
        order, factors = (v.numpy() for v in augment.color_jitter_draws(s_color, 0.3))
        seen_ops.add(int(op))
        expected = _official_photometric(augment.crop_flip(image, crop, size=48).numpy(),
                                         int(op), float(radius), order, factors)
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(
            got, three_augment.train_transform(image, seed, img_size=48).numpy())  # seeded
    assert seen_ops == {0, 1, 2}
    src = three_augment.train_transform(image, _seed(0), img_size=48, simple_crop=True)
    assert src.shape == (48, 48, 3)
    with pytest.raises(ValueError, match="simple_random_crop"):
        three_augment.train_transform(image, _seed(0), img_size=48, simple_crop=True,
                                      crop=tf.constant([0, 0, 10, 10, 0]))


def test_device_version_equals_the_host_ops_on_the_same_draws():
    import jax

    from deit_jax.augment import three_augment_device as device

    images = np.stack([np.asarray(Image.fromarray(im).resize((40, 36))) for im in _images()]
                      * 3)  # [6, 36, 40, 3]
    key = jax.random.key(0)
    out = np.asarray(jax.jit(device.three_augment)(images, key))
    d = jax.vmap(device.draws)(jax.random.split(key, len(images)))
    assert set(np.asarray(d["op"]).tolist()) == {0, 1, 2}  # every op runs here
    enhancers = (augment.brightness, augment.contrast, augment.color)
    for i, image in enumerate(images):
        op, radius = int(d["op"][i]), float(d["radius"][i])
        expected = [three_augment.grayscale, three_augment.solarize,
                    lambda x, r=radius: three_augment.gaussian_blur(x, r)][op](image)
        for k in np.asarray(d["order"][i]):
            expected = enhancers[k](expected, float(d["factors"][i][k]))
        np.testing.assert_array_equal(out[i], expected.numpy(), err_msg=f"image {i} op {op}")
    # Each op on its own, the blur at several radii: bit for bit with the host (and so PIL).
    for r in (0.1, 0.9, 2.0):
        np.testing.assert_array_equal(np.asarray(device.gaussian_blur(images[0], r)),
                                      three_augment.gaussian_blur(images[0], r).numpy())
    np.testing.assert_array_equal(np.asarray(device.grayscale(images[1])),
                                  three_augment.grayscale(images[1]).numpy())
    for f in (0.7, 1.3):
        for dev, host in ((device.contrast, augment.contrast), (device.color, augment.color),
                          (device.brightness, augment.brightness)):
            np.testing.assert_array_equal(np.asarray(dev(images[0], f)),
                                          host(images[0], f).numpy())
