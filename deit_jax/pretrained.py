"""Pretrained weights: loading them (``init_from``, ``teacher_init``) and fitting them to a model.

A source is a converted checkpoint (``python -m deit_jax.convert``) or an earlier run's workdir
(its latest step). Fitting follows the official fine-tuning rules: ``pos_embed`` is resampled
to the model's patch grid, heads whose class count differs are re-initialised.
"""

from __future__ import annotations

import flax
import flax.linen as nn
import numpy as np
from absl import logging

from deit_jax import checkpoint
from deit_jax.convert import resample_pos_embed
from deit_jax.errors import ConfigError, MissingPathError

POS_EMBED = ("params", "pos_embed")


def load(path: str) -> dict:
    """Variables from a converted checkpoint or from an earlier run's workdir (its latest step)."""
    if checkpoint.is_variables_checkpoint(path):
        return checkpoint.load_variables(path)[0]
    manager = checkpoint.create_manager(path, max_to_keep=1000, enable_async=False) if (
        checkpoint.has_run_checkpoints(path)) else None
    if manager is None:
        raise MissingPathError(
            f"{path!r} is neither a converted checkpoint (python -m deit_jax.convert ... "
            "--out DIR) nor a training workdir with checkpoints")
    state = checkpoint.restore_raw(manager, manager.latest_step())
    variables = {"params": state["params"]}
    if state.get("batch_stats"):
        variables["batch_stats"] = state["batch_stats"]
    return variables


def fit_pos_embed(pos_embed: np.ndarray, model: nn.Module) -> np.ndarray:
    """``pos_embed`` ``[1, prefix + n, dim]`` resampled to ``model``'s patch grid (the official
    fine-tuning rule)."""
    side = model.img_size // model.patch_size
    return resample_pos_embed(np.asarray(pos_embed), (side, side), model.num_prefix_tokens)


def adapt_params(pretrained: dict, target: dict, model: nn.Module) -> dict:
    """Fits ``pretrained`` params to ``target``'s shapes for fine-tuning (``init_from``).

    ``pos_embed`` is resampled to the new grid (official fine-tuning rule) and heads whose class
    count differs are re-initialised (taken from ``target``); any other mismatch is an error.
    """
    flat_src = flax.traverse_util.flatten_dict(pretrained)
    flat_dst = flax.traverse_util.flatten_dict(target)
    missing = sorted("/".join(k) for k in set(flat_dst) - set(flat_src))
    extra = sorted("/".join(k) for k in set(flat_src) - set(flat_dst))
    if missing or extra:
        raise ConfigError(f"init_from does not fit {type(model).__name__}: missing {missing}, "
                          f"unexpected {extra}")
    out = {}
    for key, dst in flat_dst.items():
        src = np.asarray(flat_src[key])
        if src.shape != dst.shape:
            if key == ("pos_embed",):
                src = fit_pos_embed(src, model)
            elif key[0] in ("head", "head_dist"):
                logging.info("init_from: re-initialising %s (%s -> %s classes)", key[0],
                             src.shape[-1], dst.shape[-1])
                src = np.asarray(dst)
            if src.shape != dst.shape:
                raise ConfigError(f"init_from: {'/'.join(key)} has shape {src.shape}, the model "
                                  f"needs {dst.shape}")
        out[key] = src.astype(np.asarray(dst).dtype)
    return flax.traverse_util.unflatten_dict(out)


def fit_teacher(variables: dict, target: dict, model: nn.Module, *, name: str, source: str,
                num_classes: int, resample: bool) -> dict:
    """Checks a teacher's ``variables`` against ``target`` (``models.variable_shapes``).

    ``resample``: a DeiT teacher's ``pos_embed`` is resampled to the student's resolution. The
    heads must predict the student's ``num_classes`` and every other shape must match
    (ConfigError naming the checkpoint ``source`` otherwise); nothing is re-initialised.
    """
    flat_t, flat_v = (flax.traverse_util.flatten_dict(t) for t in (target, variables))
    pos = POS_EMBED
    if resample and pos in flat_v and pos in flat_t and flat_v[pos].shape != flat_t[pos].shape:
        logging.info("teacher %s: resampling pos_embed %s -> %s for %dx%d inputs", name,
                     flat_v[pos].shape, flat_t[pos].shape, model.img_size, model.img_size)
        flat_v[pos] = fit_pos_embed(flat_v[pos], model)
        variables = flax.traverse_util.unflatten_dict(flat_v)
    # The head's output width is the class count (DeiT: head/kernel, RegNet: head_fc/kernel).
    widths = {v.shape[-1] for k, v in flat_v.items() if k[1].startswith("head")
              and k[-1] == "kernel"}
    if widths and widths != {num_classes}:
        raise ConfigError(f"teacher {name} from {source} predicts {sorted(widths)[0]} classes, "
                          f"the student {num_classes}")
    bad = sorted("/".join(k) for k in set(flat_t) ^ set(flat_v)) + sorted(
        "/".join(k) for k in set(flat_t) & set(flat_v) if flat_t[k].shape != flat_v[k].shape)
    if bad:
        raise ConfigError(f"teacher checkpoint {source} does not fit {name}: {bad[:10]}")
    return variables
