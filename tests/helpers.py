"""Shared test utilities: timm references with weights that make parity checks meaningful."""

from __future__ import annotations

import numpy as np
import torch


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Replaces every parameter and buffer with seeded noise of a size where errors show.

    timm's init leaves heads and biases tiny (std 0.02, zeros), so logits would match to 1e-4
    even with a wrong layout; norm scales near 1 keep activations well-conditioned.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=gen) * scale
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")) or "bn" in name \
                    and name.endswith("weight"):
                tensor.copy_(1.0 + noise)
            elif name.endswith("running_var"):
                tensor.copy_(1.0 + noise.abs())
            else:
                tensor.copy_(noise)
    return module


def state_dict_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
