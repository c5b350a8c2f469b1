"""Learning-rate schedule, AdamW with the DeiT weight-decay mask, and model EMA."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

# Parameters never decayed (besides biases and norm scales): timm's no_weight_decay().
NO_DECAY_NAMES = ("pos_embed", "cls_token")


def scaled_lr(base_lr: float, global_batch_size: int) -> float:
    """The official linear scaling rule: ``lr = base_lr * global_batch / 512``."""
    return base_lr * global_batch_size / 512.0


def lr_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int
                ) -> Callable[[jax.Array], jax.Array]:
    """step -> lr: timm's CosineLRScheduler f(t), stepped as the official main.py steps it.

    ``f(t)`` (t in epochs): linear warmup from ``warmup_lr`` over ``warmup_epochs``, then
    ``min_lr + (lr - min_lr) * (1 + cos(pi * t / epochs)) / 2`` at the absolute epoch (timm's
    ``warmup_prefix=False``), ``min_lr`` from ``t >= epochs`` on (``cycle_limit=1``).

    ``per_epoch`` (official): the lr changes once an epoch. main.py builds the scheduler (lr
    f(0)) and calls ``lr_scheduler.step(epoch)`` at the *end* of epoch ``epoch``, so epoch e
    trains at ``f(max(e - 1, 0))``: epochs 0 and 1 both at ``warmup_lr``, the last epoch at
    ``f(epochs - 2)``. ``official_lr_lag=False`` trains epoch e at ``f(e)`` instead, as the
    paper's text reads. Otherwise (``per_epoch=False``) the lr is ``f(step / steps_per_epoch)``
    every step, as timm's per-update schedules (``step_update`` after each update: update k at
    f(k)); there is no lag to reproduce, and ``official_lr_lag`` does not apply.

    A pure function of the optimizer step, so a resumed run follows the uninterrupted schedule
    exactly. Computed in the default float dtype (float64 under ``jax_enable_x64``).
    """
    opt = config.optim
    peak = scaled_lr(opt.lr, config.batch_size)
    epochs, warmup = float(config.num_epochs), float(opt.warmup_epochs)
    # Read now: the closure must not follow later edits of the config.
    per_epoch, lag = bool(opt.per_epoch), bool(opt.official_lr_lag)
    warmup_lr, min_lr = float(opt.warmup_lr), float(opt.min_lr)
    ftype = jnp.result_type(float)

    def schedule(step):
        step = jnp.asarray(step)
        if per_epoch:
            epoch = step // steps_per_epoch  # integer: exact at epoch boundaries
            if lag:
                epoch = jnp.maximum(epoch - 1, 0)
            t = epoch.astype(ftype)
        else:
            t = step.astype(ftype) / steps_per_epoch
        warm = warmup_lr + t * (peak - warmup_lr) / max(warmup, 1e-8)
        cos = min_lr + 0.5 * (peak - min_lr) * (1 + jnp.cos(jnp.pi * t / epochs))
        lr = jnp.where(t < warmup, warm, cos)
        return jnp.where(t >= epochs, min_lr, lr)

    return schedule


def decay_mask(params, *, decay_dist_token: bool):
    """True where weight decay applies: matrices and conv kernels, not biases, norms, tokens."""
    no_decay = NO_DECAY_NAMES + (() if decay_dist_token else ("dist_token",))
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({
        path: (leaf.ndim > 1 and path[-1] not in no_decay) for path, leaf in flat.items()})


def create_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int
                     ) -> tuple[optax.GradientTransformation, Callable]:
    """The optimizer (+ optional global-norm clipping) with the DeiT schedule and decay mask.

    ``optim.name``: 'adamw' (DeiT) or 'lamb' (DeiT III's ``--opt fusedlamb``: apex FusedLAMB
    as timm's ``Lamb`` re-implements it: Adam moments with bias correction, L2 decay added to
    the Adam step, then the layer-wise trust ratio ``|w| / |update|`` (1 where either is 0, no
    clipping of the ratio) on the decayed tensors only; FusedLAMB's own ``max_grad_norm=1.0``
    global clipping is ``optim.clip_grad=1.0`` in the DeiT III configs).
    """
    opt = config.optim
    if opt.name not in ("adamw", "lamb"):
        raise ValueError(f"optim.name {opt.name!r} unknown; 'adamw' (DeiT) or 'lamb' (DeiT III)")
    schedule = lr_schedule(config, steps_per_epoch)

    def mask(p):
        return decay_mask(p, decay_dist_token=opt.decay_dist_token)

    if opt.name == "adamw":
        tx = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                         weight_decay=opt.weight_decay, mask=mask)
    else:
        parts = [optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps)]
        if opt.weight_decay:
            # timm Lamb / FusedLAMB adapt only where weight_decay != 0 (always_adapt=False):
            # biases, norms, LayerScale and tokens take the plain Adam step.
            parts += [optax.add_decayed_weights(opt.weight_decay, mask),
                      optax.masked(optax.scale_by_trust_ratio(), mask)]
        tx = optax.chain(*parts, optax.scale_by_learning_rate(schedule))
    if opt.clip_grad:
        tx = optax.chain(optax.clip_by_global_norm(opt.clip_grad), tx)
    return tx, schedule


def ema_update(ema_params, params, decay: float):
    """timm's ModelEma: ``ema = decay * ema + (1 - decay) * params``, once per optimizer step."""
    return optax.incremental_update(params, ema_params, step_size=1.0 - decay)
