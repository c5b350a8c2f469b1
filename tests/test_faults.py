"""Faults and mistakes: a NaN, damaged and corrupted checkpoints, user errors, two writers.

Each test is one case of issue 14 and fails on the code before it: the run's checkpoints must
be really good, damage must be set aside (never deleted) with the resume going on from the newest
checkpoint that restores, and every user-fixable mistake must end in one line naming the fix.
"""

from __future__ import annotations

import errno
import functools
import importlib.util
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import deit_ti
from deit_jax import checkpoint, errors, models, optim, steps, train, workdir
from deit_jax.errors import CheckpointError, ConfigError, DivergedError, WorkdirError

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 6, 2
_spec = importlib.util.spec_from_file_location("fault_injection",
                                               REPO / "benchmarks" / "fault_injection.py")
fault_injection = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fault_injection)


def config(**overrides):
    """The smoke config with one block, a 16-image eval set and evaluation at the end only."""
    c = deit_ti.get_config("smoke")
    c.unlock()
    c.update_from_flattened_dict({"model.depth": 1, "dataset.synthetic_eval_size": 16,
                                  "eval_every_epochs": 100.0, "max_steps": STEPS,
                                  "checkpoint_every_steps": EVERY, "keep_checkpoints": 10,
                                  "log_every_steps": 1, **overrides})
    c.lock()
    return c


@functools.cache
def target_state(embed_dim: int = 0):
    """A TrainState of the test config's structure (restore target), built once."""
    c = config(**{"model.embed_dim": embed_dim} if embed_dim else {})
    model = models.from_config(c, 10)[0]
    tx, _ = optim.create_optimizer(c, 8)
    return steps.create_train_state(model, tx, jax.random.key(0), 32, ema=c.ema.enabled)


def saved(workdir_: Path) -> list[str]:
    return sorted(p.name for p in (workdir_ / "checkpoints").iterdir())


def state_at(workdir_: Path, step: int) -> dict:
    manager = checkpoint.create_manager(str(workdir_), max_to_keep=100, enable_async=False)
    return checkpoint.restore_raw(manager, step)


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, dict, list[str]]:
    """An uninterrupted run that diverges (finite): checkpoints at steps 2, 4 and 6."""
    path = tmp_path_factory.mktemp("faults") / "base"
    warnings = _Warnings()
    logging.getLogger("absl").addHandler(warnings)
    try:
        results = train.train_and_evaluate(
            config(**{"optim.lr": 1e3, "optim.warmup_epochs": 0.0}), str(path))
    finally:
        logging.getLogger("absl").removeHandler(warnings)
    assert saved(path) == ["2", "4", "6"]
    return path, results, warnings.messages


# ------------------------------------------------------------------------- 1. non-finite


def test_nan_stops_naming_a_finished_finite_checkpoint_whose_next_loss_was_finite(tmp_path):
    # A 1-epoch warmup without the official one-epoch lag holds the warmup lr for the first
    # epoch (8 steps): step 9 takes the first update at lr 1e30, its parameters are finite
    # (~1e28), the loss of step 10 is not.
    with pytest.raises(DivergedError) as info:
        train.train_and_evaluate(config(**{"optim.lr": 1e30, "max_steps": 12,
                                           "optim.warmup_epochs": 1.0,
                                           "optim.official_lr_lag": False,
                                           "checkpoint_every_steps": 1}), str(tmp_path))
    message = str(info.value)
    bad = int(re.search(r"(?:at|after) step (\d+)", message).group(1))
    good = re.search(r"last good checkpoint: step (\d+)", message)
    assert good, message
    good = int(good.group(1))
    # Every checkpoint is finished (none left *.orbax-checkpoint-tmp by the exit) and the newest
    # is the one named. A non-finite loss at step s comes from the parameters of step s - 1:
    # those are not saved; nor are non-finite parameters.
    assert all(name.isdigit() for name in saved(tmp_path)), saved(tmp_path)
    assert max(int(n) for n in saved(tmp_path)) == good
    assert good == bad - (2 if "non-finite loss" in message else 1), message
    assert good >= 8
    leaves = jax.tree.leaves(state_at(tmp_path, good))
    assert all(np.isfinite(x).all() for x in leaves if np.issubdtype(x.dtype, np.floating))


def test_finite_divergence_is_warned(base):
    _, results, warnings = base
    assert results["train/loss"] > 10 * results["train/loss_first"]  # it did diverge, finite
    assert any("diverging" in m for m in warnings), warnings


# ----------------------------------------------------------------- 2. and 5. damaged newest


@pytest.mark.parametrize("damage", sorted(fault_injection.DAMAGES))
def test_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_restores(
        base, tmp_path, damage, caplog):
    base = base[0]
    run = tmp_path / "run"
    shutil.copytree(base, run)
    fault_injection.DAMAGES[damage](run / "checkpoints" / "6")
    caplog.set_level(logging.WARNING)
    restored = checkpoint.RunCheckpoints(str(run), max_to_keep=10).restore_latest(
        target_state())
    assert int(restored[0].step) == 4
    expected = checkpoint.restore(checkpoint.create_manager(str(base), max_to_keep=10), 4,
                                  target_state())[0]
    jax.tree.map(np.testing.assert_array_equal, restored[0], expected)
    names = saved(run)
    assert names[:2] == ["2", "4"] and names[2].startswith("6.damaged-"), names
    assert any("step 6 is damaged" in r.getMessage() for r in caplog.records)


def test_stop_mode_stops_naming_the_damage_and_moves_nothing(base, tmp_path):
    base = base[0]
    run = tmp_path / "run"
    shutil.copytree(base, run)
    fault_injection.DAMAGES["one flipped bit"](run / "checkpoints" / "6")
    ckpts = checkpoint.RunCheckpoints(str(run), max_to_keep=10, on_damage="stop")
    with pytest.raises(CheckpointError, match=r"step 6 is damaged: .*checksums.*fallback"):
        ckpts.restore_latest(target_state())
    assert saved(run) == ["2", "4", "6"]


def test_a_checkpoint_of_another_model_is_not_taken_for_damage(base, tmp_path):
    base = base[0]
    run = tmp_path / "run"
    shutil.copytree(base, run)
    with pytest.raises(CheckpointError, match="does not fit this config"):
        checkpoint.RunCheckpoints(str(run), max_to_keep=10).restore_latest(target_state(24))
    assert saved(run) == ["2", "4", "6"]


def test_checkpoints_without_checksums_still_restore(base, tmp_path):
    base = base[0]
    state = jax.tree.map(np.asarray, state_at(base, 4))
    manager = checkpoint.create_manager(str(tmp_path), max_to_keep=3, enable_async=False)
    manager.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave({"step": 4})))
    restored = checkpoint.RunCheckpoints(str(tmp_path), max_to_keep=3).restore_latest(
        target_state())
    assert int(restored[0].step) == 4 and "checksums" not in restored[1]
    jax.tree.map(np.testing.assert_array_equal, restored[0].params, state["params"])


# ------------------------------------------------------------------------ 3. user errors


@pytest.mark.parametrize("overrides,match", [
    ({"batch_size": 0}, "batch_size=0 must be positive"),
    ({"batch_size": -32}, "batch_size=-32 must be positive"),
    ({"eval_batch_size": 12}, "eval_batch_size=12 is not divisible"),
    ({"eval_batch_size": 0}, "eval_batch_size=0 must be positive"),
    ({"checkpoint_every_steps": 0}, "checkpoint_every_steps=0"),
    ({"checkpoint_on_damage": "ignore"}, "checkpoint_on_damage='ignore'"),
])
def test_config_mistakes_are_named(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        train.train_and_evaluate(config(**overrides), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_workdir_that_is_a_file_or_read_only(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(WorkdirError, match="is a file"):
        train.train_and_evaluate(config(), str(tmp_path / "file"))

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(workdir, "open", read_only, raising=False)
    with pytest.raises(WorkdirError, match="read-only file system"):
        train.train_and_evaluate(config(), str(tmp_path / "ro"))
    assert not list((tmp_path / "ro").glob("events.out.tfevents.*"))


def test_config_key_typos_get_a_suggestion():
    argv = ["main", "--config=configs/deit_ti.py:smoke", "--config.optim.learning_rate=1"]
    line = errors.config_flag_error(argv, AttributeError("'learning_rate'"))
    assert "'optim.learning_rate'" in line and "Did you mean optim.lr?" in line
    line = errors.config_flag_error(["main", "--config=configs/nope.py"], OSError("x"))
    assert "no config file 'configs/nope.py'" in line


def _cli(*args, env=None, timeout=120):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **(env or {})}
    return subprocess.run([sys.executable, "-m", "deit_jax.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_user_errors_are_one_line_and_exit_2_tracebacks_only_with_debug(tmp_path):
    proc = _cli("--config=configs/deit_ti.py:smoke", f"--workdir={tmp_path}",
                "--config.optim.learning_rate=1")
    assert proc.returncode == 2 and "Did you mean optim.lr?" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _cli("--config=configs/deit_ti.py:smoke", f"--workdir={tmp_path}",
                "--config.batch_size=0", env={errors.DEBUG_ENV: "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


# ------------------------------------------------------------------- 4. one writer


def test_second_writer_is_refused_and_a_killed_holder_releases_the_lock(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from deit_jax.workdir import WorkdirLock; "
         f"WorkdirLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); "
         "time.sleep(60)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirError, match=rf"another run is writing .*pid {holder.pid}"):
            train.train_and_evaluate(config(), str(tmp_path))
        assert not (tmp_path / "checkpoints").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with workdir.WorkdirLock(str(tmp_path)):  # kill -9 left nothing stuck
        with pytest.raises(WorkdirError, match="another run"):
            workdir.WorkdirLock(str(tmp_path)).acquire()


# --------------------------------------------------------------------------- 6. the rest


def test_full_disk_while_saving_is_one_line_and_keeps_earlier_checkpoints(base, tmp_path,
                                                                        monkeypatch):
    base = base[0]
    run = tmp_path / "run"
    shutil.copytree(base, run)
    original = ocp.CheckpointManager.save

    def full(self, step, *args, **kwargs):
        if step > STEPS:
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as e:  # as TensorStore reports it: wrapped
                raise ValueError("Error writing ocdbt") from e
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    ckpts = checkpoint.RunCheckpoints(str(run), max_to_keep=10)
    ckpts.hold(STEPS + 2, state_at(base, 6), {"step": STEPS + 2})
    with pytest.raises(CheckpointError) as info:
        ckpts.commit()
    assert saved(run) == ["2", "4", "6"]
    line = errors.report(info.value)
    assert "\n" not in line and "cannot write checkpoint step 8" in line
    assert "disk is full" in line and "earlier checkpoints are kept" in line


def test_sigterm_during_imports_exits_0_with_a_message(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "deit_jax.main",
                             "--config=configs/deit_ti.py:smoke", f"--workdir={tmp_path}"],
                            cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)  # the handler is the module's first statement; jax/TF take longer
    proc.send_signal(signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
        pytest.fail(stderr[-3000:])
    assert proc.returncode == 0 and "SIGTERM before training started" in stderr


def test_fault_injection_script_short_version(tmp_path):
    """CI's short run of benchmarks/fault_injection.py: one kill -9 trial, one flipped bit."""
    totals = fault_injection.main(["--trials=1", "--damages=one flipped bit", "--no-nan",
                                   f"--workdir={tmp_path}", "--seed=3"])
    assert totals == {"trials": 2, "resumed": 2, "identical": 2, "lost": 0}
