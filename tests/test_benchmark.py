"""The throughput benchmark: real pmapped steps on a tiny DeiT, FLOPs against a hand count."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from deit_jax import benchmark

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A one-block DeiT-Ti on 64x64 images in 8x8 patches: 64 patches + cls + dist = 66 tokens, so
# the matmuls dominate the step as they do at full size, and it compiles in seconds.
TINY = dict(img_size=64, patch_size=8, embed_dim=192, depth=1, num_heads=3, num_classes=10)
FIELDS = ("model", "mode", "dtype", "devices", "platform", "batch_size", "images_per_sec",
          "ms_per_step", "compile_seconds", "flops_per_image", "mfu", "peak_memory_bytes")


def vit_flops(*, img_size, patch_size, embed_dim, depth, num_classes, prefix_tokens=2,
              mlp_ratio=4, train=False, **_):
    """FLOPs per image of a ViT/DeiT (a multiply-add = 2), matmuls and convolutions only.

    Per block on n tokens of width d: qkv 6nd^2, q.k^T and attn.v 2 * 2n^2d, proj 2nd^2,
    MLP 2 * 2nd^2 * mlp_ratio. Patch embedding: 2 * patches * (3 p^2) * d. One head per prefix
    token (cls, dist): 2 d C each. Training is 3x the forward (each matmul has two backward
    matmuls), except the patch embedding, whose input gradient nobody needs (2x).
    """
    patches = (img_size // patch_size) ** 2
    n, d = patches + prefix_tokens, embed_dim
    block = 6 * n * d * d + 4 * n * n * d + 2 * n * d * d + 4 * n * d * d * mlp_ratio
    embed = 2 * patches * 3 * patch_size**2 * d
    heads = 2 * d * num_classes * prefix_tokens
    forward = embed + depth * block + heads
    return 3 * forward - embed if train else forward


def _flags(**kw):
    return [f"--{k}={v}" for k, v in kw.items()]


def _run(capsys, **kw):
    result = benchmark.main(_flags(model="deit_tiny_distilled_patch16_224", batch_size=32,
                                   steps=2, warmup=1, **TINY, **kw))
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == result  # exactly one JSON line, the returned record
    return result


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_benchmark_record(capsys, mode):
    r = _run(capsys, mode=mode, peak_tflops=1.0)
    for field in FIELDS:
        assert field in r, field
    assert r["mode"] == mode and r["platform"] == "cpu" and r["devices"] == 8
    assert r["batch_size"] == 32 and r["per_device_batch"] == 4
    assert r["images_per_sec"] > 0 and r["ms_per_step"] > 0 and r["compile_seconds"] > 0
    assert r["images_per_sec"] == pytest.approx(32e3 / r["ms_per_step"])
    expected = vit_flops(**TINY, train=mode == "train")
    # XLA also counts elementwise work, mixup and the optimizer update: a few percent over.
    assert abs(r["flops_per_image"] / expected - 1) < 0.3, (r["flops_per_image"], expected)
    achieved = r["flops_per_image"] * r["images_per_sec"]
    assert r["mfu"] == pytest.approx(achieved / (1e12 * 8))
    assert r["peak_memory_bytes"] is None or r["peak_memory_bytes"] > 0


def test_teacher_kinds_cost_what_they_run(capsys):
    """An on-the-fly teacher adds its forward to the step; precomputed logits add almost none."""
    none = _run(capsys, mode="train")
    fly = _run(capsys, mode="train", teacher="regnety_002")
    pre = _run(capsys, mode="train", teacher="precomputed")
    assert (none["teacher"], fly["teacher"], pre["teacher"]) == (None, "regnety_002",
                                                                "precomputed")
    assert fly["teacher_flops_per_image"] > 0.1 * none["flops_per_image"]
    assert fly["flops_per_image"] == pytest.approx(
        none["flops_per_image"] + fly["teacher_flops_per_image"], rel=0.02)
    assert pre["teacher_flops_per_image"] is None
    # Mixing the stored probabilities (softmax, log over 10 classes) is all the extra work.
    assert pre["flops_per_image"] == pytest.approx(none["flops_per_image"], rel=0.01)


def test_flop_formula_matches_the_paper():
    # DeiT-Ti forward at 224 (distilled: 198 tokens): the paper's 2.5 GFLOPs (1.3 GMACs).
    ti = vit_flops(img_size=224, patch_size=16, embed_dim=192, depth=12, num_classes=1000)
    assert ti / 1e9 == pytest.approx(2.5, rel=0.05)


def test_build_config_teacher_sets_hard_distillation():
    c = benchmark.build_config("deit_tiny_distilled_patch16_224", 64, teacher="regnety_002")
    assert (c.distillation.kind, c.distillation.teacher) == ("hard", "regnety_002")
    assert c.distillation.random_teacher and c.mixup.prob == 1.0
    assert benchmark.build_config("deit_tiny_patch16_224", 64).distillation.kind == "none"
    pre = benchmark.build_config("deit_tiny_distilled_patch16_224", 64, teacher="precomputed")
    assert pre.distillation.kind == "hard"
    assert pre.distillation.teacher_logits == benchmark.SYNTHETIC_LOGITS


def test_import_pulls_in_no_tensorflow_or_torch():
    code = ("import sys, deit_jax.benchmark; "
            "bad = [m for m in ('tensorflow', 'tensorflow_datasets', 'clu', 'torch') "
            "if m in sys.modules]; assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env, timeout=120)


def test_cpu_devices_flag_sets_the_device_count():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # not conftest's 8 devices
    out = subprocess.run([sys.executable, "-m", "deit_jax.benchmark", "--cpu_devices=2",
                          "--batch_size=4", "--steps=1", "--warmup=0",
                          *_flags(**TINY)], check=True, cwd=ROOT, env=env,
                         timeout=300, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["devices"] == 2 and r["per_device_batch"] == 2 and r["images_per_sec"] > 0


def test_timm_reference_same_fields():
    spec = importlib.util.spec_from_file_location("timm_reference",
                                                  ROOT / "benchmarks" / "timm_reference.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    r = ref.run("deit_tiny_distilled_patch16_224", 8, steps=1, warmup=0, peak_tflops=1.0,
                **TINY)
    for field in FIELDS:
        assert field in r, field
    assert r["images_per_sec"] > 0
    # The counter sees matmuls and convolutions only: the hand count, nearly exactly.
    assert r["flops_per_image"] == pytest.approx(vit_flops(**TINY, train=True), rel=0.02)
