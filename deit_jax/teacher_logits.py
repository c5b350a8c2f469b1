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


The store's format, its reader and the join to batches are in ``teacher_store.py``.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from clu import periodic_actions
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import config_flags

from deit_jax import cli, input_pipeline, steps
from deit_jax.errors import ConfigError
from deit_jax.teacher import Teacher, build_teacher
from deit_jax.teacher import check_config as teacher_check_config
from deit_jax.teacher_store import (
    FORMAT_VERSION,
    MANIFEST,
    RESUME_KEYS,
    dataset_identity,
    path_of,
    shard_name,
    transform_record,
    variables_fingerprint,
)
from deit_jax.train import open_training_data

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


def load_teacher(config: ml_collections.ConfigDict, student, num_classes: int,
                 image_size: int) -> Teacher:
    """The teacher exactly as the training loop builds an on-the-fly one."""
    dist = config.distillation
    if dist.teacher_logits:
        raise ConfigError(f"distillation.teacher_logits={dist.teacher_logits!r} reads a store; to "
                          "write one, run the teacher model: drop "
                          "--config.distillation.teacher_logits")
    if dist.kind == "none":
        raise ConfigError("distillation.kind='none': use the distillation training config "
                          "(e.g. configs/deit_s.py:distill=hard) so the teacher is the one "
                          "training would use")
    return build_teacher(config, student, num_classes, image_size)


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
    if views < 0:
        raise ValueError(f"views must be 0 (eval view) or a positive count, got {views}")
    if not batch_size:
        batch_size = max(config.eval_batch_size // max(views, 1) // jax.device_count(), 1) * (
            jax.device_count())
    layout = input_pipeline.Layout.current(batch_size)
    teacher_check_config(config)
    student, image_size, source = open_training_data(config)
    num_classes = source.num_classes
    if top_k < 0 or top_k > num_classes:
        raise ValueError(f"top_k must be in [0, {num_classes}] (0 = full logits), got {top_k}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    teacher = load_teacher(config, student, num_classes, image_size)

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
        "transform": transform_record(config, image_size, views),
        "top_k": top_k or None,
        "dtype": "float16",
        "shard_size": shard_size,
        "num_shards": num_shards,
        "complete": False,
    }
    root = path_of(out)
    old = json.loads((root / MANIFEST).read_text()) if (root / MANIFEST).exists() else None
    if old is not None:
        differ = [k for k in RESUME_KEYS if old.get(k) != manifest[k]]
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
        multihost_utils.sync_global_devices("teacher_logits_shards_written")
    manifest["complete"] = True
    if jax.process_index() == 0:
        (root / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return {"written": todo, "skipped": skipped, "manifest": manifest}


# --------------------------------------------------------------------------------- command

def define_flags(flag_values: flags.FlagValues = flags.FLAGS,
                 argv: list[str] | None = None) -> flags.FlagValues:
    """Defines the command's flags in ``flag_values``; ``argv`` (default ``sys.argv``) is where
    ml_collections finds the ``--config.key=value`` overrides."""
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
    cli.define_distributed_flags(flag_values)
    flags.mark_flags_as_required(["config", "out"], flag_values=flag_values)
    return flag_values


def run(flag_values: flags.FlagValues) -> dict[str, Any]:
    """The command's body on parsed flags (tests call this with their own ``FlagValues``)."""
    cli.initialize_from_flags(flag_values)
    cli.hide_accelerators_from_tensorflow()
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


def console() -> None:
    """The console entry point ``deit-teacher-logits``."""
    cli.run(main, define_flags)


if __name__ == "__main__":
    console()
