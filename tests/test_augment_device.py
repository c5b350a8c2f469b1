"""deit_jax.augment.device (JAX, in the train step) against the host's PIL-exact TF ops and
against timm's draws."""
import functools
import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import torch
from PIL import Image, ImageOps
from scipy import stats
from timm.data import auto_augment as timm_aa
from timm.data.random_erasing import RandomErasing

from deit_jax import augment
from deit_jax.augment import device, device_ops
from tests.test_augment import FLAT, IMAGE, LOW_CONTRAST, OP_CASES, _natural_image

GEOMETRIC = set(augment.GEOMETRIC_OPS)


@functools.cache
def _device_op(name, interpolation):
    return jax.jit(lambda image, arg: device.apply_op(name, image, arg,
                                                     interpolation=interpolation))


def _host_inverse_map(name, arg, height, width):
    """The host's float64 inverse map of every output pixel centre: (xin, yin) [h, w]."""
    a, b, c, d, e, f = (float(v) for v in augment.ops.AFFINE_MATRICES[name](
        tf.constant(arg, tf.float64), height, width))
    ys, xs = np.mgrid[:height, :width] + 0.5
    return a * xs + b * ys + c, d * xs + e * ys + f


# Tolerances. Pixel ops: 0 (integer maths, or the host's float32 blend / SMOOTH sum repeated in
# the same order; AutoContrast's float64 LUT via the exact quotient and a bit table of where
# float64 rounds below it). Geometric ops: the device maps pixels in float32 (the host and PIL
# in float64): a sample point moves by ~1e-5 px, which changes PIL's truncation to 8 bits by
# at most 1 where the interpolated value lies within ~1e-3 of an integer (bounds below), and
# can swap image and fill for a pixel whose inverse map lands within ~1e-4 px of the border
# (those pixels are left out, found from the host's float64 map).
DEVICE_CASES = [(n, a, i, 'bicubic') for n, a, i in OP_CASES] + [
    (n, a, i, 'bilinear') for n, a, i in OP_CASES if n in GEOMETRIC]


@pytest.mark.parametrize('name,arg,image,interpolation', DEVICE_CASES,
                         ids=[f'{n}-{a}-{k}-{m}' for k, (n, a, _, m) in enumerate(DEVICE_CASES)])
def test_device_op_matches_host_op(name, arg, image, interpolation):
    host = augment.apply_op(name, tf.constant(image), arg,
                            interpolation=interpolation).numpy()
    got = np.asarray(_device_op(name, interpolation)(
        jnp.asarray(image), jnp.float32(0.0 if arg is None else arg)))
    assert got.dtype == np.uint8 and got.shape == image.shape
    if name not in GEOMETRIC:
        np.testing.assert_array_equal(got, host)
        return
    xin, yin = _host_inverse_map(name, arg, *image.shape[:2])
    h, w = image.shape[:2]
    near_border = np.minimum.reduce([np.abs(xin), np.abs(xin - w), np.abs(yin), np.abs(yin - h)])
    keep = near_border > 1e-4
    diff = np.abs(got.astype(int) - host.astype(int))[keep]
    assert diff.max() <= 1, name
    # Measured: bicubic <= 0.21% of values, bilinear up to 5% (TranslateXRel 0.4: dx = 0.6 on
    # every pixel, so v1 + 0.6 (v2 - v1) is an exact integer wherever 3 (v2 - v1) is a multiple
    # of 5, and float32 / float64 round it to opposite sides of the integer before truncation;
    # the recipe's random magnitudes rarely hit such decimal fractions).
    assert (diff > 0).mean() < (0.005 if interpolation == 'bicubic' else 0.06), name


def test_device_equalize_is_pils_on_many_images():
    # As the host's (test_augment.test_equalize_is_pils_on_many_images): PIL's // 255 step.
    run = jax.jit(device_ops.equalize)
    for seed in range(10):
        for shape in ((64, 64), (224, 224)):
            image = _natural_image(*shape, seed=seed)
            expected = np.asarray(ImageOps.equalize(Image.fromarray(image)))
            np.testing.assert_array_equal(np.asarray(run(jnp.asarray(image))), expected,
                                          err_msg=f'{shape} seed {seed}')


def test_auto_contrast_lut_is_pils_for_every_channel_range():
    # Each channel holds exactly the values lo..hi (the LUT PIL builds for that range is
    # applied to all of them); 300 random ranges, plus the float64 rounding cases
    # (lo, hi) = (0, 25), (0, 105) found in the bit table.
    rng = np.random.default_rng(0)
    ranges = [(0, 25), (0, 105), (3, 254), (0, 255), (7, 8)] + [
        tuple(sorted(rng.choice(256, 2, replace=False))) for _ in range(300)]
    fn = jax.jit(device_ops.auto_contrast)
    for k in range(0, len(ranges), 3):
        chans = ranges[k:k + 3] + [(0, 255)] * (3 - len(ranges[k:k + 3]))
        image = np.stack([np.resize(np.arange(lo, hi + 1), 256) for lo, hi in chans], -1)
        image = image.reshape(16, 16, 3).astype(np.uint8)
        expected = np.asarray(ImageOps.autocontrast(Image.fromarray(image)))
        np.testing.assert_array_equal(np.asarray(fn(image)), expected, err_msg=str(chans))
    assert device_ops._autocontrast_low_bits().sum() > 0  # the table is not empty


def test_level_to_arg_matches_timm(monkeypatch):
    levels = np.concatenate([np.linspace(0, 10, 41), [2.5, 7.5, 5.0],
                             np.random.default_rng(1).uniform(0, 10, 50)]).astype(np.float32)
    hparams = {'translate_const': 100, 'img_mean': augment.IMAGENET_MEAN_UINT8}
    for negate in (False, True):
        monkeypatch.setattr(timm_aa, '_randomly_negate', lambda v, n=negate: -v if n else v)
        for name in sorted(set(augment.RAND_INCREASING_OPS + augment.RAND_OPS)):
            level_fn = timm_aa.LEVEL_TO_ARG[name]
            got = device.level_to_arg(name, jnp.asarray(levels), negate)
            if level_fn is None:
                assert got is None
                continue
            expected = [level_fn(float(m), hparams)[0] for m in levels]
            # float32 levels: a float32 rounding of timm's float64 argument (integral
            # arguments exactly, as no level here sits on a rounding boundary).
            np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-7,
                                       err_msg=name)


def _keys(n, offset=0):
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(jnp.arange(n) + offset)


def test_rand_augment_draw_statistics():
    n = 4000
    ops, applied, levels, negates = (np.asarray(x).ravel() for x in jax.jit(jax.vmap(
        device.rand_augment_draws))(_keys(n)))
    # The host test's checks: ops uniform over 15, applied with p 0.5, fair signs,
    # N(9, 0.5) clipped to [0, 10] (2.28% exactly 10).
    assert stats.chisquare(np.bincount(ops, minlength=15)).pvalue > 1e-3
    assert abs(applied.mean() - 0.5) < 4 * math.sqrt(0.25 / applied.size)
    assert abs(negates.mean() - 0.5) < 4 * math.sqrt(0.25 / negates.size)
    assert levels.min() >= 0 and levels.max() == 10.0
    p_top = stats.norm.sf(2.0)
    assert abs((levels == 10).mean() - p_top) < 4 * math.sqrt(p_top / levels.size)
    below = levels[levels < 10]
    assert stats.kstest(below, stats.truncnorm(-np.inf, 2.0, loc=9, scale=0.5).cdf).pvalue > 1e-3
    uniform = np.asarray(jax.jit(jax.vmap(functools.partial(
        device.rand_augment_draws, magnitude_std=math.inf)))(_keys(500))[2])
    assert stats.kstest(uniform.ravel(), stats.uniform(0, 9).cdf).pvalue > 1e-3


def test_rand_augment_is_the_composition_of_its_draws():
    image = jnp.asarray(IMAGE)
    run = jax.jit(device.rand_augment)
    draws = jax.jit(device.rand_augment_draws)
    for i in range(6):
        key = jax.random.key(i)
        ops, applied, levels, negates = draws(key)
        expected = image
        for op, on, level, negate in zip(ops, applied, levels, negates, strict=True):
            if on:
                name = augment.RAND_INCREASING_OPS[int(op)]
                arg = device.level_to_arg(name, level, negate)
                expected = _device_op(name, 'bicubic')(expected, jnp.float32(0.0 if arg is None
                                                                             else arg))
        np.testing.assert_array_equal(np.asarray(run(image, key)), np.asarray(expected))


def test_color_jitter_matches_host_on_the_same_draws():
    key = jax.random.key(3)
    jitter = jax.jit(functools.partial(device.color_jitter, strength=0.3))
    draws = jax.jit(functools.partial(device.color_jitter_draws, strength=0.3))
    host = tf.function(lambda image, order, factors: tf.foldl(
        lambda x, j: tf.switch_case(j, [lambda: augment.brightness(x, factors[0]),
                                        lambda: augment.contrast(x, factors[1]),
                                        lambda: augment.color(x, factors[2])]),
        order, initializer=image))
    seen = set()
    for i in range(8):
        k = jax.random.fold_in(key, i)
        order, factors = (np.asarray(x) for x in draws(k))
        seen.add(tuple(order))
        assert (factors >= 0.7).all() and (factors <= 1.3).all()
        expected = host(tf.constant(IMAGE), tf.constant(order), tf.constant(factors)).numpy()
        np.testing.assert_array_equal(np.asarray(jitter(IMAGE, k)), expected)
    assert len(seen) >= 3


def test_normalize_equals_host():
    image = _natural_image(20, 24)
    got = np.asarray(jax.jit(device.normalize)(image))
    want = augment.normalize(tf.constant(image)).numpy()
    # XLA turns the divisions by the constants 255 and std into multiplications by their
    # reciprocals: a few float32 ulps (measured max 4.8e-7), 1/10000 of a grey level.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert np.abs(got - want).max() * 255 * min(augment.IMAGENET_STD) < 1e-4


def _erased_boxes(images):
    mask = np.any(images != 0, axis=-1)
    return mask.any((1, 2)), mask.mean((1, 2)), mask.any(2).sum(1), mask.any(1).sum(1)


@pytest.mark.parametrize('count', [1, 3])
def test_random_erasing_matches_timm_statistics(count):
    height, width, n = 30, 36, 1500
    zeros = jnp.zeros((height, width, 3))
    ours = np.asarray(jax.jit(jax.vmap(functools.partial(
        device.random_erasing, zeros, prob=0.25, count=count)))(_keys(n)))
    torch.manual_seed(0)
    random.seed(0)
    eraser = RandomErasing(0.25, mode='pixel', max_count=count, device='cpu')
    timm_out = np.stack([eraser(torch.zeros(3, height, width)).permute(1, 2, 0).numpy()
                         for _ in range(n)])
    ours_on, ours_frac, ours_h, ours_w = _erased_boxes(ours)
    timm_on, timm_frac, timm_h, timm_w = _erased_boxes(timm_out)
    assert abs(ours_on.mean() - timm_on.mean()) < 4 * math.sqrt(2 * 0.25 * 0.75 / n)
    assert abs(ours_on.mean() - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)
    assert stats.ks_2samp(ours_frac[ours_on], timm_frac[timm_on]).pvalue > 1e-3
    if count == 1:
        np.testing.assert_array_equal(np.rint(ours_frac * height * width), ours_h * ours_w)
        assert stats.ks_2samp(np.log(ours_h[ours_on] / ours_w[ours_on]),
                              np.log(timm_h[timm_on] / timm_w[timm_on])).pvalue > 1e-3
    noise = ours[np.broadcast_to(np.any(ours != 0, -1, keepdims=True), ours.shape)]
    assert abs(noise.mean()) < 0.01 and abs(noise.std() - 1) < 0.01


def test_augment_batch_keys_follow_the_global_position():
    aug = device.DeviceAugment(rand_augment=augment.parse_rand_augment('rand-m9-mstd0.5-inc1'),
                               re_prob=0.25)
    images = jnp.asarray(np.stack([_natural_image(16, 16, seed=s) for s in range(8)]))
    run = jax.jit(functools.partial(device.augment_batch, augment=aug))
    key = jax.random.key(5)
    whole = np.asarray(run(key, images, jnp.arange(8)))
    assert whole.dtype == np.float32 and whole.shape == (8, 16, 16, 3)
    # The batch in another order, each example at its own global position, is the same
    # (one compiled shape); other positions give other draws.
    np.testing.assert_array_equal(np.asarray(run(key, images[::-1], jnp.arange(8)[::-1])),
                                  whole[::-1])
    other = np.asarray(run(key, images, jnp.arange(8) + 8))
    assert all(not np.array_equal(other[i], whole[i]) for i in range(8))
    with pytest.raises(TypeError, match='uint8'):
        run(key, images.astype(jnp.float32), jnp.arange(8))


def test_host_names_are_importable_from_the_package():
    # The flat names of the former augment.py stay importable from the package.
    for name in ('train_transform', 'eval_transform', 'crop_flip', 'rand_augment',
                 'random_erasing', 'color_jitter', 'affine', 'normalize'):
        assert callable(getattr(augment, name))
    assert FLAT.shape == (20, 30, 3) and LOW_CONTRAST.dtype == np.uint8


def _step_on(devices, config, state, images, labels):
    """One pmapped train step of the global batch split over ``devices``."""
    from flax import jax_utils

    from deit_jax import models, optim, steps
    from deit_jax.teacher import Teacher

    model = models.from_config(config, 10)[0]
    tx, lr_fn = optim.create_optimizer(config, steps_per_epoch=10)
    p_step = jax.pmap(steps.train_step_from_config(config, model=model, teacher=Teacher(),
                                                   tx=tx, lr_fn=lr_fn),
                      axis_name='batch', devices=devices)
    n = len(devices)
    batch = {'image': images.reshape(n, -1, *images.shape[1:]), 'label': labels.reshape(n, -1)}
    new_state, metrics = p_step(jax_utils.replicate(state, devices), batch, None)
    return jax.tree.map(lambda x: np.asarray(x)[0], (new_state, metrics))


def _step_inputs(config):
    """A fresh train state of the config's model and 8 natural 32 x 32 uint8 images."""
    from deit_jax import models, optim, steps

    model = models.from_config(config, 10)[0]
    tx, _ = optim.create_optimizer(config, steps_per_epoch=10)
    state = steps.create_train_state(model, tx, jax.random.key(0), 32, ema=config.ema.enabled)
    images = np.stack([_natural_image(32, 32, seed=s) for s in range(8)])
    return state, images, np.arange(8, dtype=np.int32) % 10


def test_step_with_device_augmentation_on_8_devices_equals_1_device():
    from configs import deit_ti

    assert jax.local_device_count() == 8
    config = deit_ti.get_config('smoke')
    config.unlock()
    # The recipe's device half (RandAugment, erasing) on; mixup pairs within a device's batch
    # and drop path draws per device, so both are off for this comparison.
    config.update_from_flattened_dict({
        'aug.on_device': True, 'aug.auto_augment': 'rand-m9-mstd0.5-inc1', 'aug.re_prob': 0.5,
        'mixup.mixup_alpha': 0.0, 'mixup.cutmix_alpha': 0.0, 'model.drop_path_rate': 0.0,
        'distillation.kind': 'none'})
    config.lock()
    state, images, labels = _step_inputs(config)
    s8, m8 = _step_on(jax.devices(), config, state, images, labels)
    s1, m1 = _step_on(jax.devices()[:1], config, state, images, labels)
    np.testing.assert_allclose(m8['loss'], m1['loss'], rtol=1e-5)
    np.testing.assert_allclose(m8['grad_norm'], m1['grad_norm'], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4),
                 s8.params, s1.params)
    # Adam's first step moves every parameter by ~lr; a wrong mean over devices would not.
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), s1.params, state.params)
    assert min(jax.tree.leaves(moved)) > 0


def test_host_exact_path_is_finished_in_the_step():
    """aug.on_device=False: the host hands over its uint8 PIL pixels and the step normalises
    and erases them (timm's order); a float32 batch is taken as already finished."""
    from configs import deit_ti

    config = deit_ti.get_config('smoke')
    config.unlock()
    config.update_from_flattened_dict({
        'aug.on_device': False, 'aug.re_prob': 0.0, 'mixup.mixup_alpha': 0.0,
        'mixup.cutmix_alpha': 0.0, 'model.drop_path_rate': 0.0, 'distillation.kind': 'none'})
    config.lock()
    finish = device.DeviceAugment.from_config(config.aug)
    assert finish.finish_only and finish.rand_augment is None and not finish.color_jitter
    config.unlock()
    config.aug.three_augment = True  # DeiT III: no erasing, as the official transform
    assert device.DeviceAugment.from_config(config.aug).re_prob == 0.0
    config.aug.three_augment = False
    config.lock()
    state, images, labels = _step_inputs(config)
    normalised = augment.normalize(tf.constant(images)).numpy()
    _, m_uint8 = _step_on(jax.devices()[:2], config, state, images, labels)
    _, m_float = _step_on(jax.devices()[:2], config, state, normalised, labels)
    np.testing.assert_allclose(m_uint8['loss'], m_float['loss'], rtol=1e-6)
    np.testing.assert_allclose(m_uint8['grad_norm'], m_float['grad_norm'], rtol=1e-5)
    # With erasing on, the uint8 batch is erased in the step (the float one is not touched).
    config.unlock()
    config.aug.re_prob = 1.0
    config.lock()
    _, m_erased = _step_on(jax.devices()[:2], config, state, images, labels)
    _, m_float_again = _step_on(jax.devices()[:2], config, state, normalised, labels)
    assert abs(float(m_erased['loss']) - float(m_uint8['loss'])) > 1e-4
    np.testing.assert_allclose(m_float_again['loss'], m_float['loss'], rtol=1e-6)


def test_step_benchmark_reports_the_augmentations_cost():
    from configs import common
    from deit_jax import benchmark

    config = common.base_config()
    cost = benchmark._augment_cost(config, per_device=2, image_size=16, steps_timed=1)
    # XLA counts the 15 ops of two RandAugment layers, normalisation and erasing per image:
    # tens of kFLOP per pixel (16 x 16 pixels here), far below a model's step.
    assert 1e4 < cost["augment_flops_per_image"] < 1e8
    assert cost["augment_ms_per_step"] > 0


def test_training_with_device_augmentation_resumes_bit_identically(tmp_path):
    from configs import deit_ti
    from deit_jax import checkpoint, train

    def config(max_steps):
        c = deit_ti.get_config('smoke')
        c.unlock()
        # The device path end to end: uint8 crops from the host, colour jitter (RandAugment's
        # step compiles for a minute on this CPU; its draws are keyed the same way) and
        # erasing in the step.
        c.update_from_flattened_dict({
            'aug.on_device': True, 'aug.color_jitter': 0.3, 'aug.re_prob': 0.5,
            'distillation.kind': 'none', 'model.name': 'deit_tiny_patch16_224',
            'max_steps': max_steps, 'checkpoint_every_steps': 2, 'ema.enabled': False})
        c.lock()
        return c

    def final(workdir):
        manager = checkpoint.create_manager(str(workdir), max_to_keep=10, enable_async=False)
        return checkpoint.restore_raw(manager, manager.latest_step())

    train.train_and_evaluate(config(4), str(tmp_path / 'full'))
    train.train_and_evaluate(config(2), str(tmp_path / 'resumed'))
    train.train_and_evaluate(config(4), str(tmp_path / 'resumed'))
    full, resumed = final(tmp_path / 'full'), final(tmp_path / 'resumed')
    assert int(full['step']) == int(resumed['step']) == 4
    jax.tree.map(np.testing.assert_array_equal, resumed, full)
