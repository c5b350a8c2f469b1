"""The distillation teacher as the run sees it: a model run on the fly, or a precomputed store.

``config.distillation`` says which: ``teacher`` names the model, ``teacher_init`` its
variables (when it is empty, ``random_teacher`` gives random ones, for smoke tests and
benchmarks), and a non-empty ``teacher_logits`` names a store written by
``python -m deit_jax.teacher_logits``, whose logits arrive with each batch instead.
``build_teacher`` is the one place that turns the config into a :class:`Teacher`; training,
the benchmark and the store writer all call it. The teacher stays outside the train state:
loaded once, replicated once, passed to the step as its own argument.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from deit_jax import losses, models, pretrained, teacher_store
from deit_jax.errors import ConfigError
from deit_jax.mixup import mix_rows

# The old spelling of a precomputed teacher, ``distillation.teacher='precomputed:DIR'``.
OLD_PRECOMPUTED_PREFIX = "precomputed:"


@dataclasses.dataclass(frozen=True)
class Teacher:
    """The distillation teacher: a model run on the fly, or logits that arrive with the batch."""

    model: nn.Module | None = None
    variables: Any = None  # host copy; replicated once by the loop
    precomputed: bool = False  # the batch carries ``teacher_logits`` [per_device, classes]
    store: teacher_store.TeacherLogitsStore | None = None  # host side, when precomputed

    def targets(self, batch: dict, images: jax.Array, lam: jax.Array, variables: Any,
                tau: float) -> jax.Array:
        """Teacher logits ``[per_device, classes]`` for the (mixed) ``images``, never
        differentiated (inside the pmapped step; ``variables`` are the replicated ones)."""
        if self.precomputed:
            # Precomputed logits saw the unmixed views: mix the teacher's probabilities with the
            # images' lambda and pairing, and hand them back as tau * log(p) so that
            # softmax(logits / tau) = p and argmax is the mixed prediction.
            probs = jax.nn.softmax(batch["teacher_logits"].astype(jnp.float32) / tau, axis=-1)
            return tau * jnp.log(jnp.maximum(mix_rows(probs, lam), 1e-30))
        logits = self.model.apply(variables, images, train=False)
        return jax.lax.stop_gradient(logits.astype(jnp.float32))


def uses_teacher(kind: str) -> bool:
    """True for the distillation kinds with a teacher ('soft', 'hard'; not 'none', 'cls2')."""
    return kind in losses.TEACHER_KINDS


def check_config(config: ml_collections.ConfigDict) -> None:
    """The distillation fields' values and spellings, checked before anything is built."""
    dist = config.distillation
    if dist.kind not in losses.DISTILLATION_KINDS:
        raise ConfigError(f"distillation.kind={dist.kind!r} must be one of "
                          f"{losses.DISTILLATION_KINDS}")
    if dist.teacher.startswith(OLD_PRECOMPUTED_PREFIX):
        directory = dist.teacher[len(OLD_PRECOMPUTED_PREFIX):]
        raise ConfigError(
            f"distillation.teacher={dist.teacher!r} is the old spelling of a precomputed "
            f"teacher: set --config.distillation.teacher_logits={directory} and let "
            "distillation.teacher name the teacher model")
    if dist.teacher_init == "random":
        raise ConfigError("distillation.teacher_init='random' is the old spelling of a random "
                          "teacher: set --config.distillation.random_teacher=True and leave "
                          "teacher_init empty")


def build_teacher(config: ml_collections.ConfigDict, student: nn.Module, num_classes: int,
                  image_size: int, num_examples: int | None = None) -> Teacher:
    """Checks the distillation setup and loads the teacher before any training starts.

    Args:
      config: the run's config (``distillation.*``).
      student: the student model (a teacher needs one with a dist token).
      num_classes: the student's (and so the teacher's) class count.
      image_size: the student's input resolution; a DeiT teacher sees the same.
      num_examples: the training split's size, needed for a precomputed teacher, whose store is
        validated here against the run's dataset, split, classes and example ids.
    Returns:
      ``Teacher()`` when no teacher runs (kind 'none' or 'cls2'), ``Teacher(precomputed=True,
      store=...)`` for a store, else ``Teacher(model, variables)`` (host variables).
    """
    check_config(config)
    dist = config.distillation
    if dist.kind == "none":
        return Teacher()
    if not models.is_distilled(student):
        raise ConfigError(f"distillation.kind={dist.kind!r} needs a distilled student (one with a "
                          f"dist token); {config.model.name} has none: use the *_distilled_* name")
    if not uses_teacher(dist.kind):
        return Teacher()  # 'cls2': the second token learns the labels, there is no teacher
    if dist.teacher_logits:
        if num_examples is None:
            raise ConfigError("a precomputed teacher is checked against the training split: "
                              "pass build_teacher(..., num_examples=train_source.num_examples)")
        store = teacher_store.open_for_training(config, num_classes=num_classes,
                                                num_examples=num_examples, image_size=image_size)
        return Teacher(precomputed=True, store=store)
    if not dist.teacher_init and not dist.random_teacher:
        raise ConfigError(f"distillation.kind={dist.kind!r} needs a teacher checkpoint: set "
                          "--config.distillation.teacher_init=DIR (a converted checkpoint or a "
                          "teacher's workdir), or a store with "
                          "--config.distillation.teacher_logits=DIR")
    model = teacher_model(config, num_classes, image_size)
    if not dist.teacher_init:  # random_teacher
        logging.warning("distillation teacher %s has RANDOM weights (random_teacher=True)",
                        dist.teacher)
        # rbg keys: XLA on the CPU compiles threefry-heavy initialisers very slowly.
        return Teacher(model, models.init_variables(model, jax.random.key(1, impl="rbg"),
                                                    image_size))
    variables = pretrained.fit_teacher(
        pretrained.load(dist.teacher_init), models.variable_shapes(model, image_size), model,
        name=dist.teacher, source=dist.teacher_init, num_classes=num_classes,
        resample=models.is_deit(dist.teacher))
    return Teacher(model, variables)


def teacher_model(config: ml_collections.ConfigDict, num_classes: int,
                  image_size: int) -> nn.Module:
    """The model ``distillation.teacher`` names, in ``distillation.teacher_dtype``.

    A DeiT teacher (the paper's Table 2) sees the student's input at its resolution; a
    checkpoint made for another one has its pos_embed resampled on loading.
    """
    dist = config.distillation
    overrides = dict(num_classes=num_classes, dtype=jnp.dtype(dist.teacher_dtype))
    if models.is_deit(dist.teacher):
        overrides["img_size"] = image_size
    return models.create_model(dist.teacher, **overrides)
