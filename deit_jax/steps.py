"""The pure train and eval steps, pmapped over local devices with axis name ``batch``.

Imports only jax, flax, optax and ml-collections (no TensorFlow), so benchmarks run them on a
bare accelerator image. Gradients, metrics and evaluation counts cross devices only through
the collectives written out here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from deit_jax import losses, models, optim
from deit_jax.augment import device as device_aug
from deit_jax.mixup import mixup_cutmix
from deit_jax.models import AXIS
from deit_jax.teacher import Teacher, uses_teacher

# fold_in value of the augmentation key under the step key: no device index reaches it.
AUG_STREAM = 2**31 - 1


class TrainState(struct.PyTreeNode):
    """Everything a resumed run needs; the teacher is deliberately not in here."""

    step: jax.Array
    params: Any
    opt_state: Any
    batch_stats: Any  # {} for models without BatchNorm
    ema_params: Any  # {} when EMA is off
    rng: jax.Array  # root key data (uint32); per-step keys are folded from it


# ----------------------------------------------------------------------------- building blocks


def replicate(tree: Any) -> Any:
    """Copies ``tree`` to every local device, laid out exactly as pmapped outputs are.

    ``flax.jax_utils.replicate`` alone gives arrays on another mesh than the train step's
    outputs, and the step would compile a second time on step 2.
    """
    return jax.pmap(lambda x: x, axis_name=AXIS)(flax.jax_utils.replicate(tree))


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                       image_size: int, *, ema: bool) -> TrainState:
    """Step 0: fresh variables for ``[1, image_size, image_size, 3]`` inputs, the optimizer
    state and (``ema``) the EMA copy of the parameters."""
    init_rng, root = jax.random.split(rng)
    variables = models.init_variables(model, init_rng, image_size)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
        batch_stats=variables.get("batch_stats", {}),
        ema_params=jax.tree.map(jnp.copy, params) if ema else {},
        rng=jax.random.key_data(root))


# ------------------------------------------------------------------------------------- steps


def augment_on_device(step_key: jax.Array, images: jax.Array,
                      augment: device_aug.DeviceAugment) -> jax.Array:
    """The device half of the training transform (``aug.on_device``), before mixup.

    Args:
      step_key: the step's key (not per device).
      images: uint8 [per_device, H, W, 3], this device's shard of the global batch.
      augment: the device transform (``DeviceAugment.from_config(config.aug)``).
    Returns:
      float32 [per_device, H, W, 3], normalised. Example j of device d draws from its position
      d * per_device + j in the global batch, so the result does not depend on the device count.
    """
    per_device = images.shape[0]
    positions = jax.lax.axis_index(AXIS) * per_device + jnp.arange(per_device)
    return device_aug.augment_batch(jax.random.fold_in(step_key, AUG_STREAM), images, positions,
                                    augment)


def make_train_step(*, model: nn.Module, tx: optax.GradientTransformation, lr_fn: Callable,
                    mix_fn: Callable, loss_fn: Callable, teacher: Teacher | None = None,
                    teacher_tau: float = 1.0, accum_steps: int = 1,
                    ema_decay: float | None = None,
                    augment: device_aug.DeviceAugment | None = None) -> Callable:
    """The train step ``(state, batch, teacher_vars) -> (state, metrics)``, to be pmapped over
    ``batch`` (``donate_argnums=(0,)``).

    Args:
      model: the student; ``model.apply(variables, images, train=True)``.
      tx, lr_fn: the optimizer and its schedule (``lr_fn(step)`` is logged).
      mix_fn: ``(key, images, labels) -> (images, targets [n, classes], lam)`` (mixup/CutMix
        and label smoothing, ``mixup.mixup_cutmix`` with the recipe bound).
      loss_fn: ``(cls_logits, dist_logits, targets, teacher_logits) -> loss`` (the DeiT loss
        with its distillation kind, alpha, tau bound; ``losses.deit_loss``).
      teacher: None (no teacher: kind 'none' or 'cls2') or the run's ``Teacher``.
      teacher_tau: the temperature a precomputed teacher's probabilities are mixed at.
      accum_steps: micro-batches per update (gradient accumulation).
      ema_decay: the parameter EMA's decay; None = no EMA.
      augment: the device half of the transform (``DeviceAugment.from_config``): all of the
        photometric recipe (``aug.on_device``) or the host-exact path's finish (normalise,
        erasing) of uint8 batches; None = none (float32 batches are taken as they are).
    """

    def train_step(state: TrainState, batch: dict, teacher_vars: Any) -> tuple[TrainState, dict]:
        """One optimizer step on this device's shard of the global batch."""
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        rng = jax.random.fold_in(step_key, jax.lax.axis_index(AXIS))  # per-device randomness
        if augment is not None and augment.applies_to(batch["image"]):
            batch = {**batch, "image": augment_on_device(step_key, batch["image"], augment)}
        mix_rng, drop_rng = jax.random.split(rng)

        def micro_loss(params, batch_stats, micro, key):
            images, targets, lam = mix_fn(jax.random.fold_in(key, 0), micro["image"],
                                          micro["label"])
            teacher_logits = None
            if teacher is not None:
                teacher_logits = teacher.targets(micro, images, lam, teacher_vars, teacher_tau)
            variables = {"params": params}
            rngs = {"drop_path": jax.random.fold_in(key, 1)}
            if batch_stats:
                variables["batch_stats"] = batch_stats
                out, updated = model.apply(variables, images, train=True, rngs=rngs,
                                           mutable=["batch_stats"])
                batch_stats = updated["batch_stats"]
            else:
                out = model.apply(variables, images, train=True, rngs=rngs)
            cls_logits, dist_logits = out if isinstance(out, tuple) else (out, None)
            return loss_fn(cls_logits, dist_logits, targets, teacher_logits), batch_stats

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        if accum_steps == 1:
            (loss, batch_stats), grads = grad_fn(state.params, state.batch_stats, batch, mix_rng)
        else:
            # Gradient accumulation: scan over micro-batches, average gradients, one update.
            micro = jax.tree.map(lambda x: x.reshape(accum_steps, -1, *x.shape[1:]), batch)

            def body(carry, xs):
                grads_sum, loss_sum, bs = carry
                mb, i = xs
                (loss, bs), grads = grad_fn(state.params, bs, mb, jax.random.fold_in(mix_rng, i))
                return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss, bs), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, loss, batch_stats), _ = jax.lax.scan(
                body, (zeros, 0.0, state.batch_stats), (micro, jnp.arange(accum_steps)))
            grads = jax.tree.map(lambda g: g / accum_steps, grads)
            loss = loss / accum_steps

        # Every device holds the same share of the global batch: the mean of per-device means
        # is the global-batch mean, as in the official DDP code.
        grads = jax.lax.pmean(grads, AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = (optim.ema_update(state.ema_params, params, ema_decay) if ema_decay is not None
               else state.ema_params)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        metrics = jax.lax.pmean(metrics, AXIS)
        metrics["lr"] = lr_fn(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  batch_stats=batch_stats, ema_params=ema)
        return new_state, metrics

    return train_step


def train_step_from_config(config: ml_collections.ConfigDict, *, model: nn.Module,
                           tx: optax.GradientTransformation, lr_fn: Callable,
                           teacher: Teacher) -> Callable:
    """``make_train_step`` with the values ``config`` gives (mixup, loss, distillation,
    accumulation, EMA, device augmentation): the one place the step's recipe is read."""
    dist, m = config.distillation, config.mixup
    losses.check_loss_config(config.loss.kind, config.loss.bce_target_threshold,
                             m.label_smoothing, model.num_classes)
    mix_fn = functools.partial(
        mixup_cutmix, num_classes=model.num_classes, mixup_alpha=m.mixup_alpha,
        cutmix_alpha=m.cutmix_alpha, switch_prob=m.switch_prob, mix_prob=m.prob,
        label_smoothing=m.label_smoothing)
    kwargs = dict(distillation=dist.kind, alpha=dist.alpha, tau=dist.tau,
                  kd_reduction=dist.kd_reduction)
    if config.loss.kind == "bce":  # DeiT III (--bce-loss): BCE on binarised targets
        threshold = config.loss.bce_target_threshold
        loss_fn = functools.partial(losses.bce_deit_loss, **kwargs,
                                    target_threshold=threshold if threshold >= 0 else None)
    else:
        loss_fn = functools.partial(losses.deit_loss, **kwargs)
    return make_train_step(
        model=model, tx=tx, lr_fn=lr_fn, mix_fn=mix_fn, loss_fn=loss_fn,
        teacher=teacher if uses_teacher(dist.kind) else None, teacher_tau=dist.tau,
        accum_steps=config.optim.grad_accum_steps,
        ema_decay=config.ema.decay if config.ema.enabled else None,
        augment=device_aug.DeviceAugment.from_config(config.aug))


def eval_step(params: Any, batch_stats: Any, batch: dict, *, model: nn.Module) -> dict:
    """Top-1/top-5 correct counts, psummed over devices, for every head (pmapped)."""
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    if models.is_distilled(model):
        cls_logits, dist_logits = model.apply(variables, batch["image"], train=False,
                                              both_heads=True)
        outputs = {"cls": cls_logits, "dist": dist_logits,
                   "fused": (cls_logits + dist_logits) / 2}
    else:
        outputs = {"cls": model.apply(variables, batch["image"], train=False)}
    mask, labels = batch["mask"], batch["label"]
    counts = {"count": mask.sum()}
    for head, logits in outputs.items():
        top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        counts[f"top1_{head}"] = ((top5[:, 0] == labels) * mask).sum()
        counts[f"top5_{head}"] = ((top5 == labels[:, None]).any(-1) * mask).sum()
    if "real_label" in batch:
        # ImageNet-ReaL: correct if the prediction is in the example's label set; examples
        # with an empty set are skipped, as in the ReaL paper.
        real = batch["real_label"].astype(jnp.float32)  # [batch, classes] multi-hot
        has_real = (real.sum(-1) > 0) * mask
        counts["count_real"] = has_real.sum()
        for head, logits in outputs.items():
            top1 = jax.lax.top_k(logits, 1)[1]
            counts[f"top1_real_{head}"] = (
                jnp.take_along_axis(real, top1, -1)[:, 0] * has_real).sum()
    return jax.lax.psum(counts, AXIS)  # exact totals: the host only adds across batches


def evaluate(p_eval_step, params, batch_stats, batches) -> dict[str, float]:
    """Runs a pass of ``batches``; returns accuracies in percent and the example count."""
    totals = None
    for batch in batches:
        counts = p_eval_step(params, batch_stats, batch)
        totals = counts if totals is None else jax.tree.map(jnp.add, totals, counts)
    totals = jax.tree.map(lambda x: float(x[0]), jax.device_get(totals))
    count = totals.pop("count")
    count_real = totals.pop("count_real", None)
    out = {"count": count, **({"count_real": count_real} if count_real is not None else {})}
    out.update({k: 100.0 * v / (count_real if "_real_" in k else count)
                for k, v in totals.items()})
    return out
