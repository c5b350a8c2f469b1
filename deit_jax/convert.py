"""Official DeiT / timm PyTorch weights -> Flax variables, and the ``deit_jax.convert`` command.

    python -m deit_jax.convert --model deit_small_patch16_224 \
        --src deit_small_patch16_224-cd65a155.pth --out /tmp/deit_s [--img_size 384]

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
                       img_size: int | None = None) -> dict:
    """Converts a timm/official state dict (name -> array) to Flax variables.

    DeiT models: returns ``params`` for ``create_model(model_name, img_size=img_size,
    num_classes=<the checkpoint's>)``; when ``img_size`` differs from the checkpoint's grid,
    ``pos_embed`` is resampled as in the official fine-tuning code. RegNetY models: returns
    ``{'params': ..., 'batch_stats': ...}`` (BatchNorm running statistics included).
    Missing, extra or mis-shaped keys raise ``ValueError`` naming them.
    """
    state_dict = {k: np.asarray(v) for k, v in state_dict.items()}
    if model_name in regnet.REGNET_NAMES:
        return regnet.convert_regnet_state_dict(state_dict, model_name)
    if "head.weight" not in state_dict:
        raise ValueError(f"state dict for {model_name} has no 'head.weight' (keys: "
                         f"{sorted(state_dict)[:8]}...); is this a DeiT checkpoint?")
    overrides = {"num_classes": state_dict["head.weight"].shape[0]}
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


def main(argv: list[str] | None = None) -> None:
    import argparse

    from deit_jax import checkpoint

    parser = argparse.ArgumentParser(prog="python -m deit_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=models.MODEL_NAMES)
    parser.add_argument("--src", required=True, help=".pth or .safetensors file")
    parser.add_argument("--out", required=True, help="output directory (Orbax checkpoint)")
    parser.add_argument("--img_size", type=int, default=None,
                        help="target resolution; pos_embed is resampled when it differs")
    args = parser.parse_args(argv)
    variables = convert_state_dict(load_state_dict(args.src), args.model, args.img_size)
    if "params" not in variables:
        variables = {"params": variables}
    checkpoint.save_variables(args.out, variables, metadata={
        "model": args.model, "img_size": args.img_size, "src": os.path.basename(args.src)})
    n = sum(x.size for x in jax.tree.leaves(variables["params"]))
    print(f"wrote {args.model} ({n:,} params) to {args.out}")


if __name__ == "__main__":
    from deit_jax.errors import exit_on_user_error

    exit_on_user_error(main)()
