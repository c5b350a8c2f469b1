"""DeiT losses, as the official ``losses.py``: base cross-entropy on the cls head plus
distillation on the dist head, combined as ``(1 - alpha) * base + alpha * kd``."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

DISTILLATION_KINDS = ("none", "soft", "hard", "cls2")
# 'cls2' is the paper's two-class-token ablation (section 5.1): the distilled model's second
# token and head ("dist") are trained on the true labels like the cls head; no teacher.
TEACHER_KINDS = ("soft", "hard")
KD_REDUCTIONS = ("numel", "batchmean")


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over the batch of ``-sum(targets * log_softmax(logits))``; both ``[batch, classes]``.

    With smoothed one-hot targets this is exactly timm's LabelSmoothingCrossEntropy; with mixed
    targets, timm's SoftTargetCrossEntropy.
    """
    return optax.softmax_cross_entropy(logits, targets).mean()


def smoothed_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """``[batch]`` int labels -> ``[batch, classes]`` rows: on = 1 - eps + eps/C, off = eps/C."""
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def distillation_loss(dist_logits: jax.Array, teacher_logits: jax.Array, *, distillation: str,
                      tau: float = 1.0, kd_reduction: str = "numel") -> jax.Array:
    """The kd term of the official DistillationLoss; the teacher gets no gradient.

    soft: ``KL(softmax(teacher/T) || softmax(student/T)) * T^2``, summed and divided by
    ``batch * classes`` ('numel', official) or by ``batch`` ('batchmean').
    hard: cross-entropy of the student against the teacher's argmax (no label smoothing).
    """
    teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    if distillation == "soft":
        log_p_student = jax.nn.log_softmax(dist_logits / tau, axis=-1)
        log_p_teacher = jax.nn.log_softmax(teacher_logits / tau, axis=-1)
        kl = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student))
        denom = dist_logits.size if kd_reduction == "numel" else dist_logits.shape[0]
        return kl * (tau * tau) / denom
    if distillation == "hard":
        labels = jnp.argmax(teacher_logits, axis=-1)
        return optax.softmax_cross_entropy_with_integer_labels(dist_logits, labels).mean()
    raise ValueError(f"distillation must be 'soft' or 'hard' here, got {distillation!r}")


def deit_loss(cls_logits: jax.Array, dist_logits: jax.Array | None, targets: jax.Array,
              teacher_logits: jax.Array | None, *, distillation: str, alpha: float = 0.5,
              tau: float = 1.0, kd_reduction: str = "numel",
              criterion: Callable[[jax.Array, jax.Array], jax.Array] | None = None
              ) -> jax.Array:
    """The combined DeiT loss (a scalar).

    Args:
      cls_logits: ``[batch, classes]`` from the cls head.
      dist_logits: ``[batch, classes]`` from the dist head; may be None for 'none'.
      targets: ``[batch, classes]`` probability rows (label smoothing / mixup folded in).
      teacher_logits: ``[batch, classes]``; None for 'none'.
      distillation: 'none' (base only; a dist head is then untrained), 'soft', 'hard', or
        'cls2' (the second head against ``targets`` too, weight alpha; no teacher).
      alpha: weight of the kd term.
      tau: distillation temperature (soft only).
      kd_reduction: 'numel' (official) or 'batchmean' (soft only).
      criterion: ``(logits, targets) -> scalar``, the base loss of the label-trained heads;
        None = ``soft_target_cross_entropy`` (the official ``DistillationLoss`` wraps either).
    """
    criterion = criterion or soft_target_cross_entropy
    if distillation not in DISTILLATION_KINDS:
        raise ValueError(f"distillation must be one of {DISTILLATION_KINDS}, got {distillation!r}")
    if kd_reduction not in KD_REDUCTIONS:
        raise ValueError(f"kd_reduction must be one of {KD_REDUCTIONS}, got {kd_reduction!r}")
    base = criterion(cls_logits, targets)
    if distillation == "none":
        return base
    if distillation == "cls2":
        if dist_logits is None:
            raise ValueError("distillation='cls2' needs a model with a second token "
                             "(a *_distilled_* name)")
        return (1.0 - alpha) * base + alpha * criterion(dist_logits, targets)
    if dist_logits is None or teacher_logits is None:
        raise ValueError(f"distillation={distillation!r} needs dist_logits (a distilled model) "
                         "and teacher_logits")
    kd = distillation_loss(dist_logits, teacher_logits, distillation=distillation, tau=tau,
                           kd_reduction=kd_reduction)
    return (1.0 - alpha) * base + alpha * kd


def binary_cross_entropy(logits: jax.Array, targets: jax.Array, *,
                         target_threshold: float | None = 0.0) -> jax.Array:
    """DeiT III's ``--bce-loss``: sigmoid cross-entropy averaged over ``batch * classes``.

    The official ``engine.py`` binarises the (mixed) targets first, ``targets.gt(0.0)``, then
    applies ``torch.nn.BCEWithLogitsLoss()``: every class present in a mixed pair counts as a
    positive of weight 1. That is timm's ``BinaryCrossEntropy(target_threshold=0.0)`` on dense
    targets (its ``smoothing`` only applies to integer labels). ``target_threshold=None`` keeps
    the soft targets. Both arrays ``[batch, classes]``.
    """
    if target_threshold is not None:
        targets = (targets > target_threshold).astype(logits.dtype)
    return optax.sigmoid_binary_cross_entropy(logits, targets).mean()


def bce_deit_loss(cls_logits: jax.Array, dist_logits: jax.Array | None, targets: jax.Array,
                  teacher_logits: jax.Array | None, *, distillation: str, alpha: float = 0.5,
                  tau: float = 1.0, kd_reduction: str = "numel",
                  target_threshold: float | None = 0.0) -> jax.Array:
    """``deit_loss`` with ``binary_cross_entropy`` as the base criterion, as the official
    ``DistillationLoss`` wraps ``BCEWithLogitsLoss`` under ``--bce-loss`` (same arguments)."""
    return deit_loss(cls_logits, dist_logits, targets, teacher_logits, distillation=distillation,
                     alpha=alpha, tau=tau, kd_reduction=kd_reduction,
                     criterion=functools.partial(binary_cross_entropy,
                                                 target_threshold=target_threshold))


def check_loss_config(kind: str, bce_target_threshold: float, label_smoothing: float,
                      num_classes: int) -> None:
    """``config.loss`` against the targets it will see; raises ``ValueError`` naming the fix."""
    if kind not in ("ce", "bce"):
        raise ValueError(f"loss.kind must be 'ce' or 'bce', got {kind!r}")
    if kind == "bce" and 0 <= bce_target_threshold < label_smoothing / num_classes:
        raise ValueError(f"loss.kind='bce' makes targets > {bce_target_threshold} a 1: with "
                         f"mixup.label_smoothing={label_smoothing} every target is 1; set "
                         "label_smoothing=0 (official DeiT III) or loss.bce_target_threshold")
