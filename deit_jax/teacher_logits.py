"""Precomputed teacher logits: write them once over the training split, join them to batches.

    python -m deit_jax.teacher_logits --config=configs/deit_s.py:distill=hard \
        --config.distillation.teacher_init=TEACHER_DIR --out=LOGITS_DIR [--top_k=10] [--views=10]
    python -m deit_jax.main --config=configs/deit_s.py:distill=hard,teacher=precomputed,\
teacher_logits=LOGITS_DIR --workdir=RUN_DIR

The teacher (``config.distillation.teacher`` loaded from ``teacher_init``, as the training
loop would load it) runs over every example of the training split once, pmapped over the local
devices, every process its share, on one of two transforms:

- ``eval`` (default): resize + centre crop, one deterministic view per image;
- ``crops`` (``--views=K``, crop-aware, the consistent teacher of FKD, Shen & Xing 2021): K
  RandomResizedCrop + flip views per image, drawn with ``config.aug``'s scale, ratio and flip
  probability from a seed of ``(config.seed, example id)``, stored with their parameters.
  Training replays one stored view per sample (``input_pipeline.train_batches(crops=...)``),
  so the student's crop is the one the teacher labelled; the photometric augmentation
  (RandAugment, colour jitter, erasing) and mixup/CutMix stay on top, as in FKD.

A store is a directory:
- ``manifest.json``: format version, teacher name and fingerprint (a hash of its variables),
  dataset, split, number of examples and classes, the transform, ``top_k`` (null = full rows),
  shard size, and ``complete``;
- ``shard-SSSSS-of-NNNNN.npz``: shard ``S`` holds the examples with ids
  ``[S * shard_size, (S + 1) * shard_size)``: ``ids`` int64 ``[n]``, ``values`` float16
  ``[n, num_classes]`` (full logits) or ``[n, top_k]`` (the top-k logits, descending) with
  ``indices`` int32 ``[n, top_k]``, and ``decoded`` bool ``[n]`` (False: the example could not
  be decoded and its row is the teacher's output on a placeholder image). A crops store has a
  views axis, ``values`` / ``indices`` ``[n, K, ...]``, and ``crops`` int32 ``[n, K, 5]`` (top,
  left, height, width, flip of each view in the decoded image).

Shards are written atomically as they finish; a restarted command skips finished shards, so an
interrupted run (or a deleted shard) costs only the missing shards.

Training reads a store with ``TeacherLogitsStore.open`` (validated against the run's dataset,
split, class and example counts before any step) and ``attach``, which adds
``batch['teacher_logits']`` on the host from ``batch['index']`` (and ``batch['view']``).
Top-k rows are filled back to full rows with ``TOPK_FILL`` (-1e4): softmax then puts exactly
zero mass (in float32) outside the stored classes, i.e. the teacher's distribution
renormalised over its top k.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

# 2 added crop-aware stores; version-1 stores (eval transform only) read unchanged.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
PRECOMPUTED_PREFIX = "precomputed:"
# Logit given to classes outside a top-k row. exp(-1e4 / tau - max) underflows to exactly 0 in
# float32 for any tau below ~100, and -1e4 is representable in float16.
TOPK_FILL = -1e4
# Manifest keys a resumed command must agree on (anything else may differ, e.g. timestamps).
_RESUME_KEYS = ("format_version", "teacher", "teacher_fingerprint", "dataset", "split",
                "num_examples", "num_classes", "transform", "top_k", "shard_size")


def _path(directory: str) -> epath.Path:
    return epath.Path(directory)


def shard_name(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}.npz"


def dataset_identity(config: ml_collections.ConfigDict) -> dict[str, str]:
    """What a store records (and training checks) as the dataset: its name and training split."""
    return {"dataset": config.dataset.name, "split": config.dataset.train_split}


def precomputed_dir(config: ml_collections.ConfigDict) -> str:
    """The store directory of ``distillation.teacher = 'precomputed:DIR'`` ('' otherwise)."""
    teacher = config.distillation.teacher
    return teacher[len(PRECOMPUTED_PREFIX):] if teacher.startswith(PRECOMPUTED_PREFIX) else ""


def variables_fingerprint(variables: Any) -> str:
    """A short sha256 of a variables tree (names, shapes, dtypes and values)."""
    digest = hashlib.sha256()
    for key, value in sorted(flax.traverse_util.flatten_dict(variables).items()):
        value = np.ascontiguousarray(np.asarray(value))
        digest.update(f"{'/'.join(key)}:{value.dtype}:{value.shape};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------ reading


def _read_manifest(directory: str) -> dict:
    path = _path(directory) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"no {MANIFEST} in {directory}: it is not a teacher-logits store. Write one with "
            "`python -m deit_jax.teacher_logits --config=CONFIG --out=DIR` (the training "
            "config, with distillation.teacher naming the teacher model)")
    return json.loads(path.read_text())


def _load_npz(path: epath.Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        with path.open("rb") as f:
            data = np.load(io.BytesIO(f.read()) if "://" in str(path) else f)
            return {k: np.asarray(data[k]) for k in keys}
    except Exception as e:  # noqa: BLE001 - re-raised with the file and the fix
        raise ValueError(f"cannot read teacher-logits shard {path}: {e}. Delete it and rerun "
                         "the teacher_logits command to rewrite it") from e


class TeacherLogitsStore:
    """A validated store of precomputed teacher logits, looked up by example id.

    Construct with ``open``. The id index is read (and checked) at ``open``; the logits
    themselves are read into memory on the first ``lookup`` (full float16 ImageNet rows:
    2.56 GB per process; top-10: 77 MB).
    """

    def __init__(self, directory: str, manifest: dict, shard_files: list[epath.Path]):
        self.directory = directory
        self.manifest = manifest
        self._shard_files = shard_files
        self._values: np.ndarray | None = None  # float16 [num_examples, (views,) C or k]
        self._indices: np.ndarray | None = None  # int32 [num_examples, (views,) k] (top-k)
        self._crops: np.ndarray | None = None  # int32 [num_examples, views, 5] (crops store)

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def num_examples(self) -> int:
        return int(self.manifest["num_examples"])

    @property
    def top_k(self) -> int | None:
        return self.manifest["top_k"]

    @property
    def views(self) -> int | None:
        """Stored views per example of a crop-aware store; None for an eval-view store."""
        transform = self.manifest["transform"]
        return int(transform["views"]) if transform["name"] == "crops" else None

    @property
    def crops(self) -> np.ndarray | None:
        """The stored views, int32 ``[num_examples, views, 5]`` (None for an eval store)."""
        if self.views is None:
            return None
        self._load()
        return self._crops

    @classmethod
    def open(cls, directory: str, *, dataset: str, split: str, num_classes: int,
             num_examples: int) -> TeacherLogitsStore:
        """Opens ``directory`` for a run on ``dataset``/``split``; raises ValueError on a mismatch.

        Checks, before any training: format version, that the writing command finished,
        dataset and split, the class count (the student's), the example count, and that the
        shards hold every example id ``0 .. num_examples - 1`` exactly once.
        """
        manifest = _read_manifest(directory)
        fix = ("write a store for it with `python -m deit_jax.teacher_logits "
               "--config=<this training config> --out=NEW_DIR` and train with "
               "distillation.teacher='precomputed:NEW_DIR'")
        if manifest.get("format_version") not in READABLE_VERSIONS:
            raise ValueError(f"{directory} has teacher-logits format "
                             f"{manifest.get('format_version')}, this code reads "
                             f"{READABLE_VERSIONS}: rewrite it with this version's command")
        if (manifest["dataset"], manifest["split"]) != (dataset, split):
            raise ValueError(
                f"{directory} holds teacher logits for dataset {manifest['dataset']!r} split "
                f"{manifest['split']!r}, but this run trains on {dataset!r} split {split!r}: "
                f"{fix}")
        if manifest["num_classes"] != num_classes:
            raise ValueError(
                f"{directory} holds teacher logits over {manifest['num_classes']} classes, but "
                f"the student predicts {num_classes}: the teacher must be trained on the "
                f"student's classes; {fix}")
        if manifest["num_examples"] != num_examples:
            raise ValueError(
                f"{directory} holds teacher logits for {manifest['num_examples']} examples of "
                f"{dataset!r}/{split!r}, but this run's split has {num_examples} (another "
                f"version or subset of the data?): {fix}")
        if not manifest.get("complete"):
            raise ValueError(
                f"{directory} is unfinished (its writing command stopped before the end): "
                "rerun the same teacher_logits command with --out pointing at it; it resumes "
                "and writes only the missing shards")
        num_shards = manifest["num_shards"]
        files = [_path(directory) / shard_name(s, num_shards) for s in range(num_shards)]
        seen = np.zeros(num_examples, np.int32)
        for file in files:
            if not file.exists():
                continue  # reported below as missing ids
            ids = _load_npz(file, ("ids",))["ids"]
            if ids.size and (ids.min() < 0 or ids.max() >= num_examples):
                raise ValueError(f"{file} holds example ids outside [0, {num_examples}): "
                                 "delete it and rerun the teacher_logits command")
            np.add.at(seen, ids, 1)
        missing = np.flatnonzero(seen == 0)
        if missing.size:
            absent = [f.name for f in files if not f.exists()]
            raise ValueError(
                f"{directory} lacks teacher logits for {missing.size} of {num_examples} example "
                f"ids (first: {missing[:5].tolist()}; missing shard files: {absent[:5]}): rerun "
                f"the teacher_logits command with --out={directory}; it rewrites only the "
                "missing shards")
        if (seen > 1).any():
            raise ValueError(f"{directory} holds example ids more than once (e.g. "
                             f"{np.flatnonzero(seen > 1)[:5].tolist()}): rewrite the store")
        return cls(directory, manifest, files)

    def _load(self) -> None:
        if self._values is not None:
            return
        t0 = time.time()
        lead = (self.num_examples,) + ((self.views,) if self.views else ())
        width = self.top_k or self.num_classes
        values = np.zeros((*lead, width), np.float16)
        indices = np.zeros((*lead, width), np.int32) if self.top_k else None
        crops = np.zeros((*lead, 5), np.int32) if self.views else None
        keys = ("ids", "values") + (("indices",) if self.top_k else ()) + (
            ("crops",) if self.views else ())
        for file in self._shard_files:
            shard = _load_npz(file, keys)
            values[shard["ids"]] = shard["values"]
            if indices is not None:
                indices[shard["ids"]] = shard["indices"]
            if crops is not None:
                crops[shard["ids"]] = shard["crops"]
        self._values, self._indices, self._crops = values, indices, crops
        logging.info("teacher logits: read %s from %s in %.1fs", "x".join(map(str, values.shape)),
                     self.directory, time.time() - t0)

    def lookup(self, indices: np.ndarray, views: np.ndarray | None = None) -> np.ndarray:
        """Teacher logits of example ids ``indices`` (any shape ``[...]``): float32 ``[..., C]``.

        A crop-aware store needs ``views`` (the stored view of each sample, the shape of
        ``indices``); an eval store takes none. Top-k stores give full rows with ``TOPK_FILL``
        outside the stored k classes.
        """
        self._load()
        ids = np.asarray(indices, np.int64)
        flat = ids.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= self.num_examples):
            raise IndexError(f"example ids outside [0, {self.num_examples}) asked of "
                             f"{self.directory}")
        if (views is None) != (self.views is None):
            raise ValueError(f"{self.directory} is {'a crop-aware' if self.views else 'an eval'}"
                             f" store: lookup {'needs' if self.views else 'takes no'} views")
        rows_of = (flat,)
        if views is not None:
            flat_views = np.asarray(views, np.int64).reshape(-1)
            if flat_views.shape != flat.shape or flat_views.size and (
                    flat_views.min() < 0 or flat_views.max() >= self.views):
                raise IndexError(f"views must have the ids' shape and lie in [0, {self.views})")
            rows_of = (flat, flat_views)
        if self._indices is None:
            rows = self._values[rows_of].astype(np.float32)
        else:
            rows = np.full((flat.size, self.num_classes), TOPK_FILL, np.float32)
            np.put_along_axis(rows, self._indices[rows_of],
                              self._values[rows_of].astype(np.float32), axis=1)
        return rows.reshape(*ids.shape, self.num_classes)

    def check_views_match(self, config: ml_collections.ConfigDict, image_size: int) -> None:
        """A crop-aware store's views replace the run's crop and flip draws: they must have
        been drawn as ``config.aug`` says, at the student's resolution (ValueError if not)."""
        if self.views is None:
            return
        stored = self.manifest["transform"]
        # The seed only chose the stored views; any run may replay them.
        want = _transform_record(config, image_size, self.views)
        differ = {k: (stored.get(k), v) for k, v in want.items()
                  if k != "seed" and stored.get(k) != v}
        if differ:
            raise ValueError(
                f"{self.directory} stores crop views drawn with "
                f"{', '.join(f'{k}={a!r}' for k, (a, _) in differ.items())}, but this run has "
                f"{', '.join(f'{k}={b!r}' for k, (_, b) in differ.items())} (aug.* / the "
                "model's image size): the stored views replace the run's crops, so write a "
                "store with this config (`python -m deit_jax.teacher_logits --views=K ...`) or "
                "set the run's aug.* to the store's")


def open_for_training(config: ml_collections.ConfigDict, *, num_classes: int,
                      num_examples: int, image_size: int) -> TeacherLogitsStore:
    """The store named by ``distillation.teacher = 'precomputed:DIR'``, checked against the run."""
    directory = precomputed_dir(config)
    if not directory:
        raise ValueError(f"distillation.teacher={config.distillation.teacher!r} names no "
                         "precomputed store ('precomputed:DIR')")
    store = TeacherLogitsStore.open(directory, **dataset_identity(config),
                                    num_classes=num_classes, num_examples=num_examples)
    store.check_views_match(config, image_size)
    return store


def attach(batches: Iterator[dict], store: TeacherLogitsStore) -> Iterator[dict]:
    """Adds ``teacher_logits`` float32 ``[devices, per_device, C]`` from each batch's ``index``
    (and ``view``, which ``train_batches`` adds when replaying a crop-aware store's views)."""
    for batch in batches:
        batch = dict(batch)
        batch["teacher_logits"] = store.lookup(batch["index"], batch.get("view"))
        yield batch


# ------------------------------------------------------------------------------ writing


def _teacher_outputs(variables, batch, *, model, top_k: int) -> dict[str, jax.Array]:
    """The teacher's eval-mode logits for one device's images ``[batch, (views,) H, W, 3]``
    (full float16 or top-k), shaped ``[batch, (views,) C or k]``."""
    images = batch["image"]
    logits = model.apply(variables, images.reshape(-1, *images.shape[-3:]), train=False)
    logits = logits.astype(jnp.float32).reshape(*images.shape[:-3], -1)
    if top_k:
        values, indices = jax.lax.top_k(logits, top_k)
        return {"values": values.astype(jnp.float16), "indices": indices.astype(jnp.int32)}
    return {"values": logits.astype(jnp.float16)}


def _load_teacher(config: ml_collections.ConfigDict, num_classes: int, image_size: int):
    """The teacher exactly as the training loop builds an on-the-fly one."""
    from deit_jax import models, steps, train  # train imports this module

    dist = config.distillation
    if precomputed_dir(config):
        raise ValueError(f"distillation.teacher={dist.teacher!r} is a store; to write one, "
                         "name the teacher model: --config.distillation.teacher=regnety_160")
    if dist.kind == "none":
        raise ValueError("distillation.kind='none': use the distillation training config "
                         "(e.g. configs/deit_s.py:distill=hard) so the teacher is the one "
                         "training would use")
    student = models.create_model(config.model.name,
                                  **steps.model_overrides(config, num_classes))
    teacher = train.build_teacher(config, student, num_classes, image_size)
    return teacher


def _transform_record(config: ml_collections.ConfigDict, image_size: int, views: int) -> dict:
    """The manifest's ``transform``: what the teacher saw of each example."""
    aug = config.aug
    if not views:
        return {"name": "eval", "image_size": image_size, "crop_ratio": aug.eval_crop_ratio,
                "interpolation": aug.interpolation}
    return {"name": "crops", "views": views, "image_size": image_size,
            "interpolation": aug.interpolation, "scale": [float(x) for x in aug.scale],
            "ratio": [float(x) for x in aug.ratio], "hflip": float(aug.hflip),
            "seed": config.seed}


def _write_npz(path: epath.Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes ``path`` atomically (a temporary file renamed into place)."""
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    tmp.write_bytes(buffer.getvalue())
    tmp.rename(path)


def _allgather(tree: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenates every process's host arrays along axis 0 (identity with one process)."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def write_teacher_logits(config: ml_collections.ConfigDict, out: str, *, top_k: int = 0,
                         shard_size: int = 10_000, batch_size: int = 0,
                         views: int = 0) -> dict[str, Any]:
    """Runs the teacher over the training split and writes a store in ``out``.

    Every process calls this (multi-host runs stay in lockstep: same shards, same batch
    count); process 0 writes. Resumes: shards already in ``out`` are skipped.

    Args:
      config: the training config; ``distillation.teacher`` / ``teacher_init`` name the teacher.
      out: the store directory (local or gs://).
      top_k: 0 stores full float16 rows; k > 0 the top-k logits and their class ids.
      shard_size: examples per shard file.
      batch_size: global batch of examples per teacher pass (0: ``config.eval_batch_size``,
        divided by ``views`` for a crops store); the teacher sees ``batch_size * views`` images.
      views: 0 = the eval view of each example; K > 0 = a crop-aware store of K crop + flip
        views per example (drawn with ``config.aug``), replayed by training.
    Returns:
      ``{'written': [shard, ...], 'skipped': [shard, ...], 'manifest': {...}}``.
    """
    from deit_jax import input_pipeline, models, steps

    if views < 0:
        raise ValueError(f"views must be 0 (eval view) or a positive count, got {views}")
    if not batch_size:
        batch_size = max(config.eval_batch_size // max(views, 1) // jax.device_count(), 1) * (
            jax.device_count())
    layout = input_pipeline.Layout.current(batch_size)
    probe = models.create_model(config.model.name, **steps.model_overrides(config, 1))
    image_size = steps.image_size_of(probe, config)
    source = input_pipeline.get_source(config, "train", image_size)
    num_classes = source.num_classes
    if config.dataset.num_classes and config.dataset.num_classes != num_classes:
        raise ValueError(f"config.dataset.num_classes={config.dataset.num_classes} but "
                         f"{source.name} has {num_classes} classes")
    if top_k < 0 or top_k > num_classes:
        raise ValueError(f"top_k must be in [0, {num_classes}] (0 = full logits), got {top_k}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    teacher = _load_teacher(config, num_classes, image_size)

    num_shards = math.ceil(source.num_examples / shard_size)
    manifest = {
        "format_version": FORMAT_VERSION,
        "teacher": config.distillation.teacher,
        "teacher_init": config.distillation.teacher_init,
        "teacher_fingerprint": variables_fingerprint(teacher.variables),
        **dataset_identity(config),
        "data_dir": config.dataset.data_dir,
        "num_examples": source.num_examples,
        "num_classes": num_classes,
        "transform": _transform_record(config, image_size, views),
        "top_k": top_k or None,
        "dtype": "float16",
        "shard_size": shard_size,
        "num_shards": num_shards,
        "complete": False,
    }
    root = _path(out)
    old = json.loads((root / MANIFEST).read_text()) if (root / MANIFEST).exists() else None
    if old is not None:
        differ = [k for k in _RESUME_KEYS if old.get(k) != manifest[k]]
        if differ:
            raise ValueError(
                f"{out} already holds a store written with other settings "
                f"({', '.join(f'{k}: {old.get(k)!r} -> {manifest[k]!r}' for k in differ)}): "
                "pass another --out, or delete it to start over")
    # Process 0 decides what is done; everyone follows (multi-host runs must agree).
    # Shard files count as done only under a matching manifest (checked above).
    done = np.array([old is not None and (root / shard_name(s, num_shards)).exists()
                     for s in range(num_shards)])
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        done = np.asarray(multihost_utils.broadcast_one_to_all(done))
    if jax.process_index() == 0:
        root.mkdir(parents=True, exist_ok=True)
        (root / MANIFEST).write_text(json.dumps(manifest, indent=2))

    todo = [s for s in range(num_shards) if not done[s]]
    skipped = [s for s in range(num_shards) if done[s]]
    if skipped:
        logging.info("teacher logits: %d of %d shards already in %s, skipped", len(skipped),
                     num_shards, out)
    p_forward = jax.pmap(functools.partial(_teacher_outputs, model=teacher.model, top_k=top_k),
                         axis_name=steps.AXIS)
    variables = steps.replicate(teacher.variables)

    def shard_examples(shard: int) -> int:
        return min(shard_size, source.num_examples - shard * shard_size)

    def shard_batches(shard: int) -> Iterator[dict]:
        start, n = shard * shard_size, shard_examples(shard)
        transform = input_pipeline.crop_views_transform(
            config, image_size, views, index_offset=start) if views else None
        for batch in input_pipeline.eval_batches(config, source.slice(start, start + n), layout,
                                                 image_size=image_size,
                                                 batch_size=layout.global_batch,
                                                 transform=transform):
            batch["index"] = batch["index"] + start
            yield batch

    total_batches = sum(  # eval_batches' count: the same on every process
        math.ceil(math.ceil(shard_examples(s) / layout.process_count) / layout.host_batch)
        for s in todo)
    # clu logs steps/s, percent done and ETA (batches of this process; all run in lockstep).
    from clu import periodic_actions

    report = periodic_actions.ReportProgress(num_train_steps=total_batches, every_secs=30.0)
    step, examples, t0 = 0, 0, time.time()
    for i, shard in enumerate(todo):
        pending = []
        for batch in shard_batches(shard):
            # Dispatch is asynchronous: the host prepares the next batch while devices run.
            outputs = p_forward(variables, {"image": batch["image"]})
            if views:
                outputs = {**outputs, "crops": batch["crop"]}
            pending.append((batch["index"].reshape(-1), batch["mask"].reshape(-1), outputs))
            step += 1
            report(step)
        ids = np.concatenate([ids for ids, _, _ in pending])
        # eval_batches: this process's examples first, then padding; an undecodable example
        # keeps its place with mask 0 (and a placeholder image). Its row is kept (the id must
        # be in the store) and flagged in ``decoded``.
        n_mine = len(range(jax.process_index(), shard_examples(shard), jax.process_count()))
        local = {"ids": ids, "real": np.arange(len(ids)) < n_mine,
                 "decoded": np.concatenate([mask for _, mask, _ in pending]) > 0}
        for key in pending[0][2]:
            local[key] = np.concatenate([
                np.asarray(jax.device_get(o[key])).reshape(-1, *o[key].shape[2:])
                for _, _, o in pending])
        gathered = _allgather(local)
        if jax.process_index() == 0:
            keep = gathered.pop("real")
            order = np.argsort(gathered["ids"][keep], kind="stable")
            arrays = {k: v[keep][order] for k, v in gathered.items()}
            if not arrays["decoded"].all():
                logging.warning("teacher logits: %d undecodable examples in shard %d (ids %s): "
                                "their rows are the teacher on a placeholder image",
                                (~arrays["decoded"]).sum(), shard,
                                arrays["ids"][~arrays["decoded"]][:10].tolist())
            _write_npz(root / shard_name(shard, num_shards), arrays)
        elapsed, examples = time.time() - t0, examples + shard_examples(shard)
        remaining = sum(shard_examples(s) for s in todo[i + 1:])
        logging.info("teacher logits: shard %d/%d written (%d/%d of this run), %.0f images/s, "
                     "ETA %.0fs", shard + 1, num_shards, i + 1, len(todo), examples / elapsed,
                     remaining * elapsed / examples)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("teacher_logits_shards_written")
    manifest["complete"] = True
    if jax.process_index() == 0:
        (root / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return {"written": todo, "skipped": skipped, "manifest": manifest}


# --------------------------------------------------------------------------------- command

def define_flags(flag_values: flags.FlagValues = flags.FLAGS,
                 argv: list[str] | None = None) -> flags.FlagValues:
    """Defines the command's flags in ``flag_values``.

    Only the command defines them: a training process imports this module and ``main.py``
    owns ``--config`` there. ``argv`` (default ``sys.argv``) is where ml_collections finds
    the ``--config.key=value`` overrides.
    """
    config_flags.DEFINE_config_file(
        "config", None, "The distillation training config, e.g. configs/deit_s.py:distill=hard.",
        flag_values=flag_values, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("out", None, "Store directory (local or gs://); resumed if it exists.",
                        flag_values=flag_values)
    flags.DEFINE_integer("top_k", 0, "0: full float16 logits; k > 0: top-k values + indices.",
                         flag_values=flag_values)
    flags.DEFINE_integer("shard_size", 10_000, "Examples per shard file.",
                         flag_values=flag_values)
    flags.DEFINE_integer("batch_size", 0, "Global batch of examples per teacher pass (0: "
                         "eval_batch_size / max(views, 1)).", flag_values=flag_values)
    flags.DEFINE_integer("views", 0, "0: the eval view of each example; K > 0: a crop-aware "
                         "store of K RandomResizedCrop + flip views per example (FKD), replayed "
                         "by training.", flag_values=flag_values)
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first "
                      "(multi-host TPU pods, SLURM).", flag_values=flag_values)
    flags.mark_flags_as_required(["config", "out"], flag_values=flag_values)
    return flag_values


def run(flag_values: flags.FlagValues) -> dict[str, Any]:
    """The command's body on parsed flags (tests call this with their own ``FlagValues``)."""
    if flag_values.distributed:
        jax.distributed.initialize()
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # tf.data stays on the host
    result = write_teacher_logits(flag_values.config, flag_values.out, top_k=flag_values.top_k,
                                  shard_size=flag_values.shard_size,
                                  batch_size=flag_values.batch_size, views=flag_values.views)
    logging.info("teacher logits in %s: %d shards written, %d skipped", flag_values.out,
                 len(result["written"]), len(result["skipped"]))
    return result


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    run(flags.FLAGS)


if __name__ == "__main__":
    from deit_jax.errors import exit_on_user_error

    define_flags()
    app.run(exit_on_user_error(main))
