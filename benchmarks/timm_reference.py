"""The same measurement as ``deit_jax.benchmark``, for timm's model in PyTorch.

    python benchmarks/timm_reference.py --model=deit_tiny_distilled_patch16_224 --batch_size=32 \
        --mode=train [--teacher=regnety_160] [--compile] [--dtype=bfloat16] [--steps=10]

A training step is the official DeiT one: timm ``Mixup`` (mixup 0.8 / cutmix 1.0, switch 0.5,
label smoothing 0.1, 'batch' mode) on the device, ``SoftTargetCrossEntropy`` on the cls head,
with a teacher hard distillation (cross-entropy of the dist head against the teacher's argmax,
teacher in eval mode under ``no_grad``), ``(1 - alpha) * base + alpha * kd`` with alpha 0.5,
drop path 0.1, AdamW (timm's ``create_optimizer_v2``: no decay on biases, norms and tokens,
weight decay 0.05) and the EMA update (``ModelEmaV3``, decay 0.99996). bfloat16 autocast on GPU
with ``--dtype=bfloat16``. ``--compile`` wraps the student (and the teacher) in ``torch.compile``
as timm's ``--torchcompile`` does. The synthetic batch lives on the device; the host
synchronises only after the warm-up and after the timed steps.

``flops_per_image`` comes from ``torch.utils.flop_counter.FlopCounterMode`` over one eager step
(forward, backward and the teacher's forward) run with timm's explicit-matmul attention (the
counter does not see the fused CPU attention kernel): it counts matmuls, convolutions and
attention only (2 per multiply-add), no elementwise work or optimizer update, so it reads a few
percent lower than XLA's count of the same step. A test-only dependency: the library never imports
torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch.utils.flop_counter import FlopCounterMode

ALPHA = 0.5  # distillation.alpha of the recipe
DROP_PATH = 0.1
EMA_DECAY = 0.99996


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(model_name: str, batch_size: int, *, mode: str = "train", teacher_name: str = "",
        dtype: str = "float32", compile_model: bool = False, steps: int = 10, warmup: int = 2,
        peak_tflops: float = 0.0, num_classes: int = 1000, img_size: int = 224,
        threads: int = 0, count_flops: bool = True, **arch: int) -> dict[str, Any]:
    """Times ``steps`` training (or inference) steps of timm's ``model_name``; the record.

    ``arch``: timm constructor overrides (``depth``, ``patch_size``, ``embed_dim``,
    ``num_heads``; 0 = the model's), as ``deit_jax.benchmark``'s flags of the same names.
    """
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    arch = {k: v for k, v in arch.items() if v}
    model = timm.create_model(model_name, num_classes=num_classes, drop_path_rate=DROP_PATH,
                              img_size=img_size, **arch).to(device)
    distilled = hasattr(model, "set_distilled_training")
    if distilled:
        model.set_distilled_training(True)
    teacher = None
    if teacher_name and mode == "train":
        if not distilled:
            raise ValueError(f"--teacher needs a distilled student; {model_name} has no dist head")
        teacher = timm.create_model(teacher_name, num_classes=num_classes).to(device).eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    images = torch.randn(batch_size, 3, img_size, img_size, device=device)
    labels = torch.randint(0, num_classes, (batch_size,), device=device)
    base_criterion = SoftTargetCrossEntropy()
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                  label_smoothing=0.1, num_classes=num_classes)

    if mode == "train":
        model.train()
        optimizer = create_optimizer_v2(model, opt="adamw", lr=5e-4 * batch_size / 512,
                                        weight_decay=0.05)
        ema = ModelEmaV3(model, decay=EMA_DECAY)

        def step(student, teach):
            # Mixup works in place on its input, as on a fresh loader batch in the official loop.
            samples, targets = mixup(images.clone(), labels)
            with autocast:
                outputs = student(samples)
                cls_out, dist_out = outputs if isinstance(outputs, tuple) else (outputs, None)
                loss = base_criterion(cls_out, targets)
                if teach is not None:
                    with torch.no_grad():
                        teacher_out = teach(samples)
                    kd = F.cross_entropy(dist_out, teacher_out.argmax(dim=1))
                    loss = loss * (1 - ALPHA) + kd * ALPHA
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ema.update(model)
            return loss
    else:
        model.eval()

        def step(student, teach):
            with torch.inference_mode(), autocast:
                return student(images).argmax(dim=1)

    flops_per_image = None
    if count_flops:
        # FlopCounterMode does not see the fused CPU attention kernel: count one step with
        # timm's explicit-matmul attention (same arithmetic), then switch fusion back on.
        fused = [m for m in model.modules() if getattr(m, "fused_attn", False)]
        for m in fused:
            m.fused_attn = False
        counter = FlopCounterMode(display=False)
        with counter:
            step(model, teacher)
        _sync(device)
        for m in fused:
            m.fused_attn = True
        flops_per_image = counter.get_total_flops() / batch_size

    student, teach = model, teacher
    if compile_model:
        student = torch.compile(model)
        teach = torch.compile(teacher) if teacher is not None else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # The first step compiles (torch.compile) or warms up lazily initialised state.
    start = time.perf_counter()
    step(student, teach)
    _sync(device)
    compile_seconds = time.perf_counter() - start
    for _ in range(warmup):
        step(student, teach)
    _sync(device)

    load = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step(student, teach)
    _sync(device)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start

    images_per_sec = batch_size * steps / seconds
    mfu = None
    if peak_tflops and flops_per_image is not None:
        mfu = flops_per_image * images_per_sec / (peak_tflops * 1e12)
    return {
        "framework": "torch_compile" if compile_model else "torch_eager",
        "model": model_name,
        "mode": mode,
        "dtype": dtype,
        "teacher": teacher_name if teacher is not None else None,
        "distillation": ("hard" if teacher is not None else "none") if mode == "train" else None,
        "attention_impl": "sdpa" if getattr(model.blocks[0].attn, "fused_attn", False)
        else "eager",
        "img_size": img_size,
        "arch_overrides": arch or None,
        "devices": 1,
        "platform": device.type,
        "device_kind": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else "cpu"),
        "batch_size": batch_size,
        "per_device_batch": batch_size,
        "steps": steps,
        "warmup": warmup,
        "images_per_sec": images_per_sec,
        "ms_per_step": 1e3 * seconds / steps,
        "cpu_seconds_per_step": cpu_seconds / steps,
        "loadavg_1min": load,
        "compile_seconds": compile_seconds,
        "flops_per_image": flops_per_image,
        "flops_source": "torch FlopCounterMode: matmul/conv/attention of one eager step "
                        "(fwd + bwd + teacher fwd), no elementwise or optimizer",
        "peak_tflops": peak_tflops or None,
        "mfu": mfu,
        "peak_memory_bytes": (torch.cuda.max_memory_allocated(device)
                              if device.type == "cuda" else None),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_tiny_distilled_patch16_224")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--mode", default="train", choices=("train", "eval"))
    p.add_argument("--teacher", default="")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--compile", action="store_true", help="torch.compile student and teacher")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak_tflops", type=float, default=0.0)
    p.add_argument("--num_classes", type=int, default=1000)
    p.add_argument("--img_size", type=int, default=224)
    for key in ("patch_size", "embed_dim", "depth", "num_heads"):
        p.add_argument(f"--{key}", type=int, default=0, help="timm override; 0 = the model's")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = default")
    p.add_argument("--no_flops", action="store_true", help="skip the FLOP-counting step")
    a = p.parse_args(argv)
    result = run(a.model, a.batch_size, mode=a.mode, teacher_name=a.teacher, dtype=a.dtype,
                 compile_model=a.compile, steps=a.steps, warmup=a.warmup,
                 peak_tflops=a.peak_tflops, num_classes=a.num_classes, img_size=a.img_size,
                 threads=a.threads, count_flops=not a.no_flops,
                 **{k: getattr(a, k) for k in ("patch_size", "embed_dim", "depth", "num_heads")})
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
