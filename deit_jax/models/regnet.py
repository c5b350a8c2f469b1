"""RegNetY exactly as timm defines it (the DeiT teacher is timm's `regnety_160`), in Flax linen.

Matches timm 1.0.31 (`timm/models/regnet.py`): the RegNetY configs there use the defaults
`downsample='conv1x1'`, `linear_out=False`, ReLU, BatchNorm, `bottle_ratio=1`, `stem_width=32`,
`se_ratio=0.25`, `zero_init_last=True`. timm loads the official DeiT teacher checkpoint
`regnety_160-a5fe301d.pth` (its `regnety_160.deit_in1k`) without renaming any key, so that file
uses the keys converted here.

Flax submodules are named after timm's keys with the first '.' as '_': `stem/conv`,
`s1_b1/conv2/bn`, `s3_b4/se/fc1`, `s1_b1/downsample/conv`, `head_fc` <-> `stem.conv`,
`s1.b1.conv2.bn`, `s3.b4.se.fc1`, `s1.b1.downsample.conv`, `head.fc`.

Not implemented (the teacher does not need them): dilation / output_stride < 32, stochastic
depth, dropout before the head, the RegNetX/V/Z variants and torchvision's group rounding.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# timm `model_cfgs` (RegNetY: se_ratio=0.25 for all of them).
REGNET_CONFIGS: dict[str, dict[str, Any]] = {
    'regnety_002': dict(w0=24, wa=36.44, wm=2.49, group_size=8, depth=13),
    'regnety_004': dict(w0=48, wa=27.89, wm=2.09, group_size=8, depth=16),
    'regnety_008': dict(w0=56, wa=38.84, wm=2.4, group_size=16, depth=14),
    'regnety_040': dict(w0=96, wa=31.41, wm=2.24, group_size=64, depth=22),
    'regnety_080': dict(w0=192, wa=76.82, wm=2.19, group_size=56, depth=17),
    'regnety_120': dict(w0=168, wa=73.36, wm=2.37, group_size=112, depth=19),
    'regnety_160': dict(w0=200, wa=106.23, wm=2.48, group_size=112, depth=18),
}
REGNET_NAMES = tuple(REGNET_CONFIGS)
_OVERRIDES = ('num_classes', 'dtype', 'bn_axis_name', 'zero_init_last')


def stage_specs(
    w0: int, wa: float, wm: float, depth: int, group_size: int, bottle_ratio: float = 1.0,
    quant: int = 8,
) -> tuple[tuple[int, int, int], ...]:
    """Per-stage `(width, depth, group_size)`, as timm's `generate_regnet` + `_get_stage_args`."""
    # float32 on purpose: timm computes this in torch float32, and the rounding of the
    # per-block exponents and widths must come out the same.
    widths_cont = np.arange(depth, dtype=np.float32) * np.float32(wa) + np.float32(w0)
    exps = np.round(np.log(widths_cont / np.float32(w0)) / np.float32(math.log(wm)))
    widths = np.round(np.float32(w0) * np.power(np.float32(wm), exps) / quant) * quant
    # Widths never decrease with depth, so sorted unique values are the stages in order.
    stage_widths, stage_depths = np.unique(widths.astype(np.int64), return_counts=True)
    specs = []
    for width, stage_depth in zip(stage_widths.tolist(), stage_depths.tolist(), strict=True):
        # adjust_widths_groups_comp: the bottleneck width must be a multiple of the group size.
        bottleneck = int(width * bottle_ratio)
        group = min(group_size, bottleneck)
        bottleneck = int(round(bottleneck / group) * group)
        specs.append((int(bottleneck / bottle_ratio), stage_depth, group))
    return tuple(specs)


def _conv_init(kernel_size: int, features: int, groups: int = 1) -> nn.initializers.Initializer:
    # timm `_init_weights`: normal(0, sqrt(2 / fan_out)), fan_out = k*k*out / groups.
    return nn.initializers.normal(math.sqrt(2.0 / (kernel_size * kernel_size * features // groups)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _grouped_conv(lhs, rhs, strides, padding, dimension_numbers, groups):
    return jax.lax.conv_general_dilated(lhs, rhs, strides, padding,
                                        dimension_numbers=dimension_numbers,
                                        feature_group_count=groups)


def _grouped_conv_fwd(lhs, rhs, strides, padding, dimension_numbers, groups):
    return _grouped_conv(lhs, rhs, strides, padding, dimension_numbers, groups), (lhs, rhs)


def _grouped_conv_bwd(strides, padding, dimension_numbers, groups, residuals, dy):
    lhs, rhs = residuals
    _, vjp_lhs = jax.vjp(lambda x: _grouped_conv.fun(x, rhs, strides, padding,
                                                     dimension_numbers, groups), lhs)
    (dlhs,) = vjp_lhs(dy)
    # XLA:CPU computes a grouped convolution's kernel gradient ~20x slower than the dense one
    # with more FLOPs; one dense kernel gradient per group (NHWC/HWIO) is the same sum.
    cin, cout = rhs.shape[2], rhs.shape[3] // groups
    drhs = []
    for g in range(groups):
        x_g = lhs[..., g * cin:(g + 1) * cin]
        _, vjp_rhs = jax.vjp(lambda w, x_g=x_g: jax.lax.conv_general_dilated(
            x_g, w, strides, padding, dimension_numbers=dimension_numbers),
            rhs[..., g * cout:(g + 1) * cout])
        drhs.append(vjp_rhs(dy[..., g * cout:(g + 1) * cout])[0])
    return dlhs, jnp.concatenate(drhs, axis=-1)


_grouped_conv.defvjp(_grouped_conv_fwd, _grouped_conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
    """``lax.conv_general_dilated`` with a CPU-fast kernel gradient for grouped convolutions.

    Same values and gradients; only on the CPU backend, with unit dilation and NHWC/HWIO
    layouts, is the grouped case routed through ``_grouped_conv``.
    """
    plain = (feature_group_count == 1 or jax.default_backend() != "cpu" or kwargs
             or any(d not in (None, 1) and tuple(d) != (1, 1)
                    for d in (lhs_dilation, rhs_dilation)) or isinstance(padding, str))
    if plain:
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision, **kwargs)
    return _grouped_conv(lhs, rhs, tuple(window_strides), tuple(map(tuple, padding)),
                         dimension_numbers, feature_group_count)


class ConvBN(nn.Module):
    """timm's `ConvNormAct`: conv (no bias) -> BatchNorm -> optional ReLU. `[b, h, w, c]` in/out."""

    features: int
    kernel_size: int = 1
    strides: int = 1
    groups: int = 1
    act: bool = True
    zero_init_scale: bool = False
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        # PyTorch-style symmetric padding (timm `get_padding`): 1 for 3x3 at stride 1 and 2.
        # Flax 'SAME' would pad (0, 1) at stride 2 and shift every downsampled feature map.
        pad = ((self.strides - 1) + (self.kernel_size - 1)) // 2
        x = nn.Conv(
            self.features, (self.kernel_size,) * 2, strides=self.strides,
            padding=((pad, pad), (pad, pad)), feature_group_count=self.groups, use_bias=False,
            dtype=self.dtype, kernel_init=_conv_init(self.kernel_size, self.features, self.groups),
            conv_general_dilated=conv_general_dilated, name='conv')(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,  # PyTorch momentum 0.1 weights the new batch; Flax's weights the old.
            epsilon=1e-5, dtype=self.dtype, axis_name=self.bn_axis_name,
            # Two-pass variance, closer to PyTorch than E[x^2] - E[x]^2 for large means.
            use_fast_variance=False,
            scale_init=nn.initializers.zeros if self.zero_init_scale else nn.initializers.ones,
            name='bn')(x)
        return nn.relu(x) if self.act else x


class SqueezeExcite(nn.Module):
    """timm's `SEModule`: mean pool -> fc1 -> ReLU -> fc2 -> sigmoid gate. `[b, h, w, c]`."""

    reduced: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        # timm's fc1/fc2 are 1x1 convs with bias on a 1x1 map: Dense on the pooled vector.
        s = jnp.mean(x, axis=(1, 2))
        s = nn.Dense(self.reduced, dtype=self.dtype, kernel_init=_conv_init(1, self.reduced),
                     name='fc1')(s)
        s = nn.Dense(channels, dtype=self.dtype, kernel_init=_conv_init(1, channels),
                     name='fc2')(nn.relu(s))
        return x * nn.sigmoid(s)[:, None, None, :]


class Bottleneck(nn.Module):
    """RegNetY block: 1x1 -> grouped 3x3 (stride) -> SE -> 1x1, residual, ReLU.

    `[b, h, w, c_in]` -> `[b, h / strides, w / strides, features]`.
    """

    features: int
    strides: int
    group_size: int
    se_ratio: float
    bottle_ratio: float = 1.0
    zero_init_last: bool = True
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        in_chs = x.shape[-1]
        mid = int(round(self.features * self.bottle_ratio))
        conv = dict(dtype=self.dtype, bn_axis_name=self.bn_axis_name)
        shortcut = x
        x = ConvBN(mid, 1, name='conv1', **conv)(x, train)
        x = ConvBN(mid, 3, self.strides, groups=mid // self.group_size, name='conv2', **conv)(
            x, train)
        if self.se_ratio:
            # timm sizes the SE bottleneck from the block's *input* width, not from `mid`.
            x = SqueezeExcite(int(round(in_chs * self.se_ratio)), self.dtype, name='se')(x)
        x = ConvBN(self.features, 1, act=False, zero_init_scale=self.zero_init_last,
                   name='conv3', **conv)(x, train)
        if in_chs != self.features or self.strides != 1:
            # timm downsample='conv1x1': strided 1x1 conv + BN, no activation.
            shortcut = ConvBN(self.features, 1, self.strides, act=False, name='downsample',
                              **conv)(shortcut, train)
        return nn.relu(x + shortcut)


class RegNet(nn.Module):
    """RegNetY classifier (timm `RegNet`, default RegNetY config).

    Call with `x` `[batch, height, width, 3]` float32, already normalised; returns float32
    logits `[batch, num_classes]`. `train=True` normalises with batch statistics and updates
    `batch_stats` (pass `mutable=['batch_stats']`); with `bn_axis_name` set, the statistics are
    averaged over that pmap/shard_map axis. Flax, like PyTorch, normalises with the biased batch
    variance, but its running variance is updated with the biased variance too (PyTorch uses
    the unbiased one), so train-mode running variances differ by a factor n / (n - 1) in the
    new-batch term (n = batch * height * width of the layer).
    """

    w0: int
    wa: float
    wm: float
    depth: int
    group_size: int
    se_ratio: float = 0.25
    bottle_ratio: float = 1.0
    stem_width: int = 32
    num_classes: int = 1000
    zero_init_last: bool = True
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = dict(dtype=self.dtype, bn_axis_name=self.bn_axis_name)
        x = ConvBN(self.stem_width, 3, 2, name='stem', **conv)(x, train)
        specs = stage_specs(self.w0, self.wa, self.wm, self.depth, self.group_size,
                            self.bottle_ratio)
        for stage, (width, depth, group_size) in enumerate(specs, start=1):
            for block in range(1, depth + 1):
                x = Bottleneck(
                    width, 2 if block == 1 else 1, group_size, self.se_ratio, self.bottle_ratio,
                    self.zero_init_last, name=f's{stage}_b{block}', **conv)(x, train)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype,
                     kernel_init=nn.initializers.normal(0.01), name='head_fc')(x)
        return x.astype(jnp.float32)


def create_regnet(name: str, **overrides: Any) -> RegNet:
    """`RegNet` for a timm name in `REGNET_NAMES`; overrides: num_classes, dtype, bn_axis_name,
    zero_init_last."""
    if name not in REGNET_CONFIGS:
        raise ValueError(f'unknown RegNet {name!r}; valid names: {", ".join(REGNET_NAMES)}')
    unknown = sorted(set(overrides) - set(_OVERRIDES))
    if unknown:
        raise ValueError(f'unknown override(s) {unknown} for {name}; valid: {list(_OVERRIDES)}')
    return RegNet(**REGNET_CONFIGS[name], **overrides)


# Flax leaf name -> PyTorch parameter/buffer name.
_LEAF_TO_TORCH = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
                  'var': 'running_var'}


def _torch_key(path: tuple[str, ...]) -> str:
    top, *middle, leaf = path
    return '.'.join([top.replace('_', '.'), *middle, _LEAF_TO_TORCH[leaf]])


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 4:  # conv HWIO <- OIHW (grouped: I is the per-group input width in both)
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2:  # Dense (in, out) <- Linear (out, in), or SE's 1x1 conv (out, in, 1, 1)
        return (shape[1], shape[0], 1, 1) if 'se' in path else (shape[1], shape[0])
    return shape


def _to_flax(value: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
    if len(flax_shape) == 4:  # OIHW -> HWIO
        return value.transpose(2, 3, 1, 0)
    if len(flax_shape) == 2:  # (out, in) or (out, in, 1, 1) -> (in, out)
        return value.reshape(flax_shape[::-1]).T
    return value


def convert_regnet_state_dict(
    state_dict: Mapping[str, np.ndarray], model_name: str, num_classes: int | None = None,
) -> dict[str, Any]:
    """timm / official DeiT-teacher PyTorch state dict -> `{'params', 'batch_stats'}` (numpy).

    The result fits `create_regnet(model_name, num_classes=...)`; `num_classes` defaults to the
    checkpoint's head size. Conv OIHW -> HWIO, Linear (out, in) -> (in, out), running_mean/var
    -> batch_stats; `num_batches_tracked` is dropped. Unwrap `{'model': state_dict}` first.
    Raises ValueError naming every missing, unexpected or mis-shaped key.
    """
    if isinstance(state_dict.get('model'), Mapping):
        raise ValueError("state dict is wrapped as {'model': state_dict}; pass ckpt['model']")
    if num_classes is None:
        head = state_dict.get('head.fc.weight')
        num_classes = 1000 if head is None else int(np.shape(head)[0])
    model = create_regnet(model_name, num_classes=num_classes)
    # Shapes only: no weights are materialised, so this is cheap even for regnety_160.
    init = functools.partial(model.init, train=False)
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    expected = {
        _torch_key(path): (collection, path, leaf.shape)
        for collection in ('params', 'batch_stats')
        for path, leaf in traverse_util.flatten_dict(abstract[collection]).items()
    }
    given = {k for k in state_dict if not k.endswith('num_batches_tracked')}
    missing, extra = sorted(set(expected) - given), sorted(given - set(expected))
    wrong_shape = []
    out: dict[str, dict[tuple[str, ...], np.ndarray]] = {'params': {}, 'batch_stats': {}}
    for key in sorted(set(expected) & given):
        collection, path, flax_shape = expected[key]
        value = np.asarray(state_dict[key], dtype=np.float32)
        torch_shape = _torch_shape(path, flax_shape)
        if value.shape != torch_shape:
            wrong_shape.append(f'{key}: expected {torch_shape}, got {value.shape}')
            continue
        out[collection][path] = np.ascontiguousarray(_to_flax(value, flax_shape))
    problems = []
    if missing:
        problems.append(f'missing keys: {missing}')
    if extra:
        problems.append(f'unexpected keys: {extra}')
    if wrong_shape:
        problems.append(f'mis-shaped keys: {wrong_shape}')
    if problems:
        raise ValueError(f'cannot convert state dict to {model_name}: ' + '; '.join(problems))
    return {c: traverse_util.unflatten_dict(v) for c, v in out.items()}
