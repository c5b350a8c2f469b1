"""Fault injection on smoke runs: kill -9 at random points, damaged checkpoints, a NaN.

    python benchmarks/fault_injection.py --trials=10 [--workdir=/tmp/faults] [--seed=0]

Every experiment runs ``python -m deit_jax.main`` on ``configs/deit_ti.py:smoke`` (a 1-block
model, ``STEPS`` steps, a checkpoint every ``EVERY``), and holds the result to an uninterrupted
reference run bit for bit (every array of the final checkpoint):

- kill: a run killed with SIGKILL at a random moment (start-up, training, an asynchronous write,
  checkpoint garbage collection, the final save), then the same command rerun to the end;
- damage: the reference's checkpoints up to ``STEPS - EVERY``, the newest damaged in each way of
  ``DAMAGES``, then the command rerun: it must set the damaged step aside and resume from the
  one before it;
- nan: ``--config.optim.lr=1e30``: the run must stop with status 2 naming a checkpoint that
  exists, holds finite arrays and is not left half-written.

Totals: trials, resumed (the rerun ended with status 0), identical (final state equal to the
reference), lost (a rerun that failed, or a state that differs). Exit status 1 when any is lost.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 12, 4
FLAGS = ("--config=configs/deit_ti.py:smoke", "--config.model.depth=1",
         f"--config.max_steps={STEPS}", f"--config.checkpoint_every_steps={EVERY}",
         "--config.keep_checkpoints=2", "--config.log_every_steps=2",
         "--config.eval_every_epochs=100", "--config.dataset.synthetic_eval_size=16")


# ---------------------------------------------------------------------------------- damage


def _largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _emptied(step: Path) -> None:
    for child in step.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def _missing_state(step: Path) -> None:
    shutil.rmtree(step / "state")


def _missing_meta(step: Path) -> None:
    shutil.rmtree(step / "meta")


def _truncated(step: Path) -> None:
    path = _largest_file(step / "state")
    os.truncate(path, path.stat().st_size // 2)


def _zeroed(step: Path) -> None:
    path = _largest_file(step / "state")
    path.write_bytes(bytes(path.stat().st_size))


def _bit_flip(step: Path) -> None:
    path = _largest_file(step / "state")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _no_metadata(step: Path) -> None:
    (step / "state" / "_METADATA").unlink()


def _meta_garbage(step: Path) -> None:
    (step / "meta" / "metadata").write_text("{not json")


DAMAGES = {"emptied step dir": _emptied, "missing state item": _missing_state,
           "missing meta item": _missing_meta, "truncated data file": _truncated,
           "zeroed data file": _zeroed, "one flipped bit": _bit_flip,
           "missing _METADATA": _no_metadata, "garbage meta json": _meta_garbage}
