"""PIL's 8-bit image ops as TensorFlow functions: timm's RandAugment ops, pixel for pixel.

Each takes and returns uint8 [height, width, 3]. The point ops are lookup tables; the enhance
ops redo PIL's float32 blend with truncation; ``affine`` redoes PIL Geometry.c in float64.
"""

import math

import tensorflow as tf

from deit_jax.augment.policy import IMAGENET_MEAN_UINT8
from deit_jax.augment.tf_random import f64


def select(mask, x, y):
    """`tf.where(mask, x, y)` (mask broadcast to x's shape) as arithmetic: the same values
    (`x * 1 + y * 0` is x exactly for finite values), ~3x faster on the CPU, where
    SelectV2 takes ~0.5 ms per 224 x 224 x 3 image and ~1.2 ms with a scalar mask on uint8.
    A scalar choice between whole images is `tf.cond`, which computes only one side."""
    m = tf.cast(mask, x.dtype)
    return x * m + y * (1 - m)


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
    step = (tf.reduce_sum(hist, axis=1) - last_count) // 255  # PIL: // 255
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
    return tf.cast(select(x < tf.cast(threshold, tf.int32), x, 255 - x), tf.uint8)


def solarize_add(image, add, threshold=128):
    """timm `solarize_add`: add `add` (saturating) to pixels below `threshold`."""
    x = tf.cast(image, tf.int32)
    added = tf.minimum(x + tf.cast(add, tf.int32), 255)
    return tf.cast(select(x < threshold, added, x), tf.uint8)


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
    return tf.cast(select(border[..., None], tf.cast(x, padded.dtype), padded), tf.uint8)


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
    a, b, c, d, e, f = [f64(v) for v in matrix]
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
        taps, interpolate = range(-1, 3), _cubic
    elif interpolation == 'bilinear':
        taps, interpolate = range(0, 2), _linear
    else:
        raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {interpolation!r}")
    # One gather per tap from channel planes [3, h * w], widened to float64, interpolated
    # tap row by tap row: TF runs every op unfused, so few ops on [3, h, w] beat one gather
    # into a [h, w, taps, taps, 3] window (3x faster). Clamped indices are PIL's edge rule;
    # PIL interpolates along x within each row first, then along y (the same order here).
    planes = tf.reshape(tf.transpose(tf.convert_to_tensor(image, tf.uint8), [2, 0, 1]), [3, -1])

    def tap(index):  # gathered as uint8, widened after: an eighth of the bytes moved
        return tf.cast(tf.gather(planes, index, axis=1), tf.float64)

    dx, dy = dx[..., 0], dy[..., 0]
    cols = [tf.clip_by_value(x0 + t, 0, width - 1) for t in taps]
    rows = [tf.clip_by_value(y0 + t, 0, height - 1) * width for t in taps]

    def general():
        row_values = [interpolate(*[tap(row + col) for col in cols], dx)
                      for row in rows]
        return interpolate(*row_values, dy)

    # Shear and translate along one axis leave the other axis's fraction exactly 0 at every
    # pixel (e.g. ShearX: y_in = y + 0.5 exactly), where PIL's interpolation along it returns
    # its centre tap bit for bit (v2 + 0 * (...)): sampling one axis only gives the same
    # values with 4 gathers instead of 16 (~4x faster; Rotate takes the general path).
    rows_exact = (d == 0.0) & (e == 1.0) & (f == 0.0)  # dy == 0: interpolate along x
    cols_exact = (a == 1.0) & (b == 0.0) & (c == 0.0)  # dx == 0: interpolate along y
    value = tf.case(
        [(rows_exact, lambda: interpolate(
            *[tap(rows[-taps[0]] + col) for col in cols], dx)),
         (cols_exact, lambda: interpolate(
            *[tap(row + cols[-taps[0]]) for row in rows], dy))],
        default=general, exclusive=False)
    value = tf.transpose(value, [1, 2, 0])
    value = tf.floor(tf.clip_by_value(value, 0.0, 255.0))
    out = select(inside[..., None], value, tf.constant(fill, tf.float64))
    return tf.cast(out, tf.uint8)


def _rotate_matrix(degrees, height, width):
    """PIL `Image.rotate`'s inverse map: counter-clockwise about the image centre."""
    cx = tf.cast(width, tf.float64) / 2.0
    cy = tf.cast(height, tf.float64) / 2.0
    angle = -(tf.math.floormod(f64(degrees), 360.0) * (math.pi / 180.0))
    # PIL rounds the matrix entries to 15 decimals: round(x * 1e15) / 1e15 matches it.
    cos = tf.round(tf.cos(angle) * 1e15) / 1e15
    sin = tf.round(tf.sin(angle) * 1e15) / 1e15
    c = cos * -cx + sin * -cy + cx
    f = -sin * -cx + cos * -cy + cy
    return (cos, sin, c, -sin, cos, f)


# timm's geometric ops as PIL inverse maps: (arg, height, width) -> (a, b, c, d, e, f).
AFFINE_MATRICES = {
    'Rotate': _rotate_matrix,
    'ShearX': lambda factor, height, width: (1.0, factor, 0.0, 0.0, 1.0, 0.0),
    'ShearY': lambda factor, height, width: (1.0, 0.0, 0.0, factor, 1.0, 0.0),
    # translate_*_rel: shift by pct of the width / height (positive moves content left / up).
    'TranslateXRel': lambda pct, height, width: (
        1.0, 0.0, f64(pct) * tf.cast(width, tf.float64), 0.0, 1.0, 0.0),
    'TranslateYRel': lambda pct, height, width: (
        1.0, 0.0, 0.0, 0.0, 1.0, f64(pct) * tf.cast(height, tf.float64)),
}

