"""DeiT's augmentation: timm's ``create_transform(224, is_training=True,
auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25, interpolation='bicubic', color_jitter=0.3)``.

The host always hands over uint8 and the train step finishes the image; two paths split the
recipe at ``config.aug.on_device``:

- host (TensorFlow, ``tf.data``; PIL-exact pixels): ``host`` (RandomResizedCrop, flip, resize,
  normalise, the eval view, ``train_pixels``: the PIL ops the host-exact path hands over,
  normalised and erased in the step; the full ``train_transform``), ``ops`` (PIL's 8-bit ops),
  ``randaugment``, ``jitter``, ``erasing``, ``tf_random`` (stateless seeds), and ``pillow``
  (the same crop, flip and RandAugment by Pillow itself, ``aug.host_library='pillow'``);
- device (JAX, inside the pmapped train step): ``device_ops`` (the same 8-bit ops in jnp) and
  ``device`` (per-example draws, RandAugment, colour jitter, normalise, erasing, vmapped).

``policy`` holds what both share (mean/std, op tables, the RandAugment spec parser) and imports
nothing heavy. Importing this package imports no TensorFlow: the host names below
(``augment.train_transform``, ...) load their module on first use, so the JAX train step can
import ``deit_jax.augment.device`` on a machine without TensorFlow.
"""

import importlib

from deit_jax.augment.policy import (  # noqa: F401 - the package's public names
    GEOMETRIC_OPS,
    IMAGENET_MEAN,
    IMAGENET_MEAN_UINT8,
    IMAGENET_STD,
    LEVEL_DENOM,
    RAND_INCREASING_OPS,
    RAND_OPS,
    parse_rand_augment,
)

# Public host name -> its module (TensorFlow), imported when first read.
_HOST_NAMES = {
    'random_resized_crop_params': 'host', 'random_resized_crop': 'host',
    'crop_flip_params': 'host', 'crop_flip': 'host', 'crop_views': 'host',
    'normalize': 'host', 'eval_transform': 'host', 'train_transform': 'host',
    'train_pixels': 'host',
    'train_crop': 'host', 'train_view': 'host', 'HOST_RESIZE': 'host', 'HOST_LIBRARY': 'host',
    'auto_contrast': 'ops', 'equalize': 'ops', 'invert': 'ops', 'posterize': 'ops',
    'solarize': 'ops', 'solarize_add': 'ops', 'color': 'ops', 'contrast': 'ops',
    'brightness': 'ops', 'sharpness': 'ops', 'affine': 'ops',
    'level_to_arg': 'randaugment', 'apply_op': 'randaugment',
    'rand_augment_draws': 'randaugment', 'rand_augment': 'randaugment',
    'color_jitter_draws': 'jitter', 'color_jitter': 'jitter',
    'random_erasing': 'erasing',
}


def __getattr__(name):
    module = _HOST_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'deit_jax.augment' has no attribute {name!r}")
    return getattr(importlib.import_module(f'deit_jax.augment.{module}'), name)


def __dir__():
    return sorted([*globals(), *_HOST_NAMES])
