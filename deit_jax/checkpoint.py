"""Orbax checkpoints: the training run's manager, and standalone variable checkpoints.

Two kinds of directory:
- a training workdir's ``checkpoints/`` (``CheckpointManager``): items ``state`` (the
  unreplicated TrainState) and ``meta`` (JSON: step, epoch, config name);
- a *variables* checkpoint written by ``deit_jax.convert`` (``variables/`` + ``metadata.json``)
  that ``config.init_from`` and eval-only runs start from.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


def _path(directory: str) -> epath.Path:
    path = epath.Path(directory)
    # Orbax needs absolute local paths; gs:// paths are absolute already.
    return path if "://" in str(directory) else epath.Path(path.resolve())


def create_manager(workdir: str, *, max_to_keep: int, enable_async: bool = True
                   ) -> ocp.CheckpointManager:
    """The run's checkpoint manager under ``workdir/checkpoints`` (created by process 0)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=enable_async)
    return ocp.CheckpointManager(_path(workdir) / "checkpoints", options=options,
                                 item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    """Saves a host copy of ``state`` (an unreplicated pytree) and ``meta`` at ``step``.

    Arrays are fetched to host numpy first so the write can go on asynchronously while training
    continues on donated device buffers.
    """
    host_state = jax.tree.map(np.asarray, jax.device_get(state))
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(host_state),
                                               meta=ocp.args.JsonSave(meta)), force=True)


def restore(manager: ocp.CheckpointManager, step: int, target: Any) -> tuple[Any, dict]:
    """Restores ``(state, meta)`` at ``step`` into the structure of ``target`` (host arrays)."""
    abstract = jax.tree.map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), target)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - re-raised with the directory and the fix
        raise RuntimeError(
            f"cannot restore checkpoint step {step} from {manager.directory}: {e}\n"
            "The checkpoint does not fit this config (another model or optimizer?) or is "
            "corrupt. Use another --workdir, or move that step's folder away to resume from "
            "an earlier one; nothing was deleted.") from e
    return restored["state"], restored["meta"]


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
