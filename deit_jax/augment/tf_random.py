"""Stateless TensorFlow draws from [2] seeds, the only randomness of the host ops."""

import tensorflow as tf


def split_seed(seed, num):
    """Splits a [2] seed into `num` independent [2] seeds (a list)."""
    return tf.unstack(tf.random.experimental.stateless_split(seed, num=num))


def uniform(seed, shape=(), minval=0.0, maxval=1.0, dtype=tf.float32):
    return tf.random.stateless_uniform(shape, seed, minval=minval, maxval=maxval, dtype=dtype)


def randint(seed, low, high):
    """Uniform int32 in [low, high] inclusive (Python's `random.randint`); high >= low."""
    return tf.random.stateless_uniform([], seed, minval=low, maxval=high + 1, dtype=tf.int32)


def f64(value):
    """A Python number or tensor as float64 (no detour through float32 for Python floats)."""
    return tf.cast(tf.convert_to_tensor(value, dtype_hint=tf.float64), tf.float64)
