"""DeiT III: parameter counts and logit parity with timm's deit3_*, official key names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import timm
import torch
from helpers import nchw_to_nhwc, randomize_, state_dict_numpy
from timm.layers import resample_abs_pos_embed

from configs import common
from deit_jax import convert, losses, models, optim
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
    x = np.random.RandomState(0).randn(16, 32, 32, 3).astype(np.float32)
    params = model.init(jax.random.key(0), x[:1])["params"]
    assert params["pos_embed"].shape == (1, 16, 24)  # 4x4 patches, no cls row
    np.testing.assert_array_equal(params["blocks_0"]["ls1"]["gamma"],
                                  np.full(24, deit3.OFFICIAL_LAYER_SCALE_INIT, np.float32))
    assert model.drop_path_schedule == "constant"  # official: every block at the rate
    # With gamma = 1 the branches matter; the first block drops too under 'constant'.
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: np.ones_like(v) if p[-1].key == "gamma" else v, params)
    block0 = deit3.Block(num_heads=2, drop_path=0.5, init_values=1.0)
    h = np.random.RandomState(1).randn(2000, 2, 8).astype(np.float32)
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


# --------------------------------------------------------------------- the DeiT III recipe


def _mixed_targets(rng, b, c):
    """Mixed one-hots without smoothing (DeiT III: --smoothing 0.0), some with lambda = 1."""
    lam = np.where(rng.rand(b, 1) < 0.25, 1.0, rng.rand(b, 1)).astype(np.float32)
    a, p = rng.randint(0, c, b), rng.randint(0, c, b)
    return lam * np.eye(c, dtype=np.float32)[a] + (1 - lam) * np.eye(c, dtype=np.float32)[p]


def test_bce_matches_official_engine_and_timm():
    from timm.loss import BinaryCrossEntropy

    rng = np.random.RandomState(0)
    logits = rng.randn(16, 10).astype(np.float32) * 3
    targets = _mixed_targets(rng, 16, 10)
    x, t = torch.from_numpy(logits), torch.from_numpy(targets)
    # engine.py: targets = targets.gt(0.0).type(targets.dtype); BCEWithLogitsLoss().
    official = torch.nn.BCEWithLogitsLoss()(x, t.gt(0.0).type(t.dtype)).item()
    timm_bce = BinaryCrossEntropy(smoothing=0.0, target_threshold=0.0)(x, t).item()
    got = float(losses.binary_cross_entropy(logits, targets))
    np.testing.assert_allclose(got, official, rtol=1e-5)
    np.testing.assert_allclose(got, timm_bce, rtol=1e-5)
    soft = float(losses.binary_cross_entropy(logits, targets, target_threshold=None))
    np.testing.assert_allclose(soft, torch.nn.BCEWithLogitsLoss()(x, t).item(), rtol=1e-5)
    assert abs(soft - got) > 1e-3  # binarising really changes the loss


def test_bce_deit_loss_with_hard_distillation_matches_official():
    rng = np.random.RandomState(1)
    cls, dist, teacher = (rng.randn(8, 10).astype(np.float32) * 3 for _ in range(3))
    targets = _mixed_targets(rng, 8, 10)
    c, d, t, tl = (torch.from_numpy(a) for a in (cls, dist, targets, teacher))
    base = torch.nn.BCEWithLogitsLoss()(c, t.gt(0.0).float())
    want = (0.5 * base + 0.5 * torch.nn.functional.cross_entropy(d, tl.argmax(1))).item()
    got = losses.bce_deit_loss(cls, dist, targets, teacher, distillation="hard", alpha=0.5)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    np.testing.assert_allclose(
        float(losses.bce_deit_loss(cls, None, targets, None, distillation="none")),
        base.item(), rtol=1e-5)


def _lamb_config(weight_decay):
    c = common.base_config()
    c.optim.name = "lamb"
    c.optim.lr = 4e-3
    c.optim.weight_decay = weight_decay
    c.optim.clip_grad = 1.0  # FusedLAMB / timm Lamb max_grad_norm
    c.optim.warmup_epochs = 2.0
    c.optim.per_epoch = False
    c.batch_size = 512
    c.num_epochs = 10.0
    return c


@pytest.mark.parametrize("weight_decay", [0.05, 0.0])
def test_lamb_matches_timm_lamb(weight_decay):
    from timm.optim import Lamb

    rng = np.random.RandomState(0)
    shapes = {"blocks_0": {"attn": {"qkv": {"kernel": (6, 18), "bias": (18,)}},
                           "ls1": {"gamma": (6,)}, "norm1": {"scale": (6,)}},
              "pos_embed": (1, 5, 6), "cls_token": (1, 1, 6), "head": {"kernel": (6, 4)}}
    params = jax.tree.map(lambda s: rng.randn(*s).astype(np.float32) * 0.5, shapes,
                          is_leaf=lambda s: isinstance(s, tuple))
    flat = dict(convert._flatten(params))
    tx, schedule = optim.create_optimizer(_lamb_config(weight_decay), steps_per_epoch=2)
    mask = dict(convert._flatten(optim.decay_mask(params, decay_dist_token=True)))
    torch_params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in flat.items()}
    # timm's create_optimizer groups: decayed matrices vs biases / norms / tokens at 0.
    groups = [{"params": [p for k, p in torch_params.items() if mask[k]],
               "weight_decay": weight_decay},
              {"params": [p for k, p in torch_params.items() if not mask[k]],
               "weight_decay": 0.0}]
    reference = Lamb(groups, lr=1.0, betas=(0.9, 0.999), eps=1e-8, max_grad_norm=1.0)
    state = tx.init(params)
    clipped = 0
    for step in range(6):
        # Gradient norms on both sides of max_grad_norm = 1 so both branches run.
        scale = 0.05 if step % 2 else 2.0
        grads = jax.tree.map(lambda p, s=scale: rng.randn(*p.shape).astype(np.float32) * s,
                             params)
        clipped += float(optax.tree.norm(grads)) > 1.0
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        for group in reference.param_groups:
            group["lr"] = float(schedule(step))
        for k, g in convert._flatten(grads):
            torch_params[k].grad = torch.from_numpy(np.asarray(g).copy())
        reference.step()
    assert 0 < clipped < 6
    moved = 0.0
    for k, v in convert._flatten(params):
        np.testing.assert_allclose(np.asarray(v), torch_params[k].detach().numpy(), atol=1e-5,
                                   rtol=0, err_msg="/".join(k))
        moved = max(moved, float(np.abs(np.asarray(v) - flat[k]).max()))
    assert moved > 1e-3  # the steps were real


def test_configs_hold_the_official_numbers():
    from configs import deit3 as deit3_config

    s = deit3_config.get_config("size=s")
    assert (s.model.name, s.model.img_size, s.model.drop_path_rate) == (
        "deit3_small_patch16_224", 224, 0.05)
    assert (s.optim.name, s.loss.kind, s.aug.three_augment, s.num_epochs) == (
        "lamb", "bce", True, 800.0)
    assert optim.scaled_lr(s.optim.lr, s.batch_size) == pytest.approx(4e-3)  # --unscale-lr
    assert (s.aug.eval_crop_ratio, s.aug.re_prob, s.mixup.label_smoothing) == (1.0, 0.0, 0.0)
    b = deit3_config.get_config("size=b,epochs=400")
    assert (b.model.img_size, b.model.drop_path_rate, b.num_epochs) == (192, 0.2, 400.0)
    assert optim.scaled_lr(b.optim.lr, b.batch_size) == pytest.approx(3e-3)
    ft = deit3_config.get_config("size=l,finetune=384")
    assert (ft.model.name, ft.model.img_size, ft.model.drop_path_rate) == (
        "deit3_large_patch16_384", 384, 0.4)
    assert (ft.optim.name, ft.loss.kind, ft.aug.three_augment, ft.aug.repeated_aug) == (
        "adamw", "ce", False, 1)
    assert optim.scaled_lr(ft.optim.lr, ft.batch_size) == pytest.approx(1e-5)
    with pytest.raises(ValueError, match="fine-tunes"):
        deit3_config.get_config("size=s,finetune=224")  # S is pre-trained at 224 already
    with pytest.raises(ValueError, match="size"):
        deit3_config.get_config("size=xl")


@pytest.fixture(scope="module")
def deit3_smoke_run(tmp_path_factory):
    """The DeiT III recipe (LAMB, BCE, 3-Augment, EMA), tiny, 16 steps on 8 fake devices."""
    from configs import deit3 as deit3_config
    from deit_jax import train

    config = deit3_config.get_config("smoke")
    config.unlock()
    config.max_steps = 16
    config.eval_every_epochs = 100.0
    config.lock()
    workdir = tmp_path_factory.mktemp("deit3_smoke")
    return config, str(workdir), train.train_and_evaluate(config, str(workdir))


def test_deit3_recipe_smoke_run_learns(deit3_smoke_run):
    config, _, results = deit3_smoke_run
    assert (config.optim.name, config.loss.kind, config.aug.three_augment) == (
        "lamb", "bce", True)
    first, last = results["train/loss_first"], results["train/loss"]
    assert np.isfinite(last) and first == pytest.approx(np.log(2), abs=0.05)  # BCE at logits ~0
    assert last < 0.8 * first
    assert results["eval/count"] == 100


@pytest.mark.parametrize("weights", ["raw", "ema"])
def test_deit3_trained_in_jax_exported_gives_the_jax_logits_in_timm(deit3_smoke_run, tmp_path,
                                                                   weights):
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    from deit_jax import checkpoint

    config, workdir, _ = deit3_smoke_run
    out = tmp_path / f"{weights}.safetensors"
    convert.main(["--to=torch", "--model", config.model.name, "--src", workdir, "--out",
                  str(out), f"--weights={weights}"])
    manager = checkpoint.create_manager(workdir, max_to_keep=10, enable_async=False)
    state = checkpoint.restore_raw(manager, manager.latest_step())
    params = state["params" if weights == "raw" else "ema_params"]
    model = models.from_config(config, 10)[0]
    x = np.random.RandomState(0).randn(4, 3, 32, 32).astype(np.float32)
    expected = np.asarray(model.apply({"params": params}, nchw_to_nhwc(x)))
    # timm's deit3 definition (deit.py) at the smoke model's size.
    reference = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                                  num_classes=10, no_embed_class=True, init_values=1e-4).eval()
    reference.load_state_dict(load_file(str(out)))  # strict: every key and shape
    with torch.no_grad():
        got = reference(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    other = state["ema_params" if weights == "raw" else "params"]
    assert np.abs(np.asarray(model.apply({"params": other}, nchw_to_nhwc(x))) - got).max() > 1e-3


def test_loss_config_errors_name_the_fix():
    losses.check_loss_config("bce", 0.0, 0.0, 1000)  # the official DeiT III setting
    losses.check_loss_config("bce", -1.0, 0.1, 1000)  # soft targets: smoothing is fine
    with pytest.raises(ValueError, match="label_smoothing=0"):
        losses.check_loss_config("bce", 0.0, 0.1, 1000)
    with pytest.raises(ValueError, match="'ce' or 'bce'"):
        losses.check_loss_config("focal", 0.0, 0.0, 1000)
