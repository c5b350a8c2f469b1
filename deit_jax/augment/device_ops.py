"""PIL's 8-bit image ops in jax.numpy, for the device augmentation (``aug.on_device``).

The same ops as ``ops`` (the host's TensorFlow versions, PIL-exact), one image at a time
(uint8 [height, width, 3] in and out); ``device`` vmaps them over the batch. Integer ops are
the same integer maths; the enhance ops repeat the host's float32 blend in the same order, so
they give the host's (= PIL's) pixels exactly. Accelerators have no fast float64, so the two
places where PIL computes in float64 differ:

- ``auto_contrast``: PIL's float64 LUT ``int(ix * scale - lo * scale)`` is the exact integer
  quotient except where float64 rounding lands just below an integer; those (lo, hi, ix)
  triples (12,094 of the 8.4 million) are precomputed once as a bit table, so the result is
  still exact.
- ``affine`` (Rotate, ShearX/Y, TranslateX/YRel) maps pixels in float32: a sample point moves
  by ~1e-5 pixel, which changes the truncated 8-bit value by 1 where the interpolated value
  lies that close to an integer, and can flip a pixel between image and fill where its
  inverse-mapped centre lies within ~1e-5 of the border.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from deit_jax.augment.policy import IMAGENET_MEAN_UINT8

# numpy, not jnp: a jnp array made at import would start the JAX backend (and fix its device
# count, see benchmark --cpu_devices) before any command has chosen its configuration.
_CHANNELS = np.arange(3)


def _luma(image: jax.Array) -> jax.Array:
    """PIL ``convert('L')``: fixed-point ITU-R 601-2 luma, int32 [height, width]."""
    x = image.astype(jnp.int32)
    return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16


def _blend(degenerate, image: jax.Array, factor) -> jax.Array:
    """PIL ``Image.blend(degenerate, image, factor)``: float32 ``in1 + alpha * (in2 - in1)``,
    clipped and truncated (the host's arithmetic, in the same order)."""
    alpha = jnp.asarray(factor, jnp.float32)
    base = jnp.asarray(degenerate).astype(jnp.int32)
    diff = (image.astype(jnp.int32) - base).astype(jnp.float32)
    out = base.astype(jnp.float32) + alpha * diff
    return jnp.floor(jnp.clip(out, 0.0, 255.0)).astype(jnp.uint8)


def _apply_lut(image: jax.Array, lut: jax.Array) -> jax.Array:
    """PIL ``Image.point``: per-channel lookup, lut int [3, 256] -> uint8 image."""
    return lut[_CHANNELS, image.astype(jnp.int32)].astype(jnp.uint8)


def _histogram(image: jax.Array) -> jax.Array:
    """Per-channel histograms, int32 [3, 256]."""
    x = image.astype(jnp.int32).reshape(-1, 3)
    return jnp.zeros((3, 256), jnp.int32).at[_CHANNELS[None, :], x].add(1)


@functools.cache
def _autocontrast_low_bits() -> np.ndarray:
    """uint8 [256, 256, 32]: bit ix of [lo, hi] is 1 where PIL's float64 LUT entry
    ``int(ix * (255 / (hi - lo)) + -lo * (255 / (hi - lo)))`` is one below the exact quotient
    ``(ix - lo) * 255 // (hi - lo)`` (float64 rounding just under an integer)."""
    ix = np.arange(256, dtype=np.float64)[None, :]
    bits = np.zeros((256, 256, 256), bool)
    for lo in range(256):
        hi = np.arange(256)[:, None]
        span = np.maximum(hi - lo, 1)
        scale = 255.0 / span.astype(np.float64)
        pil = np.trunc(ix * scale + (-lo * scale))
        exact = np.floor_divide((np.arange(256)[None, :] - lo) * 255, span)
        bits[lo] = (pil < exact) & (hi > lo)
    return np.packbits(bits, axis=-1)


def auto_contrast(image: jax.Array) -> jax.Array:
    """PIL ``ImageOps.autocontrast(image)``: stretch each channel's [min, max] to [0, 255]."""
    present = _histogram(image) > 0
    lo = jnp.argmax(present, axis=1)
    hi = 255 - jnp.argmax(present[:, ::-1], axis=1)
    ix = jnp.arange(256)[None, :]
    span = jnp.maximum(hi - lo, 1)[:, None]
    exact = jnp.floor_divide((ix - lo[:, None]) * 255, span)
    table = jnp.asarray(_autocontrast_low_bits())
    low = (table[lo[:, None], hi[:, None], ix >> 3] >> (7 - (ix & 7))) & 1
    lut = jnp.clip(exact - low.astype(jnp.int32), 0, 255)
    lut = jnp.where((hi <= lo)[:, None], ix, lut)
    return _apply_lut(image, lut)


def equalize(image: jax.Array) -> jax.Array:
    """PIL ``ImageOps.equalize(image)``: per-channel histogram equalisation, integer maths."""
    hist = _histogram(image)
    present = hist > 0
    last = 255 - jnp.argmax(present[:, ::-1], axis=1)
    last_count = jnp.take_along_axis(hist, last[:, None], axis=1)[:, 0]
    step = (hist.sum(axis=1) - last_count) // 255  # PIL: // 255
    cum = jnp.cumsum(hist, axis=1) - hist  # exclusive
    lut = jnp.minimum((step[:, None] // 2 + cum) // jnp.maximum(step, 1)[:, None], 255)
    identity = (present.sum(axis=1) <= 1) | (step == 0)
    lut = jnp.where(identity[:, None], jnp.arange(256)[None, :], lut)
    return _apply_lut(image, lut)


def invert(image: jax.Array) -> jax.Array:
    """PIL ``ImageOps.invert``."""
    return 255 - image


def posterize(image: jax.Array, bits) -> jax.Array:
    """PIL ``ImageOps.posterize``: keep the ``bits`` most significant bits (0 <= bits <= 8)."""
    mask = ~((1 << (8 - jnp.asarray(bits).astype(jnp.int32))) - 1)
    return (image.astype(jnp.int32) & mask).astype(jnp.uint8)


def solarize(image: jax.Array, threshold) -> jax.Array:
    """PIL ``ImageOps.solarize``: invert pixels >= threshold."""
    x = image.astype(jnp.int32)
    return jnp.where(x < jnp.asarray(threshold).astype(jnp.int32), x, 255 - x).astype(jnp.uint8)


def solarize_add(image: jax.Array, add, threshold: int = 128) -> jax.Array:
    """timm ``solarize_add``: add ``add`` (saturating) to pixels below ``threshold``."""
    x = image.astype(jnp.int32)
    added = jnp.minimum(x + jnp.asarray(add).astype(jnp.int32), 255)
    return jnp.where(x < threshold, added, x).astype(jnp.uint8)


def color(image: jax.Array, factor) -> jax.Array:
    """PIL ``ImageEnhance.Color``: blend with the grey image."""
    return _blend(_luma(image)[..., None], image, factor)


def contrast(image: jax.Array, factor) -> jax.Array:
    """PIL ``ImageEnhance.Contrast``: blend with the mean grey ``int(mean + 0.5)``, here in
    exact integers: floor((2 sum + n) / 2n) (PIL's float64 mean is that close to exact)."""
    luma = _luma(image)
    n = luma.size
    mean = (2 * luma.sum() + n) // (2 * n)
    return _blend(mean, image, factor)


def brightness(image: jax.Array, factor) -> jax.Array:
    """PIL ``ImageEnhance.Brightness``: blend with black."""
    return _blend(jnp.zeros((), jnp.int32), image, factor)


def _smooth(image: jax.Array) -> jax.Array:
    """PIL SMOOTH filter [[1,1,1],[1,5,1],[1,1,1]] / 13, float32 in PIL's row order, rounded,
    border copied (as ``ops._smooth``)."""
    x = image.astype(jnp.float32)
    k = jnp.float32(1.0) / jnp.float32(13.0)
    k5 = jnp.float32(5.0) / jnp.float32(13.0)

    def row(r, centre):
        return (r[:, :-2] * k + r[:, 1:-1] * centre) + r[:, 2:] * k

    total = row(x[2:], k) + row(x[1:-1], k5)
    total = total + row(x[:-2], k)
    inner = jnp.floor(jnp.clip(total, 0.0, 255.0) + 0.5)
    return x.at[1:-1, 1:-1].set(inner).astype(jnp.uint8)


def sharpness(image: jax.Array, factor) -> jax.Array:
    """PIL ``ImageEnhance.Sharpness``: blend with the smoothed image."""
    return _blend(_smooth(image), image, factor)


def _cubic(v1, v2, v3, v4, d):
    """PIL Geometry.c BICUBIC (a = -1), in its evaluation order."""
    p2 = -v1 + v3
    p3 = 2.0 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def _linear(v1, v2, d):
    return v1 + (v2 - v1) * d


def affine(image: jax.Array, matrix: jax.Array, *, fill=IMAGENET_MEAN_UINT8,
           interpolation: str = "bicubic") -> jax.Array:
    """PIL ``Image.transform(size, AFFINE, matrix, resample, fillcolor=fill)`` in float32.

    Args:
      image: uint8 [height, width, 3].
      matrix: float32 [6], (a, b, c, d, e, f): output pixel centre (x + 0.5, y + 0.5) maps to
        the input point (a x + b y + c, d x + e y + f) (PIL's inverse map).
    Returns:
      uint8 [height, width, 3].
    """
    if interpolation == "bicubic":
        taps, interpolate = jnp.arange(-1, 3), _cubic
    elif interpolation == "bilinear":
        taps, interpolate = jnp.arange(0, 2), _linear
    else:
        raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {interpolation!r}")
    height, width = image.shape[:2]
    # Materialise the matrix and the map once each (optimization barriers): XLA would otherwise
    # recompute them inside each consumer's fusion, with differently rounded cos/sin or FMA
    # contraction, and a tap index (floor) and its fraction from two different roundings put a
    # pixel on the wrong tap (tens of grey levels off).
    matrix = jax.lax.optimization_barrier(matrix.astype(jnp.float32))
    a, b, c, d, e, f = (matrix[i] for i in range(6))
    ys = jnp.arange(height, dtype=jnp.float32)[:, None] + 0.5
    xs = jnp.arange(width, dtype=jnp.float32)[None, :] + 0.5
    xin = a * xs + b * ys + c
    yin = d * xs + e * ys + f
    xin, yin = jax.lax.optimization_barrier((xin, yin))
    inside = (xin >= 0.0) & (xin < width) & (yin >= 0.0) & (yin < height)
    xin, yin = xin - 0.5, yin - 0.5
    x0, y0 = jnp.floor(xin), jnp.floor(yin)
    dx, dy = (xin - x0)[..., None], (yin - y0)[..., None]
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    rows = jnp.clip(y0[..., None] + taps, 0, height - 1)[..., :, None]
    cols = jnp.clip(x0[..., None] + taps, 0, width - 1)[..., None, :]
    # One gather of uint8 taps [h, w, taps, taps, 3], widened after (cheaper than float).
    window = image.reshape(-1, 3)[rows * width + cols].astype(jnp.float32)
    along_x = interpolate(*[window[..., i, :] for i in range(len(taps))], dx[..., None, :])
    value = interpolate(*[along_x[..., i, :] for i in range(len(taps))], dy)
    value = jnp.floor(jnp.clip(value, 0.0, 255.0))
    out = jnp.where(inside[..., None], value, jnp.asarray(fill, jnp.float32))
    return out.astype(jnp.uint8)


def rotate_matrix(degrees, height: int, width: int) -> jax.Array:
    """PIL ``Image.rotate``'s inverse map (counter-clockwise about the centre), float32 [6]."""
    cx, cy = width / 2.0, height / 2.0
    angle = -(jnp.mod(jnp.asarray(degrees, jnp.float32), 360.0) * (np.pi / 180.0))
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    return jnp.stack([cos, sin, cos * -cx + sin * -cy + cx,
                      -sin, cos, -sin * -cx + cos * -cy + cy])


def affine_matrix(name: str, arg, height: int, width: int) -> jax.Array:
    """timm's geometric op ``name`` at ``arg`` as a PIL inverse map, float32 [6]."""
    arg = jnp.asarray(arg, jnp.float32)
    one, zero = jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)
    if name == "Rotate":
        return rotate_matrix(arg, height, width)
    if name == "ShearX":
        return jnp.stack([one, arg, zero, zero, one, zero])
    if name == "ShearY":
        return jnp.stack([one, zero, zero, arg, one, zero])
    if name == "TranslateXRel":
        return jnp.stack([one, zero, arg * width, zero, one, zero])
    if name == "TranslateYRel":
        return jnp.stack([one, zero, zero, zero, one, arg * height])
    raise ValueError(f"{name!r} is not a geometric op")


PIXEL_OPS = {
    "AutoContrast": lambda image, arg: auto_contrast(image),
    "Equalize": lambda image, arg: equalize(image),
    "Invert": lambda image, arg: invert(image),
    "Posterize": posterize,
    "Solarize": solarize,
    "SolarizeAdd": solarize_add,
    "Color": color,
    "Contrast": contrast,
    "Brightness": brightness,
    "Sharpness": sharpness,
}
for _base in ("Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness"):
    PIXEL_OPS[_base + "Increasing"] = PIXEL_OPS[_base]
