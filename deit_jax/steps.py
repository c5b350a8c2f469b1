"""The pure train and eval steps, pmapped over local devices with axis name ``batch``.

Imports only jax, flax, optax and ml-collections (no TensorFlow), so benchmarks run them on a
bare accelerator image. Gradients, metrics and evaluation counts cross devices only through
the collectives written out here.
"""

from __future__ import annotations

import dataclasses
import functools
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
from deit_jax.mixup import mix_rows, mixup_cutmix

AXIS = "batch"
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


@dataclasses.dataclass(frozen=True)
class Teacher:
    """The distillation teacher: a model run on the fly, or logits that arrive with the batch."""

    model: nn.Module | None = None
    variables: Any = None  # host copy; replicated once by the loop
    precomputed: bool = False  # the batch carries ``teacher_logits``
    store: Any = None  # the opened TeacherLogitsStore (host side) when precomputed


# ----------------------------------------------------------------------------- building blocks


def model_overrides(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
    """``create_model`` overrides from ``config.model`` (0 / '' mean: the registry's value)."""
    c = config.model
    overrides = dict(num_classes=num_classes, dtype=jnp.dtype(c.dtype))
    if models.is_deit(c.name):
        overrides["drop_path_rate"] = c.drop_path_rate
        overrides["attention_impl"] = c.attention_impl or None
        for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads"):
            if c[key]:
                overrides[key] = c[key]
    else:
        overrides["bn_axis_name"] = AXIS  # BatchNorm statistics averaged across devices
    return overrides


def image_size_of(model: nn.Module, config: ml_collections.ConfigDict) -> int:
    return getattr(model, "img_size", 0) or config.model.img_size or 224


def init_variables(model: nn.Module, rng: jax.Array, image_size: int) -> dict:
    """Initial variables for ``[1, image_size, image_size, 3]`` images."""
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return flax.core.unfreeze(jax.jit(functools.partial(model.init, train=False))(rng, images))


def variable_shapes(model: nn.Module, image_size: int) -> dict:
    """The shapes and dtypes ``init_variables`` would give, without computing anything."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return flax.core.unfreeze(jax.eval_shape(functools.partial(model.init, train=False),
                                             jax.random.key(0), images))


def is_distilled(model: nn.Module) -> bool:
    return bool(getattr(model, "distilled", False))


def replicate(tree: Any) -> Any:
    """Copies ``tree`` to every local device, laid out exactly as pmapped outputs are.

    ``flax.jax_utils.replicate`` alone gives arrays on another mesh than the train step's
    outputs, and the step would compile a second time on step 2.
    """
    return jax.pmap(lambda x: x, axis_name=AXIS)(flax.jax_utils.replicate(tree))


def create_train_state(config, model, tx, rng, image_size) -> TrainState:
    init_rng, root = jax.random.split(rng)
    variables = init_variables(model, init_rng, image_size)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
        batch_stats=variables.get("batch_stats", {}),
        ema_params=jax.tree.map(jnp.copy, params) if config.ema.enabled else {},
        rng=jax.random.key_data(root))


# ------------------------------------------------------------------------------------- steps


def _teacher_targets(batch, images, lam, teacher, teacher_vars, config):
    """Teacher logits for the (mixed) batch, never differentiated."""
    if teacher.precomputed:
        # Precomputed logits saw the unmixed views: mix the teacher's probabilities with the
        # images' lambda and pairing, and hand them back as tau * log(p) so that
        # softmax(logits / tau) = p and argmax is the mixed prediction.
        tau = config.distillation.tau
        probs = jax.nn.softmax(batch["teacher_logits"].astype(jnp.float32) / tau, axis=-1)
        return tau * jnp.log(jnp.maximum(mix_rows(probs, lam), 1e-30))
    logits = teacher.model.apply(teacher_vars, images, train=False)
    return jax.lax.stop_gradient(logits.astype(jnp.float32))


def augment_on_device(step_key: jax.Array, images: jax.Array,
                      config: ml_collections.ConfigDict) -> jax.Array:
    """The device half of the training transform (``aug.on_device``), before mixup.

    Args:
      step_key: the step's key (not per device).
      images: uint8 [per_device, H, W, 3], this device's shard of the global batch.
    Returns:
      float32 [per_device, H, W, 3], normalised. Example j of device d draws from its position
      d * per_device + j in the global batch, so the result does not depend on the device count.
    """
    per_device = images.shape[0]
    positions = jax.lax.axis_index(AXIS) * per_device + jnp.arange(per_device)
    return device_aug.augment_batch(jax.random.fold_in(step_key, AUG_STREAM), images, positions,
                                    device_aug.DeviceAugment.from_config(config.aug))


def train_step(state: TrainState, batch: dict, teacher_vars: Any, *, model: nn.Module,
               teacher: Teacher, tx: optax.GradientTransformation, lr_fn,
               config: ml_collections.ConfigDict) -> tuple[TrainState, dict]:
    """One optimizer step on this device's shard of the global batch (pmapped over ``batch``)."""
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    rng = jax.random.fold_in(step_key, jax.lax.axis_index(AXIS))  # per-device randomness
    if config.aug.get("on_device", False):
        batch = {**batch, "image": augment_on_device(step_key, batch["image"], config)}
    mix_rng, drop_rng = jax.random.split(rng)
    dist = config.distillation
    num_classes = model.num_classes
    accum = config.optim.grad_accum_steps
    losses.check_loss_config(config.loss.kind, config.loss.bce_target_threshold,
                             config.mixup.label_smoothing, num_classes)

    def micro_loss(params, batch_stats, micro, key):
        m = config.mixup
        images, targets, lam = mixup_cutmix(
            jax.random.fold_in(key, 0), micro["image"], micro["label"], num_classes=num_classes,
            mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha, switch_prob=m.switch_prob,
            mix_prob=m.prob, label_smoothing=m.label_smoothing)
        teacher_logits = None
        if dist.kind in losses.TEACHER_KINDS:
            teacher_logits = _teacher_targets(micro, images, lam, teacher, teacher_vars, config)
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
        if config.loss.kind == "bce":  # DeiT III (--bce-loss): BCE on binarised targets
            threshold = config.loss.bce_target_threshold
            loss = losses.bce_deit_loss(
                cls_logits, dist_logits, targets, teacher_logits, distillation=dist.kind,
                alpha=dist.alpha, tau=dist.tau, kd_reduction=dist.kd_reduction,
                target_threshold=threshold if threshold >= 0 else None)
        else:
            loss = losses.deit_loss(cls_logits, dist_logits, targets, teacher_logits,
                                    distillation=dist.kind, alpha=dist.alpha, tau=dist.tau,
                                    kd_reduction=dist.kd_reduction)
        return loss, batch_stats

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    if accum == 1:
        (loss, batch_stats), grads = grad_fn(state.params, state.batch_stats, batch, mix_rng)
    else:
        # Gradient accumulation: scan over micro-batches, average gradients, one update.
        micro = jax.tree.map(lambda x: x.reshape(accum, -1, *x.shape[1:]), batch)

        def body(carry, xs):
            grads_sum, loss_sum, bs = carry
            mb, i = xs
            (loss, bs), grads = grad_fn(state.params, bs, mb, jax.random.fold_in(mix_rng, i))
            return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss, bs), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grads, loss, batch_stats), _ = jax.lax.scan(
            body, (zeros, 0.0, state.batch_stats), (micro, jnp.arange(accum)))
        grads = jax.tree.map(lambda g: g / accum, grads)
        loss = loss / accum

    # Every device holds the same share of the global batch: the mean of per-device means is
    # the global-batch mean, as in the official DDP code.
    grads = jax.lax.pmean(grads, AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = (optim.ema_update(state.ema_params, params, config.ema.decay) if config.ema.enabled
           else state.ema_params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    metrics = jax.lax.pmean(metrics, AXIS)
    metrics["lr"] = lr_fn(state.step)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              batch_stats=batch_stats, ema_params=ema)
    return new_state, metrics


def eval_step(params: Any, batch_stats: Any, batch: dict, *, model: nn.Module) -> dict:
    """Top-1/top-5 correct counts, psummed over devices, for every head (pmapped)."""
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    if is_distilled(model):
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
