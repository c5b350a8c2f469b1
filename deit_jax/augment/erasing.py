"""timm RandomErasing on the host (normalised float32 images)."""

import math

import tensorflow as tf

from deit_jax.augment.ops import select
from deit_jax.augment.tf_random import randint, split_seed, uniform


def random_erasing(image, seed, *, prob=0.25, min_area=0.02, max_area=1 / 3, min_aspect=0.3,
                   mode='pixel', count=1):
    """timm `RandomErasing(prob, min_area, max_area, min_aspect, mode, max_count=count)`.

    With probability `prob`, erases n ~ U{1..count} boxes; each takes the first of 10
    (area, log-aspect) draws that fits strictly inside the image (none: no box). Box area
    is U(min_area, max_area) * image area / n, aspect h / w log-uniform in
    [min_aspect, 1 / min_aspect].

    Args:
      image: float32 [height, width, 3], normalised.
      seed: int [2].
      mode: 'pixel' (per-pixel N(0, 1)), 'rand' (per-box N(0, 1) colour) or 'const' (0).
    Returns:
      float32 [height, width, 3].
    """
    if mode not in ('pixel', 'rand', 'const'):
        raise ValueError(f"mode must be 'pixel', 'rand' or 'const', got {mode!r}")
    s_apply, s_count, *s_boxes = split_seed(seed, 2 + count)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    area = tf.cast(height * width, tf.float64)
    erase = uniform(s_apply) < prob
    num_boxes = randint(s_count, 1, count)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    rows = tf.range(height)[:, None]
    cols = tf.range(width)[None, :]
    for i, s_box in enumerate(s_boxes):
        s_area, s_aspect, s_top, s_left, s_fill = split_seed(s_box, 5)
        target = (uniform(s_area, [10], min_area, max_area, tf.float64) * area
                  / tf.cast(num_boxes, tf.float64))
        aspect = tf.exp(uniform(s_aspect, [10], *log_aspect, tf.float64))
        tries_h = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
        tries_w = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
        fits = (tries_w < width) & (tries_h < height)
        first = tf.argmax(tf.cast(fits, tf.int32))
        h, w = tries_h[first], tries_w[first]
        top = randint(s_top, 0, tf.maximum(height - h, 0))
        left = randint(s_left, 0, tf.maximum(width - w, 0))
        this_box = erase & tf.reduce_any(fits) & (i < num_boxes)

        def erased(image=image, top=top, left=left, h=h, w=w, s_fill=s_fill):
            # Built inside the branch: the mask is only computed for an erased image.
            box = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
            if mode == 'pixel':
                noise = tf.random.stateless_normal(shape, s_fill, dtype=image.dtype)
            elif mode == 'rand':
                noise = tf.random.stateless_normal([1, 1, 3], s_fill, dtype=image.dtype)
            else:
                noise = tf.zeros([], image.dtype)
            return select(box[..., None], noise + tf.zeros_like(image), image)

        # Noise only for an image that gets this box (1 in 4 at the default prob): the
        # same values, without drawing a full image of normals for the others.
        image = tf.cond(this_box, erased, lambda image=image: image)
    return image
