"""Model registry: official timm/DeiT names -> Flax modules.

``create_model(name, **overrides)`` is the one way the trainer, the converter and the tests build
models. Every model follows one calling convention: ``model.apply(variables, images, train=...)``
with float32 ``[batch, height, width, 3]`` normalised images.
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

from deit_jax.models import regnet
from deit_jax.models.deit3 import DeiT3
from deit_jax.models.vit import VisionTransformer

# The pmap axis every step runs over; BatchNorm (RegNetY) averages its statistics across it.
AXIS = "batch"
# The ``config.model`` architecture fields a DeiT model can override (None: the registry's).
ARCH_FIELDS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads")
# The input resolution of a model without an ``img_size`` field (RegNetY) and no override.
DEFAULT_IMAGE_SIZE = 224

_TI = dict(embed_dim=192, num_heads=3)
_S = dict(embed_dim=384, num_heads=6)
_B = dict(embed_dim=768, num_heads=12)

DEIT_CONFIGS: dict[str, dict[str, Any]] = {
    "deit_tiny_patch16_224": dict(**_TI),
    "deit_small_patch16_224": dict(**_S),
    "deit_base_patch16_224": dict(**_B),
    "deit_tiny_distilled_patch16_224": dict(**_TI, distilled=True),
    "deit_small_distilled_patch16_224": dict(**_S, distilled=True),
    "deit_base_distilled_patch16_224": dict(**_B, distilled=True),
    "deit_base_patch16_384": dict(**_B, img_size=384),
    "deit_base_distilled_patch16_384": dict(**_B, img_size=384, distilled=True),
    # Not official: the transformer teacher of the 28x28 claims study (configs/study.py), named
    # so that a distillation run can build it from its name.
    "deit_fmnist_patch7_28": dict(img_size=28, patch_size=7, embed_dim=192, depth=4,
                                  num_heads=3),
}
# DeiT III (timm's deit3_* entries = the official models_v2.py *_LS models). The huge model
# has 14x14 patches, as timm and the official code register it.
DEIT3_CONFIGS: dict[str, dict[str, Any]] = {
    "deit3_small_patch16_224": dict(**_S),
    "deit3_small_patch16_384": dict(**_S, img_size=384),
    "deit3_medium_patch16_224": dict(embed_dim=512, num_heads=8),
    "deit3_base_patch16_224": dict(**_B),
    "deit3_base_patch16_384": dict(**_B, img_size=384),
    "deit3_large_patch16_224": dict(embed_dim=1024, depth=24, num_heads=16),
    "deit3_large_patch16_384": dict(embed_dim=1024, depth=24, num_heads=16, img_size=384),
    "deit3_huge_patch14_224": dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14),
}
# Not official: RegNetY-200MF's first three stages (widths 24, 56, 152x4; 6 blocks), the
# quickstart's teacher for 28x28 inputs (a 2x2 last map instead of the 4-stage net's 1x1, and
# ~1.8x less CPU time per step).
SMALL_REGNETS: dict[str, dict[str, Any]] = {
    "regnety_002_3stage": dict(w0=24, wa=36.44, wm=2.49, group_size=8, depth=6),
}
MODEL_NAMES: tuple[str, ...] = (*DEIT_CONFIGS, *DEIT3_CONFIGS, *regnet.REGNET_NAMES,
                                *SMALL_REGNETS)


def is_deit(name: str) -> bool:
    """True for the ViT families (DeiT and DeiT III): the models ``config.model`` can resize."""
    return name in DEIT_CONFIGS or name in DEIT3_CONFIGS


def is_deit3(name: str) -> bool:
    return name in DEIT3_CONFIGS


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Builds the model called ``name`` (an official timm/DeiT name) with field overrides.

    DeiT models accept overrides of any ``VisionTransformer`` field (``num_classes``,
    ``img_size``, ``drop_path_rate``, ``dtype``, ``depth``, ...), DeiT III models those of
    ``deit3.DeiT3`` (the same plus ``init_values``, ``drop_path_schedule``); RegNetY models those of
    ``regnet.create_regnet``. Unknown names and fields raise ``ValueError`` listing valid ones.
    """
    if name in regnet.REGNET_NAMES:
        return regnet.create_regnet(name, **overrides)
    if name in SMALL_REGNETS:
        unknown = sorted(set(overrides) - set(regnet._OVERRIDES))
        if unknown:
            raise ValueError(f"unknown override(s) {unknown} for {name}; valid: "
                             f"{list(regnet._OVERRIDES)}")
        return regnet.RegNet(**SMALL_REGNETS[name], **overrides)
    if name in DEIT3_CONFIGS:
        cls, base = DeiT3, DEIT3_CONFIGS[name]
    elif name in DEIT_CONFIGS:
        cls, base = VisionTransformer, DEIT_CONFIGS[name]
    else:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for {name}; valid: {sorted(fields)}")
    return cls(**{**base, **overrides})


def from_config(config: ml_collections.ConfigDict, num_classes: int) -> tuple[nn.Module, int]:
    """The model ``config.model`` describes, predicting ``num_classes``, and its input size.

    DeiT models take ``config.model``'s architecture fields that are set (None keeps the
    registry's value), its drop path rate and attention implementation; RegNetY models average
    BatchNorm statistics across devices. The image size is the model's ``img_size`` (DeiT) or
    ``config.model.img_size`` (default 224).
    """
    c = config.model
    overrides: dict[str, Any] = dict(num_classes=num_classes, dtype=jnp.dtype(c.dtype))
    if is_deit(c.name):
        overrides["drop_path_rate"] = c.drop_path_rate
        overrides["attention_impl"] = None if c.attention_impl == "xla" else c.attention_impl
        overrides.update({k: c[k] for k in ARCH_FIELDS if c[k] is not None})
    else:
        overrides["bn_axis_name"] = AXIS
    return create_model(c.name, **overrides), image_size(config)


def image_size(config: ml_collections.ConfigDict) -> int:
    """The input resolution of ``config.model``: its ``img_size`` when set, else the registry's
    (DeiT names), else 224; what ``from_config``'s model is built for, without building it."""
    c = config.model
    registry = DEIT_CONFIGS.get(c.name) or DEIT3_CONFIGS.get(c.name) or {}
    return c.img_size or registry.get("img_size") or DEFAULT_IMAGE_SIZE


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
    """True for a student with a dist token (and its ``head_dist``)."""
    return bool(getattr(model, "distilled", False))
