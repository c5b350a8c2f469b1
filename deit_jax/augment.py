"""Host-side DeiT augmentation as pure, stateless TensorFlow functions for `tf.data`.

Reproduces what the official DeiT code gets from `timm.data.create_transform(224,
is_training=True, color_jitter=0.3, auto_augment='rand-m9-mstd0.5-inc1',
interpolation='bicubic', re_prob=0.25, re_mode='pixel', re_count=1)`:
RandomResizedCrop -> horizontal flip -> RandAugment (or colour jitter) -> normalise ->
random erasing, plus the eval Resize(256) + CenterCrop(224).

Every random function takes `seed`, an int32/int64 tensor of shape [2], and draws only
from `tf.random.stateless_*`, so one seed always gives the same output bit for bit.
Images are HWC with 3 channels. RandAugment and colour jitter re-implement PIL's 8-bit
arithmetic (the library timm runs them with), so on the same parameters they give PIL's
pixels exactly; resizing follows PIL's two 8-bit passes with `tf.image.resize` and
differs from PIL by at most 1 grey level on a few pixels (PIL's fixed-point weights).
"""

import functools
import math
import re

import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm's RandAugment fill: the mean colour as 8-bit values, min(255, round(255 * mean)).
IMAGENET_MEAN_UINT8 = tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)

_LEVEL_DENOM = 10.0  # timm: magnitude M maps to level M / 10 of each op's range

# timm's `_RAND_INCREASING_TRANSFORMS` and `_RAND_TRANSFORMS`, in timm's order.
RAND_INCREASING_OPS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
    'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing',
    'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel',
    'TranslateYRel',
)
RAND_OPS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd',
    'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel',
    'TranslateYRel',
)


def _split(seed, num):
    """Splits a [2] seed into `num` independent [2] seeds (a list)."""
    return tf.unstack(tf.random.experimental.stateless_split(seed, num=num))


def _uniform(seed, shape=(), minval=0.0, maxval=1.0, dtype=tf.float32):
    return tf.random.stateless_uniform(shape, seed, minval=minval, maxval=maxval, dtype=dtype)


def _randint(seed, low, high):
    """Uniform int32 in [low, high] inclusive (Python's `random.randint`); high >= low."""
    return tf.random.stateless_uniform([], seed, minval=low, maxval=high + 1, dtype=tf.int32)


def _f64(value):
    """A Python number or tensor as float64 (no detour through float32 for Python floats)."""
    return tf.cast(tf.convert_to_tensor(value, dtype_hint=tf.float64), tf.float64)


# ---------------------------------------------------------------------------------------
# RandomResizedCrop, flip, resize, normalise.


def random_resized_crop_params(seed, height, width, *, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's `RandomResizedCrop.get_params` with stateless draws.

    torchvision tries up to 10 (area, log-aspect) draws and takes the first crop that fits,
    else falls back to the largest centred crop with the aspect ratio clamped into `ratio`.
    Here the 10 tries are drawn at once and the first fitting one is selected, which is
    the same distribution.

    Args:
      seed: int [2].
      height, width: image size (int or int32 scalar tensors).
      scale: range of the crop area as a fraction of the image area.
      ratio: range of the crop aspect ratio w / h (sampled log-uniformly).
    Returns:
      (top, left, h, w), int32 scalars.
    """
    s_area, s_ratio, s_top, s_left = _split(seed, 4)
    height = tf.convert_to_tensor(height, tf.int32)
    width = tf.convert_to_tensor(width, tf.int32)
    area = tf.cast(height * width, tf.float64)
    # torchvision draws float32 and does the rest in Python floats (float64).
    target_area = area * tf.cast(_uniform(s_area, [10], scale[0], scale[1]), tf.float64)
    log_ratio = _uniform(s_ratio, [10], math.log(ratio[0]), math.log(ratio[1]))
    aspect = tf.cast(tf.exp(log_ratio), tf.float64)
    # tf.round rounds half to even like Python's round().
    tries_w = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
    tries_h = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
    fits = (tries_w > 0) & (tries_w <= width) & (tries_h > 0) & (tries_h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32))  # index of the first fitting try

    in_ratio = tf.cast(width, tf.float64) / tf.cast(height, tf.float64)
    lo, hi = min(ratio), max(ratio)
    fb_w = tf.where(
        in_ratio > hi, tf.cast(tf.round(tf.cast(height, tf.float64) * hi), tf.int32), width)
    fb_h = tf.where(
        in_ratio < lo, tf.cast(tf.round(tf.cast(width, tf.float64) / lo), tf.int32), height)

    found = tf.reduce_any(fits)
    h = tf.where(found, tries_h[first], fb_h)
    w = tf.where(found, tries_w[first], fb_w)
    top = tf.where(found, _randint(s_top, 0, height - h), (height - h) // 2)
    left = tf.where(found, _randint(s_left, 0, width - w), (width - w) // 2)
    return top, left, h, w


def _resize(image, height, width, method):
    """PIL `Image.resize((width, height), method)` of an 8-bit image, as float32.

    PIL resamples horizontally, stores the intermediate as uint8 (rounded, clipped), then
    resamples vertically. Doing the same with two antialiased one-axis `tf.image.resize`
    calls matches PIL to 1 grey level on ~0.02% of pixels (PIL's fixed-point weights);
    one 2-D float resize would differ by up to ~15 levels next to saturated edges.

    Args:
      image: [in_height, in_width, 3], values in [0, 255].
    Returns:
      float32 [height, width, 3], integers in [0, 255].
    """
    image = tf.cast(image, tf.float32)
    for size in ([tf.shape(image)[0], width], [height, width]):
        image = tf.image.resize(image, size, method=method, antialias=True)
        image = tf.round(tf.clip_by_value(image, 0.0, 255.0))
    return image


def random_resized_crop(image, seed, *, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        method='bicubic'):
    """torchvision `RandomResizedCrop(size, scale, ratio, interpolation=method)`.

    Args:
      image: [height, width, 3], any real dtype with values in [0, 255].
      seed: int [2].
    Returns:
      float32 [size, size, 3], integers in [0, 255] like PIL's 8-bit output.
    """
    shape = tf.shape(image)
    top, left, h, w = random_resized_crop_params(
        seed, shape[0], shape[1], scale=scale, ratio=ratio)
    return _crop_resize(image, top, left, h, w, size, method)


def _crop_resize(image, top, left, h, w, size, method):
    crop = tf.slice(image, tf.stack([top, left, 0]), tf.stack([h, w, -1]))
    return tf.ensure_shape(_resize(crop, size, size, method), [size, size, 3])


def crop_flip_params(crop_seed, flip_seed, height, width, *, scale=(0.08, 1.0),
                     ratio=(3 / 4, 4 / 3), hflip=0.5):
    """One RandomResizedCrop + horizontal-flip draw as a view: int32 [5] = (top, left,
    height, width, flip), flip 1 with probability `hflip`."""
    top, left, h, w = random_resized_crop_params(crop_seed, height, width, scale=scale,
                                                 ratio=ratio)
    flip = (tf.cast(_uniform(flip_seed) < hflip, tf.int32) if hflip > 0
            else tf.constant(0, tf.int32))
    return tf.stack([top, left, h, w, flip])


def crop_flip(image_uint8, crop, *, size, method='bicubic'):
    """Applies a view `crop` (int32 [5], see `crop_flip_params`): crop, resize to
    size x size as PIL does, mirror when flip is 1. Returns uint8 [size, size, 3]."""
    crop = tf.cast(crop, tf.int32)
    image = _crop_resize(image_uint8, crop[0], crop[1], crop[2], crop[3], size, method)
    image = tf.cast(image, tf.uint8)  # already rounded to integers in [0, 255]
    return tf.where(crop[4] > 0, image[:, ::-1], image)


def crop_views(image_uint8, seed, *, views, img_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
               hflip=0.5, interpolation='bicubic'):
    """`views` independent crop + flip views of one image, as `train_transform` makes them
    before its photometric part (precomputed teacher logits per view, FKD-style).

    Args:
      image_uint8: uint8 [height, width, 3].
      seed: int [2].
    Returns:
      (images float32 [views, img_size, img_size, 3] normalised, crops int32 [views, 5]).
    """
    shape = tf.shape(image_uint8)
    images, crops = [], []
    for view_seed in _split(seed, views):
        crop = crop_flip_params(*_split(view_seed, 2), shape[0], shape[1], scale=scale,
                                ratio=ratio, hflip=hflip)
        images.append(normalize(crop_flip(image_uint8, crop, size=img_size,
                                          method=interpolation)))
        crops.append(crop)
    return tf.stack(images), tf.stack(crops)


def normalize(image):
    """`ToTensor()` + `Normalize(IMAGENET_MEAN, IMAGENET_STD)`: [..., 3] -> float32."""
    x = tf.cast(image, tf.float32) / 255.0
    return (x - tf.constant(IMAGENET_MEAN, tf.float32)) / tf.constant(IMAGENET_STD, tf.float32)


def eval_transform(image_uint8, *, img_size, crop_ratio=0.875, interpolation='bicubic'):
    """timm/torchvision eval: Resize(int(img_size / crop_ratio)) shorter side, CenterCrop.

    Args:
      image_uint8: [height, width, 3] uint8.
    Returns:
      float32 [img_size, img_size, 3], normalised.
    """
    resize_to = math.floor(img_size / crop_ratio)
    shape = tf.shape(image_uint8)
    h, w = shape[0], shape[1]
    short, long = tf.minimum(h, w), tf.maximum(h, w)
    # torchvision: new_long = int(new_short * long / short), in Python floats.
    new_long = tf.cast(tf.floor(
        tf.cast(resize_to * long, tf.float64) / tf.cast(short, tf.float64)), tf.int32)
    new_h = tf.where(h <= w, resize_to, new_long)
    new_w = tf.where(h <= w, new_long, resize_to)
    image = _resize(image_uint8, new_h, new_w, interpolation)
    # torchvision CenterCrop: int(round((size_in - size_out) / 2.0)), half to even.
    top = tf.cast(tf.round(tf.cast(new_h - img_size, tf.float64) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - img_size, tf.float64) / 2.0), tf.int32)
    image = tf.slice(image, tf.stack([top, left, 0]), [img_size, img_size, 3])
    return normalize(image)


# ---------------------------------------------------------------------------------------
# PIL 8-bit primitives. Each takes and returns uint8 [height, width, 3].


def _luma(image):
    """PIL `convert('L')`: fixed-point ITU-R 601-2 luma, int32 [height, width]."""
    x = tf.cast(image, tf.int32)
    return tf.bitwise.right_shift(
        x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000, 16)


def _blend(degenerate, image, factor):
    """PIL `Image.blend(degenerate, image, factor)` on uint8.

    PIL computes `in1 + alpha * (in2 - in1)` in float32 and truncates (clipping to
    [0, 255] when alpha extrapolates); `degenerate` may be any shape broadcasting to image.
    """
    alpha = tf.cast(factor, tf.float32)
    base = tf.cast(degenerate, tf.int32)
    diff = tf.cast(tf.cast(image, tf.int32) - base, tf.float32)
    out = tf.cast(base, tf.float32) + alpha * diff
    return tf.cast(tf.floor(tf.clip_by_value(out, 0.0, 255.0)), tf.uint8)


def _apply_lut(image, lut):
    """PIL `Image.point`: per-channel lookup, lut int [3, 256] -> uint8 image."""
    index = tf.cast(image, tf.int32) + tf.range(3) * 256
    return tf.cast(tf.gather(tf.reshape(lut, [-1]), index), tf.uint8)


def _histogram(image):
    """Per-channel histograms, int64 [3, 256] (PIL `Image.histogram`)."""
    channels = tf.reshape(tf.transpose(tf.cast(image, tf.int32), [2, 0, 1]), [3, -1])
    return tf.math.bincount(channels, minlength=256, maxlength=256, axis=-1, dtype=tf.int64)


def auto_contrast(image):
    """PIL `ImageOps.autocontrast(image)`: stretch each channel's [min, max] to [0, 255]."""
    hist = _histogram(image)
    present = hist > 0
    lo = tf.argmax(tf.cast(present, tf.int32), axis=1)
    hi = 255 - tf.argmax(tf.cast(present[:, ::-1], tf.int32), axis=1)
    # Python float64 maths: scale = 255 / (hi - lo), lut = int(ix * scale - lo * scale).
    span = tf.cast(tf.maximum(hi - lo, 1), tf.float64)[:, None]
    scale = 255.0 / span
    offset = tf.cast(-lo, tf.float64)[:, None] * scale
    ix = tf.range(256, dtype=tf.float64)[None, :]
    lut = tf.clip_by_value(tf.cast(ix * scale + offset, tf.int32), 0, 255)
    lut = tf.where((hi <= lo)[:, None], tf.range(256)[None, :], lut)
    return _apply_lut(image, lut)


def equalize(image):
    """PIL `ImageOps.equalize(image)`: per-channel histogram equalisation, integer maths."""
    hist = _histogram(image)
    present = hist > 0
    last = 255 - tf.argmax(tf.cast(present[:, ::-1], tf.int32), axis=1)
    last_count = tf.gather(hist, last, batch_dims=1)
    step = (tf.reduce_sum(hist, axis=1) - last_count) // 256
    cum = tf.math.cumsum(hist, axis=1, exclusive=True)
    lut = (step[:, None] // 2 + cum) // tf.maximum(step, 1)[:, None]
    # PIL's point() saturates lut entries above 255 (reachable for the top bin).
    lut = tf.cast(tf.minimum(lut, 255), tf.int32)
    identity = (tf.reduce_sum(tf.cast(present, tf.int32), axis=1) <= 1) | (step == 0)
    lut = tf.where(identity[:, None], tf.range(256)[None, :], lut)
    return _apply_lut(image, lut)


def invert(image):
    """PIL `ImageOps.invert`."""
    return 255 - image


def posterize(image, bits):
    """PIL `ImageOps.posterize(image, bits)`: keep the `bits` most significant bits."""
    bits = tf.cast(bits, tf.int32)
    mask = tf.bitwise.invert(tf.bitwise.left_shift(1, 8 - bits) - 1)
    # timm returns the image unchanged for bits >= 8 (the mask would be all ones anyway).
    return tf.cast(tf.bitwise.bitwise_and(tf.cast(image, tf.int32), mask), tf.uint8)


def solarize(image, threshold):
    """PIL `ImageOps.solarize(image, threshold)`: invert pixels >= threshold."""
    x = tf.cast(image, tf.int32)
    return tf.cast(tf.where(x < tf.cast(threshold, tf.int32), x, 255 - x), tf.uint8)


def solarize_add(image, add, threshold=128):
    """timm `solarize_add`: add `add` (saturating) to pixels below `threshold`."""
    x = tf.cast(image, tf.int32)
    added = tf.minimum(x + tf.cast(add, tf.int32), 255)
    return tf.cast(tf.where(x < threshold, added, x), tf.uint8)


def color(image, factor):
    """PIL `ImageEnhance.Color(image).enhance(factor)`: blend with the grey image."""
    return _blend(_luma(image)[..., None], image, factor)


def contrast(image, factor):
    """PIL `ImageEnhance.Contrast(image).enhance(factor)`: blend with the mean grey."""
    luma = tf.cast(_luma(image), tf.float64)
    # ImageStat mean of the L image (float64), then int(mean + 0.5).
    mean = tf.floor(tf.reduce_sum(luma) / tf.cast(tf.size(luma), tf.float64) + 0.5)
    return _blend(tf.cast(mean, tf.int32), image, factor)


def brightness(image, factor):
    """PIL `ImageEnhance.Brightness(image).enhance(factor)`: blend with black."""
    return _blend(tf.zeros([], tf.int32), image, factor)


def _smooth(image):
    """PIL `image.filter(ImageFilter.SMOOTH)`: 3x3 kernel [[1,1,1],[1,5,1],[1,1,1]] / 13.

    PIL accumulates float32 products row by row (row y+1, then y, then y-1), rounds to the
    nearest integer, and copies the one-pixel border from the input unchanged.
    """
    x = tf.cast(image, tf.float32)
    k = tf.constant(1.0, tf.float32) / 13.0
    k5 = tf.constant(5.0, tf.float32) / 13.0

    def row(r, centre):
        return (r[:, :-2] * k + r[:, 1:-1] * centre) + r[:, 2:] * k

    total = row(x[2:], k) + row(x[1:-1], k5)
    total = total + row(x[:-2], k)
    inner = tf.floor(tf.clip_by_value(total, 0.0, 255.0) + 0.5)
    padded = tf.pad(inner, [[1, 1], [1, 1], [0, 0]])
    shape = tf.shape(image)
    border = tf.pad(tf.zeros(shape[:2] - 2, tf.bool), [[1, 1], [1, 1]], constant_values=True)
    return tf.cast(tf.where(border[..., None], x, padded), tf.uint8)


def sharpness(image, factor):
    """PIL `ImageEnhance.Sharpness(image).enhance(factor)`: blend with the smoothed image."""
    return _blend(_smooth(image), image, factor)


def _cubic(v1, v2, v3, v4, d):
    """PIL Geometry.c BICUBIC (cubic convolution a = -1), in its evaluation order."""
    p2 = -v1 + v3
    p3 = 2.0 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def _linear(v1, v2, d):
    """PIL Geometry.c BILINEAR."""
    return v1 + (v2 - v1) * d


def affine(image, matrix, *, fill=IMAGENET_MEAN_UINT8, interpolation='bicubic'):
    """PIL `Image.transform(size, Image.AFFINE, matrix, resample, fillcolor=fill)`.

    `matrix` (a, b, c, d, e, f) maps each output pixel centre (x + 0.5, y + 0.5) back to
    the input point (a x + b y + c, d x + e y + f) (PIL's inverse-map convention). Points
    outside [0, width) x [0, height) take `fill`; inside, PIL samples in float64 with
    clamped edges and truncates to uint8, which this reproduces exactly.

    Args:
      image: uint8 [height, width, 3].
      matrix: 6 scalars (Python floats or float64 tensors).
      fill: RGB fill colour for points that map outside the input.
      interpolation: 'bicubic' or 'bilinear'.
    Returns:
      uint8 [height, width, 3].
    """
    a, b, c, d, e, f = [_f64(v) for v in matrix]
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    ys, xs = tf.meshgrid(tf.range(height, dtype=tf.float64) + 0.5,
                         tf.range(width, dtype=tf.float64) + 0.5, indexing='ij')
    xin = a * xs + b * ys + c
    yin = d * xs + e * ys + f
    inside = ((xin >= 0.0) & (xin < tf.cast(width, tf.float64))
              & (yin >= 0.0) & (yin < tf.cast(height, tf.float64)))
    xin, yin = xin - 0.5, yin - 0.5
    x0, y0 = tf.floor(xin), tf.floor(yin)
    dx, dy = (xin - x0)[..., None], (yin - y0)[..., None]
    x0, y0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
    if interpolation == 'bicubic':
        taps, interpolate = tf.range(-1, 3), _cubic
    elif interpolation == 'bilinear':
        taps, interpolate = tf.range(0, 2), _linear
    else:
        raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {interpolation!r}")
    # All taps in one gather: rows [h, w, taps, 1] x cols [h, w, 1, taps] -> [h, w, taps,
    # taps, 3]; clamping the indices is PIL's edge rule.
    rows = tf.clip_by_value(y0[..., None] + taps, 0, height - 1)[..., :, None]
    cols = tf.clip_by_value(x0[..., None] + taps, 0, width - 1)[..., None, :]
    # Gathering uint8 and widening after halves the time of gathering float64.
    window = tf.cast(tf.gather(tf.reshape(image, [-1, 3]), rows * width + cols), tf.float64)
    # PIL interpolates along x within each row first, then along y.
    value = interpolate(*tf.unstack(interpolate(*tf.unstack(window, axis=3), dx[..., None, :]),
                                    axis=2), dy)
    value = tf.floor(tf.clip_by_value(value, 0.0, 255.0))
    out = tf.where(inside[..., None], value, tf.constant(fill, tf.float64))
    return tf.cast(out, tf.uint8)


def _rotate_matrix(degrees, height, width):
    """PIL `Image.rotate`'s inverse map: counter-clockwise about the image centre."""
    cx = tf.cast(width, tf.float64) / 2.0
    cy = tf.cast(height, tf.float64) / 2.0
    angle = -(tf.math.floormod(_f64(degrees), 360.0) * (math.pi / 180.0))
    # PIL rounds the matrix entries to 15 decimals: round(x * 1e15) / 1e15 matches it.
    cos = tf.round(tf.cos(angle) * 1e15) / 1e15
    sin = tf.round(tf.sin(angle) * 1e15) / 1e15
    c = cos * -cx + sin * -cy + cx
    f = -sin * -cx + cos * -cy + cy
    return (cos, sin, c, -sin, cos, f)


# timm's geometric ops as PIL inverse maps: (arg, height, width) -> (a, b, c, d, e, f).
_AFFINE_MATRICES = {
    'Rotate': _rotate_matrix,
    'ShearX': lambda factor, height, width: (1.0, factor, 0.0, 0.0, 1.0, 0.0),
    'ShearY': lambda factor, height, width: (1.0, 0.0, 0.0, factor, 1.0, 0.0),
    # translate_*_rel: shift by pct of the width / height (positive moves content left / up).
    'TranslateXRel': lambda pct, height, width: (
        1.0, 0.0, _f64(pct) * tf.cast(width, tf.float64), 0.0, 1.0, 0.0),
    'TranslateYRel': lambda pct, height, width: (
        1.0, 0.0, 0.0, 0.0, 1.0, _f64(pct) * tf.cast(height, tf.float64)),
}


# ---------------------------------------------------------------------------------------
# RandAugment.


def _signed(value, negate):
    return tf.where(negate, -value, value)


def level_to_arg(name, level, negate, *, translate_pct=0.45):
    """timm's `LEVEL_TO_ARG[name]`: magnitude level in [0, 10] -> the op's argument.

    Args:
      name: a timm op name from RAND_INCREASING_OPS or RAND_OPS.
      level: float64 scalar magnitude.
      negate: bool scalar, timm's `_randomly_negate` coin (only signed ops use it).
      translate_pct: timm hparam `translate_pct` for TranslateXRel/YRel.
    Returns:
      float64 scalar (integral where timm's argument is an int); None for ops without one.
    """
    frac = _f64(level) / _LEVEL_DENOM
    args = {
        'Rotate': lambda: _signed(frac * 30.0, negate),
        'Posterize': lambda: tf.floor(frac * 4.0),
        'PosterizeIncreasing': lambda: 4.0 - tf.floor(frac * 4.0),
        'Solarize': lambda: tf.minimum(tf.floor(frac * 256.0), 256.0),
        'SolarizeIncreasing': lambda: 256.0 - tf.minimum(tf.floor(frac * 256.0), 256.0),
        'SolarizeAdd': lambda: tf.minimum(tf.floor(frac * 110.0), 128.0),
        'ShearX': lambda: _signed(frac * 0.3, negate),
        'ShearY': lambda: _signed(frac * 0.3, negate),
        'TranslateXRel': lambda: _signed(frac * translate_pct, negate),
        'TranslateYRel': lambda: _signed(frac * translate_pct, negate),
    }
    for enhance in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
        args[enhance] = lambda: frac * 1.8 + 0.1
        args[enhance + 'Increasing'] = lambda: tf.maximum(1.0 + _signed(frac * 0.9, negate), 0.1)
    if name in ('AutoContrast', 'Equalize', 'Invert'):
        return None
    return args[name]()


def _geometric(name):
    def op(image, arg, **kwargs):
        shape = tf.shape(image)
        return affine(image, _AFFINE_MATRICES[name](arg, shape[0], shape[1]), **kwargs)
    return op


_NAME_TO_OP = {
    'AutoContrast': lambda image, arg, **_: auto_contrast(image),
    'Equalize': lambda image, arg, **_: equalize(image),
    'Invert': lambda image, arg, **_: invert(image),
    'Posterize': lambda image, arg, **_: posterize(image, arg),
    'Solarize': lambda image, arg, **_: solarize(image, arg),
    'SolarizeAdd': lambda image, arg, **_: solarize_add(image, arg),
    'Color': lambda image, arg, **_: color(image, arg),
    'Contrast': lambda image, arg, **_: contrast(image, arg),
    'Brightness': lambda image, arg, **_: brightness(image, arg),
    'Sharpness': lambda image, arg, **_: sharpness(image, arg),
}
_NAME_TO_OP.update({name: _geometric(name) for name in _AFFINE_MATRICES})
for _base in ('Posterize', 'Solarize', 'Color', 'Contrast', 'Brightness', 'Sharpness'):
    _NAME_TO_OP[_base + 'Increasing'] = _NAME_TO_OP[_base]


def apply_op(name, image, arg, *, fill=IMAGENET_MEAN_UINT8, interpolation='bicubic'):
    """timm `NAME_TO_OP[name](image, arg, fillcolor=fill, resample=interpolation)`.

    Args:
      image: uint8 [height, width, 3].
      arg: the op's argument (see `level_to_arg`); ignored by argument-free ops.
    Returns:
      uint8 [height, width, 3].
    """
    return _NAME_TO_OP[name](image, arg, fill=fill, interpolation=interpolation)


def rand_augment_draws(seed, *, num_ops=2, num_choices=15, magnitude=9.0, magnitude_std=0.5,
                       prob=0.5):
    """The random choices of one RandAugment call, one entry per layer.

    timm draws, per layer: the op (uniform, with replacement), whether it applies
    (`random() > prob` skips), its magnitude (N(magnitude, std), or U(0, magnitude) when
    std is inf, clipped to [0, 10]) and the sign coin of signed ops (`random() > 0.5`).

    Returns:
      op int32 [num_ops], applied bool [num_ops], level float64 [num_ops],
      negate bool [num_ops].
    """
    s_op, s_apply, s_level, s_sign = _split(seed, 4)
    op = _uniform(s_op, [num_ops], 0, num_choices, tf.int32)
    applied = _uniform(s_apply, [num_ops]) <= prob
    if math.isinf(magnitude_std):
        level = _uniform(s_level, [num_ops], 0.0, magnitude, tf.float64)
    else:
        level = magnitude + magnitude_std * tf.random.stateless_normal(
            [num_ops], s_level, dtype=tf.float64)
    level = tf.clip_by_value(level, 0.0, _LEVEL_DENOM)
    negate = _uniform(s_sign, [num_ops]) > 0.5
    return op, applied, level, negate


def rand_augment(image, seed, *, num_ops=2, magnitude=9.0, magnitude_std=0.5, increasing=True,
                 translate_pct=0.45, fill=IMAGENET_MEAN_UINT8, prob=0.5,
                 interpolation='bicubic'):
    """timm RandAugment, by default 'rand-m9-mstd0.5-inc1' with create_transform's hparams.

    timm's increasing/plain op sets both translate by a fraction of the image size
    (TranslateXRel/YRel, `translate_pct` 0.45); create_transform's `translate_const` is
    only read by the absolute-pixel ops, which RandAugment never uses.

    Args:
      image: uint8 [height, width, 3].
      seed: int [2].
      num_ops: ops applied in sequence (timm 'n').
      magnitude: mean magnitude M in [0, 10] (timm 'm').
      magnitude_std: std of the per-op magnitude noise, inf for U(0, M) (timm 'mstd').
      increasing: use timm's `_RAND_INCREASING_TRANSFORMS` (timm 'inc1').
      fill: RGB fill for geometric ops (timm `img_mean`).
      prob: probability of applying each chosen op (timm 'p').
      interpolation: 'bicubic' or 'bilinear' for rotate/shear/translate.
    Returns:
      uint8 [height, width, 3].
    """
    names = RAND_INCREASING_OPS if increasing else RAND_OPS
    ops, applied, levels, negates = rand_augment_draws(
        seed, num_ops=num_ops, num_choices=len(names), magnitude=magnitude,
        magnitude_std=magnitude_std, prob=prob)
    image = tf.convert_to_tensor(image, tf.uint8)
    layer = functools.partial(_rand_augment_layer, names=names, translate_pct=translate_pct,
                              fill=fill, interpolation=interpolation)

    def body(i, image):
        out = tf.cond(applied[i], functools.partial(layer, image, ops[i], levels[i], negates[i]),
                      functools.partial(tf.identity, image))
        return i + 1, tf.ensure_shape(out, image.shape)

    # A while loop traces the 15-way switch once however many layers there are.
    _, image = tf.while_loop(lambda i, _: i < num_ops, body, (tf.constant(0), image))
    return image


def _rand_augment_layer(image, op, level, negate, *, names, translate_pct, fill,
                        interpolation):
    """Applies op `names[op]` at `level`; tf.switch_case runs only the chosen branch.

    The geometric ops' branches only build their matrix, so one affine sampler serves all
    of them (a smaller graph, faster to trace).
    """

    def arg(name):
        return level_to_arg(name, level, negate, translate_pct=translate_pct)

    shape = tf.shape(image)

    def matrix_branch(name):
        if name not in _AFFINE_MATRICES:
            return lambda: tf.constant((1.0, 0.0, 0.0, 0.0, 1.0, 0.0), tf.float64)
        return lambda: tf.stack(
            [_f64(v) for v in _AFFINE_MATRICES[name](arg(name), shape[0], shape[1])])

    def pixel_branch(name):
        if name in _AFFINE_MATRICES:
            return lambda: image
        return lambda: apply_op(name, image, arg(name))

    is_geometric = tf.gather([name in _AFFINE_MATRICES for name in names], op)
    return tf.cond(
        is_geometric,
        lambda: affine(image, tf.unstack(tf.switch_case(op, [matrix_branch(n) for n in names])),
                       fill=fill, interpolation=interpolation),
        lambda: tf.switch_case(op, [pixel_branch(n) for n in names]))


def parse_rand_augment(spec: str) -> dict:
    """timm RandAugment config string -> `rand_augment` kwargs.

    'rand-m9-mstd0.5-inc1' -> dict(magnitude=9.0, num_ops=2, magnitude_std=0.5,
    increasing=True, prob=0.5). Sections: m (magnitude), n (ops), p (prob), mstd (std,
    > 100 means uniform), inc (0/1); defaults are timm's (m10, n2, p0.5, mstd0, inc0).
    """
    sections = spec.split('-')
    if sections[0] != 'rand':
        raise ValueError(f"RandAugment spec must start with 'rand', got {spec!r}")
    kwargs = dict(magnitude=10.0, num_ops=2, magnitude_std=0.0, increasing=False, prob=0.5)
    parsers = {
        'm': ('magnitude', float),
        'n': ('num_ops', int),
        'p': ('prob', float),
        'mstd': ('magnitude_std', lambda v: math.inf if float(v) > 100 else float(v)),
        'inc': ('increasing', lambda v: bool(int(v))),
    }
    for section in sections[1:]:
        match = re.fullmatch(r'([a-z]+)(\d.*)', section)
        if match is None or match.group(1) not in parsers:
            raise ValueError(
                f'Unsupported RandAugment section {section!r} in {spec!r}; '
                f'expected one of {sorted(parsers)} followed by a number')
        key, convert = parsers[match.group(1)]
        try:
            kwargs[key] = convert(match.group(2))
        except ValueError as error:
            raise ValueError(f'Bad value in RandAugment section {section!r} of {spec!r}') \
                from error
    return kwargs


# ---------------------------------------------------------------------------------------
# Colour jitter, random erasing, the full transforms.


def color_jitter_draws(seed, strength=0.3):
    """torchvision `ColorJitter.get_params` for (b, c, s) = strength, no hue.

    Returns:
      order int32 [3] (a permutation of 0=brightness, 1=contrast, 2=saturation, the order
      torchvision applies them in), factors float32 [3] ~ U[max(0, 1 - s), 1 + s].
    """
    s_order, s_factor = _split(seed, 2)
    order = tf.cast(tf.argsort(_uniform(s_order, [3])), tf.int32)
    factors = _uniform(s_factor, [3], max(0.0, 1.0 - strength), 1.0 + strength)
    return order, factors


def color_jitter(image, seed, *, strength=0.3):
    """torchvision `ColorJitter(strength, strength, strength)` on a PIL image.

    Brightness, contrast and saturation are PIL's ImageEnhance Brightness, Contrast and
    Color, applied in a random order.

    Args:
      image: uint8 [height, width, 3].
      seed: int [2].
    Returns:
      uint8 [height, width, 3].
    """
    order, factors = color_jitter_draws(seed, strength)
    enhancers = (brightness, contrast, color)
    image = tf.convert_to_tensor(image, tf.uint8)
    for i in range(3):
        image = tf.switch_case(order[i], [
            functools.partial(fn, image, factors[k]) for k, fn in enumerate(enhancers)])
    return image


_color_jitter = color_jitter  # train_transform's `color_jitter` argument shadows the name


def random_erasing(image, seed, *, prob=0.25, min_area=0.02, max_area=1 / 3, min_aspect=0.3,
                   mode='pixel', count=1):
    """timm `RandomErasing(prob, min_area, max_area, min_aspect, mode, max_count=count)`.

    With probability `prob`, erases n ~ U{1..count} boxes; each takes the first of 10
    (area, log-aspect) draws that fits strictly inside the image (none: no box). Box area
    is U(min_area, max_area) * image area / n, aspect h / w log-uniform in
    [min_aspect, 1 / min_aspect].

    Args:
      image: float32 [height, width, 3], normalised.
      seed: int [2].
      mode: 'pixel' (per-pixel N(0, 1)), 'rand' (per-box N(0, 1) colour) or 'const' (0).
    Returns:
      float32 [height, width, 3].
    """
    if mode not in ('pixel', 'rand', 'const'):
        raise ValueError(f"mode must be 'pixel', 'rand' or 'const', got {mode!r}")
    s_apply, s_count, *s_boxes = _split(seed, 2 + count)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    area = tf.cast(height * width, tf.float64)
    erase = _uniform(s_apply) < prob
    num_boxes = _randint(s_count, 1, count)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    rows = tf.range(height)[:, None]
    cols = tf.range(width)[None, :]
    for i, s_box in enumerate(s_boxes):
        s_area, s_aspect, s_top, s_left, s_fill = _split(s_box, 5)
        target = (_uniform(s_area, [10], min_area, max_area, tf.float64) * area
                  / tf.cast(num_boxes, tf.float64))
        aspect = tf.exp(_uniform(s_aspect, [10], *log_aspect, tf.float64))
        tries_h = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
        tries_w = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
        fits = (tries_w < width) & (tries_h < height)
        first = tf.argmax(tf.cast(fits, tf.int32))
        h, w = tries_h[first], tries_w[first]
        top = _randint(s_top, 0, tf.maximum(height - h, 0))
        left = _randint(s_left, 0, tf.maximum(width - w, 0))
        box = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
        box &= erase & tf.reduce_any(fits) & (i < num_boxes)
        if mode == 'pixel':
            noise = tf.random.stateless_normal(shape, s_fill, dtype=image.dtype)
        elif mode == 'rand':
            noise = tf.random.stateless_normal([1, 1, 3], s_fill, dtype=image.dtype)
        else:
            noise = tf.zeros([], image.dtype)
        image = tf.where(box[..., None], noise, image)
    return image


def train_transform(image_uint8, seed, *, img_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                    hflip=0.5, auto_augment='rand-m9-mstd0.5-inc1', color_jitter=0.3,
                    re_prob=0.25, re_mode='pixel', re_count=1, interpolation='bicubic',
                    crop=None):
    """The DeiT training transform, in timm `create_transform(is_training=True)` order.

    RandomResizedCrop -> horizontal flip -> RandAugment (colour jitter instead when
    `auto_augment` is None, as timm disables jitter under RandAugment) -> normalise ->
    random erasing. RandAugment's hparams are timm's: fill = IMAGENET_MEAN_UINT8 and the
    same `interpolation` as the crop.

    Args:
      image_uint8: uint8 [height, width, 3].
      seed: int [2].
      crop: None, or a stored view int32 [5] (`crop_flip_params`) that replaces the crop and
        flip draws (`scale`, `ratio`, `hflip` are then unused); the rest is unchanged.
    Returns:
      float32 [img_size, img_size, 3], normalised.
    """
    s_crop, s_flip, s_color, s_erase = _split(seed, 4)
    if crop is None:
        shape = tf.shape(image_uint8)
        crop = crop_flip_params(s_crop, s_flip, shape[0], shape[1], scale=scale, ratio=ratio,
                                hflip=hflip)
    image = crop_flip(image_uint8, crop, size=img_size, method=interpolation)
    if auto_augment:
        image = rand_augment(image, s_color, interpolation=interpolation,
                             **parse_rand_augment(auto_augment))
    elif color_jitter:
        image = _color_jitter(image, s_color, strength=color_jitter)
    out = normalize(image)
    if re_prob > 0:
        out = random_erasing(out, s_erase, prob=re_prob, mode=re_mode, count=re_count)
    return out

