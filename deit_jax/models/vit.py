"""DeiT / ViT in Flax linen, parameter-for-parameter the model of timm and the official DeiT code.

Token layout: ``[cls, dist, patch_1 .. patch_N]`` (``dist`` only for distilled models); the
position embedding covers all of them and is added after the concatenation.
Submodule names follow timm's state-dict keys (``blocks_3/attn/qkv`` <-> ``blocks.3.attn.qkv``)
so that conversion is a rename plus a layout change.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deit_jax.models import layers

Dtype = Any

# timm's trunc_normal_(std=.02) truncates at +-2 *absolute*, i.e. at 100 standard deviations:
# in practice a plain normal.
_init_02 = nn.initializers.normal(0.02)
# PyTorch's default Conv2d init (kaiming_uniform, a=sqrt(5)) is U(+-1/sqrt(fan_in)); timm's DeiT-era
# init leaves the patch projection at that default.
_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _conv_bias_init(fan_in: int):
    """PyTorch's default Conv2d bias init, U(+-1/sqrt(fan_in)); timm's DeiT-era init keeps it."""
    bound = fan_in ** -0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                    bound)


def _dense(features: int, dtype: Dtype, name: str) -> layers.Dense:
    return layers.Dense(features, dtype=dtype, kernel_init=_init_02,
                        bias_init=nn.initializers.zeros, name=name)


def _layer_norm(dtype: Dtype, name: str) -> layers.LayerNorm:
    return layers.LayerNorm(epsilon=1e-6, dtype=dtype, name=name)


def drop_path_rates(drop_path_rate: float, depth: int) -> list[float]:
    """timm's linear stochastic-depth rule: 0 for the first block up to the rate for the last."""
    if depth == 1:
        return [0.0]
    return [drop_path_rate * i / (depth - 1) for i in range(depth)]


class PatchEmbed(nn.Module):
    """Non-overlapping patches through a ``patch x patch`` stride-``patch`` convolution."""

    patch_size: int
    embed_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[batch, height, width, 3] -> [batch, num_patches, embed_dim] (row-major patch order)."""
        p = self.patch_size
        x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    kernel_init=_conv_init, bias_init=_conv_bias_init(p * p * x.shape[-1]),
                    name="proj")(x)
        b, h, w, d = x.shape
        return x.reshape(b, h * w, d)


class _DenseParams(nn.Module):
    """The parameters of a ``_dense`` layer (``kernel [k, n]``, ``bias [n]``), not applied."""

    in_features: int
    features: int

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        return (self.param("kernel", _init_02, (self.in_features, self.features)),
                self.param("bias", nn.initializers.zeros, (self.features,)))


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (with bias), as timm.

    Parameters ``qkv`` (``kernel [d, 3d]``, ``bias [3d]``) and ``proj`` (``[d, d]``, ``[d]``) in
    either implementation. ``attention_impl=None`` (XLA, any backend) computes in the head-major
    layout ``[batch, heads, tokens, head_dim]``: the kernels are reshaped (free) so that the
    projections produce and consume that layout in their einsums, and no head split or merge
    is a copy of its own (on the CPU: DeiT-Ti's attention forward and backward -30%,
    docs/PERFORMANCE.md). A named implementation (``'cudnn'``: flash attention on NVIDIA GPUs)
    gets ``jax.nn.dot_product_attention``'s ``[batch, tokens, heads, head_dim]``.
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[batch, tokens, dim] -> [batch, tokens, dim]."""
        b, n, d = x.shape
        h = self.num_heads
        hd = d // h
        scale = hd**-0.5  # timm's default
        if self.attention_impl is not None:
            qkv = _dense(3 * d, self.dtype, "qkv")(x)
            # timm reshapes the fused output as (3, heads, head_dim): q, k, v in that order.
            q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, h, hd), 2, 0)
            # Softmax in float32 inside the kernel.
            out = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
            if self.is_mutable_collection("intermediates"):
                # Analysis only (deit_jax.analyze): the attention weights [batch, heads, n, n],
                # which the fused kernel never materialises. Recomputed: outputs are unchanged.
                logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
                self.sow("intermediates", "attention", jax.nn.softmax(logits, axis=-1))
            return _dense(d, self.dtype, "proj")(out.reshape(b, n, d))
        w, bias = _DenseParams(d, 3 * d, name="qkv")()
        x, w, bias = nn.dtypes.promote_dtype(x, w, bias, dtype=self.dtype)
        # The kernel's output axis is timm's (3, heads, head_dim): q, k, v in that order.
        q, k, v = (jnp.einsum("bnd,dshk->sbhnk", x, w.reshape(d, 3, h, hd))
                   + bias.reshape(3, 1, h, 1, hd))
        # Scale and softmax in float32, as jax.nn.dot_product_attention's XLA implementation.
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits * scale, axis=-1)
        # Analysis only (deit_jax.analyze): the attention weights [batch, heads, n, n].
        self.sow("intermediates", "attention", probs)
        out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v)
        wp, bp = _DenseParams(d, d, name="proj")()
        out, wp, bp = nn.dtypes.promote_dtype(out, wp, bp, dtype=self.dtype)
        return jnp.einsum("bhnk,hkd->bnd", out, wp.reshape(h, hd, d)) + bp


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2."""

    hidden_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        x = _dense(self.hidden_dim, self.dtype, "fc1")(x)
        # PyTorch's nn.GELU is the erf form; flax's nn.gelu defaults to the tanh approximation.
        x = layers.gelu(x)
        return _dense(d, self.dtype, "fc2")(x)


class LayerScale(nn.Module):
    """``x * gamma`` with a learned per-channel ``gamma`` initialised to ``init_value``."""

    init_value: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],))
        return x * gamma.astype(x.dtype)


class Block(nn.Module):
    """Pre-norm transformer block with stochastic depth on both residual branches.

    ``init_values`` (DeiT III's ``Layer_scale_init_Block``): each branch is scaled per channel
    by a learned LayerScale ``gamma`` (``ls1``, ``ls2``) before stochastic depth; None = DeiT.
    """

    num_heads: int
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    init_values: float | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        # Stochastic depth = dropout of whole residual branches per sample: one mask value per
        # example, broadcast over tokens and channels, scaled by 1/(1-p) like timm's DropPath.
        drop_path = nn.Dropout(self.drop_path, broadcast_dims=(1, 2), deterministic=not train,
                               rng_collection="drop_path")
        attn = Attention(self.num_heads, self.dtype, self.attention_impl, name="attn")
        y = attn(_layer_norm(self.dtype, "norm1")(x))
        if self.init_values is not None:
            y = LayerScale(self.init_values, name="ls1")(y)
        x = x + drop_path(y)
        y = Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype, name="mlp")(
            _layer_norm(self.dtype, "norm2")(x))
        if self.init_values is not None:
            y = LayerScale(self.init_values, name="ls2")(y)
        return x + drop_path(y)


class VisionTransformer(nn.Module):
    """DeiT: ViT with a cls token and, when ``distilled``, a distillation token and head.

    ``__call__(images, train)`` takes float32 ``[batch, height, width, 3]`` normalised images.
    Returns logits ``[batch, num_classes]``; a distilled model returns ``(cls_logits,
    dist_logits)`` when ``train`` (or ``both_heads``, for evaluating each head) and their mean
    (the official inference rule) otherwise.
    ``train=True`` with ``drop_path_rate > 0`` needs a ``'drop_path'`` rng.
    """

    num_classes: int = 1000
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    distilled: bool = False
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @property
    def num_prefix_tokens(self) -> int:
        return 2 if self.distilled else 1

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False, both_heads: bool = False):
        if images.shape[1:3] != (self.img_size, self.img_size):
            raise ValueError(f"model built for {self.img_size}x{self.img_size} images, got "
                             f"{images.shape[1]}x{images.shape[2]}; resample pos_embed with "
                             "deit_jax.convert to change resolution")
        d = self.embed_dim
        x = PatchEmbed(self.patch_size, d, self.dtype, name="patch_embed")(
            images.astype(self.dtype))
        b = x.shape[0]
        tokens = [self.param("cls_token", _init_02, (1, 1, d))]
        if self.distilled:
            tokens.append(self.param("dist_token", _init_02, (1, 1, d)))
        prefix = [jnp.broadcast_to(t, (b, 1, d)).astype(x.dtype) for t in tokens]
        x = jnp.concatenate([*prefix, x], axis=1)
        pos_embed = self.param("pos_embed", _init_02, (1, x.shape[1], d))
        x = x + pos_embed.astype(x.dtype)

        # With mutable=['intermediates'] (deit_jax.analyze), 'tokens' collects the embeddings
        # [batch, tokens, dim] entering the first block and leaving each block (depth + 1).
        self.sow("intermediates", "tokens", x)
        for i, rate in enumerate(drop_path_rates(self.drop_path_rate, self.depth)):
            x = Block(self.num_heads, self.mlp_ratio, rate, self.dtype, self.attention_impl,
                      name=f"blocks_{i}")(x, train)
            self.sow("intermediates", "tokens", x)
        x = _layer_norm(self.dtype, "norm")(x)

        # Logits in float32 so losses and softmax never run in bfloat16.
        logits = _dense(self.num_classes, self.dtype, "head")(x[:, 0]).astype(jnp.float32)
        if not self.distilled:
            return logits
        dist = _dense(self.num_classes, self.dtype, "head_dist")(x[:, 1]).astype(jnp.float32)
        if train or both_heads:
            return logits, dist
        return (logits + dist) / 2
