"""Orbax checkpoints: the training run's checkpoints, and standalone variable checkpoints.

Two kinds of directory:
- a training workdir's ``checkpoints/`` (:class:`RunCheckpoints` over an Orbax
  ``CheckpointManager``): items ``state`` (the unreplicated TrainState) and ``meta`` (JSON: step,
  epoch, config name, and a CRC-32 of every state array, verified at restore);
- a *variables* checkpoint written by ``deit_jax.convert`` (``variables/`` + ``metadata.json``)
  that ``config.init_from`` and eval-only runs start from.

What a run's checkpoint promises: its arrays are finite and (except the run's last and a
preemption's, which have no next step) the next step's loss computed from them was finite
before it was written; it restores bit for bit or is found damaged (unreadable, incomplete, or
checksums that disagree: one flipped bit) and set aside as ``<step>.damaged-<time>`` (never
deleted), the resume going on from the newest checkpoint that restores.
"""

from __future__ import annotations

import datetime
import errno
import json
import re
import sys
import time
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from deit_jax.errors import CheckpointError, DivergedError

ON_DAMAGE = ("fallback", "stop")


class DamagedCheckpoint(Exception):
    """A step that cannot be restored as saved (internal: handled by ``restore_latest``)."""

    def __init__(self, step: int, why: str):
        super().__init__(f"checkpoint step {step} is damaged: {why}")
        self.step, self.why = step, why


def _path(directory: str) -> epath.Path:
    path = epath.Path(directory)
    # Orbax needs absolute local paths; gs:// paths are absolute already.
    return path if "://" in str(directory) else epath.Path(path.resolve())


def _short(error: BaseException, limit: int = 300) -> str:
    """``error`` on one line, Orbax's and TensorStore's long contexts cut."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[:limit] + " ..."


def create_manager(workdir: str, *, max_to_keep: int, enable_async: bool = True
                   ) -> ocp.CheckpointManager:
    """The run's checkpoint manager under ``workdir/checkpoints`` (created by process 0)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=enable_async)
    return ocp.CheckpointManager(_path(workdir) / "checkpoints", options=options,
                                 item_names=("state", "meta"))


# --------------------------------------------------------------------------- integrity


def checksums(tree: Any) -> dict[str, str]:
    """``{leaf path: 'dtype shape crc32'}`` of a pytree of host arrays (order independent)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        x = np.ascontiguousarray(leaf)
        out[jax.tree_util.keystr(path)] = (
            f"{x.dtype} {list(x.shape)} {zlib.crc32(x.reshape(-1).view(np.uint8)):08x}")
    return out


def first_non_finite(tree: Any) -> str | None:
    """The path of the first floating-point leaf holding a NaN or an infinity, else None."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        x = np.asarray(leaf)
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            return jax.tree_util.keystr(path)
    return None


def _write_error(error: BaseException, step: int, directory) -> CheckpointError | None:
    """A user-fixable write failure (full disk, read-only, permissions) as one line, else None."""
    chain, e = [], error
    while e is not None and len(chain) < 20:
        chain.append(e)
        e = e.__cause__ or e.__context__
    codes = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
             errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied"}
    texts = {"no space left": "the disk is full", "quota exceeded": "the disk quota is exceeded",
             "read-only file system": "the file system is read-only",
             "permission denied": "permission denied"}
    why = next((codes[c.errno] for c in chain if isinstance(c, OSError) and c.errno in codes),
               None) or next((w for c in chain for t, w in texts.items()
                              if t in str(c).lower()), None)
    if why is None:
        return None
    # An asynchronous save fails at the next save or wait: name the step that failed.
    failed = next((m.group(1) for c in chain if (m := re.search(
        r"(\d+)\.orbax-checkpoint-tmp", str(c)))), None)
    step = int(failed) if failed else step
    return CheckpointError(f"cannot write checkpoint step {step} in {directory}: {why}. The "
                           "earlier checkpoints are kept; free space (or fix the permissions) "
                           "and rerun the same command to resume from the latest of them")


# ------------------------------------------------------------------------------- run


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    """Saves ``state`` (an unreplicated pytree of host arrays) and ``meta`` at ``step``.

    The arrays' checksums go into ``meta``; the write goes on asynchronously.
    """
    meta = {**meta, "checksums": checksums(state)}
    try:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # noqa: BLE001 - user-fixable failures become one line
        if (error := _write_error(e, step, manager.directory)) is None:
            raise
        raise error from e


def wait(manager: ocp.CheckpointManager) -> None:
    """Waits for pending asynchronous saves; a failed one raises a one-line error."""
    try:
        manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - user-fixable failures become one line
        if (error := _write_error(e, manager.latest_step(), manager.directory)) is None:
            raise
        raise error from e


def _abstract(target: Any) -> Any:
    return jax.tree.map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), target)


def _mismatch(manager: ocp.CheckpointManager, step: int, target: Any) -> str | None:
    """What makes ``step``'s saved arrays unfit for ``target``, if its metadata is readable."""
    try:
        saved = manager.item_metadata(step)["state"]
    except Exception:  # noqa: BLE001 - unreadable metadata: damage, not a mismatch
        return None
    if saved is None:
        return None
    shapes = sorted(tuple(m.shape) for m in jax.tree.leaves(getattr(saved, "tree", saved)))
    wanted = sorted(tuple(np.shape(x)) for x in jax.tree.leaves(target))
    if shapes == wanted:
        return None
    return f"{len(shapes)} arrays saved, this config's state has {len(wanted)} or other shapes"


def _ignore_late_reads() -> None:
    """Silences the reads/writes of a failed restore/save that end after Orbax's event loop.

    When one TensorStore read or write fails, Orbax's ``asyncio.run`` ends while others are in
    flight; each then reports ``RuntimeError('Event loop is closed')`` through
    ``sys.unraisablehook``, dozens of tracebacks burying the one line that matters.
    """
    previous = sys.unraisablehook
    if getattr(previous, "deit_jax", False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.deit_jax = True
    sys.unraisablehook = hook


def restore(manager: ocp.CheckpointManager, step: int, target: Any) -> tuple[Any, dict]:
    """Restores ``(state, meta)`` at ``step`` into the structure of ``target`` (host arrays).

    Raises :class:`CheckpointError` when the checkpoint was written for another model or
    optimizer, :class:`DamagedCheckpoint` when it cannot be read or its arrays disagree with the
    checksums written at save (checkpoints from before checksums are restored unverified).
    """
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(target)), meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - classified below
        _ignore_late_reads()
        if (why := _mismatch(manager, step, target)) is not None:
            raise CheckpointError(
                f"checkpoint step {step} in {manager.directory} does not fit this config "
                f"({why}): it was written by another model or optimizer; use another "
                "--workdir") from e
        raise DamagedCheckpoint(step, f"cannot be read ({_short(e)})") from e
    state, meta = restored["state"], restored["meta"]
    shapes = [np.shape(x) for x in jax.tree.leaves(state)]
    if shapes != [np.shape(x) for x in jax.tree.leaves(target)]:  # Orbax keeps saved shapes
        raise CheckpointError(
            f"checkpoint step {step} in {manager.directory} does not fit this config (other "
            "array shapes): it was written by another model; use another --workdir")
    expected = (meta or {}).get("checksums")
    if expected is not None:
        actual = checksums(jax.tree.map(np.asarray, state))
        bad = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
        if bad:
            raise DamagedCheckpoint(step, f"{len(bad)} arrays differ from the checksums written "
                                    f"at save, e.g. {bad[0]} (corrupted on disk)")
    return state, meta


class RunCheckpoints:
    """A training run's checkpoints: holds a step's state until it is known good, then saves.

    ``hold(step, state)`` takes a host copy of the state after step ``step`` and checks it is
    finite; ``commit()`` writes it, which the loop does once the loss of step ``step + 1``
    (computed from these very parameters) is known to be finite. A non-finite loss ``drop()``s
    it instead, so a checkpoint never holds parameters that give a non-finite loss.
    """

    def __init__(self, workdir: str, *, max_to_keep: int, on_damage: str = "fallback",
                 enable_async: bool = True):
        self.manager = create_manager(workdir, max_to_keep=max_to_keep,
                                      enable_async=enable_async)
        self.on_damage = on_damage
        _ignore_late_reads()
        self.held: tuple[int, Any, dict] | None = None

    @property
    def directory(self):
        return self.manager.directory

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def hold(self, step: int, state: Any, meta: dict) -> None:
        host = jax.tree.map(np.asarray, jax.device_get(state))
        if (leaf := first_non_finite(host)) is not None:
            raise DivergedError(f"non-finite values in {leaf} after step {step}; "
                                f"{self.last_good_note()}")
        self.held = (step, host, meta)

    def commit(self) -> int | None:
        """Saves the held state; returns its step (None when nothing was held)."""
        if self.held is None:
            return None
        step, host, meta = self.held
        self.held = None
        save(self.manager, step, host, meta)
        return step

    def last_good_note(self) -> str:
        """Drops the held state, finishes pending saves, names the newest finalised step."""
        self.held = None
        try:
            wait(self.manager)
            self.manager.reload()
        except Exception as e:  # noqa: BLE001 - the message must still come out
            logging.error("finishing the pending checkpoint failed: %s", _short(e))
        latest = self.manager.latest_step()
        if latest is None:
            return f"no good checkpoint in {self.directory}"
        return (f"last good checkpoint: step {latest} in {self.directory} (finite, and so was "
                "the loss of the step after it); lower optim.lr or set optim.clip_grad before "
                "rerunning, which resumes from it")

    def wait(self) -> None:
        wait(self.manager)

    def restore_latest(self, target: Any) -> tuple[Any, dict] | None:
        """``(state, meta)`` of the newest checkpoint that restores, None when there is none.

        A damaged newest checkpoint is set aside with a warning (``on_damage='fallback'``) or
        stops the run with the fix (``'stop'``).
        """
        moved = []
        while (step := self.manager.latest_step()) is not None:
            try:
                damage = None
                restored = restore(self.manager, step, target)
            except DamagedCheckpoint as e:
                damage, restored = e, None
            damage = _agree(damage, step)
            if damage is None:
                if moved:
                    logging.warning("resumed from step %d, the newest checkpoint that restores "
                                    "(damaged ones set aside: %s)", step, ", ".join(moved))
                return restored
            folder = self.directory / str(step)
            if self.on_damage == "stop":
                raise CheckpointError(
                    f"{damage} ({folder}); move that folder away to resume from the previous "
                    "checkpoint, or set --config.checkpoint_on_damage=fallback to have it "
                    "done; nothing was deleted")
            aside = self._set_aside(step)
            moved.append(aside.name)
            logging.warning("%s: moved %s to %s (kept, not deleted); trying the previous one",
                            damage, folder, aside)
        if moved:
            raise CheckpointError(
                f"no checkpoint in {self.directory} restores (set aside: {', '.join(moved)}); "
                "rerun to start the run over, or use another --workdir")
        return None

    def _set_aside(self, step: int) -> epath.Path:
        now = np.int64(time.time_ns() // 1000)
        if jax.process_count() > 1:  # one name on every process
            now = multihost_utils.broadcast_one_to_all(now)
        stamp = datetime.datetime.fromtimestamp(int(now) / 1e6, datetime.timezone.utc)
        # '<step>.damaged-<time>Z' is not an Orbax step name (not all digits, no '_<digits>'
        # end), so the manager neither lists nor garbage-collects it.
        aside = self.directory / f"{step}.damaged-{stamp.strftime('%Y%m%dT%H%M%S%fZ')}"
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"deit_jax set aside checkpoint {step}")
        self.manager.reload()
        return aside

    def close(self) -> None:
        self.manager.close()


def _agree(damage: DamagedCheckpoint | None, step: int) -> DamagedCheckpoint | None:
    """Every process takes a step as damaged when any process found it so."""
    if jax.process_count() == 1:
        return damage
    flags = multihost_utils.process_allgather(np.int32(damage is not None))
    if damage is None and np.asarray(flags).any():
        return DamagedCheckpoint(step, "another process could not restore it")
    return damage


# -------------------------------------------------------------------------- variables


def save_variables(directory: str, variables: dict, metadata: dict | None = None) -> None:
    """Writes ``variables`` ({'params': ..., ['batch_stats': ...]}) as a standalone checkpoint."""
    path = _path(directory)
    path.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / "variables", jax.tree.map(np.asarray, variables), force=True)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        (path / "metadata.json").write_text(json.dumps(metadata or {}, indent=2))


def is_variables_checkpoint(directory: str) -> bool:
    return (_path(directory) / "variables").exists()


def load_variables(directory: str) -> tuple[dict, dict]:
    """Reads a checkpoint written by ``save_variables``: returns ``(variables, metadata)``."""
    path = _path(directory)
    if not (path / "variables").exists():
        raise FileNotFoundError(
            f"{directory} is not a deit-jax variables checkpoint (no 'variables/' inside); "
            "create one with `python -m deit_jax.convert --model NAME --src FILE --out DIR`")
    try:
        variables = ocp.StandardCheckpointer().restore(path / "variables")
    except Exception as e:  # noqa: BLE001 - re-raised with the directory
        raise ValueError(f"cannot read the checkpoint in {directory}: {e}") from e
    meta_file = path / "metadata.json"
    metadata = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    return jax.tree.map(np.asarray, variables), metadata


def has_run_checkpoints(workdir: str) -> bool:
    """True when ``workdir`` holds a training run's checkpoints."""
    directory = _path(workdir) / "checkpoints"
    return directory.exists() and any(p.name.isdigit() for p in directory.iterdir())


def restore_raw(manager: ocp.CheckpointManager, step: int) -> dict:
    """The ``state`` item at ``step`` as a plain tree of host arrays (no target structure)."""
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))
    except Exception as e:  # noqa: BLE001 - re-raised with the directory
        raise ValueError(f"cannot read checkpoint step {step} in {manager.directory}: {e}") from e
    return jax.tree.map(np.asarray, restored["state"])
