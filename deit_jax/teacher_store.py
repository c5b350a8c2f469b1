"""The teacher-logits store: its format, the reader training uses, and the join to batches.

A store (written by ``python -m deit_jax.teacher_logits``, ``teacher_logits.py``) is a directory:
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

Training (``distillation.teacher_logits=DIR``) reads a store with ``open_for_training``
(validated against the run's dataset, split, class and example counts before any step) and
``attach``, which adds ``batch['teacher_logits']`` on the host from ``batch['index']`` (and
``batch['view']``). Top-k rows are filled back to full rows with ``TOPK_FILL`` (-1e4): softmax
then puts exactly zero mass (in float32) outside the stored classes, i.e. the teacher's
distribution renormalised over its top k.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import flax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

# 2 added crop-aware stores; version-1 stores (eval transform only) read unchanged.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
# Logit given to classes outside a top-k row. exp(-1e4 / tau - max) underflows to exactly 0 in
# float32 for any tau below ~100, and -1e4 is representable in float16.
TOPK_FILL = -1e4
# Manifest keys a resumed command must agree on (anything else may differ, e.g. timestamps).
RESUME_KEYS = ("format_version", "teacher", "teacher_fingerprint", "dataset", "split",
                "num_examples", "num_classes", "transform", "top_k", "shard_size")


def path_of(directory: str) -> epath.Path:
    return epath.Path(directory)


def shard_name(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}.npz"


def dataset_identity(config: ml_collections.ConfigDict) -> dict[str, str]:
    """What a store records (and training checks) as the dataset: its name and training split."""
    return {"dataset": config.dataset.name, "split": config.dataset.train_split}


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
    path = path_of(directory) / MANIFEST
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
               "--config.distillation.teacher_logits=NEW_DIR")
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
        files = [path_of(directory) / shard_name(s, num_shards) for s in range(num_shards)]
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
        # The seed only chose the stored views; any run may replay them. `pixels` (the crop's
        # resize / library) is provenance: another one changes pixels by about a grey level.
        want = transform_record(config, image_size, self.views)
        differ = {k: (stored.get(k), v) for k, v in want.items()
                  if k not in ("seed", "pixels") and stored.get(k) != v}
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
    """The store named by ``distillation.teacher_logits``, checked against the run."""
    directory = config.distillation.teacher_logits
    if not directory:
        raise ValueError("distillation.teacher_logits is empty: it names no precomputed store "
                         "(--config.distillation.teacher_logits=DIR)")
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



def transform_record(config: ml_collections.ConfigDict, image_size: int, views: int) -> dict:
    """The manifest's ``transform``: what the teacher saw of each example."""
    from deit_jax.augment.host import crop_pixels  # TensorFlow: only when views are stored

    aug = config.aug
    if not views:
        return {"name": "eval", "image_size": image_size, "crop_ratio": aug.eval_crop_ratio,
                "interpolation": aug.interpolation}
    return {"name": "crops", "views": views, "image_size": image_size,
            "interpolation": aug.interpolation, "scale": [float(x) for x in aug.scale],
            "ratio": [float(x) for x in aug.ratio], "hflip": float(aug.hflip),
            "seed": config.seed, "pixels": "{}/{}".format(*crop_pixels(aug))}

