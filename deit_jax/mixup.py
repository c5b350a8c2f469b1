"""Mixup / CutMix on the device, inside the train step, as timm's ``Mixup`` in 'batch' mode.

Running it in the step (not the input pipeline) means the on-the-fly teacher sees exactly the
student's mixed images. One lambda per (per-device) batch, each sample paired with the batch
reversed, CutMix lambda corrected to the pasted box's area, label smoothing folded into the
targets -- as the official code, where each GPU mixes its own batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deit_jax.losses import smoothed_one_hot


def mix_rows(x: jax.Array, lam: jax.Array) -> jax.Array:
    """``lam * x + (1 - lam) * x[::-1]`` along the batch (targets, teacher probabilities)."""
    return lam * x + (1.0 - lam) * x[::-1]


def mixup_cutmix(rng: jax.Array, images: jax.Array, labels: jax.Array, *, num_classes: int,
                 mixup_alpha: float, cutmix_alpha: float, switch_prob: float = 0.5,
                 mix_prob: float = 1.0, label_smoothing: float = 0.0
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mixes a batch.

    Args:
      rng: PRNG key (per device and step).
      images: ``[batch, height, width, channels]``.
      labels: ``[batch]`` int class ids.
    Returns:
      ``(images, targets, lam)``: mixed images, ``[batch, num_classes]`` target rows (summing to
      1), and the lambda used (area-corrected for CutMix; 1.0 when nothing was mixed).
    """
    k_switch, k_mix, k_cut, k_y, k_x, k_apply = jax.random.split(rng, 6)
    one_hot = smoothed_one_hot(labels, num_classes, label_smoothing)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, one_hot, jnp.float32(1.0)

    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch) < switch_prob
    else:
        use_cutmix = jnp.bool_(cutmix_alpha > 0)
    lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
    lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0
    apply = jax.random.uniform(k_apply) < mix_prob
    lam = jnp.where(apply, jnp.where(use_cutmix, lam_cut, lam_mix), 1.0).astype(jnp.float32)

    flipped = images[::-1]
    # CutMix box as timm's rand_bbox: side = int(size * sqrt(1 - lam)), centre uniform over the
    # image, clipped at the border; lambda then corrected to the box's real area.
    h, w = images.shape[1:3]
    cut_rat = jnp.sqrt(1.0 - lam)
    cut_h, cut_w = (h * cut_rat).astype(jnp.int32), (w * cut_rat).astype(jnp.int32)
    cy, cx = jax.random.randint(k_y, (), 0, h), jax.random.randint(k_x, (), 0, w)
    yl, yh = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h // 2, 0, h)
    xl, xh = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w // 2, 0, w)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    box = (rows >= yl) & (rows < yh) & (cols >= xl) & (cols < xh)
    lam_box = 1.0 - ((yh - yl) * (xh - xl)) / (h * w)

    cutmix_now = use_cutmix & apply
    mixed = jnp.where(cutmix_now,
                      jnp.where(box[None, :, :, None], flipped, images),
                      lam.astype(images.dtype) * images + (1 - lam).astype(images.dtype) * flipped)
    lam = jnp.where(cutmix_now, lam_box, lam).astype(jnp.float32)
    return mixed, mix_rows(one_hot, lam), lam
