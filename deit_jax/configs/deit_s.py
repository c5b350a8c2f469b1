"""DeiT-S on ImageNet-1k: the paper's full recipe (300 epochs, batch 1024, AdamW 5e-4 x B/512).

    python -m deit_jax.main --config=configs/deit_s.py --workdir=DIR \
        --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets
    python -m deit_jax.main --config=configs/deit_s.py:distill=hard \
        --config.distillation.teacher_init=TEACHER_DIR --workdir=DIR

Variants (comma-separated after ':'): distill=none|soft|hard, teacher=onthefly|precomputed
(teacher_logits=DIR, a store of `python -m deit_jax.teacher_logits`), res=224|384, smoke (a
tiny CPU run on synthetic data).
Expected ImageNet-1k val top-1 (official checkpoints): 79.9 (distill=hard: 81.2 fused).
"""

from deit_jax.configs import common


def get_config(arg=None):
    return common.deit_config("s", arg)
