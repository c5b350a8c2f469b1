"""DeiT III's 3-Augment as pure, stateless TensorFlow functions for ``tf.data`` (host side).

The official ``augment.py`` ``new_data_aug_generator`` (``main.py --ThreeAugment [--src]``):

    RandomResizedCrop(size, scale=(0.08, 1), bicubic) + RandomHorizontalFlip()
        or, with --src: Resize(size, bicubic) + RandomCrop(size, padding=4, reflect) + flip
    -> RandomChoice([Grayscale(3), Solarization (threshold 128), GaussianBlur(radius U(0.1, 2))])
    -> ColorJitter(0.3, 0.3, 0.3)   (--color-jitter; none when 0)
    -> ToTensor + Normalize(ImageNet mean, std)

It replaces the whole timm transform: no RandAugment, no random erasing. Every op works on
PIL's 8-bit values as PIL does: grayscale is PIL's fixed-point luma, solarisation PIL's LUT,
the blur is PIL's ``GaussianBlur`` (three extended box blurs per axis with PIL's 8.24
fixed-point weights, rounded to 8 bits after every pass), and crop, flip, colour jitter and
normalisation are ``deit_jax.augment``'s PIL-exact ops. Seeds are int [2] tensors, as there.
"""

from __future__ import annotations

import math

import tensorflow as tf

from deit_jax.augment import host, jitter, ops, tf_random

BLUR_RADIUS = (0.1, 2.0)  # official GaussianBlur(radius_min=0.1, radius_max=2.0)
_BLUR_PASSES = 3  # PIL's ImageFilter.GaussianBlur: image.gaussian_blur(xy, passes=3)
OPS = ("grayscale", "solarize", "gaussian_blur")


def grayscale(image):
    """torchvision ``Grayscale(3)`` on a PIL image: PIL ``convert('L')`` copied to 3 channels.

    uint8 [height, width, 3] -> uint8 [height, width, 3].
    """
    luma = tf.cast(ops._luma(image), tf.uint8)
    return tf.stack([luma] * 3, axis=-1)


def solarize(image):
    """The official ``Solarization``: PIL ``ImageOps.solarize(image)`` (threshold 128)."""
    return ops.solarize(image, 128)


def box_blur_radius(radius):
    """PIL's ``_gaussian_blur_radius(radius, passes=3)`` (float32 C arithmetic): the fractional
    box radius whose 3 passes have the variance of a Gaussian of std ``radius``."""
    r = tf.cast(radius, tf.float32)
    sigma2 = r * r / _BLUR_PASSES
    # C: sqrt(12.0 * sigma2 + 1.0) and floor((L - 1.0) / 2.0) in double, stored as float.
    big_l = tf.cast(tf.sqrt(12.0 * tf.cast(sigma2, tf.float64) + 1.0), tf.float32)
    small_l = tf.cast(tf.floor((tf.cast(big_l, tf.float64) - 1.0) / 2.0), tf.float32)
    a = (2 * small_l + 1) * (small_l * (small_l + 1) - 3 * sigma2)
    a = a / (6 * (sigma2 - (small_l + 1) * (small_l + 1)))
    return small_l + a


def _max_box_radius(radius_max: float) -> int:
    sigma2 = radius_max * radius_max / _BLUR_PASSES
    return int(math.floor((math.sqrt(12.0 * sigma2 + 1.0) - 1.0) / 2.0)) + 1


def _box_blur_rows(x, box_radius, max_radius: int):
    """One PIL ``ImagingHorizontalBoxBlur`` pass along axis 1 of int64 [rows, width, 3].

    ``out[i] = (sum_{|k| <= R} in[i + k] * ww + (in[i - R - 1] + in[i + R + 1]) * fw + 2^23)
    >> 24`` with indices clamped to the edge, R = int(box_radius), ww = uint32(2^24 / (2 r + 1))
    and fw = (2^24 - (2R + 1) ww) / 2: the fractional radius weights the two far taps.
    """
    width = tf.shape(x)[1]
    offsets = tf.range(-max_radius - 1, max_radius + 2)
    idx = tf.clip_by_value(tf.range(width)[:, None] + offsets[None, :], 0, width - 1)
    taps = tf.gather(x, idx, axis=1)  # [rows, width, taps, 3]
    whole = tf.cast(box_radius, tf.int32)  # C's (int) truncation
    ww = tf.cast(tf.cast(1 << 24, tf.float32) / (box_radius * 2 + 1), tf.int64)
    fw = ((1 << 24) - tf.cast(2 * whole + 1, tf.int64) * ww) // 2
    dist = tf.abs(offsets)
    weights = tf.where(dist <= whole, ww, tf.where(dist == whole + 1, fw, tf.zeros_like(ww)))
    acc = tf.reduce_sum(taps * weights[None, None, :, None], axis=2)
    return tf.bitwise.right_shift(acc + (1 << 23), 24)


def gaussian_blur(image, radius, *, max_radius: float = BLUR_RADIUS[1]):
    """PIL ``image.filter(ImageFilter.GaussianBlur(radius))`` for ``radius <= max_radius``.

    Three box-blur passes along the width, then three along the height, each rounded to 8 bits.

    Args:
      image: uint8 [height, width, 3].
      radius: float scalar (tensor or number) in (0, max_radius].
    Returns:
      uint8 [height, width, 3].
    """
    box = box_blur_radius(radius)
    taps = _max_box_radius(max_radius)
    x = tf.cast(image, tf.int64)
    for _ in range(_BLUR_PASSES):
        x = _box_blur_rows(x, box, taps)
    x = tf.transpose(x, [1, 0, 2])
    for _ in range(_BLUR_PASSES):
        x = _box_blur_rows(x, box, taps)
    return tf.cast(tf.transpose(x, [1, 0, 2]), tf.uint8)


def three_augment_draws(seed, *, radius=BLUR_RADIUS):
    """The op (0 grayscale, 1 solarize, 2 blur; uniform like ``RandomChoice``) and the blur
    radius ~ U(radius): (int32 scalar, float32 scalar)."""
    s_op, s_radius = tf_random.split_seed(seed, 2)
    op = tf_random.randint(s_op, 0, len(OPS) - 1)
    return op, tf_random.uniform(s_radius, (), radius[0], radius[1])


def three_augment(image, seed, *, radius=BLUR_RADIUS):
    """The official ``RandomChoice([gray_scale(p=1), Solarization(p=1), GaussianBlur(p=1)])``.

    uint8 [height, width, 3] -> uint8 [height, width, 3].
    """
    op, r = three_augment_draws(seed, radius=radius)
    image = tf.convert_to_tensor(image, tf.uint8)
    return tf.switch_case(op, [lambda: grayscale(image), lambda: solarize(image),
                               lambda: gaussian_blur(image, r, max_radius=radius[1])])


def simple_random_crop_params(seed, height, width, *, size, padding=4):
    """torchvision ``RandomCrop(size, padding).get_params`` after ``Resize(size)``: the resized
    shape (shorter side ``size``; longer ``int(size * long / short)``) and the crop's top-left
    corner uniform in the padded image. Returns int32 (new_h, new_w, top, left)."""
    s_top, s_left = tf_random.split_seed(seed, 2)
    short, long = tf.minimum(height, width), tf.maximum(height, width)
    new_long = tf.cast(tf.floor(tf.cast(size * long, tf.float64) / tf.cast(short, tf.float64)),
                       tf.int32)
    new_h = tf.where(height <= width, size, new_long)
    new_w = tf.where(height <= width, new_long, size)
    top = tf_random.randint(s_top, 0, new_h + 2 * padding - size)
    left = tf_random.randint(s_left, 0, new_w + 2 * padding - size)
    return new_h, new_w, top, left


def pad_crop(image, top, left, *, size, padding=4):
    """``RandomCrop(size, padding, padding_mode='reflect')`` at a given corner (torchvision
    pads with numpy's 'reflect', the edge pixel not repeated, as ``tf.pad`` 'REFLECT')."""
    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]], mode="REFLECT")
    return tf.slice(padded, tf.stack([top, left, 0]), [size, size, 3])


def simple_random_crop(image_uint8, seed, *, size, padding=4, interpolation="bicubic"):
    """The official ``--src`` crop: ``Resize(size, bicubic)`` (shorter side), then
    ``RandomCrop(size, padding=4, padding_mode='reflect')``.

    uint8 [height, width, 3] -> uint8 [size, size, 3].
    """
    shape = tf.shape(image_uint8)
    new_h, new_w, top, left = simple_random_crop_params(seed, shape[0], shape[1], size=size,
                                                        padding=padding)
    resized = tf.cast(host._resize(image_uint8, new_h, new_w, interpolation), tf.uint8)
    return tf.ensure_shape(pad_crop(resized, top, left, size=size, padding=padding),
                           [size, size, 3])


def train_transform(image_uint8, seed, **kwargs):
    """``new_data_aug_generator``: ``train_pixels`` (``kwargs`` are its arguments) ->
    normalise. Returns float32 [img_size, img_size, 3], normalised."""
    return host.normalize(train_pixels(image_uint8, seed, **kwargs))


def train_pixels(image_uint8, seed, *, img_size, simple_crop: bool = False,
                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, color_jitter=0.3,
                 interpolation="bicubic", crop=None):
    """``new_data_aug_generator``'s PIL part: crop + flip -> 3-Augment -> colour jitter, as
    the host path hands it over (the train step normalises:
    ``augment.device.DeviceAugment.finish_only``).

    Args:
      image_uint8: uint8 [height, width, 3].
      seed: int [2].
      simple_crop: the official ``--src`` (Resize + RandomCrop(padding 4, reflect))
        instead of RandomResizedCrop(``scale``, ``ratio``).
      crop: None, or a stored RandomResizedCrop view int32 [5] (``host.crop_flip_params``)
        replacing the crop and flip draws (not with ``simple_crop``).
    Returns:
      uint8 [img_size, img_size, 3].
    """
    s_crop, s_flip, s_choice, s_color = tf_random.split_seed(seed, 4)
    if simple_crop:
        if crop is not None:
            raise ValueError("stored crop views are RandomResizedCrop views; they do not "
                             "combine with aug.simple_random_crop")
        image = simple_random_crop(image_uint8, s_crop, size=img_size, interpolation=interpolation)
        flip = tf_random.uniform(s_flip) < hflip
        image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
    else:
        if crop is None:
            shape = tf.shape(image_uint8)
            crop = host.crop_flip_params(s_crop, s_flip, shape[0], shape[1], scale=scale,
                                            ratio=ratio, hflip=hflip)
        image = host.crop_flip(image_uint8, crop, size=img_size, method=interpolation)
    image = three_augment(image, s_choice)
    if color_jitter:
        image = jitter.color_jitter(image, s_color, strength=color_jitter)
    return tf.convert_to_tensor(image, tf.uint8)
