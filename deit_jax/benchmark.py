"""Throughput of the real pmapped train / eval step on synthetic, device-resident data.

    python -m deit_jax.benchmark --model=deit_tiny_distilled_patch16_224 --batch_size=32 \
        --mode=train [--teacher=regnety_160|precomputed] [--dtype=bfloat16] [--steps=20] \
        [--warmup=3] [--peak_tflops=989] [--attention_impl=cudnn]

Times exactly the function the trainer runs: ``steps.train_step`` (or ``steps.eval_step``) under
``jax.pmap(..., axis_name='batch', donate_argnums=(0,))`` over every local device, the recipe of
``configs.common.base_config()`` (mixup/cutmix, label smoothing, drop path, AdamW, EMA), with a
randomly initialised teacher when ``--teacher`` names a model (hard distillation), or with
``--teacher=precomputed`` the step a precomputed teacher-logits store gives (the batch carries
random ``teacher_logits [devices, per_device, classes]``; no teacher runs). The batch is put on
the devices once, so the figure excludes the input pipeline (and the store's host lookup). The
host waits for the devices only after the warm-up and after the timed steps, never per step.
Prints one JSON line. ``--on_device=true`` (train) feeds uint8 views, so the step includes the
device augmentation (``aug.on_device``); its own FLOPs per image and time per step (jitted
alone on one device's batch) and its share of the step time come with the record.

    python -m deit_jax.benchmark --mode=input --data_dir=ROOT [--on_device=true|false]

times the host side of the training input pipeline instead (``run_input``; TensorFlow is
imported for this mode only).

FLOPs come from XLA's cost analysis of the compiled per-device program (every op: matmuls and
convolutions as 2 per multiply-add, plus elementwise work, the optimizer update and, with a
teacher, the teacher's forward pass), divided by the per-device batch. The teacher's own share is
reported apart in ``teacher_flops_per_image``.

Imports jax, flax, optax, ml_collections and numpy only (no TensorFlow), so it runs on a bare
accelerator image.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from flax import jax_utils

from deit_jax import cli, models, optim, steps
from deit_jax.augment import device as device_aug
from deit_jax.configs import common
from deit_jax.models import ARCH_FIELDS, AXIS
from deit_jax.teacher import Teacher, build_teacher

MODES = ("train", "eval", "input")
# distillation.teacher_logits of a precomputed-teacher benchmark: no store, the logits in the
# batch are made up (the step's cost does not depend on them).
SYNTHETIC_LOGITS = "<synthetic>"


def build_config(model: str, batch_size: int, *, teacher: str = "", distillation: str = "hard",
                 dtype: str = "float32", attention_impl: str = "xla", num_classes: int = 1000,
                 on_device: bool = False, **arch: int | None) -> ml_collections.ConfigDict:
    """The full recipe for ``model`` at global ``batch_size``; ``arch`` overrides ``config.model``
    fields (``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``; None = the
    registry's)."""
    c = common.base_config()
    c.model.name = model
    c.model.dtype = dtype
    c.model.attention_impl = attention_impl
    for key, value in arch.items():
        c.model[key] = value
    c.dataset.name = "synthetic"
    c.dataset.num_classes = num_classes
    # True: the batch holds uint8 views and the step runs the device augmentation.
    c.aug.on_device = on_device
    c.batch_size = batch_size
    c.eval_batch_size = batch_size
    if teacher:
        if distillation not in ("hard", "soft"):
            raise ValueError(f"distillation must be hard or soft with a teacher, got "
                             f"{distillation!r}")
        c.distillation.kind = distillation
        if teacher == "precomputed":
            c.distillation.teacher_logits = SYNTHETIC_LOGITS  # made up by the benchmark
        else:
            c.distillation.teacher = teacher
            c.distillation.random_teacher = True  # weights do not change the cost
            c.distillation.teacher_dtype = dtype
    else:
        c.distillation.kind = "none"
    return c


def _cost_flops(compiled) -> float | None:
    """Total ``flops`` of a compiled executable's cost analysis (None when the backend has none)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def _peak_memory_bytes(devices: Sequence[jax.Device]) -> int | None:
    """Largest ``peak_bytes_in_use`` over ``devices``; None where the backend keeps no stats."""
    peaks = []
    for device in devices:
        try:
            stats = device.memory_stats()
        except Exception:  # some backends raise instead of returning None
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def _shard(x: np.ndarray) -> jax.Array:
    """``[devices, ...]`` host array -> one shard per local device, laid out as pmap expects."""
    return jax.pmap(lambda a: a)(x)


def synthetic_batch(config: ml_collections.ConfigDict, image_size: int, devices: int,
                    mode: str) -> dict[str, jax.Array]:
    """A device-resident batch: images ``[devices, per_device, H, W, 3]``, labels (and mask)."""
    if config.batch_size % devices:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by {devices} devices")
    per_device = config.batch_size // devices
    rng = np.random.default_rng(config.seed)
    shape = (devices, per_device)
    if mode == "train" and config.aug.on_device:  # the host's uint8 crops
        image = rng.integers(0, 256, (*shape, image_size, image_size, 3), dtype=np.uint8)
    else:  # normalised float32: taken as finished (no normalise/erasing, as timm's step)
        image = rng.standard_normal((*shape, image_size, image_size, 3), dtype=np.float32)
    batch = {
        "image": image,
        "label": rng.integers(0, config.dataset.num_classes, shape, dtype=np.int32)}
    if mode == "eval":
        batch["mask"] = np.ones(shape, np.float32)
    if mode == "train" and config.distillation.teacher_logits:
        batch["teacher_logits"] = rng.standard_normal((*shape, config.dataset.num_classes),
                                                      dtype=np.float32)
    return {k: _shard(v) for k, v in batch.items()}


def _augment_cost(config: ml_collections.ConfigDict, per_device: int, image_size: int,
                  steps_timed: int) -> dict[str, float | None]:
    """The device augmentation alone (``augment.device.augment_batch`` on one device's batch,
    jitted): XLA's FLOPs per image and its time per step, for its share of the step."""
    aug = device_aug.DeviceAugment.from_config(config.aug)
    fn = jax.jit(functools.partial(device_aug.augment_batch, augment=aug))
    images = jnp.asarray(np.random.default_rng(0).integers(
        0, 256, (per_device, image_size, image_size, 3), dtype=np.uint8))
    args = (jax.random.key(0), images, jnp.arange(per_device))
    compiled = fn.lower(*args).compile()
    flops = _cost_flops(compiled)
    jax.block_until_ready(compiled(*args))
    start = time.perf_counter()
    outs = [compiled(*args) for _ in range(steps_timed)]
    jax.block_until_ready(outs)
    return {"augment_flops_per_image": None if flops is None else flops / per_device,
            "augment_ms_per_step": 1e3 * (time.perf_counter() - start) / steps_timed}


def run(config: ml_collections.ConfigDict, *, mode: str = "train", steps_timed: int = 10,
        warmup: int = 2, peak_tflops: float = 0.0) -> dict[str, Any]:
    """Compiles and times the pmapped step of ``config``; returns the result record.

    Args:
      config: a ``base_config()``-shaped config (``build_config`` makes one).
      mode: 'train' (``steps.train_step``) or 'eval' (``steps.eval_step``).
      steps_timed: steps in the timed region.
      warmup: steps run (and waited for) after compilation, before timing.
      peak_tflops: per-device peak for the dtype, for MFU; 0 = no MFU.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if steps_timed < 1 or warmup < 0:
        raise ValueError("steps must be >= 1 and warmup >= 0")
    devices = jax.local_devices()
    n_dev = len(devices)
    num_classes = config.dataset.num_classes
    model, image_size = models.from_config(config, num_classes)
    tx, lr_fn = optim.create_optimizer(config, steps_per_epoch=1000)
    state = steps.create_train_state(model, tx, jax.random.key(config.seed), image_size,
                                     ema=config.ema.enabled)
    batch = synthetic_batch(config, image_size, n_dev, mode)
    per_device = config.batch_size // n_dev

    teacher = Teacher()
    teacher_flops = None
    if mode == "train" and config.distillation.teacher_logits == SYNTHETIC_LOGITS:
        teacher = Teacher(precomputed=True)  # the store's step, without a store
    elif mode == "train":
        teacher = build_teacher(config, model, num_classes, image_size)
    if teacher.model is not None:
        # The teacher's share of the step: its forward pass alone, on one device's batch.
        t_images = jnp.zeros((per_device, image_size, image_size, 3), jnp.float32)
        t_fwd = jax.jit(functools.partial(teacher.model.apply, train=False)).lower(
            teacher.variables, t_images)
        t_flops = _cost_flops(t_fwd.compile())
        teacher_flops = None if t_flops is None else t_flops / per_device

    if mode == "train":
        p_step = jax.pmap(
            steps.train_step_from_config(config, model=model, tx=tx, lr_fn=lr_fn,
                                         teacher=teacher),
            axis_name=AXIS, donate_argnums=(0,))
        state_r = jax_utils.replicate(state)
        teacher_vars = jax_utils.replicate(teacher.variables) if teacher.model else None
        args = (state_r, batch, teacher_vars)
    else:
        p_step = jax.pmap(functools.partial(steps.eval_step, model=model), axis_name=AXIS)
        args = (jax_utils.replicate(state.params), jax_utils.replicate(state.batch_stats), batch)
    del state

    start = time.perf_counter()
    compiled = p_step.lower(*args).compile()
    compile_seconds = time.perf_counter() - start
    step_flops = _cost_flops(compiled)

    def call(args):
        if mode == "train":
            state_r, metrics = compiled(*args)
            return (state_r, *args[1:]), metrics
        return args, compiled(*args)

    for _ in range(warmup):
        args, out = call(args)
    jax.block_until_ready((args, out) if warmup else args)

    outputs = []
    load = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps_timed):
        args, out = call(args)
        outputs.append(out)  # eval steps are independent: wait for all of them, once
    jax.block_until_ready((args, outputs))
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start

    augment = (_augment_cost(config, per_device, image_size, steps_timed)
               if mode == "train" and config.aug.on_device else {})
    images_per_sec = config.batch_size * steps_timed / seconds
    flops_per_image = None if step_flops is None else step_flops / per_device
    mfu = None
    if peak_tflops and flops_per_image is not None:
        mfu = flops_per_image * images_per_sec / (peak_tflops * 1e12 * n_dev)
    return {
        "framework": "jax",
        "model": config.model.name,
        "mode": mode,
        "dtype": config.model.dtype,
        "teacher": ("precomputed" if teacher.precomputed else
                    config.distillation.teacher if teacher.model else None),
        "distillation": config.distillation.kind if mode == "train" else None,
        "attention_impl": config.model.attention_impl,
        "img_size": image_size,
        "devices": n_dev,
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "batch_size": config.batch_size,
        "per_device_batch": per_device,
        "steps": steps_timed,
        "warmup": warmup,
        "images_per_sec": images_per_sec,
        "ms_per_step": 1e3 * seconds / steps_timed,
        # Host CPU time of all threads: on a shared CPU host, less noisy than wall time.
        "cpu_seconds_per_step": cpu_seconds / steps_timed,
        "loadavg_1min": load,
        "compile_seconds": compile_seconds,
        "flops_per_image": flops_per_image,
        "flops_source": "xla_cost_analysis: whole per-device step (incl. teacher forward, "
                        "mixup, optimizer) / per-device batch",
        "teacher_flops_per_image": teacher_flops,
        "peak_tflops": peak_tflops or None,
        "mfu": mfu,
        "peak_memory_bytes": _peak_memory_bytes(devices),
        "on_device_aug": bool(config.aug.on_device) if mode == "train" else None,
        **augment,
        "augment_step_share": (augment["augment_ms_per_step"] / (1e3 * seconds / steps_timed)
                               if augment else None),
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
    }


def run_input(data_dir: str, *, on_device: bool = True, images: int = 512,
              batch_size: int = 64, warmup: int = 2, image_size: int = 224,
              seed: int = 0, host_resize: str = "pil",
              host_library: str = "pillow") -> dict[str, Any]:
    """Times the host side of the training input pipeline over the ImageFolder ``data_dir``.

    ``input_pipeline.train_batches`` with the full recipe (``base_config``'s aug) and
    ``aug.on_device``: True = decode, RandomResizedCrop + flip, uint8 hand-over (the step does
    the rest); False = every PIL op on the host (crop, flip, RandAugment; the step normalises
    and erases); ``host_resize`` is ``aug.host_resize`` (the crop's resize) and
    ``host_library`` ``aug.host_library`` (which library runs the PIL ops). One process, one
    device's layout; ``images`` are timed after ``warmup`` batches (tf.data start-up, tracing).
    """
    # TensorFlow only here: the step benchmarks must run on images without it.
    from deit_jax import input_pipeline

    if images < batch_size:
        raise ValueError(f"--images={images} must be at least --batch_size={batch_size}")
    c = common.base_config()
    c.seed = seed
    c.dataset.name = "imagefolder"
    c.dataset.data_dir = data_dir
    c.aug.on_device = on_device
    c.aug.host_resize = host_resize
    c.aug.host_library = host_library
    # Keep every full batch of a small benchmark folder (the official sampler's N // 256 * 256
    # epoch would keep none of fewer than 256 files); the per-image work is the same.
    c.aug.ra_multiple = 1
    source = input_pipeline.get_source(c, "train", image_size)
    layout = input_pipeline.Layout(batch_size, 0, 1, 1)
    batches = input_pipeline.train_batches(c, source, layout, image_size=image_size)
    for _ in range(warmup):
        next(batches)
    steps_timed = images // batch_size
    load = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps_timed):
        batch = next(batches)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    n = steps_timed * batch_size
    return {"framework": "deit_jax", "mode": "input", "on_device": on_device,
            "host_resize": host_resize, "host_library": host_library,
            "image_dtype": str(batch["image"].dtype), "images": n,
            "batch_size": batch_size,
            "images_per_sec": n / seconds, "cpu_ms_per_image": 1e3 * cpu_seconds / n,
            "cpus": len(os.sched_getaffinity(0)), "loadavg_1min": load}


def define_flags(flag_values: flags.FlagValues, argv: list[str] | None = None) -> None:
    """The benchmark's flags (``argv`` unused: no ``--config``)."""
    del argv
    fv = dict(flag_values=flag_values)
    flags.DEFINE_enum("model", "deit_tiny_distilled_patch16_224", list(models.MODEL_NAMES),
                      "Model name.", **fv)
    flags.DEFINE_integer("batch_size", 128, "Global, over all local devices.", **fv)
    flags.DEFINE_enum("mode", "train", list(MODES), "What is timed.", **fv)
    flags.DEFINE_string("teacher", "", "Teacher model name (random weights); 'precomputed' = "
                        "logits in the batch (a teacher-logits store's step); '' = no teacher, "
                        "distillation.kind='none'.", **fv)
    flags.DEFINE_enum("distillation", "hard", ["hard", "soft"],
                      "The distillation kind when --teacher is given.", **fv)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.", **fv)
    flags.DEFINE_integer("steps", 10, "Timed steps.", **fv)
    flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.", **fv)
    flags.DEFINE_float("peak_tflops", 0.0, "Per-device peak TFLOP/s for --dtype (for MFU); "
                       "0 = no MFU.", **fv)
    flags.DEFINE_enum("attention_impl", "xla", ["xla", "cudnn"], "Attention implementation.",
                      **fv)
    flags.DEFINE_integer("num_classes", 1000, "Classes of the synthetic labels.", **fv)
    flags.DEFINE_integer("cpu_devices", 0, "On the CPU: this many XLA devices "
                         "(jax_num_cpu_devices), the step pmapped over them and the batch split; "
                         "0 = JAX's default (1). With 2 on 2 cores DeiT-Ti's step ran 1.3x "
                         "faster, but jax 0.10.2's in-process all-reduce can deadlock "
                         "(docs/PERFORMANCE.md).", **fv)
    for key in ARCH_FIELDS:
        flags.DEFINE_integer(key, None, "DeiT override; unset = the model's.", **fv)
    flags.DEFINE_integer("seed", 0, "Seed of the synthetic batch and the initialisation.", **fv)
    flags.DEFINE_string("data_dir", "", "--mode=input: an ImageFolder root (train/).", **fv)
    flags.DEFINE_enum("on_device", None, ["true", "false"],
                      "aug.on_device. --mode=input (default true): the host side of that path is "
                      "timed. --mode=train (default false): true = uint8 views augmented in the "
                      "step, with the augmentation's FLOPs and step-time share.", **fv)
    flags.DEFINE_integer("images", 512, "--mode=input: images timed.", **fv)
    flags.DEFINE_enum("host_resize", "pil", ["pil", "fast"],
                      "--mode=input: aug.host_resize, the crop's resize on the host.", **fv)
    flags.DEFINE_enum("host_library", "pillow", ["pillow", "tensorflow"],
                      "--mode=input: aug.host_library, which library computes the host's "
                      "PIL ops (the crop's 'pil' resize, flip; RandAugment with "
                      "--on_device=false).", **fv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark that ``argv`` (flags, no program name; default ``sys.argv[1:]``)
    describes; prints and returns its JSON record."""
    a = cli.parse(define_flags, sys.argv[1:] if argv is None else argv,
                  "python -m deit_jax.benchmark", __doc__)
    if a.mode == "input":
        if not a.data_dir:
            raise SystemExit("--mode=input needs --data_dir=ROOT (an ImageFolder with train/; "
                             "benchmarks/input_make_data.py makes one)")
        result = run_input(a.data_dir, on_device=a.on_device != "false", images=a.images,
                           batch_size=a.batch_size, warmup=a.warmup, seed=a.seed,
                           image_size=a.img_size or 224, host_resize=a.host_resize,
                           host_library=a.host_library)
        print(json.dumps(result), flush=True)
        return result
    if a.cpu_devices < 0:
        raise SystemExit(f"--cpu_devices={a.cpu_devices}: give 0 (JAX's default) or a count")
    if a.cpu_devices:  # before the first computation: it sizes the CPU client when it starts
        jax.config.update("jax_num_cpu_devices", a.cpu_devices)
    arch = {k: a[k].value for k in ARCH_FIELDS if a[k].value is not None}
    if arch and not models.is_deit(a.model):
        raise SystemExit(f"--{next(iter(arch))} applies to DeiT models only")
    config = build_config(a.model, a.batch_size, teacher=a.teacher, distillation=a.distillation,
                          dtype=a.dtype, attention_impl=a.attention_impl,
                          num_classes=a.num_classes, on_device=a.on_device == "true", **arch)
    config.seed = a.seed
    result = run(config, mode=a.mode, steps_timed=a.steps, warmup=a.warmup,
                 peak_tflops=a.peak_tflops)
    print(json.dumps(result), flush=True)
    return result


def console() -> None:
    """The console entry point ``deit-benchmark``."""
    from deit_jax.errors import exit_on_user_error

    exit_on_user_error(main)()


if __name__ == "__main__":
    console()
