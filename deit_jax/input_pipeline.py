"""Input pipeline: the epoch index plan, per-process split, tf.data transforms, batching.

Every training batch is a pure function of ``(seed, step)``: the order of an epoch comes from
a seeded permutation (with the official RASampler's repeats), and each example's augmentation
from a stateless seed derived from ``(seed, epoch, position)``. A run resumed at step k thus
sees exactly the batches an uninterrupted run sees, without reading the first k again.

Batches are dicts of numpy arrays shaped ``[local_devices, per_device, ...]``:
``image`` ``[..., H, W, 3]`` (training: uint8, the host's part of the recipe, finished in the
train step; evaluation: float32, normalised), ``label`` int32, ``index`` int64 (example
id in the split) and, for evaluation, ``mask`` (1 for real examples, 0 for padding or an
undecodable file) plus the source's extra fields (ReaL's ``real_label``).

Corrupt files never stop a run (unless ``dataset.strict_decoding``): each example is decoded
in a one-element dataset whose errors are dropped, falling back deterministically to the next
example of the split (training) or to a masked placeholder (evaluation). The host logs every
bad file once and counts them in ``Batches.errors``. Sources live in ``data_sources``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging

from deit_jax.augment import host as host_aug
from deit_jax.augment import three_augment
from deit_jax.data_sources import (  # noqa: F401 - re-exported: train.py reads them from here
    DataError,
    Source,
    decode_crop,
    fashion_mnist,
    get_extra_eval_sources,
    get_source,
    image_folder,
    image_folder_classes,
    load_example,
    synthetic,
    tfds_source,
)

# Training: how many examples (the planned one, then the next ones in the split) are tried
# before a run gives up. Several consecutive bad files mean unreadable storage, not a few
# corrupt JPEGs, and training on would be training on nothing.
TRAIN_DECODE_ATTEMPTS = 8
# Decodes in flight (the interleave over one-element datasets), and the parallel map calls:
# fixed, as tf.data's autotuning model is off (``_options``).
_CYCLE = max(8, os.cpu_count() or 1)
_PARALLEL = os.cpu_count() or 1
_NO_END = 2**62  # Dataset.range's stop for the endless training stream of epochs


class CorruptImageError(DataError):
    """An undecodable example under ``dataset.strict_decoding``."""


@dataclasses.dataclass
class DecodeErrors:
    """Undecodable examples met so far: ``count`` occurrences (each repeat and epoch counts),
    ``files`` {index: where} of the distinct ones."""

    split: str
    count: int = 0
    files: dict[int, str] = dataclasses.field(default_factory=dict)

    def record(self, source: Source, index: int, replacement: int, *, strict: bool,
               train: bool) -> None:
        self.count += 1
        if index in self.files and not strict:
            return
        where = source.where(index)
        reason = _decode_error(source, index)
        if strict:
            raise CorruptImageError(
                f"undecodable {self.split} example {where} ({reason}); dataset.strict_decoding="
                "True stops here; fix or delete the file, or set "
                "--config.dataset.strict_decoding=False to skip such files (logged, counted)")
        if train and replacement < 0:
            raise DataError(
                f"{TRAIN_DECODE_ATTEMPTS} consecutive {self.split} examples from {where} on "
                f"fail to decode ({reason}): the data looks unreadable (storage, permissions), "
                "not just a few corrupt files")
        self.files[index] = where
        instead = (f"replaced by example {source.where(replacement)}" if replacement >= 0
                   else "left out of the metrics (mask 0)")
        logging.warning("undecodable %s example %s (%s): %s; %d bad files so far", self.split,
                        where, reason, instead, len(self.files))


def _decode_error(source: Source, index: int) -> str:
    """Why example ``index`` fails, from a second, eager load on the host (rare path)."""
    try:
        load_example(source, tf.constant(index, tf.int64))
    except Exception as e:  # noqa: BLE001 - any failure is the reason we report
        # TF's messages wrap the reason in op and device names: keep the reason.
        text = re.sub(r"\{\{[^}]*\}\}|\[Op:[^\]]*\]|\bname: ?$", "", str(e).splitlines()[0])
        return f"{type(e).__name__}: {text.strip()}"[:300]
    return "a transient read error (it decodes now)"


class Batches(Iterator[dict]):
    """The batch iterator; ``errors`` (:class:`DecodeErrors`) counts undecodable examples."""

    def __init__(self, iterator: Iterator[dict], errors: DecodeErrors):
        self._iterator = iterator
        self.errors = errors

    def __next__(self) -> dict:
        return next(self._iterator)


def epoch_plan(num_examples: int, epoch: int, seed: int, *, num_replicas: int,
               num_repeats: int = 1, shuffle: bool = True, ra_multiple: int = 1) -> np.ndarray:
    """Example indices of one training epoch for every replica: ``[num_replicas, per_replica]``.

    The official RASampler: a seeded permutation, each index repeated ``num_repeats`` times
    consecutively, padded by wrapping, then dealt round-robin to replicas (here: global
    devices), so the repeats of an image land on different devices with independent
    augmentations. Each replica keeps ``floor(kept / num_replicas)`` indices, where ``kept`` is
    ``num_examples`` rounded down to a multiple of ``ra_multiple`` with repeats (the official
    sampler's ``len // 256 * 256``; ``aug.ra_multiple``) and ``num_examples`` without: an epoch
    is still about ``len(train)`` samples, repeats counted. ``num_repeats=1`` is the official
    DistributedSampler (RandomSampler in a single process): a plain permutation.
    """
    order = (np.random.default_rng([seed, epoch]).permutation(num_examples) if shuffle
             else np.arange(num_examples))
    order = np.repeat(order, num_repeats)
    total = math.ceil(len(order) / num_replicas) * num_replicas
    order = np.concatenate([order, order[:total - len(order)]])
    dealt = order.reshape(-1, num_replicas).T  # dealt[r] = order[r::num_replicas]
    return dealt[:, :epoch_samples(num_examples, num_repeats, ra_multiple) // num_replicas]


def epoch_samples(num_examples: int, num_repeats: int = 1, ra_multiple: int = 1) -> int:
    """Samples an epoch keeps, over all replicas: the official RASampler's ``N // 256 * 256``
    (``ra_multiple=256``) with repeats, all ``N`` without (before rounding to replicas)."""
    if ra_multiple < 1:
        raise ValueError(f"aug.ra_multiple must be >= 1, got {ra_multiple}")
    return num_examples // ra_multiple * ra_multiple if num_repeats > 1 else num_examples


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the global batch maps onto processes and devices."""

    global_batch: int
    process_index: int
    process_count: int
    local_devices: int

    @property
    def per_device(self) -> int:
        return self.global_batch // (self.process_count * self.local_devices)

    @property
    def host_batch(self) -> int:
        return self.global_batch // self.process_count

    @classmethod
    def current(cls, global_batch: int) -> Layout:
        layout = cls(global_batch, jax.process_index(), jax.process_count(),
                     jax.local_device_count())
        if global_batch % (layout.process_count * layout.local_devices):
            raise ValueError(f"batch size {global_batch} is not divisible by the "
                             f"{layout.process_count * layout.local_devices} devices; pick a "
                             "multiple of the device count")
        return layout


def _per_example_seed(seed: int, epoch, position):
    base = tf.random.experimental.stateless_fold_in(tf.constant([seed, 0], tf.int64), epoch)
    return tf.random.experimental.stateless_fold_in(base, position)


def view_seed(seed: int, index):
    """The seed of example ``index``'s stored crop views (a stream apart from training's)."""
    return tf.random.experimental.stateless_fold_in(tf.constant([seed, 1], tf.int64),
                                                    tf.cast(index, tf.int64))


def crop_views_transform(config: ml_collections.ConfigDict, image_size: int, views: int, *,
                         index_offset: int = 0):
    """``eval_batches`` transform giving each example ``views`` crop + flip views drawn with
    ``config.aug``'s scale, ratio and flip probability: ``image`` float32
    ``[views, image_size, image_size, 3]`` and ``crop`` int32 ``[views, 5]``.

    The views of example ``i`` depend only on ``(config.seed, i)``; ``index_offset`` is the
    split index of the source's example 0 (``Source.slice``).
    """
    aug = config.aug
    resize, library = host_aug.crop_pixels(aug)

    def transform(image, index):
        images, crops = host_aug.crop_views(
            image, view_seed(config.seed, index + index_offset), views=views, img_size=image_size,
            scale=tuple(aug.scale), ratio=tuple(aug.ratio), hflip=aug.hflip,
            interpolation=aug.interpolation, resize=resize, library=library)
        return {"image": images, "crop": crops}

    return transform


def _reshape_for_devices(batch: dict, local_devices: int) -> dict:
    return {k: v.reshape(local_devices, -1, *v.shape[1:]) for k, v in batch.items()}


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    # One thread per element, parallelism across elements: the cheapest way to fill the
    # cores with small per-image ops (and what keeps JAX's host threads responsive).
    options.threading.max_intra_op_parallelism = 1
    options.experimental_optimization.map_parallelization = True
    options.experimental_optimization.inject_prefetch = True
    # No autotuning model: with it, destroying an iterator waited on one of its threads (most
    # likely the model's, asleep up to a minute), 14-42 s in 4 of 7 runs at the end of a stage
    # (docs/PERFORMANCE.md, "Closing a training stream"). Parallelism is set explicitly instead
    # (_PARALLEL, _CYCLE).
    options.autotune.enabled = False
    return options


def _decode_with_fallback(source: Source, attempts: int, load: Callable | None = None):
    """``element -> one-element dataset`` of the first of ``index, index + 1, ...``
    (``attempts`` of them, from ``element["index"]``) that loads, as ``load(element, index)``'s
    dict (default ``load_example``) plus ``loaded`` (the index used; -1 with a placeholder
    image when none loads).

    Graph-mode errors cannot be caught with try/except; ``ignore_errors`` on a dataset of one
    example turns a failure into an empty dataset, and the concatenation moves on. Only the
    attempts needed are ever run.
    """
    load = load or (lambda element, index: load_example(source, index))
    n = source.num_examples

    def attempt(element, index):
        one = tf.data.Dataset.from_tensors(index)
        return one.map(lambda i: {**load(element, i), "loaded": i}).ignore_errors()

    def first_loadable(element):
        index = element["index"]
        ds = attempt(element, index)
        if attempts > 1:
            # The fallbacks as one lazy flat_map: built and run only when the first attempt
            # yields nothing (2 dataset ops per element instead of 3 per attempt).
            ds = ds.concatenate(tf.data.Dataset.range(1, attempts).flat_map(
                lambda k: attempt(element, (index + k) % n)))
        # The placeholder has the loaded examples' structure (shapes left free).
        spec = ds.element_spec
        placeholder = {k: tf.zeros([16 if d is None else d for d in v.shape], v.dtype)
                       for k, v in spec.items()}
        placeholder.update({k: tf.constant(v) for k, v in source.extras.items()},
                           loaded=tf.constant(-1, tf.int64))
        if "crop" in placeholder:  # crop-aware decoding: the placeholder's whole 16 x 16
            placeholder["crop"] = tf.constant([0, 0, 16, 16, 0], tf.int32)
        return ds.concatenate(tf.data.Dataset.from_tensors(placeholder)).take(1)

    return first_loadable


def _decoded(ds: tf.data.Dataset, source: Source, attempts: int,
             load: Callable | None = None) -> tf.data.Dataset:
    """Adds the decoded example (see ``_decode_with_fallback``) to each element, in order."""
    if source.in_memory and load is None:
        # Nothing to decode, nothing that can fail: the same elements, without the
        # one-element datasets (about half the host time of a 28x28 image).
        return ds.map(lambda e: {**e, **load_example(source, e["index"]), "loaded": e["index"]},
                      num_parallel_calls=_PARALLEL, deterministic=True)
    first_loadable = _decode_with_fallback(source, attempts, load)

    def expand(element):
        return first_loadable(element).map(lambda example: {**element, **example})

    return ds.interleave(expand, cycle_length=_CYCLE, block_length=1,
                         num_parallel_calls=_CYCLE, deterministic=True)


def _strict(config: ml_collections.ConfigDict) -> bool:
    return bool(config.dataset.get("strict_decoding", False))


def train_batches(config: ml_collections.ConfigDict, source: Source, layout: Layout, *,
                  image_size: int, start_step: int = 0,
                  crops: np.ndarray | None = None) -> Batches:
    """Endless training batches for this process, starting at global step ``start_step``.

    Yields ``image`` uint8 [local_devices, per_device, image_size, image_size, 3] (the PIL
    part of the recipe: crop, flip and RandAugment or colour jitter; with ``aug.on_device``
    the crop + flip view only; the train step does the rest, ``augment.device``), ``label``
    int32 and ``index`` int64 [local_devices, per_device]. An undecodable example
    is replaced by the next loadable one of the split (same augmentation seed), logged and
    counted in the returned iterator's ``errors``; ``dataset.strict_decoding`` raises instead.

    ``crops`` (int32 ``[num_examples, views, 5]``, a crop-aware teacher-logits store's views)
    replays stored views: each sample takes view ``view`` (uniform over the views, drawn per
    epoch and position, added to the batch as int64) of the example it loads, in place of the
    RandomResizedCrop and flip draws; the rest of the transform is unchanged.
    """
    aug = config.aug
    num_replicas = layout.process_count * layout.local_devices
    n_steps = steps_per_epoch(source.num_examples, layout.global_batch,
                              num_repeats=aug.repeated_aug, ra_multiple=aug.ra_multiple)
    if n_steps == 0:
        raise DataError(f"{source.num_examples} training examples give no full batch of "
                        f"{layout.global_batch}; lower batch_size")
    first = layout.process_index * layout.local_devices
    scale, ratio = tuple(aug.scale), tuple(aug.ratio)
    strict = _strict(config)
    on_device = bool(aug.get("on_device", False))
    keys = ("index", "epoch", "position")
    if crops is not None:
        if crops.ndim != 3 or crops.shape[0] != source.num_examples or crops.shape[2] != 5:
            raise ValueError(f"crops must be int32 [{source.num_examples}, views, 5], got "
                             f"{crops.shape}")
        keys += ("view",)
        crop_table = tf.constant(crops, tf.int32)

    resize, library = host_aug.crop_pixels(aug)
    # Crop-aware decoding (a JPEG decodes only its crop's window; the same pixels): for the
    # RandomResizedCrop recipes of sources that hand over encoded bytes.
    crop_aware = source.load_encoded is not None and not aug.three_augment

    def load_cropped(element, index):
        example = source.load_encoded(index)
        seed = _per_example_seed(config.seed, element["epoch"], element["position"])
        if crops is not None:  # the stored view of the example being loaded
            stored = tf.gather_nd(crop_table, tf.stack([index, element["view"]]))
            view_of = lambda height, width: stored  # noqa: E731
        else:
            view_of = lambda height, width: host_aug.train_view(  # noqa: E731
                seed, height, width, scale=scale, ratio=ratio, hflip=aug.hflip)
        window, view = decode_crop(example.pop("encoded"), view_of)
        return {**example, "image": window, "crop": view}

    def transform(element):
        seed = _per_example_seed(config.seed, element["epoch"], element["position"])
        crop = None
        if crop_aware:
            crop = element["crop"]
        elif crops is not None:
            # The view of the example really loaded (a corrupt file's replacement has its own).
            crop = tf.gather_nd(crop_table, tf.stack([tf.maximum(element["loaded"], 0),
                                                      element["view"]]))
        if aug.three_augment:  # DeiT III (official --ThreeAugment [--src]), host path only
            image = three_augment.train_pixels(
                element["image"], seed, img_size=image_size,
                simple_crop=aug.simple_random_crop, scale=scale, ratio=ratio,
                hflip=aug.hflip, color_jitter=aug.color_jitter,
                interpolation=aug.interpolation, crop=crop)
        elif on_device:  # crop + flip only: the train step does the rest (augment.device)
            image = host_aug.train_crop(
                element["image"], seed, img_size=image_size, scale=scale, ratio=ratio,
                hflip=aug.hflip, interpolation=aug.interpolation, crop=crop, resize=resize,
                library=library)
        else:
            # The PIL ops (PIL-exact pixels); the train step normalises and erases.
            image = host_aug.train_pixels(
                element["image"], seed, img_size=image_size, scale=scale, ratio=ratio,
                hflip=aug.hflip, auto_augment=aug.auto_augment or None,
                color_jitter=aug.color_jitter, interpolation=aug.interpolation, crop=crop,
                resize=resize, library=library)
        out = {"image": image, "label": element["label"], "index": element["index"],
               "loaded": element["loaded"]}
        if crops is not None:
            out["view"] = element["view"]
        return out

    def epoch_arrays(epoch: int):
        """(index, epoch, position) of this process's examples, in batch order."""
        plan = epoch_plan(source.num_examples, epoch, config.seed, num_replicas=num_replicas,
                          num_repeats=aug.repeated_aug, ra_multiple=aug.ra_multiple)
        n = n_steps * layout.per_device
        # This process's replicas (devices), step-major: each step holds each local device's
        # slice in device order, which the final reshape turns into [devices, per_device].
        rows = np.arange(first, first + layout.local_devices)
        order = plan[rows, :n].reshape(layout.local_devices, n_steps, -1)
        # Position in the epoch's global stream: distinct for every sample, repeats included.
        positions = (rows[:, None] * plan.shape[1] + np.arange(n)).reshape(order.shape)
        order, positions = (np.moveaxis(a, 1, 0).reshape(-1) for a in (order, positions))
        skip = max((start_step - epoch * n_steps) * layout.host_batch, 0)
        arrays = {"index": order[skip:].astype(np.int64),
                  "epoch": np.full(len(order) - skip, epoch, np.int64),
                  "position": positions[skip:].astype(np.int64)}
        if crops is not None:
            # One draw per position of the epoch's global stream: the repeats of an image
            # (repeated augmentation) take independent views; resuming redraws the same.
            views = np.random.default_rng([config.seed, epoch, 1]).integers(
                crops.shape[1], size=plan.size)
            arrays["view"] = views[arrays["position"]]
        return arrays

    def epoch_tensors(epoch):
        arrays = tf.numpy_function(lambda e: tuple(epoch_arrays(int(e))[k] for k in keys), [epoch],
                                   (tf.int64,) * len(keys), stateful=False)
        return {k: tf.ensure_shape(a, [None]) for k, a in zip(keys, arrays, strict=True)}

    # Dataset.range + numpy_function, not Dataset.from_generator: building a GeneratorDataset
    # makes TensorFlow (seen with 2.21 on Python 3.11) pin glibc's mmap threshold at 128 KiB
    # for the whole process, after which every XLA buffer above it is a fresh mmap: page
    # faults that made the CPU train step ~1.6x slower (docs/PERFORMANCE.md, "The real loop
    # against the step").
    ds = tf.data.Dataset.range(start_step // n_steps, _NO_END).map(epoch_tensors).unbatch()
    ds = _decoded(ds, source, 1 if strict else TRAIN_DECODE_ATTEMPTS,
                  load_cropped if crop_aware else None)
    ds = ds.map(transform, num_parallel_calls=_PARALLEL, deterministic=True)
    ds = ds.batch(layout.host_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    ds = ds.with_options(_options())
    errors = DecodeErrors("train")

    def checked():
        for batch in ds.as_numpy_iterator():
            loaded = batch.pop("loaded")
            for i in np.flatnonzero(loaded != batch["index"]):
                errors.record(source, int(batch["index"][i]), int(loaded[i]), strict=strict,
                              train=True)
            # The id of the example really in the batch: precomputed teacher logits join on it.
            batch["index"] = loaded
            yield _reshape_for_devices(batch, layout.local_devices)

    return Batches(checked(), errors)


def steps_per_epoch(num_examples: int, global_batch: int, *, num_repeats: int = 1,
                    ra_multiple: int = 1) -> int:
    """Full global batches per epoch (the last partial batch is dropped, as the official code).

    With repeated augmentation (``num_repeats > 1``) the epoch keeps ``N // ra_multiple *
    ra_multiple`` samples first, as the official RASampler (``ra_multiple=256``); for a batch
    that is a multiple of ``ra_multiple`` (every official recipe) that changes nothing.
    """
    kept = epoch_samples(num_examples, num_repeats, ra_multiple)
    if kept < global_batch <= num_examples:
        raise ValueError(
            f"repeated augmentation keeps {num_examples} // {ra_multiple} * {ra_multiple} = "
            f"{kept} samples per epoch (the official RASampler's rule), less than one batch of "
            f"{global_batch}; set --config.aug.ra_multiple=1 (keep every full batch) or "
            "--config.aug.repeated_aug=1")
    return kept // global_batch


def eval_batches(config: ml_collections.ConfigDict, source: Source, layout: Layout, *,
                 image_size: int, batch_size: int | None = None,
                 transform: Callable[[tf.Tensor, tf.Tensor], dict] | None = None) -> Batches:
    """One pass over the split: every example exactly once across processes, padded + masked.

    Every process yields the same number of batches (collectives need that); padding rows
    repeat example 0 and carry ``mask == 0``, as do undecodable examples (logged, counted in
    the returned iterator's ``errors``; ``dataset.strict_decoding`` raises instead). Extra
    fields of the source (``real_label``) come along.

    ``transform(image_uint8, index) -> {'image': ..., ...}`` replaces the eval transform (e.g.
    ``crop_views_transform``); its fields join the batch.
    """
    global_batch = batch_size or layout.global_batch
    host_batch = global_batch // layout.process_count
    per_process = math.ceil(source.num_examples / layout.process_count)
    num_batches = math.ceil(per_process / host_batch)
    mine = np.arange(layout.process_index, source.num_examples, layout.process_count)
    padded = num_batches * host_batch
    mask = np.concatenate([np.ones(len(mine), np.float32), np.zeros(padded - len(mine),
                                                                     np.float32)])
    indices = np.concatenate([mine, np.zeros(padded - len(mine), np.int64)])
    crop_ratio = config.aug.eval_crop_ratio
    strict = _strict(config)

    def apply(element):
        if transform is not None:
            return {**element, **transform(element["image"], element["index"])}
        image = host_aug.eval_transform(element["image"], img_size=image_size,
                                       crop_ratio=crop_ratio,
                                       interpolation=config.aug.interpolation)
        return {**element, "image": image}

    ds = tf.data.Dataset.from_tensor_slices({"index": indices.astype(np.int64), "mask": mask})
    ds = _decoded(ds, source, 1)
    ds = ds.map(apply, num_parallel_calls=_PARALLEL, deterministic=True)
    ds = ds.batch(host_batch).prefetch(tf.data.AUTOTUNE).with_options(_options())
    errors = DecodeErrors("eval")

    def checked():
        for batch in ds.as_numpy_iterator():
            loaded = batch.pop("loaded")
            bad = (loaded < 0) & (batch["mask"] > 0)
            for i in np.flatnonzero(bad):
                errors.record(source, int(batch["index"][i]), -1, strict=strict, train=False)
            batch["mask"] = np.where(loaded < 0, 0.0, batch["mask"]).astype(np.float32)
            yield _reshape_for_devices(batch, layout.local_devices)

    return Batches(checked(), errors)
