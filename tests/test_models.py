"""The DeiT family: parameter counts, parity with timm, calling convention, dtypes, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from helpers import nchw_to_nhwc, randomize_, state_dict_numpy

from deit_jax import convert, models
from deit_jax.models import vit

# timm's exact counts (../shared/DEIT_REFERENCE.md).
PARAM_COUNTS = {
    "deit_tiny_patch16_224": 5_717_416,
    "deit_small_patch16_224": 22_050_664,
    "deit_base_patch16_224": 86_567_656,
    "deit_tiny_distilled_patch16_224": 5_910_800,
    "deit_small_distilled_patch16_224": 22_436_432,
    "deit_base_distilled_patch16_224": 87_338_192,
    "deit_base_patch16_384": 86_859_496,
    "deit_base_distilled_patch16_384": 87_630_032,
}


def _param_shapes(model):
    x = jnp.zeros((1, model.img_size, model.img_size, 3))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_count(name):
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(_param_shapes(
        models.create_model(name))))
    assert count == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parity_with_timm(name):
    torch.manual_seed(0)
    reference = randomize_(timm.create_model(name, pretrained=False), seed=1)
    assert sum(p.numel() for p in reference.parameters()) == PARAM_COUNTS[name]
    params = convert.convert_state_dict(state_dict_numpy(reference), name)
    model = models.create_model(name)
    size = model.img_size
    images = np.random.RandomState(0).randn(2, 3, size, size).astype(np.float32)
    if model.distilled:
        # One reference pass in timm's two-head training form (no dropout or drop path in a
        # default model, so train mode computes the eval function); timm's eval output is
        # the mean of the two heads.
        reference.set_distilled_training(True)
        reference.train()
        with torch.no_grad():
            heads = [h.numpy() for h in reference(torch.from_numpy(images))]
        expected = {"eval": (heads[0] + heads[1]) / 2, "cls": heads[0], "dist": heads[1]}
        assert np.abs(heads[0] - heads[1]).max() > 0.1  # the heads really differ
    else:
        with torch.no_grad():
            expected = {"eval": reference.eval()(torch.from_numpy(images)).numpy()}

    @jax.jit
    def forward(params, x):  # both forms in one program: XLA shares the common trunk
        out = {"eval": model.apply({"params": params}, x, train=False)}
        if model.distilled:
            out["cls"], out["dist"] = model.apply({"params": params}, x, train=True)
        return out

    got = forward(params, nchw_to_nhwc(images))
    assert np.abs(expected["eval"]).max() > 0.5  # logits large enough to mean something
    for key, value in expected.items():
        np.testing.assert_allclose(np.asarray(got[key]), value, atol=1e-4, rtol=0, err_msg=key)


def _tiny(**kw):
    return models.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8,
                               depth=2, num_classes=7, **kw)


def test_calling_convention_and_token_layout():
    model = _tiny()
    x = np.random.RandomState(0).randn(3, 32, 32, 3).astype(np.float32)
    params = model.init(jax.random.key(0), x)["params"]
    assert params["pos_embed"].shape == (1, 16 + 2, 192)  # cls + dist + 4x4 patches
    fused = model.apply({"params": params}, x, train=False)
    cls, dist = model.apply({"params": params}, x, train=True)  # drop_path_rate 0: no rng needed
    assert fused.shape == (3, 7) and fused.dtype == jnp.float32
    np.testing.assert_allclose(fused, (cls + dist) / 2, atol=1e-6)
    plain = models.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    out = plain.apply(plain.init(jax.random.key(0), x), x, train=True)
    assert not isinstance(out, tuple) and out.shape == (3, 1000)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_head_major_attention_equals_dot_product_attention(dtype):
    """attention_impl=None (the head-major einsums) against jax.nn.dot_product_attention in
    [batch, tokens, heads, head_dim] (implementation='xla', the layout of attention_impl='cudnn'):
    the same parameters, outputs, gradients and sown attention weights."""
    x = jnp.asarray(np.random.RandomState(0).randn(3, 11, 48), dtype)
    head_major, fused = vit.Attention(3, dtype), vit.Attention(3, dtype, "xla")
    params = head_major.init(jax.random.key(0), x)
    other = fused.init(jax.random.key(0), x)
    assert jax.tree.structure(params) == jax.tree.structure(other)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(other), strict=True):
        np.testing.assert_array_equal(a, b)
    assert params["params"]["qkv"]["kernel"].shape == (48, 144)
    # Weights of order 1 (not init's 0.02), so that attention is far from uniform.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = tree.unflatten([0.3 * jax.random.normal(k, p.shape)
                             for k, p in zip(keys, leaves, strict=True)])

    def loss(module):
        def f(p, x):
            out, state = module.apply(p, x, mutable=["intermediates"])
            return (out.astype(jnp.float32) ** 2).sum(), state["intermediates"]["attention"][0]
        return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)

    (value, probs), grads = loss(head_major)(params, x)
    (value_f, probs_f), grads_f = loss(fused)(params, x)
    assert probs.shape == (3, 3, 11, 11) and probs.dtype == jnp.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert probs.max() > 0.5  # far from uniform (1/11)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(probs, probs_f, atol=tol)
    np.testing.assert_allclose(value, value_f, rtol=tol)
    assert float(value) > 1.0
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_f), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(b).max() > 0
        np.testing.assert_allclose(a, b, atol=tol * np.abs(b).max())


def test_stochastic_depth_rates_match_timm():
    for rate, depth in ((0.1, 12), (0.3, 5), (0.0, 3)):
        expected = [x.item() for x in torch.linspace(0, rate, depth)]
        np.testing.assert_allclose(vit.drop_path_rates(rate, depth), expected, atol=1e-7)


def test_stochastic_depth_drops_whole_samples():
    block = vit.Block(num_heads=2, drop_path=0.5)
    x = np.random.RandomState(0).randn(2000, 3, 8).astype(np.float32)
    params = block.init(jax.random.key(0), x, train=False)
    out = np.asarray(block.apply(params, x, train=True, rngs={"drop_path": jax.random.key(1)}))
    # A sample passes through unchanged iff both residual branches were dropped: p^2 = 0.25.
    unchanged = np.abs(out - x).max(axis=(1, 2)) == 0
    assert abs(unchanged.mean() - 0.25) < 0.03
    np.testing.assert_array_equal(block.apply(params, x, train=False),
                                  block.apply(params, x, train=False))
    model = _tiny(drop_path_rate=0.5)
    images = np.zeros((1, 32, 32, 3), np.float32)
    with pytest.raises(Exception, match="drop_path"):  # training needs the rng stream
        model.apply(model.init(jax.random.key(0), images), images, train=True)


def test_bfloat16_compute_close_to_float32():
    x = np.random.RandomState(0).randn(4, 32, 32, 3).astype(np.float32)
    model32, model16 = _tiny(), _tiny(dtype=jnp.bfloat16)
    params = model32.init(jax.random.key(0), x)["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(
        model16.init(jax.random.key(0), x)["params"]))  # float32 master weights
    out32 = np.asarray(model32.apply({"params": params}, x))
    out16 = model16.apply({"params": params}, x)
    assert out16.dtype == jnp.float32  # logits cast back for the loss
    # bfloat16 has an 8-bit mantissa: relative error ~1e-2 through 2 blocks.
    err = np.abs(np.asarray(out16) - out32).max() / np.abs(out32).max()
    assert 0 < err < 0.05


def test_unknown_name_and_override_are_clear_errors():
    with pytest.raises(ValueError, match="deit_small_patch16_224"):
        models.create_model("deit_smal_patch16_224")
    with pytest.raises(ValueError, match="drop_path_rate"):
        models.create_model("deit_tiny_patch16_224", drop_path=0.1)


def test_wrong_resolution_is_a_clear_error():
    model = _tiny()
    x = np.zeros((1, 32, 32, 3), np.float32)
    params = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="resample"):
        model.apply(params, np.zeros((1, 48, 48, 3), np.float32))
