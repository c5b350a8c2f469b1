"""The host's PIL ops run by Pillow itself (``aug.host_library='pillow'``).

The crop's resize, the flip (both paths) and timm's RandAugment ops (the host-exact path) are
Pillow's own calls, made exactly as torchvision's ``RandomResizedCrop`` and timm's
``auto_augment`` make them, inside one ``tf.numpy_function`` per image. Every random draw is
the TensorFlow one of ``host.train_pixels`` (the same stateless seeds,
``randaugment.rand_augment_draws`` and ``level_to_arg``), so an example gets the same crop,
flip, ops and magnitudes under either library, determinism and resume hold, and only the
library that computes the pixels differs:
Pillow's are PIL's by construction. Pillow releases the GIL inside its C ops (resample,
transform, point, blend); the Python around them holds it (docs/PERFORMANCE.md has the
per-core figures and the scaling).
"""

import numpy as np
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from deit_jax.augment.policy import (
    IMAGENET_MEAN,
    IMAGENET_MEAN_UINT8,
    IMAGENET_STD,
    RAND_INCREASING_OPS,
    RAND_OPS,
)

RESAMPLE = {'bicubic': Image.Resampling.BICUBIC, 'bilinear': Image.Resampling.BILINEAR}


def _lut(image, table):
    return image.point(list(table) * 3)


def posterize(image, bits):
    """timm `posterize`: ImageOps.posterize's mask; 0 bits gives black (Pillow < 10, which
    DeiT ran, masked every bit; Pillow >= 10 refuses 0 bits)."""
    if bits >= 8:
        return image
    mask = ~(2 ** (8 - bits) - 1)
    return _lut(image, (i & mask for i in range(256)))


def solarize_add(image, add, threshold=128):
    """timm `solarize_add`: add to pixels below `threshold`, saturating at 255."""
    return _lut(image, (min(255, i + add) if i < threshold else i for i in range(256)))


def _affine(matrix):
    """timm's shear / translate: `img.transform(img.size, AFFINE, matrix(arg, w, h), ...)`."""
    def op(image, arg, fill, resample):
        return image.transform(image.size, Image.Transform.AFFINE, matrix(arg, *image.size),
                               resample=resample, fillcolor=fill)
    return op


# timm's NAME_TO_OP on PIL images: (image, arg, fill, resample) -> image.
_OPS = {
    'AutoContrast': lambda image, arg, fill, resample: ImageOps.autocontrast(image),
    'Equalize': lambda image, arg, fill, resample: ImageOps.equalize(image),
    'Invert': lambda image, arg, fill, resample: ImageOps.invert(image),
    'Rotate': lambda image, arg, fill, resample: image.rotate(arg, resample=resample,
                                                             fillcolor=fill),
    'Posterize': lambda image, arg, fill, resample: posterize(image, int(arg)),
    'Solarize': lambda image, arg, fill, resample: ImageOps.solarize(image, int(arg)),
    'SolarizeAdd': lambda image, arg, fill, resample: solarize_add(image, int(arg)),
    'Color': lambda image, arg, fill, resample: ImageEnhance.Color(image).enhance(arg),
    'Contrast': lambda image, arg, fill, resample: ImageEnhance.Contrast(image).enhance(arg),
    'Brightness': lambda image, arg, fill, resample: ImageEnhance.Brightness(image).enhance(arg),
    'Sharpness': lambda image, arg, fill, resample: ImageEnhance.Sharpness(image).enhance(arg),
    'ShearX': _affine(lambda f, width, height: (1, f, 0, 0, 1, 0)),
    'ShearY': _affine(lambda f, width, height: (1, 0, 0, f, 1, 0)),
    'TranslateXRel': _affine(lambda pct, width, height: (1, 0, pct * width, 0, 1, 0)),
    'TranslateYRel': _affine(lambda pct, width, height: (1, 0, 0, 0, 1, pct * height)),
}
for _base in ('Posterize', 'Solarize', 'Color', 'Contrast', 'Brightness', 'Sharpness'):
    _OPS[_base + 'Increasing'] = _OPS[_base]


def apply_op(name, image, arg, *, fill=IMAGENET_MEAN_UINT8, interpolation='bicubic'):
    """timm `NAME_TO_OP[name](img, arg, fillcolor=fill, resample=interpolation)` on uint8
    [height, width, 3] (numpy in, numpy out); `arg` as `randaugment.level_to_arg` gives it."""
    out = _OPS[name](Image.fromarray(np.asarray(image, np.uint8)), arg, tuple(fill),
                     RESAMPLE[interpolation])
    return np.asarray(out)


_MEAN = np.asarray(IMAGENET_MEAN, np.float32)
_STD = np.asarray(IMAGENET_STD, np.float32)


def _normalize(image):
    """`host.normalize` in numpy: the same float32 operations in the same order (the same
    bits), each in place and outside the GIL."""
    x = image.astype(np.float32)
    x /= np.float32(255.0)
    x -= _MEAN
    x /= _STD
    return x


def _transform(image, view, ops, applied, args, *, size, names, fill, interpolation,
               normalize):
    """The numpy side: crop + resize (unless `view` is empty), flip, the applied ops, and
    `host.normalize` when `normalize`."""
    resample = RESAMPLE[interpolation]
    pil = Image.fromarray(image)
    if view.size:
        top, left, height, width, flip = (int(v) for v in view)
        pil = pil.crop((left, top, left + width, top + height))
        if (height, width) != (size, size):
            pil = pil.resize((size, size), resample)
        if flip:
            pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for op, on, arg in zip(ops, applied, args, strict=True):
        if on:
            pil = _OPS[names[op]](pil, float(arg), fill, resample)
    return _normalize(np.asarray(pil)) if normalize else np.asarray(pil)


def transform(image, view, draws, *, size, increasing=True, fill=IMAGENET_MEAN_UINT8,
              interpolation='bicubic', normalize=False):
    """Crop + resize + flip (torchvision's `resized_crop` then `hflip` on a PIL image) and the
    RandAugment layers of `draws`, by Pillow, as one graph op of tf.data.

    Args:
      image: uint8 [height, width, 3].
      view: int32 [5] (top, left, height, width, flip), or None when `image` is already the
        flipped size x size crop.
      draws: (op int32 [n], applied bool [n], arg float64 [n]), or None for no ops.
      increasing: timm's op table (`RAND_INCREASING_OPS`) or the plain one (`RAND_OPS`).
      normalize: also `host.normalize` the result (in numpy, the same bits).
    Returns:
      uint8 [size, size, 3], or float32 normalised with `normalize`.
    """
    names = RAND_INCREASING_OPS if increasing else RAND_OPS
    view = tf.zeros([0], tf.int32) if view is None else tf.cast(view, tf.int32)
    if draws is None:
        draws = (tf.zeros([0], tf.int32), tf.zeros([0], tf.bool), tf.zeros([0], tf.float64))

    def run(image, view, ops, applied, args):
        return _transform(image, view, ops, applied, args, size=size, names=names,
                          fill=tuple(fill), interpolation=interpolation, normalize=normalize)

    out = tf.numpy_function(run, [tf.convert_to_tensor(image, tf.uint8), view, *draws],
                            tf.float32 if normalize else tf.uint8, stateful=False)
    return tf.ensure_shape(out, [size, size, 3])
