"""DeiT III ("Revenge of the ViT", Touvron, Cord, Jegou 2022) in Flax linen.

The official ``models_v2.py`` ``vit_models`` with ``Layer_scale_init_Block``, as timm's
``deit3_*`` models build it (``VisionTransformer(no_embed_class=True, init_values=...)``):

- pre-norm blocks whose two residual branches are each scaled per channel by a learned
  LayerScale ``gamma`` before stochastic depth;
- a cls token and no dist token; the position embedding covers **only the patches**: it is added
  to the patch tokens and the cls token is concatenated afterwards (timm's ``no_embed_class``);
- the rest as DeiT: fused qkv with bias, LayerNorm eps 1e-6, exact GELU, final norm, a linear
  head on the cls token.

Submodule names follow timm's state-dict keys (``blocks_3/ls1/gamma`` <-> ``blocks.3.ls1.gamma``;
the official ``.pth`` files call it ``blocks.3.gamma_1``, renamed on conversion).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deit_jax.models.vit import (  # noqa: F401 - LayerScale re-exported for DeiT III users
    Block,
    Dtype,
    LayerScale,
    PatchEmbed,
    _dense,
    _init_02,
    _layer_norm,
    drop_path_rates,
)

# The official training code builds its models with ``vit_models(init_scale=1e-4)`` (main.py
# passes no init_scale); timm's deit3_* entries use 1e-6. It only matters from scratch.
OFFICIAL_LAYER_SCALE_INIT = 1e-4
DROP_PATH_SCHEDULES = ("constant", "linear")


class DeiT3(nn.Module):
    """DeiT III ViT: ``__call__(images, train)`` on float32 ``[batch, height, width, 3]``
    normalised images returns float32 logits ``[batch, num_classes]``.

    ``drop_path_schedule``: 'constant' = every block drops with ``drop_path_rate`` (the official
    ``models_v2.py``, ``dpr = [drop_path_rate for i in range(depth)]``, which trained the
    released checkpoints); 'linear' = timm's 0 .. rate ramp. ``train=True`` with
    ``drop_path_rate > 0`` needs a ``'drop_path'`` rng.
    """

    num_classes: int = 1000
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    init_values: float = OFFICIAL_LAYER_SCALE_INIT
    drop_path_rate: float = 0.0
    drop_path_schedule: str = "constant"
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @property
    def num_prefix_tokens(self) -> int:
        """Rows of ``pos_embed`` ahead of the patch grid: none (the cls token has no position
        embedding), which is what pos_embed resampling needs to know."""
        return 0

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        if images.shape[1:3] != (self.img_size, self.img_size):
            raise ValueError(f"model built for {self.img_size}x{self.img_size} images, got "
                             f"{images.shape[1]}x{images.shape[2]}; resample pos_embed with "
                             "deit_jax.convert to change resolution")
        if self.drop_path_schedule not in DROP_PATH_SCHEDULES:
            raise ValueError(f"drop_path_schedule must be one of {DROP_PATH_SCHEDULES}, got "
                             f"{self.drop_path_schedule!r}")
        d = self.embed_dim
        x = PatchEmbed(self.patch_size, d, self.dtype, name="patch_embed")(
            images.astype(self.dtype))
        b, n = x.shape[:2]
        pos_embed = self.param("pos_embed", _init_02, (1, n, d))
        x = x + pos_embed.astype(x.dtype)  # patches only: added before the cls token joins
        cls = self.param("cls_token", _init_02, (1, 1, d))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(x.dtype), x], axis=1)

        if self.drop_path_schedule == "linear":
            rates = drop_path_rates(self.drop_path_rate, self.depth)
        else:
            rates = [self.drop_path_rate] * self.depth
        for i, rate in enumerate(rates):
            # The official Layer_scale_init_Block: vit.Block with LayerScale on both branches.
            x = Block(self.num_heads, self.mlp_ratio, rate, self.dtype, self.attention_impl,
                      init_values=self.init_values, name=f"blocks_{i}")(x, train)
        x = _layer_norm(self.dtype, "norm")(x)
        # Logits in float32 so losses and softmax never run in bfloat16.
        return _dense(self.num_classes, self.dtype, "head")(x[:, 0]).astype(jnp.float32)
