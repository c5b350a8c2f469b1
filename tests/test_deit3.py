"""DeiT III: parameter counts and logit parity with timm's deit3_*, official key names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from helpers import nchw_to_nhwc, randomize_, state_dict_numpy
from timm.layers import resample_abs_pos_embed

from deit_jax import convert, models
from deit_jax.models import deit3


def _count(model) -> int:
    x = jax.ShapeDtypeStruct((1, model.img_size, model.img_size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes))


def test_registry_has_every_timm_deit3_name():
    assert sorted(models.DEIT3_CONFIGS) == sorted(timm.list_models("deit3*"))


@pytest.mark.parametrize("name", sorted(models.DEIT3_CONFIGS))
def test_parameter_count_equals_timm(name):
    with torch.device("meta"):  # shapes only: huge (632M) costs nothing
        reference = timm.create_model(name, pretrained=False)
    expected = sum(p.numel() for p in reference.parameters())
    model = models.create_model(name)
    assert _count(model) == expected
    # And every tensor has one of timm's names.
    x = jax.ShapeDtypeStruct((1, model.img_size, model.img_size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]
    assert {convert._torch_key(p) for p, _ in convert._flatten(shapes)} == set(
        reference.state_dict())


def _random_timm(name, seed=1, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    # randomize_ leaves gamma ~N(0, 0.05): branches then matter as much as the residual path.
    return randomize_(model, seed=seed).eval()


def _logits_timm(model, images):
    with torch.no_grad():
        return model(torch.from_numpy(images)).numpy()


def test_parity_with_timm_deit3_small_224():
    name = "deit3_small_patch16_224"
    reference = _random_timm(name)
    params = convert.convert_state_dict(state_dict_numpy(reference), name)
    images = np.random.RandomState(0).randn(2, 3, 224, 224).astype(np.float32)
    expected = _logits_timm(reference, images)
    got = jax.jit(models.create_model(name).apply)({"params": params}, nchw_to_nhwc(images))
    assert np.abs(expected).max() > 0.5  # logits large enough to mean something
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)


def test_384_from_the_224_checkpoint_matches_timm_384():
    # Reduced depth keeps it cheap; the pos_embed resampling is what is tested here.
    src = _random_timm("deit3_small_patch16_224", seed=3, depth=3)
    params = convert.convert_state_dict(state_dict_numpy(src), "deit3_small_patch16_384",
                                        depth=3)
    assert params["pos_embed"].shape == (1, 24 * 24, 384)  # no cls row
    ref = timm.create_model("deit3_small_patch16_384", pretrained=False, depth=3).eval()
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    # The official fine-tuning rule: bicubic, no antialiasing, no prefix rows (no_embed_class).
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], [24, 24], num_prefix_tokens=0,
                                             antialias=False)
    ref.load_state_dict(sd)
    images = np.random.RandomState(1).randn(1, 3, 384, 384).astype(np.float32)
    model = models.create_model("deit3_small_patch16_384", depth=3)
    got = np.asarray(model.apply({"params": params}, nchw_to_nhwc(images)))
    np.testing.assert_allclose(got, _logits_timm(ref, images), atol=1e-4, rtol=0)


def test_official_pth_layer_scale_names_convert(tmp_path):
    """The official release names LayerScale ``gamma_1``/``gamma_2`` inside ``{'model': ...}``."""
    name = "deit3_small_patch16_224"
    src = _random_timm(name, seed=4, depth=2)
    official = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v
                for k, v in src.state_dict().items()}
    assert "blocks.1.gamma_2" in official
    torch.save({"model": official}, tmp_path / "deit_3_small_224_1k.pth")
    got = convert.convert_state_dict(convert.load_state_dict(
        str(tmp_path / "deit_3_small_224_1k.pth")), name, depth=2)
    expected = convert.convert_state_dict(state_dict_numpy(src), name, depth=2)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    np.testing.assert_array_equal(got["blocks_1"]["ls2"]["gamma"],
                                  src.blocks[1].ls2.gamma.detach().numpy())


def test_layer_scale_init_and_drop_path_schedule():
    model = models.create_model("deit3_small_patch16_224", img_size=32, patch_size=8, depth=3,
                                embed_dim=24, num_heads=2, drop_path_rate=0.5)
    x = np.random.RandomState(0).randn(256, 32, 32, 3).astype(np.float32)
    params = model.init(jax.random.key(0), x[:1])["params"]
    assert params["pos_embed"].shape == (1, 16, 24)  # 4x4 patches, no cls row
    np.testing.assert_array_equal(params["blocks_0"]["ls1"]["gamma"],
                                  np.full(24, deit3.OFFICIAL_LAYER_SCALE_INIT, np.float32))
    assert model.drop_path_schedule == "constant"  # official: every block at the rate
    # With gamma = 1 the branches matter; the first block drops too under 'constant'.
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: np.ones_like(v) if p[-1].key == "gamma" else v, params)
    block0 = deit3.LayerScaleBlock(num_heads=2, drop_path=0.5, init_values=1.0)
    h = np.random.RandomState(1).randn(2000, 3, 24).astype(np.float32)
    bp = block0.init(jax.random.key(0), h, train=False)
    out = np.asarray(block0.apply(bp, h, train=True, rngs={"drop_path": jax.random.key(1)}))
    unchanged = np.abs(out - h).max(axis=(1, 2)) == 0
    assert abs(unchanged.mean() - 0.25) < 0.03  # both branches dropped: p^2
    linear = models.create_model("deit3_small_patch16_224", img_size=32, patch_size=8, depth=3,
                                 embed_dim=24, num_heads=2, drop_path_rate=0.5,
                                 drop_path_schedule="linear")
    rng = {"drop_path": jax.random.key(2)}
    a = model.apply({"params": params}, x, train=True, rngs=rng)
    b = linear.apply({"params": params}, x, train=True, rngs=rng)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
    with pytest.raises(ValueError, match="drop_path_schedule"):
        models.create_model("deit3_small_patch16_224", img_size=32, patch_size=8, depth=1,
                            drop_path_schedule="cosine").init(jax.random.key(0), x[:1])
