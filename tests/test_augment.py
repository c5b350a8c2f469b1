"""deit_jax.augment against timm / torchvision / PIL, the library the official DeiT runs."""
import math
import random

import numpy as np
import pytest
import tensorflow as tf
import timm.data
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from scipy import stats
from timm.data import auto_augment as timm_aa
from timm.data.random_erasing import RandomErasing

from deit_jax import augment
from deit_jax.augment import pillow, tf_random

FILL = augment.IMAGENET_MEAN_UINT8


def _natural_image(height, width, seed=0):
    """Smooth colour gradients + noise + flat saturated patches, uint8 [height, width, 3]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    base = np.stack([128 + 100 * np.sin(xx / 9.0 + yy / 13.0),
                     128 + 90 * np.cos(yy / 7.0),
                     (xx * 3 + yy * 2) % 256], -1)
    image = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    image[5:15, 5:25] = 255
    image[height // 2:height // 2 + 10, width // 2:width // 2 + 20] = 0
    image[-15:-5, 10:20] = [10, 200, 30]
    return image


IMAGE = _natural_image(60, 84)  # full range: every channel holds 0 and 255
LOW_CONTRAST = (IMAGE // 2 + 40).astype(np.uint8)  # no channel holds 0 or 255
FLAT = np.full((20, 30, 3), [90, 17, 200], np.uint8)


def _seeds(n, offset=0):
    return np.stack([np.arange(n) + offset, np.full(n, 7)], 1).astype(np.int64)


def _map_seeds(fn, n, offset=0):
    """Runs fn(seed) in a tf.data map (graph mode, as the input pipeline does) over n seeds."""
    dataset = tf.data.Dataset.from_tensor_slices(_seeds(n, offset)).map(fn).batch(n)
    return tf.nest.map_structure(lambda t: t.numpy(), next(iter(dataset)))


# ---------------------------------------------------------------------------------------
# RandAugment ops, one by one, against timm's op functions on PIL images.

# Every op is bit-exact (tolerance 0): point ops are lookup tables; the enhance ops redo
# PIL's float32 blend with truncation (and the SMOOTH kernel's float32 sum with rounding
# and copied border); the geometric ops redo PIL Geometry.c (float64 inverse map, a=-1
# cubic or linear with clamped taps, truncation to uint8, hard fill outside).
OP_CASES = [
    ('AutoContrast', None, IMAGE), ('AutoContrast', None, LOW_CONTRAST),
    ('AutoContrast', None, FLAT), ('Equalize', None, IMAGE), ('Equalize', None, LOW_CONTRAST),
    ('Equalize', None, FLAT), ('Invert', None, IMAGE),
    ('Rotate', 27.3, IMAGE), ('Rotate', -13.0, LOW_CONTRAST), ('Rotate', 0.0, IMAGE),
    ('PosterizeIncreasing', 1, IMAGE), ('PosterizeIncreasing', 4, IMAGE),
    ('Posterize', 3, LOW_CONTRAST), ('SolarizeIncreasing', 100, IMAGE),
    ('Solarize', 256, IMAGE), ('Solarize', 0, IMAGE), ('SolarizeAdd', 99, IMAGE),
    ('ColorIncreasing', 0.19, IMAGE), ('Color', 1.81, IMAGE),
    ('ContrastIncreasing', 0.3, IMAGE), ('Contrast', 1.9, LOW_CONTRAST),
    ('BrightnessIncreasing', 0.4, IMAGE), ('Brightness', 1.8, IMAGE),
    ('SharpnessIncreasing', 0.1, IMAGE), ('Sharpness', 1.9, IMAGE),
    ('ShearX', 0.27, IMAGE), ('ShearY', -0.3, IMAGE),
    ('TranslateXRel', 0.4, IMAGE), ('TranslateYRel', -0.33, LOW_CONTRAST),
]


@pytest.mark.parametrize('library', ['tensorflow', 'pillow'])
@pytest.mark.parametrize('interpolation', ['bicubic', 'bilinear'])
@pytest.mark.parametrize('name,arg,image', OP_CASES,
                         ids=[f'{n}-{a}-{i}' for i, (n, a, _) in enumerate(OP_CASES)])
def test_op_matches_timm_exactly(name, arg, image, interpolation, library):
    # 'tensorflow': the TF graph ops; 'pillow': aug.host_library='pillow' calling Pillow.
    resample = {'bicubic': Image.BICUBIC, 'bilinear': Image.BILINEAR}[interpolation]
    args = () if arg is None else (arg,)
    expected = np.asarray(timm_aa.NAME_TO_OP[name](
        Image.fromarray(image), *args, fillcolor=FILL, resample=resample))
    if library == 'pillow':
        got = pillow.apply_op(name, image, 0.0 if arg is None else float(arg), fill=FILL,
                              interpolation=interpolation)
    else:
        got = augment.apply_op(name, tf.constant(image), arg, fill=FILL,
                               interpolation=interpolation).numpy()
    assert got.dtype == np.uint8 and got.shape == image.shape
    np.testing.assert_array_equal(got, expected)


def test_equalize_is_pils_on_many_images():
    # PIL's step is (count - count of the last bin) // 255. The three test images above pass
    # with // 256 too; these sizes and seeds do not (49 of 120 differed, up to 17 levels).
    for seed in range(30):
        for shape in ((64, 64), (60, 84), (100, 100), (224, 224)):
            image = _natural_image(*shape, seed=seed)
            expected = np.asarray(ImageOps.equalize(Image.fromarray(image)))
            got = augment.equalize(tf.constant(image)).numpy()
            np.testing.assert_array_equal(got, expected, err_msg=f'{shape} seed {seed}')


def test_posterize_zero_bits_is_black():
    # PosterizeIncreasing at level 10 keeps 0 bits. Pillow < 10 (what DeiT ran) masked every
    # bit to 0; Pillow >= 10 raises instead, which would crash timm's loader. Keep black.
    with pytest.raises(ValueError):
        timm_aa.posterize(Image.fromarray(IMAGE), 0)
    got = augment.apply_op('PosterizeIncreasing', tf.constant(IMAGE), 0).numpy()
    np.testing.assert_array_equal(got, np.zeros_like(IMAGE))
    got = pillow.apply_op('PosterizeIncreasing', IMAGE, 0.0)
    np.testing.assert_array_equal(got, np.zeros_like(IMAGE))


def test_level_to_arg_matches_timm(monkeypatch):
    levels = np.concatenate([np.linspace(0, 10, 41), [2.5, 7.5, 3.90625, 5.0, 9.999999],
                             np.random.default_rng(1).uniform(0, 10, 50)])
    hparams = {'translate_const': 100, 'img_mean': FILL}
    for negate in (False, True):
        monkeypatch.setattr(timm_aa, '_randomly_negate', lambda v, n=negate: -v if n else v)
        for name in sorted(set(augment.RAND_INCREASING_OPS + augment.RAND_OPS)):
            level_fn = timm_aa.LEVEL_TO_ARG[name]
            got = augment.level_to_arg(name, tf.constant(levels, tf.float64), negate)
            if level_fn is None:
                assert got is None
                continue
            expected = [level_fn(float(m), hparams)[0] for m in levels]
            np.testing.assert_array_equal(got.numpy(), expected, err_msg=name)


def test_rand_augment_config_matches_timm_create_transform():
    transform = timm.data.create_transform(
        224, is_training=True, color_jitter=0.3, auto_augment='rand-m9-mstd0.5-inc1',
        interpolation='bicubic', re_prob=0.25, re_mode='pixel', re_count=1)
    ra = next(t for t in transform.transforms if isinstance(t, timm_aa.RandAugment))
    assert tuple(op.name for op in ra.ops) == augment.RAND_INCREASING_OPS
    assert not any(isinstance(t, T.ColorJitter) for t in transform.transforms)
    kwargs = augment.parse_rand_augment('rand-m9-mstd0.5-inc1')
    assert ra.num_layers == kwargs['num_ops'] == 2
    for op in ra.ops:
        assert op.prob == kwargs['prob'] == 0.5
        assert op.magnitude == kwargs['magnitude'] == 9
        assert op.magnitude_std == kwargs['magnitude_std'] == 0.5
        assert op.kwargs['fillcolor'] == FILL == (124, 116, 104)
        assert op.kwargs['resample'] == Image.BICUBIC
        assert 'translate_pct' not in op.hparams  # so the Rel ops use timm's 0.45


@pytest.mark.parametrize('spec', ['rand-m9-mstd0.5-inc1', 'rand-n3-m7-p0.7', 'rand-mstd101',
                                  'rand-m5-inc0', 'rand'])
def test_parse_rand_augment_matches_timm(spec):
    ra = timm_aa.rand_augment_transform(spec, {'img_mean': FILL})
    kwargs = augment.parse_rand_augment(spec)
    names = augment.RAND_INCREASING_OPS if kwargs['increasing'] else augment.RAND_OPS
    assert tuple(op.name for op in ra.ops) == names
    assert ra.num_layers == kwargs['num_ops']
    assert ra.ops[0].prob == kwargs['prob']
    assert ra.ops[0].magnitude == kwargs['magnitude']
    assert ra.ops[0].magnitude_std == kwargs['magnitude_std']


@pytest.mark.parametrize('spec', ['rnd-m9', 'rand-m9-x3', 'rand-mfoo', 'rand-tweights',
                                  'rand-m9-n', 'rand-p0.5.5'])
def test_parse_rand_augment_rejects_bad_specs(spec):
    with pytest.raises(ValueError, match='RandAugment'):
        augment.parse_rand_augment(spec)


def test_rand_augment_is_the_composition_of_its_draws():
    image = tf.constant(IMAGE)
    for i in range(12):
        seed = tf.constant([i, 3], tf.int64)
        ops, applied, levels, negates = augment.rand_augment_draws(seed)
        expected = image
        for op, on, level, negate in zip(ops.numpy(), applied.numpy(), levels, negates,
                                         strict=True):
            if on:
                name = augment.RAND_INCREASING_OPS[op]
                arg = augment.level_to_arg(name, level, negate)
                expected = augment.apply_op(name, expected, arg)
        np.testing.assert_array_equal(augment.rand_augment(image, seed).numpy(),
                                      expected.numpy())


def test_rand_augment_draw_statistics():
    n = 4000
    ops, applied, levels, negates = _map_seeds(lambda s: augment.rand_augment_draws(s), n)
    ops, applied, levels, negates = (x.ravel() for x in (ops, applied, levels, negates))
    # Ops uniform over timm's 15 (chi-square), each applied with prob 0.5, signs fair.
    assert stats.chisquare(np.bincount(ops, minlength=15)).pvalue > 1e-3
    assert abs(applied.mean() - 0.5) < 4 * math.sqrt(0.25 / applied.size)
    assert abs(negates.mean() - 0.5) < 4 * math.sqrt(0.25 / negates.size)
    # Magnitude N(9, 0.5) clipped to [0, 10]: 2.28% sit exactly at 10.
    assert levels.min() >= 0 and levels.max() == 10.0
    p_top = stats.norm.sf(2.0)
    assert abs((levels == 10).mean() - p_top) < 4 * math.sqrt(p_top / levels.size)
    below = levels[levels < 10]
    assert stats.kstest(below, stats.truncnorm(-np.inf, 2.0, loc=9, scale=0.5).cdf).pvalue > 1e-3
    _, _, uniform_levels, _ = _map_seeds(
        lambda s: augment.rand_augment_draws(s, magnitude=9.0, magnitude_std=math.inf), 500)
    assert stats.kstest(uniform_levels.ravel(), stats.uniform(0, 9).cdf).pvalue > 1e-3


# ---------------------------------------------------------------------------------------
# RandomResizedCrop.


def test_random_resized_crop_params_match_torchvision_statistics():
    height, width, n = 300, 400, 3000
    top, left, h, w = _map_seeds(
        lambda s: augment.random_resized_crop_params(s, height, width), n)
    torch.manual_seed(0)
    tv = np.array([T.RandomResizedCrop.get_params(
        torch.empty(3, height, width), [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])
    ours = np.stack([top, left, h, w], 1)
    for params in (ours, tv):
        assert (params[:, 0] >= 0).all() and (params[:, 0] + params[:, 2] <= height).all()
        assert (params[:, 1] >= 0).all() and (params[:, 1] + params[:, 3] <= width).all()

    def features(p):
        area = p[:, 2] * p[:, 3] / (height * width)
        log_aspect = np.log(p[:, 3] / p[:, 2])
        slack = height - p[:, 2]
        rel_top = p[:, 0][slack > 0] / slack[slack > 0]  # uniform in [0, 1] given h
        return area, log_aspect, rel_top

    for ours_x, tv_x in zip(features(ours), features(tv), strict=True):
        assert stats.ks_2samp(ours_x, tv_x).pvalue > 1e-3
        assert abs(ours_x.mean() - tv_x.mean()) < 0.02
    # Different seeds give different crops.
    assert len({tuple(p) for p in ours}) > 0.99 * n


@pytest.mark.parametrize('height,width,ratio', [(100, 100, (5.0, 6.0)), (90, 120, (0.1, 0.2)),
                                                (81, 100, (2.0, 4.0))])
def test_random_resized_crop_fallback_matches_torchvision(height, width, ratio):
    # No try can fit (scale >= 0.5 at these ratios), so both take the deterministic fallback.
    scale = (0.5, 1.0)
    expected = T.RandomResizedCrop.get_params(torch.empty(3, height, width), scale, ratio)
    got = augment.random_resized_crop_params(
        tf.constant([1, 2]), height, width, scale=scale, ratio=ratio)
    assert tuple(int(v) for v in got) == expected


def test_random_resized_crop_pixels_match_pil():
    # Both resize in two 8-bit passes; PIL's fixed-point weights flip a rounding now and
    # then. Measured: max 1 grey level on <= 0.03% of values; allowed max 1 on < 0.2%.
    image = _natural_image(180, 250, seed=3)
    for i in range(6):
        seed = tf.constant([i, 11])
        top, left, h, w = (int(v) for v in augment.random_resized_crop_params(seed, 180, 250))
        expected = np.asarray(Image.fromarray(image).crop((left, top, left + w, top + h))
                              .resize((64, 64), Image.BICUBIC), np.float32)
        got = augment.random_resized_crop(tf.constant(image), seed, size=64).numpy()
        assert got.dtype == np.float32 and got.shape == (64, 64, 3)
        diff = np.abs(got - expected)
        assert diff.max() <= 1 and (diff > 0).mean() < 2e-3, (diff.max(), (diff > 0).mean())


# ---------------------------------------------------------------------------------------
# Colour jitter, erasing, eval and the full train transform.


def test_color_jitter_matches_torchvision_functional_on_pil():
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    orders = set()
    for i in range(40):
        seed = tf.constant([i, 5])
        order, factors = (x.numpy() for x in augment.color_jitter_draws(seed, 0.3))
        assert sorted(order) == [0, 1, 2]
        assert ((factors >= 0.7) & (factors <= 1.3)).all()
        orders.add(tuple(order))
        expected = Image.fromarray(IMAGE)
        for k in order:
            expected = adjust[k](expected, float(factors[k]))
        got = augment.color_jitter(tf.constant(IMAGE), seed, strength=0.3).numpy()
        np.testing.assert_array_equal(got, np.asarray(expected))
    assert len(orders) == 6


def _erased_boxes(images):
    """Per image: (erased?, erased pixel fraction, h, w of the bounding box)."""
    mask = np.any(images != 0, axis=-1)
    rows, cols = mask.any(2), mask.any(1)
    h = rows.sum(1)
    w = cols.sum(1)
    return mask.any((1, 2)), mask.mean((1, 2)), h, w


@pytest.mark.parametrize('count', [1, 3])
def test_random_erasing_matches_timm_statistics(count):
    height, width, n = 40, 48, 2000
    zeros = tf.zeros([height, width, 3])
    ours = _map_seeds(lambda s: augment.random_erasing(zeros, s, prob=0.25, count=count), n)
    torch.manual_seed(0)
    random.seed(0)
    eraser = RandomErasing(0.25, mode='pixel', max_count=count, device='cpu')
    timm_out = np.stack([eraser(torch.zeros(3, height, width)).permute(1, 2, 0).numpy()
                         for _ in range(n)])
    ours_on, ours_frac, ours_h, ours_w = _erased_boxes(ours)
    timm_on, timm_frac, timm_h, timm_w = _erased_boxes(timm_out)
    # Erasing probability: binomial tolerance of 4 sigma around timm's rate.
    assert abs(ours_on.mean() - timm_on.mean()) < 4 * math.sqrt(2 * 0.25 * 0.75 / n)
    assert abs(ours_on.mean() - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)
    assert stats.ks_2samp(ours_frac[ours_on], timm_frac[timm_on]).pvalue > 1e-3
    if count == 1:
        # One box: the erased set is exactly its bounding box.
        np.testing.assert_array_equal(np.rint(ours_frac * height * width), ours_h * ours_w)
        assert stats.ks_2samp(np.log(ours_h[ours_on] / ours_w[ours_on]),
                              np.log(timm_h[timm_on] / timm_w[timm_on])).pvalue > 1e-3
    # Erased pixels are N(0, 1) per pixel and channel.
    noise = ours[np.broadcast_to(np.any(ours != 0, -1, keepdims=True), ours.shape)]
    assert abs(noise.mean()) < 0.01 and abs(noise.std() - 1) < 0.01
    assert stats.kstest(noise[:20000], 'norm').pvalue > 1e-3


@pytest.mark.parametrize('height,width', [(300, 400), (380, 290), (180, 200), (256, 256)])
def test_eval_transform_matches_timm(height, width):
    # Same two 8-bit resize passes as PIL up to its fixed-point weights. Measured in grey
    # levels: max 1 on <= 0.07% of values; allowed max 1 (+ float slack) on < 0.2%.
    image = _natural_image(height, width, seed=5)
    transform = timm.data.create_transform(224, is_training=False, interpolation='bicubic',
                                           crop_pct=0.875)
    expected = transform(Image.fromarray(image)).permute(1, 2, 0).numpy()
    got = augment.eval_transform(tf.constant(image), img_size=224).numpy()
    assert got.shape == (224, 224, 3) and got.dtype == np.float32
    levels = np.abs(got - expected) * np.array(augment.IMAGENET_STD) * 255
    assert levels.max() < 1.001 and (levels > 1e-3).mean() < 2e-3, (
        levels.max(), (levels > 1e-3).mean())


def test_train_transform_deterministic_and_seed_dependent():
    image = tf.constant(_natural_image(120, 150, seed=9))

    def transform(seed):
        return (augment.train_transform(image, seed, img_size=64),
                augment.train_transform(image, seed, img_size=64, re_prob=0.0))

    dataset = tf.data.Dataset.from_tensor_slices(_seeds(16)).map(
        transform, num_parallel_calls=4).batch(16)
    graph, no_erase = (x.numpy() for x in next(iter(dataset)))
    again, _ = (x.numpy() for x in next(iter(dataset)))
    np.testing.assert_array_equal(again, graph)  # same seeds, same bits, in parallel too
    eager = np.stack([transform(tf.constant(s))[0].numpy() for s in _seeds(4)])
    np.testing.assert_array_equal(eager, graph[:4])  # eager == tf.data graph mode
    assert len({x.tobytes() for x in graph}) == 16  # every seed gives a different image
    assert graph.shape == (16, 64, 64, 3) and graph.dtype == np.float32
    assert np.isfinite(graph).all()
    low = (0 - np.array(augment.IMAGENET_MEAN)) / np.array(augment.IMAGENET_STD)
    high = (1 - np.array(augment.IMAGENET_MEAN)) / np.array(augment.IMAGENET_STD)
    assert (no_erase >= low - 1e-6).all() and (no_erase <= high + 1e-6).all()
    # Erasing (p=0.25) changes some of the 16 images and leaves the rest bit-identical.
    erased = np.any(graph != no_erase, axis=(1, 2, 3))
    assert 0 < erased.sum() < 16


@pytest.mark.parametrize('hflip', [0.0, 1.0])
def test_train_transform_without_randomness_is_resize_flip_normalise(hflip):
    image = _natural_image(100, 100, seed=2)
    got = augment.train_transform(
        tf.constant(image), tf.constant([0, 0]), img_size=48, scale=(1.0, 1.0),
        ratio=(1.0, 1.0), hflip=hflip, auto_augment=None, color_jitter=None, re_prob=0.0)
    resized = np.asarray(Image.fromarray(image).resize((48, 48), Image.BICUBIC))
    if hflip:
        resized = resized[:, ::-1]
    # Up to PIL's fixed-point rounding (1 grey level on a few pixels, see above).
    levels = (np.abs(got.numpy() - augment.normalize(resized).numpy())
              * np.array(augment.IMAGENET_STD) * 255)
    assert levels.max() < 1.001 and (levels > 1e-3).mean() < 2e-3


def test_train_transform_color_jitter_path_when_rand_augment_off():
    image = tf.constant(_natural_image(100, 100, seed=4))
    kwargs = dict(img_size=48, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, re_prob=0.0)
    plain = augment.train_transform(image, tf.constant([3, 1]), auto_augment=None,
                                    color_jitter=None, **kwargs).numpy()
    jittered = augment.train_transform(image, tf.constant([3, 1]), auto_augment=None,
                                       color_jitter=0.3, **kwargs).numpy()
    assert np.abs(jittered - plain).mean() > 0.01


def _timm_train_view(image, seed, *, img_size):
    """The host transform of `seed` without erasing, rebuilt from timm/torchvision calls on a
    PIL image with our draws (crop, flip, RandAugment layers)."""
    crop_seed, flip_seed, s_color, _ = tf_random.split_seed(seed, 4)
    top, left, h, w, flip = (int(v) for v in augment.crop_flip_params(
        crop_seed, flip_seed, *image.shape[:2]))
    pil = TF.resized_crop(Image.fromarray(image), top, left, h, w, [img_size, img_size],
                          T.InterpolationMode.BICUBIC)
    if flip:
        pil = TF.hflip(pil)
    ops, applied, levels, negates = augment.rand_augment_draws(s_color)
    for op, on, level, negate in zip(ops.numpy(), applied.numpy(), levels, negates,
                                     strict=True):
        if on:
            name = augment.RAND_INCREASING_OPS[op]
            arg = augment.level_to_arg(name, level, negate)
            args = () if arg is None else (arg.numpy().item(),)
            if name.startswith(('Posterize', 'Solarize')):
                args = tuple(int(a) for a in args)
            pil = timm_aa.NAME_TO_OP[name](pil, *args, fillcolor=FILL,
                                           resample=Image.BICUBIC)
    return np.asarray(pil)


def test_pillow_train_transform_is_timms_pipeline_on_the_same_draws():
    image = _natural_image(150, 170, seed=6)
    for i in range(40):
        seed = tf.constant([i, 3])
        got = augment.train_transform(tf.constant(image), seed, img_size=64, re_prob=0.0,
                                      library='pillow').numpy()
        expected = _timm_train_view(image, seed, img_size=64)
        np.testing.assert_array_equal(got, augment.normalize(expected).numpy(), err_msg=i)


def test_host_libraries_agree_where_no_resize_is_needed():
    # Same draws, and every RandAugment op bit-exact in both: without a resize (the crop is
    # the whole 64 x 64 image) 'pillow' and 'tensorflow' give the same bits, erasing included.
    image = tf.constant(_natural_image(64, 64, seed=5))
    kwargs = dict(img_size=64, scale=(1.0, 1.0), ratio=(1.0, 1.0))

    def both(seed):
        return tuple(augment.train_transform(image, seed, library=lib, **kwargs)
                     for lib in ('pillow', 'tensorflow'))

    dataset = tf.data.Dataset.from_tensor_slices(_seeds(48)).map(
        both, num_parallel_calls=4).batch(48)
    pil, tf_ops = (x.numpy() for x in next(iter(dataset)))
    np.testing.assert_array_equal(pil, tf_ops)
    assert len({x.tobytes() for x in pil}) > 24  # not all draws are no-ops
    with pytest.raises(ValueError, match="host_library"):
        augment.train_transform(image, tf.constant([0, 0]), library='opencv', **kwargs)

