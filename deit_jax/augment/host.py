"""The host transforms: RandomResizedCrop + flip, PIL's two-pass resize, normalise, eval view,
and the full PIL-exact training transform (``aug.on_device=False``).
"""

import math

import tensorflow as tf

from deit_jax.augment import pillow
from deit_jax.augment.erasing import random_erasing
from deit_jax.augment.jitter import color_jitter as _color_jitter
from deit_jax.augment.policy import IMAGENET_MEAN, IMAGENET_STD, parse_rand_augment
from deit_jax.augment.randaugment import rand_augment, rand_augment_layers
from deit_jax.augment.tf_random import randint, split_seed, uniform

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
    s_area, s_ratio, s_top, s_left = split_seed(seed, 4)
    height = tf.convert_to_tensor(height, tf.int32)
    width = tf.convert_to_tensor(width, tf.int32)
    area = tf.cast(height * width, tf.float64)
    # torchvision draws float32 and does the rest in Python floats (float64).
    target_area = area * tf.cast(uniform(s_area, [10], scale[0], scale[1]), tf.float64)
    log_ratio = uniform(s_ratio, [10], math.log(ratio[0]), math.log(ratio[1]))
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
    top = tf.where(found, randint(s_top, 0, height - h), (height - h) // 2)
    left = tf.where(found, randint(s_left, 0, width - w), (width - w) // 2)
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


# aug.host_resize: how the RandomResizedCrop window becomes size x size.
#   'pil'  PIL's antialiased resize: Pillow's own (aug.host_library='pillow', ~1.5 ms per
#          ImageNet crop on one core) or the two TF passes above (PIL's to 1 grey level,
#          ~3.8 ms).
#   'fast' one bicubic pass without antialiasing, as big_vision's inception crop does:
#          ~0.5 ms; the same pixels as 'pil' when the crop is upscaled (then antialiasing
#          changes nothing), aliased when it is downscaled (mean 1.3 grey levels from PIL).
HOST_RESIZE = ('pil', 'fast')

# aug.host_library: which library computes the host's pixels: the crop's 'pil' resize and
# the flip (both paths), and RandAugment (the host-exact path, ``aug.on_device=False``).
#   'pillow'      Pillow's own ops in one tf.numpy_function per image (`pillow.transform`):
#                 PIL's pixels by construction, about half the TF ops' CPU per image;
#                 the Python around Pillow's C calls holds the GIL.
#   'tensorflow'  the same ops redone as TensorFlow graph ops (`ops`, `randaugment`): no
#                 Python on the hot path; the resize is PIL's to 1 grey level on natural
#                 crops (up to 9 next to saturated patches of tiny synthetic images).
# The draws are the same TensorFlow ones under both, so an example is augmented alike.
HOST_LIBRARY = ('pillow', 'tensorflow')


def crop_pixels(aug):
    """(resize, library) of the training crop for a config's ``aug``: `HOST_RESIZE` and
    `HOST_LIBRARY` (ConfigError naming the flag if not). Both paths take them: under
    ``aug.on_device`` the library computes the crop's resize and flip (``train_crop``)."""
    from deit_jax.errors import ConfigError

    for key, default, allowed in (('host_resize', 'pil', HOST_RESIZE),
                                  ('host_library', 'pillow', HOST_LIBRARY)):
        if aug.get(key, default) not in allowed:
            raise ConfigError(f"aug.{key}={aug.get(key)!r}; set --config.aug.{key} to one "
                              f"of {allowed}")
    return aug.get('host_resize', 'pil'), aug.get('host_library', 'pillow')


def _resize_fast(image, height, width, method):
    """One `tf.image.resize` pass without antialiasing; float32 integers in [0, 255]."""
    image = tf.image.resize(image, [height, width], method=method, antialias=False)
    return tf.round(tf.clip_by_value(image, 0.0, 255.0))


def random_resized_crop(image, seed, *, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        method='bicubic', resize='pil'):
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
    return _crop_resize(image, top, left, h, w, size, method, resize)


def _crop_resize(image, top, left, h, w, size, method, resize='pil'):
    if resize not in HOST_RESIZE:
        raise ValueError(f"aug.host_resize={resize!r}; expected one of {HOST_RESIZE}")
    crop = tf.slice(image, tf.stack([top, left, 0]), tf.stack([h, w, -1]))
    resized = lambda: (_resize if resize == 'pil' else _resize_fast)(crop, size, size, method)  # noqa: E731
    # A crop already size x size is returned as it is, as PIL's resize returns a copy then
    # (the whole 28x28 Fashion-MNIST image of the quickstart's crop-free recipe).
    out = tf.cond(tf.logical_and(tf.equal(h, size), tf.equal(w, size)),
                  lambda: tf.cast(crop, tf.float32), resized)
    return tf.ensure_shape(out, [size, size, 3])


def crop_flip_params(crop_seed, flip_seed, height, width, *, scale=(0.08, 1.0),
                     ratio=(3 / 4, 4 / 3), hflip=0.5):
    """One RandomResizedCrop + horizontal-flip draw as a view: int32 [5] = (top, left,
    height, width, flip), flip 1 with probability `hflip`."""
    top, left, h, w = random_resized_crop_params(crop_seed, height, width, scale=scale,
                                                 ratio=ratio)
    flip = (tf.cast(uniform(flip_seed) < hflip, tf.int32) if hflip > 0
            else tf.constant(0, tf.int32))
    return tf.stack([top, left, h, w, flip])


def crop_flip(image_uint8, crop, *, size, method='bicubic', resize='pil'):
    """Applies a view `crop` (int32 [5], see `crop_flip_params`): crop, resize to
    size x size (as PIL does with `resize='pil'`, see HOST_RESIZE), mirror when flip is 1.
    Returns uint8 [size, size, 3]."""
    crop = tf.cast(crop, tf.int32)
    image = _crop_resize(image_uint8, crop[0], crop[1], crop[2], crop[3], size, method, resize)
    image = tf.cast(image, tf.uint8)  # already rounded to integers in [0, 255]
    # tf.cond, not tf.where: a scalar SelectV2 over the image costs ~1.2 ms on the CPU.
    return tf.cond(crop[4] > 0, lambda: tf.reverse(image, [1]), lambda: image)


def crop_views(image_uint8, seed, *, views, img_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
               hflip=0.5, interpolation='bicubic', resize='pil', library='tensorflow'):
    """`views` independent crop + flip views of one image, as `train_transform` makes them
    before its photometric part (precomputed teacher logits per view, FKD-style).

    Args:
      image_uint8: uint8 [height, width, 3].
      seed: int [2].
    `resize` and `library` (`HOST_RESIZE`, `HOST_LIBRARY`) are the training path's, so that a
    stored view's pixels are the ones training replays.

    Returns:
      (images float32 [views, img_size, img_size, 3] normalised, crops int32 [views, 5]).
    """
    shape = tf.shape(image_uint8)
    images, crops = [], []
    for view_seed in split_seed(seed, views):
        crop = crop_flip_params(*split_seed(view_seed, 2), shape[0], shape[1], scale=scale,
                                ratio=ratio, hflip=hflip)
        if library == 'pillow' and resize == 'pil':
            images.append(pillow.transform(image_uint8, crop, None, size=img_size,
                                           interpolation=interpolation, normalize=True))
        else:
            images.append(normalize(crop_flip(image_uint8, crop, size=img_size,
                                              method=interpolation, resize=resize)))
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



def train_pixels(image_uint8, seed, *, img_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 hflip=0.5, auto_augment='rand-m9-mstd0.5-inc1', color_jitter=0.3,
                 interpolation='bicubic', crop=None, resize='pil', library='pillow'):
    """The PIL part of the DeiT training transform, as the host-exact path hands it over.

    RandomResizedCrop -> horizontal flip -> RandAugment (colour jitter instead when
    `auto_augment` is None, as timm disables jitter under RandAugment), in timm
    `create_transform(is_training=True)` order. RandAugment's hparams are timm's:
    fill = IMAGENET_MEAN_UINT8 and the same `interpolation` as the crop. What follows in
    timm, normalisation and random erasing, is not a PIL op: `train_transform` adds it here,
    the train step on the device (`augment.device.DeviceAugment.finish_only`).

    Args:
      image_uint8: uint8 [height, width, 3].
      seed: int [2].
      crop: None, or a stored view int32 [5] (`crop_flip_params`) that replaces the crop and
        flip draws (`scale`, `ratio`, `hflip` are then unused); the rest is unchanged.
      resize: `HOST_RESIZE`, how the crop is resized.
      library: `HOST_LIBRARY`, which library computes the crop, flip and RandAugment pixels.
    Returns:
      uint8 [img_size, img_size, 3].
    """
    if library not in HOST_LIBRARY:
        raise ValueError(f"aug.host_library={library!r}; expected one of {HOST_LIBRARY}")
    _, _, s_color, _ = split_seed(seed, 4)
    if library == 'pillow' and (auto_augment or resize == 'pil'):
        if crop is None:
            shape = tf.shape(image_uint8)
            crop = train_view(seed, shape[0], shape[1], scale=scale, ratio=ratio, hflip=hflip)
        ra = parse_rand_augment(auto_augment) if auto_augment else dict(num_ops=0)
        draws = rand_augment_layers(s_color, **ra)  # num_ops 0: no layers
        if resize != 'pil':  # the crop resized by TensorFlow ('fast'), the rest by Pillow
            image_uint8 = crop_flip(image_uint8, crop, size=img_size, method=interpolation,
                                    resize=resize)
            crop = None
        image = pillow.transform(image_uint8, crop, draws, size=img_size,
                                 increasing=ra.get('increasing', True),
                                 interpolation=interpolation)
    else:
        image = train_crop(image_uint8, seed, img_size=img_size, scale=scale, ratio=ratio,
                           hflip=hflip, interpolation=interpolation, crop=crop, resize=resize,
                           library=library)
        if auto_augment:
            image = tf.cast(rand_augment(image, s_color, interpolation=interpolation,
                                         **parse_rand_augment(auto_augment)), tf.uint8)
    if not auto_augment and color_jitter:  # timm: no colour jitter under RandAugment
        image = _color_jitter(image, s_color, strength=color_jitter)
    return image


def train_transform(image_uint8, seed, *, re_prob=0.25, re_mode='pixel', re_count=1,
                    **kwargs):
    """The whole DeiT training transform on the host: `train_pixels` (`kwargs` are its
    arguments) -> normalise -> random erasing (timm `RandomErasing(re_prob, mode=re_mode,
    max_count=re_count)`), as timm `create_transform(is_training=True)`.

    Returns:
      float32 [img_size, img_size, 3], normalised.
    """
    out = normalize(train_pixels(image_uint8, seed, **kwargs))
    if re_prob > 0:
        s_erase = split_seed(seed, 4)[3]
        out = random_erasing(out, s_erase, prob=re_prob, mode=re_mode, count=re_count)
    return out


def train_crop(image_uint8, seed, *, img_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
               hflip=0.5, interpolation='bicubic', crop=None, resize='pil',
               library='pillow'):
    """The host's part of the training transform under ``aug.on_device``: RandomResizedCrop +
    flip, drawn from `seed` exactly as `train_transform` draws them (the same crop and flip).

    Args:
      image_uint8: uint8 [height, width, 3].
      seed: int [2], the example's seed (`train_transform`'s).
      crop: None, or a stored view int32 [5] that replaces the crop and flip draws.
      resize: `HOST_RESIZE`, how the crop is resized.
      library: `HOST_LIBRARY`; 'pillow' with the 'pil' resize crops, resizes and flips with
        Pillow itself (PIL's pixels, ~1/3 of the CPU of TensorFlow's two antialiased passes).
    Returns:
      uint8 [img_size, img_size, 3].
    """
    if crop is None:
        shape = tf.shape(image_uint8)
        crop = train_view(seed, shape[0], shape[1], scale=scale, ratio=ratio, hflip=hflip)
    if library == 'pillow' and resize == 'pil':
        return pillow.transform(image_uint8, crop, None, size=img_size,
                                interpolation=interpolation)
    return crop_flip(image_uint8, crop, size=img_size, method=interpolation, resize=resize)


def train_view(seed, height, width, *, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5):
    """The crop + flip view (int32 [5], `crop_flip_params`) that `train_crop` and
    `train_transform` draw from the example's `seed` for an image of `height` x `width`:
    what crop-aware decoding needs before the pixels exist."""
    s_crop, s_flip, _, _ = split_seed(seed, 4)
    return crop_flip_params(s_crop, s_flip, height, width, scale=scale, ratio=ratio,
                            hflip=hflip)
