"""DeiT III ("Revenge of the ViT", Touvron, Cord, Jegou 2022) on ImageNet-1k.

Pre-training (800 epochs), then the official fine-tuning at 224 (B, L, H, pre-trained at lower
resolution) or at 384 (S, B, L), from the 224 run's workdir:

    python -m deit_jax.main --config=configs/deit3.py:size=s --workdir=DIR/s800 \
        --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets
    python -m deit_jax.main --config=configs/deit3.py:size=s,finetune=384 \
        --config.init_from=DIR/s800 --workdir=DIR/s384
    python -m deit_jax.main --config=configs/deit3.py:size=b,finetune=224 \
        --config.init_from=DIR/b800 --workdir=DIR/b224

Variants (comma-separated after ':'): size=s|b|l|h, epochs=800|400, finetune=none|224|384,
smoke (a tiny CPU run of the same recipe on synthetic data, 2 epochs of 8 steps). ViT-M has
a released checkpoint but no published command, so no variant.

Every number is from the official ``README_revenge.md`` training commands (facebookresearch/deit;
the flags ``main.py`` defines):
- pre-training: ``--opt fusedlamb`` (apex FusedLAMB; here timm-Lamb-exact LAMB with its
  ``max_grad_norm=1.0``), ``--bce-loss`` (BCE on binarised mixed targets), ``--smoothing 0.0``,
  ``--ThreeAugment --color-jitter 0.3`` (RandomResizedCrop + flip + one of grayscale /
  solarisation / blur + jitter; no ``--src`` on ImageNet-1k), ``--reprob 0.0``, mixup 0.8 /
  cutmix 1.0, repeated augmentation, ``--weight-decay 0.05``, cosine with 5 warmup epochs from
  1e-6 to the default min lr 1e-5, ``--eval-crop-ratio 1.0``, model EMA (default on), global
  batch 2048 (S, B: 256 x 8 GPUs; L, H: 64 x 32), ``--unscale-lr`` with lr 4e-3 (S) / 3e-3
  (B, L, H), drop path 0.05 / 0.2 / 0.45 / 0.6 (S / B / L / H), resolution 224 / 192 / 192 /
  160 (S / B / L / H: the larger models are pre-trained small and fine-tuned at 224).
- fine-tuning (224 and 384): AdamW, lr 1e-5 at global batch 512, 20 epochs, weight decay 0.1,
  label smoothing 0.1, cross-entropy, RandAugment rand-m9-mstd0.5-inc1 (no 3-Augment), no
  repeated augmentation, mixup 0.8 / cutmix 1.0, 5 warmup epochs; drop path at 224:
  B 0.2, L 0.45, H 0.55; at 384: S 0.0, B 0.15, L 0.4.
The models drop paths at a constant rate in every block (``models_v2.py``: ``dpr =
[drop_path_rate for i in range(depth)]``), and LayerScale starts at 1e-4 (``vit_models``'
``init_scale``), the ``DeiT3`` defaults. This codebase scales lr by batch / 512, so the official
unscaled lr at batch B is written as ``lr * 512 / B`` (4e-3 at 2048 -> 1e-3).
``epochs=400`` is the paper's shorter schedule with every other setting unchanged.

Expected ImageNet-1k val top-1 (README_revenge.md, 800 epochs): S 81.4 (384: 83.4),
B 83.8 (384: 85.0), L 84.9 (384: 85.8), H 85.2; the pre-training logs end at S 81.38,
B 82.82 (at 192, before the 224 fine-tune).
"""

from deit_jax.configs import common

MODELS = {"s": "deit3_small_patch16_224", "b": "deit3_base_patch16_224",
          "l": "deit3_large_patch16_224", "h": "deit3_huge_patch14_224"}
PRETRAIN = {  # official (lr at batch 2048, drop path, resolution)
    "s": (4e-3, 0.05, 224), "b": (3e-3, 0.2, 192), "l": (3e-3, 0.45, 192), "h": (3e-3, 0.6, 160)}
FINETUNE_DROP_PATH = {224: {"b": 0.2, "l": 0.45, "h": 0.55}, 384: {"s": 0.0, "b": 0.15, "l": 0.4}}
PRETRAIN_BATCH = 2048
FINETUNE_BATCH = 512


def _pretrain(c, size, epochs):
    lr, drop_path, res = PRETRAIN[size]
    c.model.drop_path_rate = drop_path
    c.model.img_size = res
    c.loss.kind = "bce"
    c.optim.name = "lamb"
    c.optim.lr = lr * 512 / PRETRAIN_BATCH  # official --unscale-lr at batch 2048
    c.optim.clip_grad = 1.0  # FusedLAMB's built-in max_grad_norm
    c.optim.weight_decay = 0.05
    c.mixup.label_smoothing = 0.0
    c.aug.three_augment = True
    c.aug.on_device = False  # 3-Augment runs on the host (deit_jax/augment/three_augment.py)
    c.aug.simple_random_crop = False
    c.aug.auto_augment = ""
    c.aug.color_jitter = 0.3
    c.aug.re_prob = 0.0
    c.aug.repeated_aug = 3
    c.batch_size = PRETRAIN_BATCH
    c.num_epochs = float(epochs)


def _finetune(c, size, res):
    if size not in FINETUNE_DROP_PATH[res]:
        raise ValueError(f"the official code fine-tunes {sorted(FINETUNE_DROP_PATH[res])} at "
                         f"{res}, not size={size}")
    c.model.drop_path_rate = FINETUNE_DROP_PATH[res][size]
    c.model.img_size = res
    if res == 384:
        c.model.name = c.model.name.replace("_224", "_384")
    c.loss.kind = "ce"
    c.optim.name = "adamw"
    c.optim.lr = 1e-5  # at batch 512: unscaled and scaled agree
    c.optim.weight_decay = 0.1
    c.mixup.label_smoothing = 0.1
    c.aug.three_augment = False
    c.aug.auto_augment = "rand-m9-mstd0.5-inc1"
    c.aug.re_prob = 0.0
    c.aug.repeated_aug = 1
    c.batch_size = FINETUNE_BATCH
    c.eval_batch_size = FINETUNE_BATCH
    c.num_epochs = 20.0


def get_config(arg=None):
    arg = common.parse_arg(arg, size="s", epochs=800, finetune="none", smoke=False)
    if arg.size not in MODELS:
        raise ValueError(f"size must be one of {sorted(MODELS)}, got {arg.size!r}")
    if arg.epochs not in (400, 800):
        raise ValueError(f"epochs must be 400 or 800 (the paper's schedules), got {arg.epochs}")
    c = common.base_config()
    c.model.name = MODELS[arg.size]
    c.aug.eval_crop_ratio = 1.0
    c.eval_batch_size = 1024
    if arg.finetune == "none":
        _pretrain(c, arg.size, arg.epochs)
    elif arg.finetune in ("224", "384"):
        _finetune(c, arg.size, int(arg.finetune))
    else:
        raise ValueError(f"finetune must be none, 224 or 384, got {arg.finetune!r}")
    if arg.smoke:
        common.smoke(c)
        c.model.name = MODELS["s"].replace("_224", "_384") if arg.finetune == "384" else \
            MODELS["s"]
        c.model.drop_path_rate = 0.05
        # 16 steps: no warmup, and a step size that moves the tiny model (LAMB: ~4% a step).
        c.optim.warmup_epochs = 0.0
        c.optim.lr = 0.64
    c.lock()
    return c
