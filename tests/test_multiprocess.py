"""Multi-process training on the CPU and preemption, through ``python -m deit_jax.main``.

Every run is a real ``deit_jax.main`` subprocess with its own device count (the pytest
process keeps conftest's 8 fake devices): several processes talk through gloo collectives and
a coordinator on 127.0.0.1, exactly the path a TPU pod or a SLURM job takes. All runs share
one config, so a reference run of 1 process x 4 devices, checkpointed at every step, is the
ground truth the others are held to:

- 2 processes x 2 devices see the same global batches in the same device order (per-example
  augmentation seeds, per-device mixup/drop-path keys from the global ``axis_index``), so
  their losses and states equal the reference's up to float reassociation in the cross-process
  all-reduce: ``LOSS_RTOL`` and ``STATE_ATOL``/``STATE_RTOL`` below (the attention key bias
  excepted, see ``KEY_BIAS_STEP``).
- a run stopped by SIGTERM and resumed equals the reference bit for bit (same topology).

Runs share a persistent compilation cache, so only the first run of each topology compiles.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from deit_jax import checkpoint

REPO = Path(__file__).resolve().parents[1]
# The smoke model on synthetic data; 500 epochs only so that no run reaches the end of the
# schedule (every run stops at --config.max_steps), and evaluation only at a run's last step
# (the reference also every EVAL_EVERY steps).
# No warmup and a larger lr so that parameters move enough for differences to show.
TRAIN_FLAGS = ("--config=configs/deit_ti.py:smoke", "--config.num_epochs=500",
               "--config.optim.warmup_epochs=0", "--config.optim.lr=0.01",
               "--config.eval_every_epochs=1000", "--config.log_every_steps=1")
EVAL_EXAMPLES = 100  # smoke: synthetic_eval_size
STEPS_PER_EPOCH = 8  # smoke: 256 examples / batch 32
EVAL_EVERY = 4  # the reference's evaluations; multi-process runs evaluate at their last step
REFERENCE_STEPS = 24
# 2x2 vs 1x4: the 4-device mean is summed in another order across processes. Measured after
# 12 steps: losses within 1.1e-7 relative, every state leaf but one (below) within 1.5e-7.
LOSS_RTOL = 1e-5
STATE_ATOL, STATE_RTOL = 1e-6, 1e-5
# The key third of each qkv bias has a gradient of exactly zero (softmax ignores a constant
# added to every key), so it only ever receives rounding noise, which AdamW normalises into
# steps of up to a few lr: two summation orders let it drift apart by up to that much per
# step (measured 4.8e-6 after 12 steps). It never changes an output; it is held to this bound.
PEAK_LR = 0.01 * 32 / 512  # --config.optim.lr, scaled by the smoke batch / 512
KEY_BIAS_STEP = 4 * PEAK_LR
RUN_TIMEOUT_S = 300  # one training run on 2 busy cores (compilation included)


# ------------------------------------------------------------------------------- subprocesses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Run:
    """A training run: one ``deit_jax.main`` process per JAX process."""

    workdir: Path
    procs: list[subprocess.Popen]
    logs: list[Path]

    def log(self, i: int = 0) -> str:
        return self.logs[i].read_text(errors="replace")

    def tails(self) -> str:
        return "\n".join(f"--- process {i} ({p.returncode=}) {self.logs[i]}:\n"
                         + "\n".join(self.log(i).splitlines()[-30:])
                         for i, p in enumerate(self.procs))

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # its own session: the process we started
                p.wait()

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> None:
        """Waits for every process; fails (after killing the rest) on a timeout or an error."""
        deadline = time.monotonic() + timeout
        try:
            for p in self.procs:
                p.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"training run in {self.workdir} timed out after {timeout}s\n"
                        f"{self.tails()}")
        if any(p.returncode != 0 for p in self.procs):
            self.kill()
            pytest.fail(f"training run in {self.workdir} failed\n{self.tails()}")


def start(workdir: Path, cache: Path, *, processes: int, devices: int, steps: int,
          flags: tuple[str, ...] = ()) -> Run:
    """Starts ``processes`` x ``devices`` training ``workdir`` up to global step ``steps``."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="",
               TF_CPP_MIN_LOG_LEVEL="2", JAX_COMPILATION_CACHE_DIR=str(cache))
    cmd = [sys.executable, "-m", "deit_jax.main", f"--workdir={workdir}", *TRAIN_FLAGS,
           f"--config.max_steps={steps}", *flags]
    if processes > 1:
        cmd.append(f"--coordinator_address=127.0.0.1:{_free_port()}")
        cmd.append(f"--num_processes={processes}")
    tag = f"{workdir.name}.{len(list(workdir.parent.glob(workdir.name + '.*.p0.log')))}"
    procs, logs = [], []
    for i in range(processes):
        extra = [f"--process_id={i}"] if processes > 1 else []
        log = workdir.parent / f"{tag}.p{i}.log"
        with open(log, "w") as out:
            procs.append(subprocess.Popen(cmd + extra, cwd=REPO, env=env, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        logs.append(log)
    return Run(workdir, procs, logs)


def train(workdir: Path, cache: Path, **kwargs) -> Run:
    run = start(workdir, cache, **kwargs)
    run.wait()
    return run


# -------------------------------------------------------------------------- reading the runs


def scalars(workdir: Path, tag: str) -> dict[int, float]:
    """``{step: value}`` of ``tag`` from every TensorBoard event file in ``workdir``."""
    import tensorflow as tf

    out = {}
    for path in sorted(workdir.glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.tag == tag:
                    out[event.step] = float(tf.make_ndarray(value.tensor))
    return out


def saved_steps(workdir: Path) -> list[int]:
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def state_at(workdir: Path, step: int) -> dict:
    manager = checkpoint.create_manager(str(workdir), max_to_keep=1000, enable_async=False)
    state = checkpoint.restore_raw(manager, step)
    manager.close()
    return state


def assert_states_close(actual: dict, expected: dict, *, exact: bool) -> None:
    """Every leaf of two checkpointed TrainStates equal (``exact``) or within tolerance."""
    flat_a = jax.tree_util.tree_flatten_with_path(actual)[0]
    flat_e = jax.tree_util.tree_flatten_with_path(expected)[0]
    assert [k for k, _ in flat_a] == [k for k, _ in flat_e]
    step = int(expected["step"])
    for (key, a), (_, e) in zip(flat_a, flat_e, strict=True):
        name = jax.tree_util.keystr(key)
        a, e = np.asarray(a), np.asarray(e)
        if exact or not np.issubdtype(e.dtype, np.floating):
            np.testing.assert_array_equal(a, e, err_msg=name)
            continue
        if name.startswith("['params']") and name.endswith("['attn']['qkv']['bias']"):
            keys = slice(len(e) // 3, 2 * len(e) // 3)
            np.testing.assert_allclose(a[keys], e[keys], atol=KEY_BIAS_STEP * step, rtol=0,
                                       err_msg=name + " (keys)")
            a, e = np.delete(a, keys), np.delete(e, keys)
        np.testing.assert_allclose(a, e, atol=STATE_ATOL, rtol=STATE_RTOL, err_msg=name)


def assert_losses_match(workdir: Path, reference: dict[int, float], steps: range) -> None:
    losses = scalars(workdir, "loss")
    assert set(steps) <= set(losses), f"steps logged: {sorted(losses)}"
    got = np.array([losses[s] for s in steps])
    want = np.array([reference[s] for s in steps])
    np.testing.assert_allclose(got, want, rtol=LOSS_RTOL, atol=0)
    assert len(set(np.round(want, 4))) > 1  # the losses move: the comparison means something


def assert_evals_match(workdir: Path, reference: Path, step: int) -> None:
    """Evaluation at ``step`` counts every example once and agrees with the reference's.

    Accuracies may differ by one example: a near-tie between two logits can flip under the
    float differences above.
    """
    assert scalars(workdir, "eval/count")[step] == EVAL_EXAMPLES
    for tag in ("eval/top1_cls", "eval/top5_cls", "eval_ema/top1_cls"):
        assert abs(scalars(workdir, tag)[step] - scalars(reference, tag)[step]) <= (
            100 / EVAL_EXAMPLES), tag


def preempted_step(log: str) -> int:
    found = re.findall(r"preempted: saved step (\d+)", log)
    assert len(found) == 1, log[-3000:]
    return int(found[0])


# -------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache) -> Path:
    """1 process x 4 devices, uninterrupted, a checkpoint at every step."""
    workdir = tmp_path_factory.mktemp("runs") / "reference"
    train(workdir, cache, processes=1, devices=4, steps=REFERENCE_STEPS,
          flags=("--config.checkpoint_every_steps=1",
                 f"--config.keep_checkpoints={REFERENCE_STEPS}",
                 f"--config.eval_every_epochs={EVAL_EVERY / STEPS_PER_EPOCH}"))
    assert saved_steps(workdir) == list(range(1, REFERENCE_STEPS + 1))
    return workdir


def reference_state(reference: Path, cache: Path, step: int) -> dict:
    """The reference state at ``step``, training a longer reference when needed."""
    if step > REFERENCE_STEPS:
        workdir = reference.parent / f"reference_{step}"
        if not workdir.exists():
            train(workdir, cache, processes=1, devices=4, steps=step)
        return state_at(workdir, step)
    return state_at(reference, step)


# ----------------------------------------------------------------------------------- tests


def test_two_processes_equal_one_process_through_multiprocess_checkpoints(
        tmp_path, cache, reference):
    k = EVAL_EVERY  # the reference evaluated at k, 2k and 3k
    ref_losses = scalars(reference, "loss")
    workdir = tmp_path / "multi"

    # 2 processes x 2 devices from scratch to step k: a checkpoint written by both.
    run = train(workdir, cache, processes=2, devices=2, steps=k,
                flags=(f"--config.checkpoint_every_steps={k}",))
    for i in range(2):
        assert f"process {i}/2, 2 local / 4 global devices" in run.log(i)
    assert_losses_match(workdir, ref_losses, range(1, k + 1))
    assert saved_steps(workdir) == [k]
    assert_states_close(state_at(workdir, k), state_at(reference, k), exact=False)
    # Process 0 alone writes metrics; evaluation covers every example once across processes.
    assert len(list(workdir.glob("events.out.tfevents.*"))) == 1
    assert_evals_match(workdir, reference, k)
    eval_lines = [re.findall(rf"step {k}: (\{{.*\}})", run.log(i)) for i in range(2)]
    assert eval_lines[0] and eval_lines[0] == eval_lines[1]  # every process logs the same

    # Both processes restore that checkpoint and train on to 2k.
    run = train(workdir, cache, processes=2, devices=2, steps=2 * k,
                flags=(f"--config.checkpoint_every_steps={k}",))
    for i in range(2):
        assert f"at step {k}" in re.search(r"resumed from .*", run.log(i)).group(0)
    assert_losses_match(workdir, ref_losses, range(k + 1, 2 * k + 1))
    assert saved_steps(workdir) == [k, 2 * k]
    assert_evals_match(workdir, reference, 2 * k)
    assert_states_close(state_at(workdir, 2 * k), state_at(reference, 2 * k), exact=False)

    # One process with 4 devices resumes the multi-process checkpoint to 3k.
    run = train(workdir, cache, processes=1, devices=4, steps=3 * k,
                flags=(f"--config.checkpoint_every_steps={k}",))
    assert f"at step {2 * k}" in re.search(r"resumed from .*", run.log()).group(0)
    assert_losses_match(workdir, ref_losses, range(2 * k + 1, 3 * k + 1))
    assert_evals_match(workdir, reference, 3 * k)
    assert_states_close(state_at(workdir, 3 * k), state_at(reference, 3 * k), exact=False)


def _sigterm_when_training(run: Run, target: int, *, min_step: int = 3,
                           timeout: float = RUN_TIMEOUT_S) -> None:
    """Sends SIGTERM to process ``target`` once process 0 has logged step ``min_step``."""
    deadline = time.monotonic() + timeout
    pattern = re.compile(r"\] \[(\d+)\] .*loss=")
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in run.procs):
            run.kill()
            pytest.fail(f"a process ended before SIGTERM was sent\n{run.tails()}")
        logged = [int(s) for s in pattern.findall(run.log(0))]
        if logged and max(logged) >= min_step:
            run.procs[target].send_signal(signal.SIGTERM)
            return
        time.sleep(0.1)
    run.kill()
    pytest.fail(f"no training step logged within {timeout}s\n{run.tails()}")


def test_sigterm_checkpoints_exits_cleanly_and_resumes_exactly(tmp_path, cache, reference):
    workdir = tmp_path / "preempted"
    every = 1000  # scheduled checkpoints never come: the one found is the preemption's
    flags = (f"--config.checkpoint_every_steps={every}",)
    run = start(workdir, cache, processes=1, devices=4, steps=400, flags=flags)
    _sigterm_when_training(run, 0)
    run.wait()  # exit status 0
    log = run.log()
    assert "SIGTERM received" in log
    s = preempted_step(log)
    assert 3 < s < 400 and s % every and not (workdir / "DONE").exists()
    assert saved_steps(workdir) == [s]
    # The loop saved the state it had trained, nothing else.
    assert_states_close(state_at(workdir, s), reference_state(reference, cache, s), exact=True)

    t = s + 3
    run = train(workdir, cache, processes=1, devices=4, steps=t, flags=flags)
    assert f"at step {s}" in re.search(r"resumed from .*", run.log()).group(0)
    assert saved_steps(workdir) == [s, t] and (workdir / "DONE").exists()
    # Bit-identical on the CPU: same programs, same batches, same keys.
    assert_states_close(state_at(workdir, t), reference_state(reference, cache, t), exact=True)
    ref_losses = scalars(reference, "loss") if t <= REFERENCE_STEPS else scalars(
        reference.parent / f"reference_{t}", "loss")
    losses = scalars(workdir, "loss")
    assert [losses[i] for i in range(1, t + 1)] == [ref_losses[i] for i in range(1, t + 1)]


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path, cache,
                                                                     reference):
    """JAX's preemption sync manager (started by ``jax.distributed.initialize``) catches the
    signal in process 1 and both processes agree on the step to save at."""
    workdir = tmp_path / "preempted2"
    run = start(workdir, cache, processes=2, devices=2, steps=400,
                flags=("--config.checkpoint_every_steps=1000",))
    _sigterm_when_training(run, 1)
    run.wait()  # both exit 0
    s0, s1 = preempted_step(run.log(0)), preempted_step(run.log(1))
    assert s0 == s1 and 3 < s0 < 400 and not (workdir / "DONE").exists()
    assert saved_steps(workdir) == [s0]
    assert_states_close(state_at(workdir, s0), reference_state(reference, cache, s0),
                        exact=False)
