"""Dense, LayerNorm and GELU for the transformer, written for XLA:CPU's backward pass.

Each computes exactly what its flax / PyTorch counterpart computes (the same parameters, the
same names, values equal to float32 rounding) and only changes how the gradient is expressed.
Measured on the quickstart's student block (batch 256, 18 tokens, width 96, one core of this
project's 2-vCPU Xeon), the gradient of one block went from about 61 to about 41 ms; the table
and the per-op profile are in docs/PERFORMANCE.md. On a GPU or TPU these are the same fused
kernels as flax's (the weight-gradient orientation below applies to the CPU only).

* ``gelu``: PyTorch's ``nn.GELU`` formula, ``x * (1 + erf(x / sqrt 2)) / 2``. flax's exact
  gelu goes through ``erfc``, whose XLA expansion (an exp and selects) XLA:CPU splits into
  several passes over the MLP's hidden activations, forward and backward.
* ``Dense``: ``x @ kernel + bias`` with a custom VJP whose kernel gradient is one explicit
  ``[m, k]^T [m, n]`` contraction over the flattened tokens. Left to autodiff, XLA:CPU lays the
  cotangent out column-major and adds a transpose of it; its Eigen matmul is also about 1.8x
  faster for this contraction when the output has fewer rows than columns, so on the CPU a
  kernel with ``k > n`` (fc2) gets ``[n, k]`` computed and transposed (a kernel-sized copy).
* ``LayerNorm``: the normalisation with a custom VJP that keeps the normalised input and the
  reciprocal standard deviation and forms the input gradient in one expression
  (``r * (g - mean(g) - xhat * mean(g * xhat))``, ``g`` = cotangent times scale), instead of
  autodiff's chain through the mean and variance reductions. The variance is the two-pass
  ``mean((x - mean)^2)``, as PyTorch's, not flax's ``mean(x^2) - mean^2``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

_SQRT_HALF = 0.7071067811865476


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, PyTorch's formula."""
    return x * (0.5 + 0.5 * jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))


@jax.custom_vjp
def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x @ kernel`` for ``x [..., k]``, ``kernel [k, n]``."""
    return x @ kernel


def _matmul_fwd(x, kernel):
    return x @ kernel, (x, kernel)


def _matmul_bwd(res, g):
    x, kernel = res
    k, n = kernel.shape
    x2, g2 = x.reshape(-1, k), g.reshape(-1, n)
    if k > n and jax.default_backend() == "cpu":
        # The barrier keeps XLA from folding the transpose back into the contraction.
        d_kernel = jax.lax.optimization_barrier(jnp.einsum("mk,mn->nk", x2, g2)).T
    else:
        d_kernel = jnp.einsum("mk,mn->kn", x2, g2)
    return g @ kernel.T, d_kernel


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Dense(nn.Module):
    """``nn.Dense`` (params ``kernel [k, n]``, ``bias [n]``) with ``matmul``'s gradient."""

    features: int
    dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        bias = self.param("bias", self.bias_init, (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return matmul(x, kernel) + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    """LayerNorm over the last axis (two-pass variance), ``* scale + bias``."""
    return _layer_norm_fwd(x, scale, bias, epsilon)[0]


def _layer_norm_fwd(x, scale, bias, epsilon):
    centred = x - x.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt((centred * centred).mean(-1, keepdims=True) + epsilon)
    xhat = centred * rstd
    return xhat * scale + bias, (xhat, rstd, scale)


def _layer_norm_bwd(epsilon, res, g):
    del epsilon
    xhat, rstd, scale = res
    gs = g * scale
    dx = rstd * (gs - gs.mean(-1, keepdims=True) - xhat * (gs * xhat).mean(-1, keepdims=True))
    axes = tuple(range(g.ndim - 1))
    return dx, (g * xhat).sum(axes), g.sum(axes)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
    """``nn.LayerNorm`` (params ``scale``, ``bias``) computed by ``layer_norm``.

    Statistics in float32 when ``dtype`` is lower (as flax), output in ``dtype``.
    """

    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,))
        bias = self.param("bias", nn.initializers.zeros, (d,))
        compute = jnp.promote_types(x.dtype, jnp.float32)
        y = layer_norm(x.astype(compute), scale.astype(compute), bias.astype(compute),
                       self.epsilon)
        return y.astype(self.dtype)
