"""The photometric half of DeiT's training transform on the device (``aug.on_device=True``),
and the finish of the host-exact path's uint8 pixels (``aug.on_device=False``: normalise,
random erasing; ``DeviceAugment.finish_only``).

The host hands over uint8 [batch, H, W, 3] RandomResizedCrop + flip views; inside the pmapped
train step, before mixup, ``augment_batch`` runs, per example: RandAugment (timm
``rand-m9-mstd0.5-inc1``: all 15 ops) or, with RandAugment off, torchvision ColorJitter ->
normalise -> timm RandomErasing. Each example has its own ops and magnitudes: the batch is
``jax.vmap``-ed, so every op of the switch is computed for every example and the drawn one
selected (a few dozen MFLOP per image against DeiT-S's ~28 GFLOP training step).

Randomness is stateless: example ``i`` of the global batch draws from
``fold_in(key, i)``, ``key`` being the step's augmentation key. The draws thus depend on the
step and the example's global position only, not on how the batch is laid out over devices
(8 devices give what 1 device gives), and a resumed run redraws the same.

The ops are ``device_ops`` (PIL's 8-bit arithmetic in jnp); the draws follow timm's and
torchvision's distributions (the host versions in ``randaugment``, ``jitter``, ``erasing``
use TensorFlow's generator, so the two paths draw different but equally distributed values).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections

from deit_jax.augment import device_ops
from deit_jax.augment.policy import (
    GEOMETRIC_OPS,
    IMAGENET_MEAN,
    IMAGENET_MEAN_UINT8,
    IMAGENET_STD,
    LEVEL_DENOM,
    RAND_INCREASING_OPS,
    RAND_OPS,
    parse_rand_augment,
)
from deit_jax.errors import ConfigError


def normalize(image: jax.Array) -> jax.Array:
    """``ToTensor()`` + ``Normalize(mean, std)``: [..., 3] -> float32, as ``host.normalize``."""
    x = image.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


# ----------------------------------------------------------------------------- RandAugment


def level_to_arg(name: str, level, negate, *, translate_pct: float = 0.45):
    """timm's ``LEVEL_TO_ARG[name]`` in float32: level in [0, 10] -> the op's argument
    (None for AutoContrast, Equalize, Invert)."""
    frac = jnp.asarray(level, jnp.float32) / LEVEL_DENOM

    def signed(v):
        return jnp.where(negate, -v, v)

    if name in ("AutoContrast", "Equalize", "Invert"):
        return None
    if name == "Rotate":
        return signed(frac * 30.0)
    if name == "Posterize":
        return jnp.floor(frac * 4.0)
    if name == "PosterizeIncreasing":
        return 4.0 - jnp.floor(frac * 4.0)
    if name == "Solarize":
        return jnp.minimum(jnp.floor(frac * 256.0), 256.0)
    if name == "SolarizeIncreasing":
        return 256.0 - jnp.minimum(jnp.floor(frac * 256.0), 256.0)
    if name == "SolarizeAdd":
        return jnp.minimum(jnp.floor(frac * 110.0), 128.0)
    if name in ("ShearX", "ShearY"):
        return signed(frac * 0.3)
    if name in ("TranslateXRel", "TranslateYRel"):
        return signed(frac * translate_pct)
    if name.endswith("Increasing"):
        return jnp.maximum(1.0 + signed(frac * 0.9), 0.1)
    return frac * 1.8 + 0.1  # Color, Contrast, Brightness, Sharpness


def rand_augment_draws(key: jax.Array, *, num_ops: int = 2, num_choices: int = 15,
                       magnitude: float = 9.0, magnitude_std: float = 0.5, prob: float = 0.5):
    """One RandAugment call's draws, as timm's: per layer the op (uniform with replacement),
    whether it applies (``random() > prob`` skips), the magnitude (N(m, std), or U(0, m) for
    std inf, clipped to [0, 10]) and the sign coin (``random() > 0.5`` negates).

    Returns:
      op int32 [num_ops], applied bool [num_ops], level float32 [num_ops], negate bool [num_ops].
    """
    k_op, k_apply, k_level, k_sign = jax.random.split(key, 4)
    op = jax.random.randint(k_op, (num_ops,), 0, num_choices)
    applied = jax.random.uniform(k_apply, (num_ops,)) <= prob
    if math.isinf(magnitude_std):
        level = jax.random.uniform(k_level, (num_ops,), maxval=magnitude)
    else:
        level = magnitude + magnitude_std * jax.random.normal(k_level, (num_ops,))
    level = jnp.clip(level, 0.0, LEVEL_DENOM)
    negate = jax.random.uniform(k_sign, (num_ops,)) > 0.5
    return op, applied, level, negate


def apply_op(name: str, image: jax.Array, arg, *, fill=IMAGENET_MEAN_UINT8,
             interpolation: str = "bicubic") -> jax.Array:
    """timm op ``name`` at argument ``arg`` on one uint8 [H, W, 3] image."""
    if name in GEOMETRIC_OPS:
        height, width = image.shape[:2]
        return device_ops.affine(image, device_ops.affine_matrix(name, arg, height, width),
                                 fill=fill, interpolation=interpolation)
    return device_ops.PIXEL_OPS[name](image, arg)


def _layer(image, op, level, negate, *, names, translate_pct, fill, interpolation):
    """Op ``names[op]`` at ``level``. The geometric ops share one affine warp (their branch only
    builds the matrix), the pixel ops go through ``lax.switch``."""
    height, width = image.shape[:2]

    def arg(name):
        return level_to_arg(name, level, negate, translate_pct=translate_pct)

    identity = jnp.asarray([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], jnp.float32)
    matrices = jnp.stack([device_ops.affine_matrix(n, arg(n), height, width)
                          if n in GEOMETRIC_OPS else identity for n in names])
    geometric = jnp.asarray([n in GEOMETRIC_OPS for n in names])[op]

    def pixel_branch(name):
        if name in GEOMETRIC_OPS:
            return lambda x: x
        return lambda x: device_ops.PIXEL_OPS[name](x, arg(name))

    pixel = jax.lax.switch(op, [pixel_branch(n) for n in names], image)
    warped = device_ops.affine(image, matrices[op], fill=fill, interpolation=interpolation)
    return jnp.where(geometric, warped, pixel)


def rand_augment(image: jax.Array, key: jax.Array, *, num_ops: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5, increasing: bool = True, prob: float = 0.5,
                 translate_pct: float = 0.45, fill=IMAGENET_MEAN_UINT8,
                 interpolation: str = "bicubic") -> jax.Array:
    """timm RandAugment on one uint8 [H, W, 3] image (``host.rand_augment``'s arguments)."""
    names = RAND_INCREASING_OPS if increasing else RAND_OPS
    draws = rand_augment_draws(key, num_ops=num_ops, num_choices=len(names),
                               magnitude=magnitude, magnitude_std=magnitude_std, prob=prob)
    layer = functools.partial(_layer, names=names, translate_pct=translate_pct, fill=fill,
                              interpolation=interpolation)

    def body(image, xs):
        op, applied, level, negate = xs
        return jnp.where(applied, layer(image, op, level, negate), image), None

    # A scan traces the 15-way switch once however many layers there are.
    return jax.lax.scan(body, image, draws)[0]


# -------------------------------------------------------------- colour jitter, random erasing


def color_jitter_draws(key: jax.Array, strength: float = 0.3):
    """torchvision ``ColorJitter.get_params`` for (b, c, s) = strength, no hue: the order
    (int32 [3], a permutation of brightness 0, contrast 1, saturation 2) and the factors
    (float32 [3] ~ U[max(0, 1 - s), 1 + s])."""
    k_order, k_factor = jax.random.split(key)
    order = jnp.argsort(jax.random.uniform(k_order, (3,))).astype(jnp.int32)
    factors = jax.random.uniform(k_factor, (3,), minval=max(0.0, 1.0 - strength),
                                 maxval=1.0 + strength)
    return order, factors


def color_jitter(image: jax.Array, key: jax.Array, *, strength: float = 0.3) -> jax.Array:
    """torchvision ``ColorJitter(s, s, s)`` on one uint8 image: PIL's Brightness, Contrast and
    Color enhancers in a random order."""
    order, factors = color_jitter_draws(key, strength)
    enhancers = (device_ops.brightness, device_ops.contrast, device_ops.color)
    for i in range(3):
        image = jax.lax.switch(order[i], [functools.partial(fn, factor=factors[k])
                                          for k, fn in enumerate(enhancers)], image)
    return image


def random_erasing(image: jax.Array, key: jax.Array, *, prob: float = 0.25,
                   min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3,
                   mode: str = "pixel", count: int = 1) -> jax.Array:
    """timm ``RandomErasing`` on one normalised float32 [H, W, 3] image (``erasing``'s rules:
    n ~ U{1..count} boxes with probability ``prob``, each the first of 10 draws that fits)."""
    if mode not in ("pixel", "rand", "const"):
        raise ValueError(f"mode must be 'pixel', 'rand' or 'const', got {mode!r}")
    height, width = image.shape[:2]
    k_apply, k_count, *k_boxes = jax.random.split(key, 2 + count)
    erase = jax.random.uniform(k_apply) < prob
    num_boxes = jax.random.randint(k_count, (), 1, count + 1)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    for i, k_box in enumerate(k_boxes):
        k_area, k_aspect, k_top, k_left, k_fill = jax.random.split(k_box, 5)
        target = (jax.random.uniform(k_area, (10,), minval=min_area, maxval=max_area)
                  * (height * width) / num_boxes)
        aspect = jnp.exp(jax.random.uniform(k_aspect, (10,), minval=log_aspect[0],
                                            maxval=log_aspect[1]))
        tries_h = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
        tries_w = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
        fits = (tries_w < width) & (tries_h < height)
        first = jnp.argmax(fits)
        h, w = tries_h[first], tries_w[first]
        top = jax.random.randint(k_top, (), 0, jnp.maximum(height - h, 0) + 1)
        left = jax.random.randint(k_left, (), 0, jnp.maximum(width - w, 0) + 1)
        box = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
        box &= erase & fits.any() & (i < num_boxes)
        if mode == "pixel":
            noise = jax.random.normal(k_fill, image.shape, image.dtype)
        elif mode == "rand":
            noise = jax.random.normal(k_fill, (1, 1, 3), image.dtype)
        else:
            noise = jnp.zeros((), image.dtype)
        image = jnp.where(box[..., None], noise, image)
    return image


# ------------------------------------------------------------------------------ the batch


@dataclasses.dataclass(frozen=True)
class DeviceAugment:
    """The device half of the recipe, from ``config.aug`` (``from_config``)."""

    rand_augment: dict | None = None  # ``parse_rand_augment`` kwargs; None = off
    color_jitter: float = 0.0  # used when rand_augment is None
    re_prob: float = 0.0
    re_mode: str = "pixel"
    re_count: int = 1
    interpolation: str = "bicubic"
    # True: the host-exact path's finish only (normalise, erasing) of its uint8 PIL pixels;
    # float32 images are then taken as already finished (a caller's own normalised batch).
    finish_only: bool = False

    @classmethod
    def from_config(cls, aug: ml_collections.ConfigDict) -> DeviceAugment:
        if aug.get("three_augment", False) and aug.get("on_device", False):
            # (else the step would add RandAugment and erasing to the host's 3-Augment)
            raise ConfigError("aug.three_augment runs on the host (DeiT III's 3-Augment, "
                              "deit_jax/augment/three_augment.py); set "
                              "--config.aug.on_device=False")
        erasing = dict(re_prob=aug.re_prob, re_mode=aug.re_mode, re_count=aug.re_count)
        if not aug.get("on_device", False):
            # The host ran the PIL ops (``host.train_pixels``); what timm does after them,
            # normalise and random erasing, runs here. DeiT III's 3-Augment has no erasing
            # (the official ``new_data_aug_generator`` replaces the whole transform).
            if aug.get("three_augment", False):
                erasing["re_prob"] = 0.0
            return cls(**erasing, interpolation=aug.interpolation, finish_only=True)
        return cls(rand_augment=parse_rand_augment(aug.auto_augment) if aug.auto_augment
                   else None, color_jitter=aug.color_jitter, **erasing,
                   interpolation=aug.interpolation)

    def applies_to(self, images: jax.Array) -> bool:
        """Whether the step runs this on ``images``: always on the device path (whose
        ``augment_batch`` refuses anything but uint8), on uint8 only for ``finish_only``."""
        return not self.finish_only or images.dtype == jnp.uint8

    def example(self, key: jax.Array, image: jax.Array) -> jax.Array:
        """uint8 [H, W, 3] view -> float32 [H, W, 3] normalised, augmented."""
        k_color, k_erase = jax.random.split(key)
        if self.rand_augment is not None:
            image = rand_augment(image, k_color, interpolation=self.interpolation,
                                 **self.rand_augment)
        elif self.color_jitter:
            image = color_jitter(image, k_color, strength=self.color_jitter)
        out = normalize(image)
        if self.re_prob > 0:
            out = random_erasing(out, k_erase, prob=self.re_prob, mode=self.re_mode,
                                 count=self.re_count)
        return out


def augment_batch(key: jax.Array, images: jax.Array, positions: jax.Array,
                  augment: DeviceAugment) -> jax.Array:
    """Augments a batch, example ``j`` with key ``fold_in(key, positions[j])``.

    Args:
      key: the step's augmentation key (a typed PRNG key).
      images: uint8 [batch, H, W, 3] host views (crop + flip).
      positions: int32 [batch], each example's position in the global batch.
    Returns:
      float32 [batch, H, W, 3], normalised.
    """
    if images.dtype != jnp.uint8:
        raise TypeError(f"device augmentation takes the host's uint8 views, got {images.dtype}; "
                        "the host pipeline must run with the same config.aug.on_device")
    keys = jax.vmap(functools.partial(jax.random.fold_in, key))(positions)
    return jax.vmap(augment.example)(keys, images)
