"""Official DeiT / timm PyTorch weights <-> Flax variables, and the ``deit_jax.convert`` command.

    python -m deit_jax.convert --model deit_small_patch16_224 \
        --src deit_small_patch16_224-cd65a155.pth --out /tmp/deit_s [--img_size 384]
    python -m deit_jax.convert --to=torch --model deit3_small_patch16_224 \
        --src WORKDIR_OR_CHECKPOINT --out deit3_s.safetensors [--weights=raw|ema]

The second form writes timm's state-dict layout, which
``timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=FILE))`` loads.

``.pth`` files (``{'model': state_dict}``, as the official release) need torch, imported only
here; timm hub ``.safetensors`` files need only numpy. The output directory is an Orbax
checkpoint that ``config.init_from`` and evaluation read.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from deit_jax import models
from deit_jax.models import regnet

# PyTorch's bicubic convolution coefficient; jax.image.resize('cubic') uses -0.5.
_TORCH_CUBIC_A = -0.75


def _cubic_weights(t: np.ndarray, a: float = _TORCH_CUBIC_A) -> np.ndarray:
    """Keys cubic weights of the 4 taps at offsets -1, 0, 1, 2 for fractional positions t."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] matrix of ``F.interpolate(mode='bicubic', align_corners=False)``.

    Same source-index rule (half-pixel centres, no antialiasing) and the same border rule
    (taps clamped to the edge) as PyTorch's ``upsample_bicubic2d``.
    """
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    base = np.floor(src)
    weights = _cubic_weights(src - base)
    matrix = np.zeros((out_size, in_size), np.float64)
    for tap in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)
        np.add.at(matrix, (np.arange(out_size), idx), weights[:, tap])
    return matrix


def resample_pos_embed(pos_embed: np.ndarray, new_grid: tuple[int, int], num_prefix_tokens: int,
                       old_grid: tuple[int, int] | None = None) -> np.ndarray:
    """Resamples ``[1, prefix + h*w, dim]`` to ``[1, prefix + new_h*new_w, dim]``.

    As the official fine-tuning code: prefix tokens (cls, dist) kept, the patch part reshaped to
    its grid (square unless ``old_grid`` says otherwise) and resized bicubically with PyTorch's
    kernel.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[0, num_prefix_tokens:]
    if old_grid is None:
        side = math.isqrt(grid.shape[0])
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != grid.shape[0]:
        raise ValueError(f"pos_embed patch part has {grid.shape[0]} tokens, not a "
                         f"{old_grid[0]}x{old_grid[1]} grid")
    grid = grid.reshape(*old_grid, -1).astype(np.float64)
    rows = torch_bicubic_matrix(old_grid[0], new_grid[0])
    cols = torch_bicubic_matrix(old_grid[1], new_grid[1])
    grid = np.einsum("ah,hwd,bw->abd", rows, grid, cols)
    grid = grid.reshape(1, new_grid[0] * new_grid[1], -1).astype(pos_embed.dtype)
    return np.concatenate([prefix, grid], axis=1)


def _torch_key(path: tuple[str, ...]) -> str:
    """Flax path -> timm key: ('blocks_3', 'attn', 'qkv', 'kernel') -> blocks.3.attn.qkv.weight."""
    key = ".".join(path)
    key = re.sub(r"blocks_(\d+)", r"blocks.\1", key)
    return re.sub(r"\.(kernel|scale)$", ".weight", key)


def _to_flax_layout(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:  # conv OIHW -> HWIO
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2:  # Linear (out, in) -> Dense (in, out)
        return value.T
    return value


def _check_keys(state_dict: Mapping[str, Any], expected: set[str], model_name: str) -> None:
    missing, extra = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or extra:
        raise ValueError(f"state dict does not fit {model_name}: missing keys {missing}, "
                         f"unexpected keys {extra}")


def convert_state_dict(state_dict: Mapping[str, Any], model_name: str,
                       img_size: int | None = None, **overrides: Any) -> dict:
    """Converts a timm/official state dict (name -> array) to Flax variables.

    DeiT and DeiT III models: returns ``params`` for ``create_model(model_name,
    img_size=img_size, num_classes=<the checkpoint's>, **overrides)``; when ``img_size``
    differs from the checkpoint's grid, ``pos_embed`` is resampled as in the official fine-tuning
    code. The official DeiT III ``.pth`` files' LayerScale keys (``blocks.N.gamma_1``/``gamma_2``)
    are read as timm's (``blocks.N.ls1.gamma``/``ls2.gamma``). RegNetY models: returns
    ``{'params': ..., 'batch_stats': ...}`` (BatchNorm running statistics included).
    Missing, extra or mis-shaped keys raise ``ValueError`` naming them.
    """
    state_dict = {k: np.asarray(v) for k, v in state_dict.items()}
    if model_name in regnet.REGNET_NAMES:
        return regnet.convert_regnet_state_dict(state_dict, model_name)
    if "head.weight" not in state_dict:
        raise ValueError(f"state dict for {model_name} has no 'head.weight' (keys: "
                         f"{sorted(state_dict)[:8]}...); is this a DeiT checkpoint?")
    if models.is_deit3(model_name):
        state_dict = {re.sub(r"\.gamma_([12])$", r".ls\1.gamma", k): v
                      for k, v in state_dict.items()}
    overrides = {"num_classes": state_dict["head.weight"].shape[0], **overrides}
    if img_size is not None:
        overrides["img_size"] = img_size
    model = models.create_model(model_name, **overrides)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), np.zeros((1, model.img_size, model.img_size, 3),
                                                       np.float32)))["params"]
    flat = {path: leaf for path, leaf in _flatten(shapes)}
    _check_keys(state_dict, {_torch_key(p) for p in flat}, model_name)

    out = {}
    for path, leaf in flat.items():
        key = _torch_key(path)
        value = _to_flax_layout(state_dict[key])
        if key == "pos_embed" and value.shape != leaf.shape:
            side = model.img_size // model.patch_size
            value = resample_pos_embed(value, (side, side), model.num_prefix_tokens)
        if value.shape != leaf.shape:
            raise ValueError(f"{key}: checkpoint shape {state_dict[key].shape} does not fit "
                             f"{model_name} (expects {leaf.shape} in Flax layout)")
        _set(out, path, value.astype(np.float32))
    return out


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()):
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _flatten(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads ``.pth``/``.pt`` (torch needed) or ``.safetensors`` (numpy only) weights."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return dict(load_file(path))
    if path.endswith((".pth", ".pt", ".bin")):
        try:
            import torch
        except ImportError as e:
            raise ImportError("reading .pth files needs PyTorch: `pip install torch` (CPU build "
                              "is enough), or use the timm hub .safetensors file") from e
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means an unreadable file
            raise ValueError(f"cannot read {path} as a PyTorch checkpoint: {e}") from e
        for key in ("model", "state_dict", "model_ema"):
            if isinstance(blob, Mapping) and key in blob and isinstance(blob[key], Mapping):
                blob = blob[key]
                break
        return {k: v.float().numpy() if v.is_floating_point() else v.numpy()
                for k, v in blob.items()}
    raise ValueError(f"unknown checkpoint format {path!r}: expected .pth or .safetensors")

# ------------------------------------------------------------------- export: Flax -> timm


def _to_torch_layout(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:  # conv HWIO -> OIHW
        return value.transpose(3, 2, 0, 1)
    if value.ndim == 2:  # Dense (in, out) -> Linear (out, in)
        return value.T
    return value


def _shape_mismatches(got: Mapping, expected: Mapping) -> list[str]:
    flat_got, flat_exp = dict(_flatten(got)), dict(_flatten(expected))
    out = [f"missing {'/'.join(k)}" for k in sorted(set(flat_exp) - set(flat_got))]
    out += [f"unexpected {'/'.join(k)}" for k in sorted(set(flat_got) - set(flat_exp))]
    out += [f"{'/'.join(k)}: {np.shape(flat_got[k])} != {tuple(flat_exp[k].shape)}"
            for k in sorted(set(flat_got) & set(flat_exp))
            if tuple(np.shape(flat_got[k])) != tuple(flat_exp[k].shape)]
    return out


def vit_architecture(params: Mapping, model_name: str) -> dict[str, Any]:
    """The ``create_model`` overrides that ``params`` of a DeiT / DeiT III model were built with
    (class count, width, depth, patch size, resolution, MLP ratio), read from the shapes."""
    probe = models.create_model(model_name)
    try:
        width = params["cls_token"].shape[-1]
        patch = params["patch_embed"]["proj"]["kernel"].shape[0]
        grid = params["pos_embed"].shape[1] - probe.num_prefix_tokens
        arch = dict(num_classes=params["head"]["kernel"].shape[-1], embed_dim=width,
                    patch_size=patch, img_size=math.isqrt(grid) * patch,
                    depth=sum(1 for k in params if re.fullmatch(r"blocks_\d+", k)),
                    mlp_ratio=params["blocks_0"]["mlp"]["fc1"]["kernel"].shape[-1] / width)
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"these parameters are not a {model_name} (no {e}); pass the --model "
                         "the run trained") from e
    if arch["embed_dim"] % probe.num_heads == 0:
        arch["num_heads"] = probe.num_heads
    else:  # a resized model: head count does not change any shape
        arch["num_heads"] = 1
    return arch


def export_state_dict(variables: Mapping, model_name: str) -> dict[str, np.ndarray]:
    """Flax variables -> timm's state dict for ``model_name`` (numpy, PyTorch layouts).

    ``variables`` is ``{'params': ...}`` (DeiT, DeiT III) or ``{'params', 'batch_stats'}``
    (RegNetY: BatchNorm running statistics become ``running_mean``/``running_var``, with
    ``num_batches_tracked`` = 0). The parameters are checked against ``model_name``'s
    structure (at their own width, depth, resolution and class count) first; a mismatch
    raises ``ValueError`` naming the keys.
    """
    params = variables["params"]
    if model_name in regnet.REGNET_NAMES:
        return _export_regnet(variables, model_name)
    if variables.get("batch_stats"):
        raise ValueError(f"{model_name} has no BatchNorm, but the variables carry batch_stats")
    arch = vit_architecture(params, model_name)
    model = models.create_model(model_name, **arch)
    side = model.img_size
    expected = jax.eval_shape(lambda: model.init(
        jax.random.key(0), np.zeros((1, side, side, 3), np.float32)))["params"]
    problems = _shape_mismatches(params, expected)
    if problems:
        raise ValueError(f"parameters do not fit {model_name} ({arch}): {problems[:10]}")
    return {_torch_key(path): np.ascontiguousarray(_to_torch_layout(np.asarray(v, np.float32)))
            for path, v in _flatten(params)}


def _export_regnet(variables: Mapping, model_name: str) -> dict[str, np.ndarray]:
    head = variables["params"].get("head_fc")
    if not isinstance(head, Mapping) or "kernel" not in head:
        raise ValueError(f"these parameters are not a {model_name} (no head_fc); pass the "
                         "--model the run trained")
    num_classes = head["kernel"].shape[-1]
    model = regnet.create_regnet(model_name, num_classes=num_classes)
    expected = jax.eval_shape(lambda: model.init(
        jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32), train=False))
    got = {c: variables.get(c, {}) for c in ("params", "batch_stats")}
    problems = _shape_mismatches(got, expected)
    if problems:
        raise ValueError(f"variables do not fit {model_name}: {problems[:10]}")
    out = {}
    for collection in ("params", "batch_stats"):
        for path, v in _flatten(got[collection]):
            v = np.asarray(v, np.float32)
            key = regnet._torch_key(path)
            torch_shape = regnet._torch_shape(path, v.shape)
            # 4-D: HWIO -> OIHW; 2-D: Dense or SE 1x1 conv (in, out) -> (out, in[, 1, 1]).
            v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T.reshape(torch_shape) \
                if v.ndim == 2 else v
            out[key] = np.ascontiguousarray(v)
            if key.endswith("running_mean"):  # PyTorch's BatchNorm buffer, unused in eval
                out[key[: -len("running_mean")] + "num_batches_tracked"] = np.array(0, np.int64)
    return out


EXPORT_WEIGHTS = ("raw", "ema")


def load_export_variables(src: str, weights: str = "raw") -> dict:
    """Variables to export from a converted checkpoint or a training workdir (latest step).

    ``weights``: 'raw' (the trained parameters, what the official code evaluates) or 'ema'
    (the model EMA; a workdir only, and only when the run had ``ema.enabled``). BatchNorm
    statistics (RegNetY) are the run's own: the EMA covers parameters only.
    """
    from deit_jax import checkpoint

    if weights not in EXPORT_WEIGHTS:
        raise ValueError(f"weights must be one of {EXPORT_WEIGHTS}, got {weights!r}")
    if checkpoint.is_variables_checkpoint(src):
        if weights == "ema":
            raise ValueError(f"{src} is a converted checkpoint with one set of weights; "
                             "use --weights=raw (EMA weights live in a training workdir)")
        return checkpoint.load_variables(src)[0]
    if not checkpoint.has_run_checkpoints(src):
        raise FileNotFoundError(f"{src!r} is neither a converted checkpoint nor a training "
                                "workdir with checkpoints")
    manager = checkpoint.create_manager(src, max_to_keep=1000, enable_async=False)
    state = checkpoint.restore_raw(manager, manager.latest_step())
    params = state["params"] if weights == "raw" else state.get("ema_params")
    if not params:
        raise ValueError(f"the run in {src} kept no EMA weights (ema.enabled was off); use "
                         "--weights=raw")
    variables = {"params": params}
    if state.get("batch_stats"):
        variables["batch_stats"] = state["batch_stats"]
    return variables


def save_safetensors(state_dict: Mapping[str, np.ndarray], path: str) -> None:
    """Writes a state dict as ``.safetensors`` (numpy only) that timm and torch read."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path,
              metadata={"format": "pt"})


def define_flags(flag_values, argv: list[str] | None = None) -> None:
    """The command's flags (``argv`` unused: no ``--config``)."""
    from absl import flags

    del argv
    fv = dict(flag_values=flag_values)
    flags.DEFINE_enum("to", "flax", ["flax", "torch"], "flax: PyTorch weights -> Orbax "
                      "checkpoint; torch: a checkpoint or workdir -> timm .safetensors.", **fv)
    flags.DEFINE_enum("model", None, list(models.MODEL_NAMES), "Model name.", **fv)
    flags.DEFINE_string("src", None, "--to=flax: .pth or .safetensors file; --to=torch: a "
                        "converted checkpoint or a training workdir (its latest step).", **fv)
    flags.DEFINE_string("out", None, "--to=flax: output directory; --to=torch: "
                        "FILE.safetensors.", **fv)
    flags.DEFINE_integer("img_size", None, "--to=flax: target resolution; pos_embed is "
                         "resampled when it differs.", **fv)
    flags.DEFINE_enum("weights", "raw", list(EXPORT_WEIGHTS), "--to=torch: the raw trained "
                      "weights or the model EMA.", **fv)
    flags.mark_flags_as_required(["model", "src", "out"], **fv)


def main(argv: list[str] | None = None) -> None:
    """Runs the command on ``argv`` (flags, no program name; default ``sys.argv[1:]``)."""
    import sys

    from deit_jax import checkpoint, cli

    args = cli.parse(define_flags, sys.argv[1:] if argv is None else argv,
                     "python -m deit_jax.convert", __doc__)
    if args.to == "torch":
        if not args.out.endswith(".safetensors"):
            cli.usage_error(f"--to=torch writes a .safetensors file; got --out={args.out}")
        if args.img_size is not None:
            cli.usage_error("--img_size resamples on import (--to=flax) only")
        state_dict = export_state_dict(load_export_variables(args.src, args.weights),
                                       args.model)
        save_safetensors(state_dict, args.out)
        n = sum(v.size for k, v in state_dict.items() if "running_" not in k
                and not k.endswith("num_batches_tracked"))
        print(f"wrote {args.model} ({args.weights} weights, {n:,} params) to {args.out}; load "
              f"with timm.create_model({args.model!r}, pretrained=True, "
              f"pretrained_cfg_overlay=dict(file={args.out!r}))")
        return
    variables = convert_state_dict(load_state_dict(args.src), args.model, args.img_size)
    if "params" not in variables:
        variables = {"params": variables}
    checkpoint.save_variables(args.out, variables, metadata={
        "model": args.model, "img_size": args.img_size, "src": os.path.basename(args.src)})
    n = sum(x.size for x in jax.tree.leaves(variables["params"]))
    print(f"wrote {args.model} ({n:,} params) to {args.out}")


def console() -> None:
    """The console entry point ``deit-convert``."""
    from deit_jax.errors import exit_on_user_error

    exit_on_user_error(main)()


if __name__ == "__main__":
    console()
