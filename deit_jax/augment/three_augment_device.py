"""DeiT III's 3-Augment photometric part on the device, in jax.numpy (no TensorFlow).

The same PIL-exact ops as the host ``three_augment`` (grayscale, solarisation, PIL's
``GaussianBlur``, then torchvision ``ColorJitter(0.3, 0.3, 0.3)`` as PIL's enhancers), for
pipelines that crop and flip on the host and run the photometric augmentation inside the step:
the host ships uint8 crops, ``three_augment(images, key)`` runs after the transfer, and
normalisation follows. Given the same draws the outputs equal the host ops bit for bit; the
draws come from JAX's PRNG, so a seed gives other images than on the host.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

BLUR_RADIUS = (0.1, 2.0)
_PASSES = 3


def _luma(image: jax.Array) -> jax.Array:
    """PIL ``convert('L')`` (fixed-point ITU-R 601-2): int32 [..., H, W, 3] -> [..., H, W]."""
    x = image.astype(jnp.int32)
    return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16


def grayscale(image: jax.Array) -> jax.Array:
    """torchvision ``Grayscale(3)``: uint8 [H, W, 3] -> uint8 [H, W, 3]."""
    return jnp.repeat(_luma(image)[..., None], 3, axis=-1).astype(jnp.uint8)


def solarize(image: jax.Array, threshold: int = 128) -> jax.Array:
    """PIL ``ImageOps.solarize``: pixels >= threshold inverted."""
    x = image.astype(jnp.int32)
    return jnp.where(x < threshold, x, 255 - x).astype(jnp.uint8)


def _box_radius(radius: jax.Array) -> jax.Array:
    """PIL ``_gaussian_blur_radius(radius, 3)`` in float32 (the host version's arithmetic)."""
    r = jnp.asarray(radius, jnp.float32)
    sigma2 = r * r / _PASSES
    small_l = jnp.floor((jnp.sqrt(12.0 * sigma2 + 1.0) - 1.0) / 2.0)
    a = (2 * small_l + 1) * (small_l * (small_l + 1) - 3 * sigma2)
    return small_l + a / (6 * (sigma2 - (small_l + 1) * (small_l + 1)))


def _box_blur_rows(x: jax.Array, box: jax.Array, max_taps: int) -> jax.Array:
    """One PIL box-blur pass along axis 1 of uint32 [rows, width, 3] (8.24 fixed point; the
    sums fit uint32 as in PIL's C)."""
    width = x.shape[1]
    offsets = jnp.arange(-max_taps - 1, max_taps + 2)
    idx = jnp.clip(jnp.arange(width)[:, None] + offsets[None, :], 0, width - 1)
    taps = x[:, idx]  # [rows, width, taps, 3]
    whole = box.astype(jnp.int32)
    ww = (jnp.float32(1 << 24) / (box * 2 + 1)).astype(jnp.uint32)
    fw = (jnp.uint32(1 << 24) - (2 * whole + 1).astype(jnp.uint32) * ww) // 2
    dist = jnp.abs(offsets)
    weights = jnp.where(dist <= whole, ww, jnp.where(dist == whole + 1, fw, jnp.uint32(0)))
    acc = jnp.sum(taps * weights[None, None, :, None], axis=2, dtype=jnp.uint32)
    return (acc + jnp.uint32(1 << 23)) >> 24


def gaussian_blur(image: jax.Array, radius: jax.Array,
                  max_radius: float = BLUR_RADIUS[1]) -> jax.Array:
    """PIL ``GaussianBlur(radius)``: uint8 [H, W, 3] -> uint8 [H, W, 3], radius <= max_radius."""
    sigma2 = max_radius * max_radius / _PASSES
    max_taps = int(math.floor((math.sqrt(12.0 * sigma2 + 1.0) - 1.0) / 2.0)) + 1
    box = _box_radius(radius)
    x = image.astype(jnp.uint32)
    for _ in range(_PASSES):
        x = _box_blur_rows(x, box, max_taps)
    x = jnp.swapaxes(x, 0, 1)
    for _ in range(_PASSES):
        x = _box_blur_rows(x, box, max_taps)
    return jnp.swapaxes(x, 0, 1).astype(jnp.uint8)


def _blend(degenerate: jax.Array, image: jax.Array, factor: jax.Array) -> jax.Array:
    """PIL ``Image.blend(degenerate, image, factor)``: float32, truncated, clipped."""
    base = degenerate.astype(jnp.int32)
    out = base.astype(jnp.float32) + jnp.float32(factor) * (
        image.astype(jnp.int32) - base).astype(jnp.float32)
    return jnp.floor(jnp.clip(out, 0.0, 255.0)).astype(jnp.uint8)


def brightness(image, factor):
    return _blend(jnp.zeros((), jnp.int32), image, factor)


def contrast(image, factor):
    luma = _luma(image)
    # int(mean + 0.5) of the L image, in exact integers.
    mean = (2 * jnp.sum(luma) + luma.size) // (2 * luma.size)
    return _blend(mean, image, factor)


def color(image, factor):
    return _blend(_luma(image)[..., None], image, factor)


def draws(key: jax.Array, *, strength: float = 0.3, radius=BLUR_RADIUS) -> dict:
    """One image's draws: op (0 grayscale, 1 solarize, 2 blur), blur radius ~ U(radius),
    jitter order (a permutation of brightness, contrast, saturation) and factors
    ~ U[max(0, 1 - s), 1 + s]."""
    k_op, k_radius, k_order, k_factor = jax.random.split(key, 4)
    return {"op": jax.random.randint(k_op, (), 0, 3),
            "radius": jax.random.uniform(k_radius, (), jnp.float32, radius[0], radius[1]),
            "order": jax.random.permutation(k_order, 3),
            "factors": jax.random.uniform(k_factor, (3,), jnp.float32, max(0.0, 1 - strength),
                                          1 + strength)}


def apply(image: jax.Array, d: dict, *, color_jitter: bool = True,
          max_radius: float = BLUR_RADIUS[1]) -> jax.Array:
    """3-Augment then colour jitter with the draws ``d``: uint8 [H, W, 3] -> uint8."""
    image = jax.lax.switch(d["op"], [grayscale, solarize,
                                     lambda x: gaussian_blur(x, d["radius"], max_radius)], image)
    if color_jitter:
        for i in range(3):
            image = jax.lax.switch(d["order"][i], [
                lambda x, k=k, fn=fn: fn(x, d["factors"][k])
                for k, fn in enumerate((brightness, contrast, color))], image)
    return image


def three_augment(images: jax.Array, key: jax.Array, *, color_jitter: float = 0.3,
                  radius=BLUR_RADIUS) -> jax.Array:
    """The photometric half of ``new_data_aug_generator`` on a batch, one draw per image.

    Args:
      images: uint8 [batch, height, width, 3] (cropped and flipped).
      key: a PRNG key.
    Returns:
      uint8 [batch, height, width, 3].
    """
    keys = jax.random.split(key, images.shape[0])
    per_image = jax.vmap(lambda k: draws(k, strength=color_jitter, radius=radius))(keys)
    return jax.vmap(lambda x, d: apply(x, d, color_jitter=bool(color_jitter),
                                       max_radius=radius[1]))(images, per_image)
