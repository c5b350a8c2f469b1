"""torchvision ColorJitter(b, c, s) on the host, with PIL's 8-bit enhance ops."""

import functools

import tensorflow as tf

from deit_jax.augment.ops import brightness, color, contrast
from deit_jax.augment.tf_random import split_seed, uniform


def color_jitter_draws(seed, strength=0.3):
    """torchvision `ColorJitter.get_params` for (b, c, s) = strength, no hue.

    Returns:
      order int32 [3] (a permutation of 0=brightness, 1=contrast, 2=saturation, the order
      torchvision applies them in), factors float32 [3] ~ U[max(0, 1 - s), 1 + s].
    """
    s_order, s_factor = split_seed(seed, 2)
    order = tf.cast(tf.argsort(uniform(s_order, [3])), tf.int32)
    factors = uniform(s_factor, [3], max(0.0, 1.0 - strength), 1.0 + strength)
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

