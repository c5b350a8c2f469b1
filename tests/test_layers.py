"""deit_jax.models.layers against flax's Dense/LayerNorm/gelu and PyTorch's: values, gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from deit_jax.models import layers


def _data(shape, seed=0, scale=1.0):
    values = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return jnp.asarray(values * scale)


@pytest.mark.parametrize("k,n", [(24, 96), (96, 24), (32, 32)])
def test_dense_equals_flax_dense_with_its_gradients(k, n):
    x = _data((4, 7, k))
    ours, ref = layers.Dense(n), nn.Dense(n)
    params = ref.init(jax.random.key(0), x)
    params = jax.tree.map(lambda v: v + _data(v.shape, 1, 0.1), params)  # a non-zero bias too
    assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(params)
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-6, atol=1e-6)
    cot = _data((4, 7, n), 2)

    def grads(module):
        return jax.grad(lambda p, x: (module.apply(p, x) * cot).sum(), argnums=(0, 1))(params, x)

    (gp, gx), (rp, rx) = grads(ours), grads(ref)
    np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gp["params"]["kernel"], rp["params"]["kernel"], rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(gp["params"]["bias"], rp["params"]["bias"], rtol=1e-5, atol=1e-5)
    # The kernel gradient is x^T cot (a wrong orientation or a missing transpose fails here).
    np.testing.assert_allclose(gp["params"]["kernel"],
                               np.einsum("btk,btn->kn", np.asarray(x), np.asarray(cot)),
                               rtol=1e-4, atol=1e-4)


def test_dense_bfloat16_computes_in_bfloat16_and_returns_float32_gradients():
    x = _data((8, 16))
    m = layers.Dense(4, dtype=jnp.bfloat16)
    p = m.init(jax.random.key(0), x)
    assert m.apply(p, x).dtype == jnp.bfloat16
    g = jax.grad(lambda p: m.apply(p, x).astype(jnp.float32).sum())(p)
    assert g["params"]["kernel"].dtype == jnp.float32
    expected = np.repeat(np.asarray(x).sum(0)[:, None], 4, 1)
    np.testing.assert_allclose(g["params"]["kernel"], expected, rtol=2e-2, atol=2e-2)


def test_layer_norm_equals_torch_with_its_gradients():
    x = _data((3, 5, 48), 3, 2.0) + 1.5  # an offset: a one-pass variance would lose digits
    scale, bias, cot = 1 + _data((48,), 4, 0.1), _data((48,), 5, 0.1), _data((3, 5, 48), 6)
    ln = layers.LayerNorm(epsilon=1e-6)
    p = {"params": {"scale": scale, "bias": bias}}
    assert jax.tree.structure(ln.init(jax.random.key(0), x)) == jax.tree.structure(p)
    y, vjp = jax.vjp(lambda p, x: ln.apply(p, x), p, x)
    gp, gx = vjp(cot)
    tx = torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True)
    tln = torch.nn.LayerNorm(48, eps=1e-6).double()
    with torch.no_grad():
        tln.weight.copy_(torch.tensor(np.asarray(scale)))
        tln.bias.copy_(torch.tensor(np.asarray(bias)))
    ty = tln(tx)
    ty.backward(torch.tensor(np.asarray(cot), dtype=torch.float64))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gp["params"]["scale"], tln.weight.grad.numpy(), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(gp["params"]["bias"], tln.bias.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_layer_norm_bfloat16_output_float32_statistics():
    x = _data((2, 64), 7) + 100.0
    ln = layers.LayerNorm(dtype=jnp.bfloat16)
    p = ln.init(jax.random.key(0), x)
    y = ln.apply(p, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    ref = nn.LayerNorm(epsilon=1e-6, dtype=jnp.bfloat16).apply(p, x.astype(jnp.bfloat16))
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), atol=3e-2)


def test_gelu_is_torch_erf_gelu_value_and_gradient():
    x = _data((4096,), 8, 3.0)
    tx = torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True)
    ty = torch.nn.functional.gelu(tx)
    ty.sum().backward()
    np.testing.assert_allclose(layers.gelu(x), ty.detach().numpy(), rtol=0, atol=3e-6)
    np.testing.assert_allclose(jax.grad(lambda v: layers.gelu(v).sum())(x), tx.grad.numpy(),
                               rtol=0, atol=3e-6)
    # Not the tanh approximation (which differs by up to ~1e-3 here).
    tanh_form = np.asarray(nn.gelu(x, approximate=True))
    assert np.abs(np.asarray(layers.gelu(x)) - tanh_form).max() > 1e-4
