"""timm RandAugment on the host: level -> argument, the per-layer draws, the op switch."""

import functools
import math

import tensorflow as tf

from deit_jax.augment.ops import (
    AFFINE_MATRICES,
    affine,
    auto_contrast,
    brightness,
    color,
    contrast,
    equalize,
    invert,
    posterize,
    sharpness,
    solarize,
    solarize_add,
)
from deit_jax.augment.policy import (
    IMAGENET_MEAN_UINT8,
    LEVEL_DENOM,
    RAND_INCREASING_OPS,
    RAND_OPS,
)
from deit_jax.augment.tf_random import f64, split_seed, uniform


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
    frac = f64(level) / LEVEL_DENOM
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
        return affine(image, AFFINE_MATRICES[name](arg, shape[0], shape[1]), **kwargs)
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
_NAME_TO_OP.update({name: _geometric(name) for name in AFFINE_MATRICES})
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
    s_op, s_apply, s_level, s_sign = split_seed(seed, 4)
    op = uniform(s_op, [num_ops], 0, num_choices, tf.int32)
    applied = uniform(s_apply, [num_ops]) <= prob
    if math.isinf(magnitude_std):
        level = uniform(s_level, [num_ops], 0.0, magnitude, tf.float64)
    else:
        level = magnitude + magnitude_std * tf.random.stateless_normal(
            [num_ops], s_level, dtype=tf.float64)
    level = tf.clip_by_value(level, 0.0, LEVEL_DENOM)
    negate = uniform(s_sign, [num_ops]) > 0.5
    return op, applied, level, negate


def rand_augment_layers(seed, *, num_ops=2, magnitude=9.0, magnitude_std=0.5, increasing=True,
                        translate_pct=0.45, prob=0.5):
    """`rand_augment`'s draws as each layer's (op, applied, argument): what
    `pillow.transform` applies. Same seed, same layers as `rand_augment`.

    Returns:
      op int32 [num_ops], applied bool [num_ops], arg float64 [num_ops] (0 for the ops
      without an argument).
    """
    names = RAND_INCREASING_OPS if increasing else RAND_OPS
    ops, applied, levels, negates = rand_augment_draws(
        seed, num_ops=num_ops, num_choices=len(names), magnitude=magnitude,
        magnitude_std=magnitude_std, prob=prob)

    def branch(name, level, negate):
        def arg():  # built inside the switch branch: only the drawn op's argument runs
            value = level_to_arg(name, level, negate, translate_pct=translate_pct)
            return tf.zeros([], tf.float64) if value is None else f64(value)
        return arg

    args = tf.stack([
        tf.switch_case(ops[i], [branch(n, levels[i], negates[i]) for n in names])
        for i in range(num_ops)]) if num_ops else tf.zeros([0], tf.float64)
    return ops, applied, args


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
        if name not in AFFINE_MATRICES:
            return lambda: tf.constant((1.0, 0.0, 0.0, 0.0, 1.0, 0.0), tf.float64)
        return lambda: tf.stack(
            [f64(v) for v in AFFINE_MATRICES[name](arg(name), shape[0], shape[1])])

    def pixel_branch(name):
        if name in AFFINE_MATRICES:
            return lambda: image
        return lambda: apply_op(name, image, arg(name))

    is_geometric = tf.gather([name in AFFINE_MATRICES for name in names], op)
    return tf.cond(
        is_geometric,
        lambda: affine(image, tf.unstack(tf.switch_case(op, [matrix_branch(n) for n in names])),
                       fill=fill, interpolation=interpolation),
        lambda: tf.switch_case(op, [pixel_branch(n) for n in names]))

