"""The DeiT loss against the official formulas (written in PyTorch), mixup/cutmix, schedule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from timm.scheduler import CosineLRScheduler

from configs import common
from deit_jax import losses, optim
from deit_jax.mixup import mixup_cutmix


def official_loss(cls, dist, targets, teacher, kind, alpha, tau, reduction):
    """facebookresearch/deit losses.py DistillationLoss.forward, verbatim in PyTorch."""
    cls, dist, targets, teacher = (torch.from_numpy(np.asarray(a)) for a in
                                   (cls, dist, targets, teacher))
    base = SoftTargetCrossEntropy()(cls, targets)
    if kind == "none":
        return base.item()
    if kind == "soft":
        kd = F.kl_div(F.log_softmax(dist / tau, dim=1), F.log_softmax(teacher / tau, dim=1),
                      reduction="sum", log_target=True) * (tau * tau)
        kd = kd / (dist.numel() if reduction == "numel" else dist.shape[0])
    else:
        kd = F.cross_entropy(dist, teacher.argmax(dim=1))
    return (base * (1 - alpha) + kd * alpha).item()


@pytest.mark.parametrize("kind,reduction", [("none", "numel"), ("soft", "numel"),
                                            ("soft", "batchmean"), ("hard", "numel")])
def test_deit_loss_matches_official(kind, reduction):
    rng = np.random.RandomState(0)
    b, c = 16, 10
    cls, dist, teacher = (rng.randn(b, c).astype(np.float32) * 3 for _ in range(3))
    targets = rng.dirichlet(np.ones(c), size=b).astype(np.float32)
    for alpha, tau in ((0.5, 1.0), (0.1, 3.0)):
        got = losses.deit_loss(cls, dist, targets, teacher, distillation=kind, alpha=alpha,
                               tau=tau, kd_reduction=reduction)
        want = official_loss(cls, dist, targets, teacher, kind, alpha, tau, reduction)
        np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_teacher_gets_no_gradient():
    rng = np.random.RandomState(1)
    cls, dist, teacher = (jnp.asarray(rng.randn(4, 5), jnp.float32) for _ in range(3))
    targets = jax.nn.one_hot(jnp.arange(4), 5)
    for kind in ("soft", "hard"):
        grad_t, grad_s = jax.grad(
            lambda t, d, k=kind: losses.deit_loss(cls, d, targets, t, distillation=k),
            argnums=(0, 1))(teacher, dist)
        assert np.all(np.asarray(grad_t) == 0) and np.abs(np.asarray(grad_s)).max() > 1e-3


def test_label_smoothing_targets_match_timm():
    from timm.data.mixup import one_hot as timm_one_hot  # noqa: F401 (import check)
    from timm.loss import LabelSmoothingCrossEntropy

    rng = np.random.RandomState(2)
    logits, labels = rng.randn(8, 10).astype(np.float32), rng.randint(0, 10, 8)
    ours = losses.soft_target_cross_entropy(logits, losses.smoothed_one_hot(labels, 10, 0.1))
    theirs = LabelSmoothingCrossEntropy(0.1)(torch.from_numpy(logits), torch.from_numpy(labels))
    np.testing.assert_allclose(float(ours), theirs.item(), rtol=1e-5)


def _batch(seed=0, b=8, size=16):
    rng = np.random.RandomState(seed)
    return (jnp.asarray(rng.rand(b, size, size, 3), jnp.float32),
            jnp.asarray(rng.randint(0, 10, b)))


def test_cutmix_lambda_is_the_pasted_area():
    images, labels = _batch()
    for seed in range(20):
        mixed, targets, lam = mixup_cutmix(jax.random.key(seed), images, labels, num_classes=10,
                                           mixup_alpha=0.0, cutmix_alpha=1.0,
                                           label_smoothing=0.1)
        np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-6)
        from_flipped = np.all(np.asarray(mixed) == np.asarray(images[::-1]), axis=-1)
        from_self = np.all(np.asarray(mixed) == np.asarray(images), axis=-1)
        assert np.all(from_flipped | from_self)
        # Every sample has the same box: the pasted fraction is 1 - lambda.
        np.testing.assert_allclose(1.0 - from_flipped[0].mean(), lam, atol=1e-6)
        expected = lam * losses.smoothed_one_hot(labels, 10, 0.1) + (1 - lam) * \
            losses.smoothed_one_hot(labels[::-1], 10, 0.1)
        np.testing.assert_allclose(targets, expected, atol=1e-6)


def test_mixup_pairs_with_reversed_batch_and_switches():
    images, labels = _batch(1)
    kinds = []
    for seed in range(40):
        mixed, targets, lam = mixup_cutmix(jax.random.key(seed), images, labels, num_classes=10,
                                           mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
        np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-6)
        blended = lam * images + (1 - lam) * images[::-1]
        kinds.append("mixup" if np.allclose(mixed, blended, atol=1e-6) else "cutmix")
    assert 10 < kinds.count("mixup") < 30  # switch probability 0.5
    mixed, targets, lam = mixup_cutmix(jax.random.key(0), images, labels, num_classes=10,
                                       mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.0)
    assert float(lam) == 1.0 and np.array_equal(mixed, images)


def _timm_cosine(peak, epochs, warmup, t_in_epochs=True):
    """timm's CosineLRScheduler as timm 0.3.2's create_scheduler builds it for main.py."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    return opt, CosineLRScheduler(opt, t_initial=epochs, lr_min=1e-5, warmup_lr_init=1e-6,
                                  warmup_t=warmup, cycle_limit=1, t_in_epochs=t_in_epochs)


@pytest.mark.parametrize("warmup", [3, 0])
def test_lr_schedule_matches_timm_cosine_scheduler_stepped_as_main_py(warmup):
    config = common.base_config()
    config.batch_size, config.num_epochs = 2048, 20.0
    config.optim.warmup_epochs = float(warmup)
    steps_per_epoch = 7
    peak = 5e-4 * 2048 / 512
    schedule = optim.lr_schedule(config, steps_per_epoch)
    config.optim.official_lr_lag = False
    paper = optim.lr_schedule(config, steps_per_epoch)
    opt, timm_sched = _timm_cosine(peak, 20, warmup)
    official = []  # main.py: the lr of epoch e is set by lr_scheduler.step(e - 1) after e - 1
    for epoch in range(25):
        official.append(opt.param_groups[0]["lr"])
        for step in (epoch * steps_per_epoch, epoch * steps_per_epoch + 6):
            np.testing.assert_allclose(float(schedule(step)), official[-1], rtol=1e-5,
                                       err_msg=f"epoch {epoch}")
            np.testing.assert_allclose(float(paper(step)), timm_sched._get_lr(epoch)[0],
                                       rtol=1e-5, err_msg=f"epoch {epoch}")
        timm_sched.step(epoch)
    if warmup:  # epochs 0 and 1 both at warmup_lr; the project's old schedule had f(1) at 1
        assert official[0] == official[1] == 1e-6 < float(paper(steps_per_epoch))
    # The last epoch (19) trains at f(18), epoch 20 (past the end) at f(19): min_lr not reached.
    assert official[20] == pytest.approx(timm_sched._get_lr(19)[0]) and official[20] > 1e-5

    # The official resume quirk: resumed at epoch k, main.py calls lr_scheduler.step(k) before
    # training epoch k, which then runs at f(k), not the uninterrupted run's f(k - 1). The
    # project's schedule is a pure function of the step: resuming changes nothing.
    k = 6
    _, resumed = _timm_cosine(peak, 20, warmup)
    resumed.step(k)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(timm_sched._get_lr(k)[0])
    np.testing.assert_allclose(float(schedule(k * steps_per_epoch)), official[k], rtol=1e-5)
    assert abs(official[k] - timm_sched._get_lr(k)[0]) > 1e-4


def test_per_step_lr_schedule_matches_timm_step_update():
    # per_epoch=False (the quickstart): timm's per-update schedule, step_update(n) after each
    # update, so update k trains at f(k); the official lag does not apply.
    config = common.base_config()
    config.batch_size, config.num_epochs = 2048, 4.0
    config.optim.warmup_epochs, config.optim.per_epoch = 0.5, False
    steps_per_epoch = 6
    schedule = optim.lr_schedule(config, steps_per_epoch)
    opt, timm_sched = _timm_cosine(5e-4 * 2048 / 512, 4 * steps_per_epoch, 3, t_in_epochs=False)
    for update in range(30):
        np.testing.assert_allclose(float(schedule(update)), opt.param_groups[0]["lr"],
                                   rtol=1e-5, err_msg=f"update {update}")
        timm_sched.step_update(update + 1)


def test_weight_decay_mask():
    params = {"cls_token": np.zeros((1, 1, 4)), "dist_token": np.zeros((1, 1, 4)),
              "pos_embed": np.zeros((1, 5, 4)), "head": {"kernel": np.zeros((4, 3)),
                                                         "bias": np.zeros(3)},
              "norm": {"scale": np.zeros(4), "bias": np.zeros(4)},
              "patch_embed": {"proj": {"kernel": np.zeros((2, 2, 3, 4))}}}
    official = optim.decay_mask(params, decay_dist_token=True)
    assert official == {"cls_token": False, "dist_token": True, "pos_embed": False,
                        "head": {"kernel": True, "bias": False},
                        "norm": {"scale": False, "bias": False},
                        "patch_embed": {"proj": {"kernel": True}}}
    assert optim.decay_mask(params, decay_dist_token=False)["dist_token"] is False


def test_configs_build_and_reject_typos():
    import importlib

    for family in ("deit_ti", "deit_s", "deit_b"):
        module = importlib.import_module(f"configs.{family}")
        for arg in (None, "distill=none", "distill=soft", "distill=hard", "res=384",
                    "distill=hard,teacher=precomputed,teacher_logits=/x", "smoke",
                    "distill=hard,smoke"):
            config = module.get_config(arg)
            assert isinstance(config, ml_collections.ConfigDict)
            with pytest.raises(AttributeError):
                config.optim.lrr = 1.0  # locked: a typo fails loudly
        with pytest.raises(ValueError, match="known"):
            module.get_config("distil=hard")
    assert module.get_config("distill=hard").model.name == "deit_base_distilled_patch16_224"
    assert module.get_config("res=384").model.name == "deit_base_patch16_384"
