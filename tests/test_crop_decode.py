"""Crop-aware decoding (a JPEG decodes only its RandomResizedCrop window) and the host resize
options (``aug.host_resize``): the same pixels as decoding whole, damage still detected."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from configs import common
from deit_jax import augment, data_sources
from deit_jax import input_pipeline as ip
from deit_jax.errors import ConfigError


def _smooth_image(rng, shape=(61, 83), noise=40):
    """Smooth gradients plus noise (chroma upsampling then matters at every window edge)."""
    y, x = np.mgrid[:shape[0], :shape[1]]
    base = np.stack([x * 3, y * 4, (x + y) * 2], -1) % 256
    return np.clip(base + rng.randint(-noise, noise + 1, (*shape, 3)), 0, 255).astype(np.uint8)


def _jpeg(image, **kwargs) -> bytes:
    return tf.io.encode_jpeg(image, quality=90, **kwargs).numpy()


ENCODINGS = {"4:2:0": {}, "4:4:4": {"chroma_downsampling": False},
             "progressive": {"progressive": True}}


def _fixed_view(view):
    return lambda height, width: tf.constant(view, tf.int32)


def _views(rng, height, width, n):
    """Random windows, the image's four corners and the whole image among them."""
    views = [(0, 0, height, width, 0), (0, 0, 5, 7, 1), (height - 9, width - 3, 9, 3, 0)]
    for _ in range(n):
        h, w = rng.randint(1, height + 1), rng.randint(1, width + 1)
        views.append((rng.randint(0, height - h + 1), rng.randint(0, width - w + 1), h, w,
                      rng.randint(2)))
    return views


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_window_pixels_equal_the_whole_decode_cropped(encoding):
    rng = np.random.RandomState(0)
    data = _jpeg(_smooth_image(rng), **ENCODINGS[encoding])
    full = data_sources.decode_image_bytes(data).numpy()
    for view in _views(rng, *full.shape[:2], 30):
        window, rel = data_sources.decode_crop(data, _fixed_view(view))
        t, left, h, w, flip = rel.numpy()
        assert (h, w, flip) == view[2:]
        assert window.shape[0] < full.shape[0] or window.shape[1] < full.shape[1] or \
            view[2:4] == full.shape[:2]  # only the window (plus margin) was decoded
        top, left0 = view[0], view[1]
        np.testing.assert_array_equal(window.numpy()[t:t + h, left:left + w],
                                      full[top:top + h, left0:left0 + w])


def test_without_the_margin_window_edges_differ(monkeypatch):
    """The margin is what makes the pixels equal: libjpeg's chroma upsampling at the window's
    edge differs from the whole decode's."""
    monkeypatch.setattr(data_sources, "_CROP_MARGIN", 0)
    rng = np.random.RandomState(1)
    data = _jpeg(_smooth_image(rng))
    full = data_sources.decode_image_bytes(data).numpy()
    differing = 0
    for view in _views(rng, *full.shape[:2], 30)[3:]:
        window, _ = data_sources.decode_crop(data, _fixed_view(view))
        top, left, h, w, _ = view
        differing += not np.array_equal(window.numpy(), full[top:top + h, left:left + w])
    assert differing > 0


def test_damaged_or_other_files_are_decoded_whole():
    rng = np.random.RandomState(2)
    image = _smooth_image(rng)
    data = _jpeg(image)
    # Truncated: the crop lies above the damage, which decode_and_crop_jpeg alone would miss.
    with pytest.raises(tf.errors.InvalidArgumentError):
        data_sources.decode_crop(data[: len(data) // 2], _fixed_view((0, 0, 4, 4, 0)))
    # Trailing bytes after the end-of-image marker: decoded whole, the same pixels.
    window, rel = data_sources.decode_crop(data + b"\0" * 7, _fixed_view((3, 5, 8, 9, 0)))
    assert window.shape == image.shape and rel.numpy().tolist() == [3, 5, 8, 9, 0]
    # PNG: decoded whole; the view comes from the decoded size.
    png = tf.io.encode_png(image).numpy()
    seen = []

    def view_of(height, width):
        seen.append(True)
        return tf.stack([height - 2, width - 3, 2, 3, 0])

    window, rel = data_sources.decode_crop(png, view_of)
    np.testing.assert_array_equal(window.numpy(), image)
    assert rel.numpy().tolist() == [image.shape[0] - 2, image.shape[1] - 3, 2, 3, 0] and seen


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.RandomState(3)
    for c in range(2):
        for i in range(6):
            path = root / "train" / f"c{c}" / f"{i}.jpg"
            os.makedirs(path.parent, exist_ok=True)
            path.write_bytes(_jpeg(_smooth_image(rng, (40 + 7 * i, 50 + 3 * c))))
    return str(root)


@pytest.mark.parametrize("on_device", [True, False])
def test_training_batches_are_the_same_with_and_without_crop_aware_decoding(jpeg_folder,
                                                                            on_device):
    config = common.base_config()
    config.aug.ra_multiple = 1
    config.aug.repeated_aug = 1
    config.aug.on_device = on_device
    config.aug.auto_augment = ""  # the crop is what changes; keep the host path cheap
    config.aug.re_prob = 0.0
    source = ip.image_folder(os.path.join(jpeg_folder, "train"))
    assert source.load_encoded is not None
    whole = dataclasses.replace(source, load_encoded=None)
    layout = ip.Layout(4, 0, 1, 2)
    a = ip.train_batches(config, source, layout, image_size=24)
    b = ip.train_batches(config, whole, layout, image_size=24)
    for _ in range(4):
        x, y = next(a), next(b)
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    assert x["image"].dtype == np.uint8  # the host-exact path's jittered pixels, or the view


def test_fast_resize_equals_pil_when_upscaling_and_is_close_when_downscaling():
    """'fast' drops only the antialiasing: an upscaled crop (antialiasing changes nothing)
    matches PIL's bicubic to 1 grey level away from the border, where tf clamps the taps
    and PIL renormalises them; a downscaled one is aliased, so only its mean stays close (on
    mild noise: on ImageNet photos the mean is 1.3 levels, docs/PERFORMANCE.md)."""
    rng = np.random.RandomState(4)
    image = _smooth_image(rng, (120, 150), noise=3)
    for view, inner_max, mean_max in (((10, 20, 30, 40, 0), 1, 0.5),
                                      ((0, 0, 120, 150, 1), 255, 2.0)):
        fast = augment.crop_flip(image, view, size=64, resize="fast").numpy().astype(int)
        t, left, h, w, flip = view
        pil = Image.fromarray(image[t:t + h, left:left + w]).resize((64, 64), Image.BICUBIC)
        pil = np.asarray(pil).astype(int)[:, ::-1] if flip else np.asarray(pil).astype(int)
        diff = np.abs(fast - pil)
        assert diff[3:-3, 3:-3].max() <= inner_max
        assert diff.mean() <= mean_max
    exact = augment.crop_flip(image, (0, 0, 120, 150, 0), size=64).numpy().astype(int)
    pil = np.asarray(Image.fromarray(image).resize((64, 64), Image.BICUBIC)).astype(int)
    assert np.abs(exact - pil).max() <= 1  # 'pil' is PIL's antialiased resize
    assert np.abs(fast - exact).max() > 1  # and 'fast' really is a different resize
    with pytest.raises(ValueError, match="host_resize"):
        augment.crop_flip(image, view, size=64, resize="lanczos")


@pytest.mark.parametrize("key,value", [("host_resize", "lanczos"), ("host_library", "opencv")])
def test_unknown_host_option_is_a_config_error_before_any_decoding(jpeg_folder, key, value):
    config = common.base_config()
    config.aug.ra_multiple = 1
    config.aug[key] = value
    source = ip.image_folder(os.path.join(jpeg_folder, "train"))
    with pytest.raises(ConfigError, match=f"--config.aug.{key}"):
        ip.train_batches(config, source, ip.Layout(4, 0, 1, 2), image_size=24)
