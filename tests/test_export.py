"""Export to timm: timm -> convert -> export -> timm loads it -> the same weights and logits."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import timm
import torch
from helpers import nchw_to_nhwc, randomize_, state_dict_numpy

from deit_jax import checkpoint, convert


def _timm_from_file(name, path, **kwargs):
    """timm's own pretrained loader on a local file (no download: the file override wins)."""
    return timm.create_model(name, pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()


def _random_regnet(name):
    torch.manual_seed(0)
    model = timm.create_model(name)
    with torch.no_grad():  # BN statistics and zero-initialised parts random too (test_regnet)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
        model.head.fc.weight.normal_(0.0, 0.05)
    return model.eval()


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
                                  "deit3_small_patch16_224", "regnety_002"])
def test_timm_convert_export_timm_round_trip(name, tmp_path):
    if name.startswith("regnet"):
        reference = _random_regnet(name)
    else:
        torch.manual_seed(0)
        reference = randomize_(timm.create_model(name), seed=5).eval()
    original = state_dict_numpy(reference)
    variables = convert.convert_state_dict(original, name)
    if "params" not in variables:
        variables = {"params": variables}
    exported = convert.export_state_dict(variables, name)
    assert set(exported) == set(original)
    for key, value in original.items():  # layout changes only: bit-identical tensors
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    path = tmp_path / f"{name}.safetensors"
    convert.save_safetensors(exported, str(path))
    loaded = _timm_from_file(name, path)
    images = torch.from_numpy(np.random.RandomState(0).randn(2, 3, 224, 224).astype(np.float32))
    with torch.no_grad():
        expected, got = reference(images).numpy(), loaded(images).numpy()
    assert np.abs(expected).max() > 0.1
    np.testing.assert_array_equal(got, expected)


def _tiny_deit_variables(distilled: bool):
    from deit_jax import models

    model = models.create_model(
        "deit_tiny_distilled_patch16_224" if distilled else "deit_tiny_patch16_224",
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_classes=10)
    return model, model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))


def test_export_checks_the_family_and_the_collections():
    model, variables = _tiny_deit_variables(distilled=True)
    with pytest.raises(ValueError, match="dist_token"):  # a distilled model named as plain
        convert.export_state_dict(variables, "deit_tiny_patch16_224")
    with pytest.raises(ValueError, match="ls1"):  # DeiT weights named as DeiT III
        convert.export_state_dict(variables, "deit3_small_patch16_224")
    with pytest.raises(ValueError, match="batch_stats"):
        convert.export_state_dict({**variables, "batch_stats": {"x": np.zeros(3)}},
                                  "deit_tiny_distilled_patch16_224")
    with pytest.raises(ValueError, match="not a regnety_002|do not fit regnety_002"):
        convert.export_state_dict(variables, "regnety_002")
    # A resized model exports at its own architecture, which the message-free path returns.
    arch = convert.vit_architecture(variables["params"], "deit_tiny_distilled_patch16_224")
    assert arch == dict(num_classes=10, embed_dim=48, patch_size=8, img_size=32, depth=2,
                        mlp_ratio=4.0, num_heads=3)


def test_command_line_export_of_a_converted_checkpoint(tmp_path):
    model, variables = _tiny_deit_variables(distilled=False)
    checkpoint.save_variables(str(tmp_path / "ckpt"), jax.tree.map(np.asarray, variables))
    out = tmp_path / "w.safetensors"
    convert.main(["--to=torch", "--model", "deit_tiny_patch16_224", "--src",
                  str(tmp_path / "ckpt"), "--out", str(out)])
    reference = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8,
                                  embed_dim=48, depth=2, num_classes=10).eval()
    from safetensors.torch import load_file

    reference.load_state_dict(load_file(str(out)))  # strict: every key, every shape
    x = np.random.RandomState(0).randn(2, 3, 32, 32).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    got = np.asarray(model.apply(variables, nchw_to_nhwc(x)))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="--weights=raw"):  # no EMA in a converted checkpoint
        convert.main(["--to=torch", "--model", "deit_tiny_patch16_224", "--src",
                      str(tmp_path / "ckpt"), "--out", str(out), "--weights=ema"])
    with pytest.raises(SystemExit):
        convert.main(["--to=torch", "--model", "deit_tiny_patch16_224", "--src",
                      str(tmp_path / "ckpt"), "--out", str(tmp_path / "w.pth")])
    with pytest.raises(FileNotFoundError, match="neither"):
        convert.main(["--to=torch", "--model", "deit_tiny_patch16_224", "--src",
                      str(tmp_path / "nothing"), "--out", str(out)])
