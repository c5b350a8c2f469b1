"""DeiT-B on ImageNet-1k: the paper's full recipe (300 epochs, batch 1024, AdamW 5e-4 x B/512).

    python -m deit_jax.main --config=configs/deit_b.py --workdir=DIR \
        --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets
    python -m deit_jax.main --config=configs/deit_b.py:distill=hard \
        --config.distillation.teacher_init=TEACHER_DIR --workdir=DIR

Variants (comma-separated after ':'): distill=none|soft|hard, teacher=onthefly|precomputed
(teacher_logits=DIR), res=224|384, smoke (a tiny CPU run on synthetic data).
Expected ImageNet-1k val top-1 (official checkpoints): 81.8 (distill=hard: 83.4 fused;
res=384 fine-tune: 82.9 / 85.2).
"""

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, distill="none", teacher="onthefly", teacher_logits="",
                           res=224, smoke=False)
    config = common.apply_variant(common.base_config(), "b", arg)
    config.lock()
    return config
