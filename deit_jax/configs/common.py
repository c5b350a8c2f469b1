"""The DeiT recipe shared by every config family, and the ``:arg`` variant parser.

Numbers are the paper's Table 9 and the official code's defaults (../shared/DEIT_REFERENCE.md).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

DISTILLED = {"ti": "deit_tiny_distilled_patch16_224", "s": "deit_small_distilled_patch16_224",
             "b": "deit_base_distilled_patch16_224"}
PLAIN = {"ti": "deit_tiny_patch16_224", "s": "deit_small_patch16_224",
         "b": "deit_base_patch16_224"}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """``'distill=hard,smoke'`` -> {distill: 'hard', smoke: True} over ``defaults``.

    A bare word sets a boolean flag; values are cast to the type of the default. Unknown
    keys are an error that lists the known ones.
    """
    out = dict(defaults)
    for part in filter(None, (arg or "").split(",")):
        key, _, value = part.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config variant {key!r}; known: {sorted(defaults)}")
        default = defaults[key]
        if not value:
            out[key] = True
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = type(default)(value)
    return ml_collections.ConfigDict(out)


def base_config() -> ml_collections.ConfigDict:
    """The full ImageNet-1k DeiT recipe (official defaults)."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "deit_small_patch16_224"
    c.model.drop_path_rate = 0.1
    # Compute dtype; parameters stay float32.
    c.model.dtype = "float32"
    # Architecture overrides for small experiments (DeiT models; None = the registry's value).
    # img_size is also the input resolution of a RegNetY (None: 224).
    for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads"):
        c.model[key] = config_dict.placeholder(int)
    # 'xla' = XLA's attention; 'cudnn' = cuDNN flash attention on NVIDIA GPUs.
    c.model.attention_impl = "xla"

    c.dataset = ml_collections.ConfigDict()
    # A TFDS name (prepared as ArrayRecord), 'imagefolder' (official --data-path layout),
    # 'fashion_mnist' (offline) or 'synthetic'.
    c.dataset.name = "imagenet2012"
    c.dataset.data_dir = ""
    c.dataset.train_split = "train"
    c.dataset.eval_split = "validation"
    c.dataset.num_classes = 1000
    c.dataset.download = False
    c.dataset.synthetic_train_size = 0
    c.dataset.synthetic_eval_size = 0
    # Undecodable files: False = log, count and replace/mask them; True = stop with the path.
    c.dataset.strict_decoding = False
    # Extra evaluation sets, TFDS 'name[/config][:split]', comma-separated, e.g.
    # 'imagenet_v2/matched-frequency:test,imagenet2012_real:validation'.
    c.dataset.extra_eval = ""

    c.aug = ml_collections.ConfigDict()
    # True: the host decodes, crops and flips and hands over uint8 views; RandAugment (or colour
    # jitter), normalisation and random erasing run on the device inside the train step (fast,
    # same distributions). False: every PIL op on the host (crop, flip, RandAugment or jitter:
    # PIL-exact pixels), handed over as uint8; the step normalises and erases.
    c.aug.on_device = True
    c.aug.scale = (0.08, 1.0)
    c.aug.ratio = (3 / 4, 4 / 3)
    c.aug.hflip = 0.5
    c.aug.auto_augment = "rand-m9-mstd0.5-inc1"
    c.aug.color_jitter = 0.3  # only used when auto_augment is ''
    c.aug.interpolation = "bicubic"
    # How the RandomResizedCrop window is resized on the host: 'pil' = PIL's antialiased
    # two-pass resize (PIL's pixels, the official recipe's); 'fast' = one bicubic pass without
    # antialiasing (big_vision's inception crop; ~1.5x less host CPU per image, aliased when a
    # crop is downscaled). docs/PERFORMANCE.md has the figures.
    c.aug.host_resize = "pil"
    # Which library computes the host's pixels (the crop's 'pil' resize and flip; with
    # aug.on_device=False also RandAugment): 'pillow' = Pillow's own ops (PIL's pixels by
    # construction, about half the host CPU of 'tensorflow'; its Python part holds the GIL) or
    # 'tensorflow' = the same ops as TF graph ops (no Python; resize PIL's to ~1 grey level).
    c.aug.host_library = "pillow"
    c.aug.re_prob = 0.25
    c.aug.re_mode = "pixel"
    c.aug.re_count = 1
    # Repeats per image (the official RASampler in a distributed run, the paper's recipe); 1 =
    # no repeats, as the official DistributedSampler, or RandomSampler in a single process.
    c.aug.repeated_aug = 3
    # With repeats an epoch keeps len(train) // ra_multiple * ra_multiple samples (the official
    # RASampler's 256); 1 = all up to the last full batch. Same steps when 256 divides the batch.
    c.aug.ra_multiple = 256
    c.aug.eval_crop_ratio = 0.875
    # DeiT III (official --ThreeAugment, --src): crop + flip, then one of grayscale /
    # solarisation / Gaussian blur, then colour jitter (aug.color_jitter); replaces RandAugment
    # and erasing. simple_random_crop: Resize + RandomCrop(padding 4, reflect) for the RRC.
    c.aug.three_augment = False
    c.aug.simple_random_crop = False

    c.mixup = ml_collections.ConfigDict()
    c.mixup.mixup_alpha = 0.8
    c.mixup.cutmix_alpha = 1.0
    c.mixup.switch_prob = 0.5
    c.mixup.prob = 1.0
    c.mixup.label_smoothing = 0.1

    c.loss = ml_collections.ConfigDict()
    c.loss.kind = "ce"  # 'ce' (DeiT: soft-target cross-entropy) | 'bce' (DeiT III --bce-loss)
    # bce: targets > threshold become 1 (official: targets.gt(0.0)); < 0 keeps soft targets.
    c.loss.bce_target_threshold = 0.0

    c.distillation = ml_collections.ConfigDict()
    c.distillation.kind = "none"  # 'none' | 'soft' | 'hard'
    c.distillation.alpha = 0.5
    c.distillation.tau = 1.0
    c.distillation.kd_reduction = "numel"  # official; 'batchmean' is the common alternative
    # The teacher model's name; run on the fly from the variables in teacher_init (a converted
    # checkpoint or a teacher's workdir), unless teacher_logits names a precomputed store.
    c.distillation.teacher = "regnety_160"
    c.distillation.teacher_init = ""
    # True: random teacher weights when teacher_init is empty (smoke tests, benchmarks only).
    c.distillation.random_teacher = False
    # A store written by `python -m deit_jax.teacher_logits` ('' = run the teacher on the fly).
    c.distillation.teacher_logits = ""
    c.distillation.teacher_dtype = "float32"

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr = 5e-4  # scaled by batch_size / 512
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.05
    c.optim.decay_dist_token = True  # the official code decays it; current timm does not
    c.optim.warmup_epochs = 5.0
    c.optim.warmup_lr = 1e-6
    c.optim.min_lr = 1e-5
    c.optim.per_epoch = True  # the official code steps the schedule once per epoch
    # Official: main.py steps the scheduler after each epoch, so epoch e trains at f(e - 1)
    # (epochs 0 and 1 at warmup_lr). False: epoch e at f(e), as the paper's text reads.
    # Applies to per_epoch schedules only (optim.lr_schedule).
    c.optim.official_lr_lag = True
    c.optim.clip_grad = 0.0  # 0 = no clipping (official)
    c.optim.grad_accum_steps = 1

    c.ema = ml_collections.ConfigDict()
    c.ema.enabled = True
    c.ema.decay = 0.99996

    c.batch_size = 1024  # global, repeats counted
    c.eval_batch_size = 1024
    c.num_epochs = 300.0
    c.max_steps = 0  # > 0 stops early (tests, smoke runs); the schedule still uses num_epochs
    c.log_every_steps = 100
    c.eval_every_epochs = 10.0
    c.checkpoint_every_steps = 5000
    c.keep_checkpoints = 3
    # A newest checkpoint that does not restore (incomplete, truncated, checksum mismatch):
    # 'fallback' sets it aside as checkpoints/<step>.damaged-<time> and resumes from the newest
    # one that restores; 'stop' ends the run naming it.
    c.checkpoint_on_damage = "fallback"
    c.init_from = ""  # a converted checkpoint or an earlier run's workdir
    c.eval_only = False
    return c


def apply_variant(c: ml_collections.ConfigDict, size: str, arg: ml_collections.ConfigDict
                  ) -> ml_collections.ConfigDict:
    """Applies the variants common to deit_ti/s/b: distill, teacher, res (fine-tune), smoke."""
    if arg.distill not in ("none", "soft", "hard"):
        raise ValueError(f"distill must be none, soft or hard, got {arg.distill!r}")
    c.model.name = PLAIN[size] if arg.distill == "none" else DISTILLED[size]
    c.distillation.kind = arg.distill
    if arg.distill == "soft":
        c.distillation.tau = 3.0  # the paper's soft-distillation baseline (official default 1.0)
        c.distillation.alpha = 0.1
    if arg.teacher == "precomputed":
        if not arg.teacher_logits:
            raise ValueError("teacher=precomputed needs teacher_logits=DIR (a teacher-logits "
                             "store)")
        c.distillation.teacher_logits = arg.teacher_logits
    elif arg.teacher != "onthefly":
        raise ValueError(f"teacher must be onthefly or precomputed, got {arg.teacher!r}")
    if arg.res == 384:
        # Fine-tune the 224 checkpoint at 384 (official: lr 5e-6 x batch/512, wd 1e-8, 30 ep,
        # min lr 5e-6, and the default warmup: 5 epochs from warmup_lr 1e-6).
        c.model.name = c.model.name.replace("_224", "_384") if size == "b" else c.model.name
        c.model.img_size = 384
        c.optim.lr = 5e-6
        c.optim.min_lr = 5e-6
        c.optim.weight_decay = 1e-8
        c.num_epochs = 30.0
        c.batch_size = 512
        c.eval_batch_size = 512
    elif arg.res != 224:
        raise ValueError(f"res must be 224 or 384, got {arg.res}")
    if arg.smoke:
        smoke(c)
    return c


def deit_config(size: str, arg: str | None) -> ml_collections.ConfigDict:
    """The locked config of DeiT-``size`` ('ti', 's', 'b') for the variant string ``arg``.

    Variants (comma-separated): distill=none|soft|hard, teacher=onthefly|precomputed
    (teacher_logits=DIR), res=224|384, smoke.
    """
    arg = parse_arg(arg, distill="none", teacher="onthefly", teacher_logits="", res=224,
                    smoke=False)
    config = apply_variant(base_config(), size, arg)
    config.lock()
    return config


def smoke(c: ml_collections.ConfigDict) -> None:
    """Shrinks everything: a 2-block model on 32x32 synthetic data, a few steps."""
    c.model.img_size = 32
    c.model.patch_size = 8
    c.model.embed_dim = 48
    c.model.depth = 2
    c.model.num_heads = 3
    c.dataset.name = "synthetic"
    c.dataset.num_classes = 10
    c.dataset.synthetic_train_size = 256
    c.dataset.synthetic_eval_size = 100
    # The synthetic classes are a patch's position: keep crops and flips from erasing it.
    c.aug.auto_augment = ""
    c.aug.color_jitter = 0.0
    c.aug.scale = (0.85, 1.0)
    c.aug.ratio = (1.0, 1.0)
    c.aug.hflip = 0.0
    c.aug.re_prob = 0.0
    c.aug.repeated_aug = 1
    # No RandAugment, jitter or erasing here: the device would only normalise. The host path
    # keeps the batches float32 images, as the step tests feed them.
    c.aug.on_device = False
    # A randomly initialised small CNN: exercises the distillation path, teaches nothing.
    if not c.distillation.teacher_logits:
        c.distillation.teacher = "regnety_002"
        c.distillation.random_teacher = True
    c.batch_size = 32
    c.eval_batch_size = 32
    c.num_epochs = 2.0
    # No warmup: with the official one-epoch lag (optim.official_lr_lag) a 1-epoch warmup
    # would keep both epochs at warmup_lr; without, both train at the peak lr f(0).
    c.optim.warmup_epochs = 0.0
    c.log_every_steps = 4
    c.eval_every_epochs = 1.0
    c.checkpoint_every_steps = 8
