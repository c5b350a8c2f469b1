"""RegNetY against timm (random weights): parameter counts, eval/train parity, conversion."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from flax import traverse_util

from deit_jax.models import regnet

# timm's parameter counts; regnety_160 is the DeiT teacher (DEIT_REFERENCE.md).
TIMM_PARAMS_160 = 83_590_140


def _count(model: regnet.RegNet) -> int:
    init = functools.partial(model.init, train=False)
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(shapes['params']))


def _random_timm(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """timm model whose BN affine params, running stats and biases are random too.

    timm's init zeroes every `conv3.bn.weight` and all biases; left like that, half of the
    conversion (residual branches, BN statistics) would never influence the logits.
    """
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
            elif isinstance(module, torch.nn.Conv2d | torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.1)
        # Larger head weights than timm's std 0.01 so logits are O(1..10), not O(0.1).
        model.head.fc.weight.normal_(0.0, 0.05)
    return model


def _state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _images(batch: int, size: int, seed: int = 1) -> tuple[torch.Tensor, jax.Array]:
    nchw = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return nchw, jnp.asarray(nchw.numpy().transpose(0, 2, 3, 1))


@pytest.mark.parametrize('name', regnet.REGNET_NAMES)
def test_parameter_count_matches_timm(name):
    expected = sum(p.numel() for p in timm.create_model(name).parameters())
    assert _count(regnet.create_regnet(name)) == expected
    if name == 'regnety_160':
        assert expected == TIMM_PARAMS_160


def test_stage_specs_match_timm():
    # The per-stage widths, depths and group counts timm builds (params alone could hide a
    # swap between stages).
    for name in regnet.REGNET_NAMES:
        model = timm.create_model(name)
        expected = []
        for stage in (model.s1, model.s2, model.s3, model.s4):
            blocks = list(stage.children())
            conv2 = blocks[0].conv2.conv
            expected.append((conv2.out_channels, len(blocks), conv2.out_channels // conv2.groups))
        assert regnet.stage_specs(**regnet.REGNET_CONFIGS[name]) == tuple(expected), name


@pytest.mark.parametrize('name,batch,size', [
    ('regnety_002', 4, 64), ('regnety_008', 2, 64), ('regnety_160', 2, 96)])
def test_eval_logits_match_timm(name, batch, size):
    torch_model = _random_timm(name).eval()
    nchw, nhwc = _images(batch, size)
    with torch.no_grad():
        expected = torch_model(nchw).numpy()
    variables = regnet.convert_regnet_state_dict(_state_dict(torch_model), name)
    model = regnet.create_regnet(name)
    logits = jax.jit(functools.partial(model.apply, train=False))(variables, nhwc)
    assert logits.shape == (batch, 1000) and logits.dtype == jnp.float32
    # Measured (timm 1.0.31, CPU): 002 1.1e-6, 008 2.3e-6, 160 1.3e-5; |logits| up to 13.5.
    assert np.abs(np.asarray(logits) - expected).max() < 1e-4
    assert np.abs(expected).max() > 1.0  # the comparison is not between near-zero numbers


def test_train_mode_matches_timm_and_updates_batch_stats():
    name = 'regnety_002'
    torch_model = _random_timm(name).train()
    variables = regnet.convert_regnet_state_dict(_state_dict(torch_model), name)
    # Elements each BN normalises over (batch * height * width), for PyTorch's unbiased update.
    counts = {}

    def record(module, inputs, output, key):
        counts[key] = inputs[0].numel() // module.num_features

    for key, module in torch_model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_hook(functools.partial(record, key=key))
    nchw, nhwc = _images(4, 64)
    with torch.no_grad():
        expected = torch_model(nchw).numpy()
    after = regnet.convert_regnet_state_dict(_state_dict(torch_model), name)['batch_stats']

    model = regnet.create_regnet(name)
    logits, state = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))(
        variables, nhwc)
    # Batch statistics over as few as 4 * 2 * 2 elements (s4) amplify rounding: measured 5.8e-5
    # with |logits| up to 6.6.
    assert np.abs(np.asarray(logits) - expected).max() < 2e-4

    before = traverse_util.flatten_dict(variables['batch_stats'])
    after = traverse_util.flatten_dict(after)
    new = traverse_util.flatten_dict(jax.device_get(state['batch_stats']))
    assert new.keys() == after.keys()
    for path, value in new.items():
        assert not np.allclose(value, before[path]), path  # every running stat moved
        if path[-1] == 'mean':
            np.testing.assert_allclose(value, after[path], atol=1e-5, err_msg=str(path))
        else:
            # PyTorch folds the *unbiased* batch variance into running_var, Flax the biased one:
            # undo Bessel's correction on timm's new-batch term.
            n = counts['.'.join([path[0].replace('_', '.'), *path[1:-1]])]
            old = before[path]
            bessel_free = 0.9 * old + (after[path] - 0.9 * old) * (n - 1) / n
            np.testing.assert_allclose(value, bessel_free, rtol=1e-4, atol=1e-5,
                                       err_msg=str(path))


def test_bn_axis_name_averages_statistics_across_devices():
    # 8 devices with one image each must behave like one device with all 8 images (without the
    # cross-device mean the logits differ by O(1)). 64 px keeps s4's 2x2 maps: statistics over
    # fewer elements make train-mode BN too ill-conditioned for a tight comparison.
    name, devices = 'regnety_002', jax.local_device_count()
    assert devices == 8  # tests/conftest.py
    _, nhwc = _images(devices, 64)
    variables = regnet.convert_regnet_state_dict(_state_dict(_random_timm(name)), name)
    single = regnet.create_regnet(name)
    logits, state = jax.jit(functools.partial(single.apply, train=True, mutable=['batch_stats']))(
        variables, nhwc)

    sharded = regnet.create_regnet(name, bn_axis_name='batch')
    p_apply = jax.pmap(functools.partial(sharded.apply, train=True, mutable=['batch_stats']),
                       axis_name='batch', in_axes=(None, 0))
    p_logits, p_state = p_apply(variables, nhwc[:, None])
    # Measured 4e-5 (a different summation order than the single-device batch), logits O(5).
    np.testing.assert_allclose(np.asarray(p_logits)[:, 0], logits, rtol=0, atol=2e-4)
    p_stats = jax.tree_util.tree_map(lambda x: np.asarray(x[0]), p_state['batch_stats'])
    jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5),
                           p_stats, jax.device_get(state['batch_stats']))


def test_bfloat16_compute_close_to_float32():
    name = 'regnety_002'
    variables = regnet.convert_regnet_state_dict(_state_dict(_random_timm(name)), name)
    _, nhwc = _images(4, 64)
    f32 = jax.jit(functools.partial(regnet.create_regnet(name).apply, train=False))(
        variables, nhwc)
    bf16 = jax.jit(functools.partial(regnet.create_regnet(name, dtype=jnp.bfloat16).apply,
                                     train=False))(variables, nhwc)
    assert bf16.dtype == jnp.float32  # logits come back in float32 whatever the compute dtype
    # bfloat16 keeps 8 mantissa bits; measured 0.6% of the largest logit.
    error = np.abs(np.asarray(bf16) - np.asarray(f32)).max()
    assert 0 < error < 0.03 * np.abs(np.asarray(f32)).max()
    # Parameters stay float32 (only the compute is bfloat16).
    init = functools.partial(regnet.create_regnet(name, dtype=jnp.bfloat16).init, train=False)
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype('float32')}


def test_init_follows_timm():
    # timm `_init_weights`: convs (SE's 1x1 convs too) normal(0, sqrt(2 / fan_out)) with
    # fan_out = k*k*out / groups, zero biases, and zero_init_last=True zeroes conv3.bn's scale.
    # One block (regnety_002's s4_b1: 152 -> 368 channels, 46 groups of 8) keeps this cheap.
    assert regnet.create_regnet('regnety_002').zero_init_last  # timm's default
    block = regnet.Bottleneck(368, strides=2, group_size=8, se_ratio=0.25)
    params = jax.jit(functools.partial(block.init, train=False))(
        jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 152)))['params']
    grouped = np.asarray(params['conv2']['conv']['kernel'])
    assert grouped.shape == (3, 3, 8, 368)
    np.testing.assert_allclose(grouped.std(), np.sqrt(2.0 / (9 * 368 / 46)), rtol=0.03)
    np.testing.assert_allclose(np.asarray(params['conv1']['conv']['kernel']).std(),
                               np.sqrt(2.0 / 368), rtol=0.03)
    np.testing.assert_allclose(np.asarray(params['se']['fc1']['kernel']).std(),
                               np.sqrt(2.0 / 38), rtol=0.05)  # SE width: round(152 / 4) = 38
    for module in ('conv1', 'conv2', 'conv3', 'downsample'):
        scale = np.asarray(params[module]['bn']['scale'])
        assert np.all(scale == (0.0 if module == 'conv3' else 1.0)), module
        assert not np.any(np.asarray(params[module]['bn']['bias'])), module


def test_bad_names_and_overrides_raise():
    with pytest.raises(ValueError, match='regnety_999.*regnety_160'):
        regnet.create_regnet('regnety_999')
    with pytest.raises(ValueError, match='width_mult.*num_classes'):
        regnet.create_regnet('regnety_002', width_mult=2)
    assert regnet.create_regnet('regnety_002', num_classes=10, bn_axis_name='b').num_classes == 10


def test_convert_rejects_bad_state_dicts():
    name = 'regnety_002'
    good = _state_dict(timm.create_model(name))
    with pytest.raises(ValueError, match='regnety_999'):
        regnet.convert_regnet_state_dict(good, 'regnety_999')

    with pytest.raises(ValueError, match='model'):  # the official file's wrapper, not unwrapped
        regnet.convert_regnet_state_dict({'model': good}, name)

    missing = {k: v for k, v in good.items() if k != 's2.b1.se.fc1.bias'}
    with pytest.raises(ValueError, match=r'missing keys: \[.s2\.b1\.se\.fc1\.bias.\]'):
        regnet.convert_regnet_state_dict(missing, name)

    extra = {**good, 's5.b1.conv1.conv.weight': np.zeros((8, 8, 1, 1), np.float32)}
    with pytest.raises(ValueError, match=r'unexpected keys: \[.s5\.b1\.conv1\.conv\.weight.\]'):
        regnet.convert_regnet_state_dict(extra, name)

    # A dense 3x3 kernel where the grouped one (8 input channels per group) belongs.
    bad = {**good, 's1.b1.conv2.conv.weight': np.zeros((24, 24, 3, 3), np.float32)}
    with pytest.raises(ValueError, match=r's1\.b1\.conv2\.conv\.weight: expected \(24, 8, 3, 3\)'):
        regnet.convert_regnet_state_dict(bad, name)

    # The head size comes from the checkpoint unless given; a conflicting one is mis-shaped.
    with pytest.raises(ValueError, match=r'head\.fc\.weight: expected \(10, 368\)'):
        regnet.convert_regnet_state_dict(good, name, num_classes=10)
    small = _state_dict(timm.create_model(name, num_classes=10))
    assert regnet.convert_regnet_state_dict(small, name)['params']['head_fc']['kernel'].shape == (
        368, 10)


def test_cpu_grouped_conv_gradient_equals_lax():
    """The CPU-fast kernel gradient of grouped convolutions is the same gradient."""
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(4, 9, 9, 24), jnp.float32)
    w = jnp.asarray(rng.randn(3, 3, 8, 24), jnp.float32)
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

    def loss(conv, x, w):
        y = conv(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn, feature_group_count=3)
        return jnp.sum(jnp.sin(y))

    ours = jax.grad(functools.partial(loss, regnet.conv_general_dilated), argnums=(0, 1))(x, w)
    ref = jax.grad(functools.partial(loss, jax.lax.conv_general_dilated), argnums=(0, 1))(x, w)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(ours[1]).max()) > 1.0  # a real gradient, not zeros
