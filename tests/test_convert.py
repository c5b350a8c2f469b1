"""Official-weight import: PyTorch-exact bicubic resampling, 224 -> 384, the command line."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import nchw_to_nhwc, randomize_, state_dict_numpy
from timm.layers import resample_abs_pos_embed

from deit_jax import checkpoint, convert, models


@pytest.mark.parametrize("old,new", [((14, 14), (24, 24)), ((24, 24), (14, 14)),
                                     ((14, 14), (14, 14)), ((7, 7), (12, 20)),
                                     ((14, 14), (3, 5))])
def test_bicubic_matches_torch_interpolate(old, new):
    grid = np.random.RandomState(0).randn(1, 2 + old[0] * old[1], 16).astype(np.float32)
    got = convert.resample_pos_embed(grid, new, num_prefix_tokens=2, old_grid=old)
    patches = torch.from_numpy(grid[0, 2:].reshape(*old, 16)).permute(2, 0, 1)[None]
    expected = F.interpolate(patches, size=new, mode="bicubic", align_corners=False)
    expected = expected[0].permute(1, 2, 0).reshape(-1, 16).numpy()
    np.testing.assert_array_equal(got[0, :2], grid[0, :2])  # prefix tokens kept as they are
    np.testing.assert_allclose(got[0, 2:], expected, atol=1e-5, rtol=0)


def test_bicubic_differs_from_jax_cubic_kernel():
    # Why we do not use jax.image.resize: its cubic kernel (a = -0.5) gives other values.
    x = np.random.RandomState(1).randn(14, 14).astype(np.float32)
    ours = convert.torch_bicubic_matrix(14, 24) @ x @ convert.torch_bicubic_matrix(14, 24).T
    theirs = np.asarray(jax.image.resize(x, (24, 24), "cubic"))
    assert np.abs(ours - theirs).max() > 1e-2


@pytest.fixture(scope="module")
def deit_small_224():
    torch.manual_seed(0)
    return randomize_(timm.create_model("deit_small_distilled_patch16_224"), seed=2).eval()


def test_224_checkpoint_converted_at_384_matches_timm(deit_small_224):
    name = "deit_small_distilled_patch16_224"
    state = state_dict_numpy(deit_small_224)
    params = convert.convert_state_dict(state, name, img_size=384)
    assert params["pos_embed"].shape == (1, 2 + 24 * 24, 384)
    model = models.create_model(name, img_size=384)
    images = np.random.RandomState(0).randn(1, 3, 384, 384).astype(np.float32)
    got = np.asarray(model.apply({"params": params}, nchw_to_nhwc(images)))

    def timm_384(antialias):
        ref = timm.create_model(name, img_size=384).eval()
        sd = {k: v.clone() for k, v in deit_small_224.state_dict().items()}
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], [24, 24], num_prefix_tokens=2,
                                                 antialias=antialias)
        ref.load_state_dict(sd)
        with torch.no_grad():
            return ref(torch.from_numpy(images)).numpy()

    # The official fine-tuning resampling (no antialiasing): the same function, float tolerance.
    np.testing.assert_allclose(got, timm_384(antialias=False), atol=1e-4, rtol=0)
    # timm's loader antialiases by default (PIL-style kernel): close, not identical.
    diff = np.abs(got - timm_384(antialias=True)).max()
    assert 1e-5 < diff < 0.05 * np.abs(got).max()


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_command_line_round_trip(deit_small_224, tmp_path, fmt):
    name = "deit_small_distilled_patch16_224"
    sd = {k: v.contiguous() for k, v in deit_small_224.state_dict().items()}
    src = tmp_path / f"weights.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(src))
    else:
        torch.save({"model": sd}, src)  # the official release's layout
    out = tmp_path / "converted"
    convert.main(["--model", name, "--src", str(src), "--out", str(out)])
    variables, metadata = checkpoint.load_variables(str(out))
    assert metadata["model"] == name
    expected = convert.convert_state_dict(state_dict_numpy(deit_small_224), name)
    jax.tree.map(np.testing.assert_array_equal, variables["params"], expected)


def test_bad_state_dicts_are_clear_errors(deit_small_224):
    name = "deit_small_distilled_patch16_224"
    good = state_dict_numpy(deit_small_224)
    missing = {k: v for k, v in good.items() if k != "blocks.3.attn.qkv.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['blocks.3.attn.qkv.bias'\]"):
        convert.convert_state_dict(missing, name)
    with pytest.raises(ValueError, match=r"unexpected keys \['blocks.12.norm1.weight'\]"):
        convert.convert_state_dict({**good, "blocks.12.norm1.weight": good["norm.weight"]}, name)
    bad_shape = {**good, "blocks.0.mlp.fc1.weight": good["blocks.0.mlp.fc1.weight"][:10]}
    with pytest.raises(ValueError, match="blocks.0.mlp.fc1.weight"):
        convert.convert_state_dict(bad_shape, name)
    with pytest.raises(ValueError, match="head.weight"):
        convert.convert_state_dict({"foo": np.zeros(3)}, name)


def test_unreadable_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        convert.load_state_dict(str(tmp_path / "missing.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        convert.load_state_dict(str(garbage))
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        convert.load_state_dict(str(garbage.rename(tmp_path / "weights.h5")))
    with pytest.raises(FileNotFoundError, match="deit_jax.convert"):
        checkpoint.load_variables(str(tmp_path))
