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
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: deit_jax from this checkout
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this process only reads checkpoints
STEPS, EVERY = 12, 4
FLAGS = ("--config=configs/deit_ti.py:smoke", "--config.model.depth=1",
         f"--config.max_steps={STEPS}", f"--config.checkpoint_every_steps={EVERY}",
         "--config.keep_checkpoints=3", "--config.log_every_steps=1",
         "--config.eval_every_epochs=100", "--config.dataset.synthetic_eval_size=16")
DEVICES = 2
RUN_TIMEOUT_S = 600


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


# ------------------------------------------------------------------------------ runs


def _env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}",
               PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="",
               TF_CPP_MIN_LOG_LEVEL="2", JAX_COMPILATION_CACHE_DIR=str(cache))
    return env


def start(workdir: Path, cache: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    log = workdir.parent / f"{workdir.name}.{time.time_ns()}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "deit_jax.main", f"--workdir={workdir}",
                                 *FLAGS, *extra], cwd=REPO, env=_env(cache), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def run(workdir: Path, cache: Path, *extra: str) -> tuple[int, str]:
    proc, log = start(workdir, cache, *extra)
    try:
        rc = proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    return rc, log.read_text()


def final_state(workdir: Path, step: int = STEPS) -> dict | None:
    from deit_jax import checkpoint

    try:
        manager = checkpoint.create_manager(str(workdir), max_to_keep=100, enable_async=False)
        return checkpoint.restore_raw(manager, step)
    except Exception:  # noqa: BLE001 - a missing or unreadable final state is a loss
        return None


def identical(a: dict | None, b: dict) -> bool:
    import jax

    if a is None:
        return False
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


def _last_logged_step(log: str) -> int:
    steps = re.findall(r"\] \[(\d+)\] .*loss=", log)
    return int(steps[-1]) if steps else 0


# --------------------------------------------------------------------------- trials


def kill_trial(root: Path, cache: Path, ref: dict, rng: random.Random, i: int) -> dict:
    """SIGKILL at a random step (plus a random delay) or a random moment, then rerun."""
    workdir = root / f"kill{i}"
    proc, log = start(workdir, cache)
    if rng.random() < 0.75:
        target, delay = rng.randint(1, STEPS), rng.uniform(0.0, 0.4)
        where = f"after step {target} logged + {delay:.2f}s"
        while proc.poll() is None and _last_logged_step(log.read_text()) < target:
            time.sleep(0.02)
        time.sleep(delay)
    else:
        delay = rng.uniform(0.5, 12.0)
        where = f"{delay:.1f}s after start"
        time.sleep(delay)
    finished_before = proc.poll() is not None
    if not finished_before:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    state_dirs = sorted(p.name for p in (workdir / "checkpoints").glob("*")) if (
        workdir / "checkpoints").exists() else []
    rc, _ = run(workdir, cache)
    same = rc == 0 and identical(final_state(workdir), ref)
    return {"trial": f"kill {i}", "where": where + (" (had finished)" if finished_before else
                                                     f"; left {state_dirs}"),
            "resumed": rc == 0, "identical": same}


def damage_trial(root: Path, cache: Path, reference: Path, ref: dict, name: str) -> dict:
    """The reference without its last checkpoint; the newest left is damaged; rerun."""
    workdir = root / ("damage-" + name.replace(" ", "-"))
    shutil.copytree(reference, workdir)
    (workdir / "DONE").unlink()
    shutil.rmtree(workdir / "checkpoints" / str(STEPS))
    DAMAGES[name](workdir / "checkpoints" / str(STEPS - EVERY))
    rc, log = run(workdir, cache)
    aside = list((workdir / "checkpoints").glob(f"{STEPS - EVERY}.damaged-*"))
    warned = f"checkpoint step {STEPS - EVERY} is damaged" in log
    same = rc == 0 and identical(final_state(workdir), ref)
    return {"trial": f"damage: {name}", "where": f"set aside: {bool(aside)}, warned: {warned}",
            "resumed": rc == 0 and bool(aside) and warned, "identical": same}


def nan_trial(root: Path, cache: Path) -> dict:
    """lr=1e30 diverges at the first full-lr step: status 2, a good checkpoint named."""
    workdir = root / "nan"
    rc, log = run(workdir, cache, "--config.optim.lr=1e30", "--config.checkpoint_every_steps=1")
    named = re.search(r"last good checkpoint: step (\d+)", log)
    names = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    ok = rc == 2 and named is not None and all(n.isdigit() for n in names) and (
        max(int(n) for n in names) == int(named.group(1)))
    if ok:
        import jax

        leaves = jax.tree.leaves(final_state(workdir, int(named.group(1))))
        ok = all(np.isfinite(x).all() for x in leaves if np.issubdtype(x.dtype, np.floating))
    # The default lr resumes from the named checkpoint and finishes.
    rc2, _ = run(workdir, cache)
    return {"trial": "nan", "where": f"exit {rc}, named step "
            f"{named.group(1) if named else None}, left {names}",
            "resumed": ok and rc2 == 0, "identical": None}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10, help="kill -9 trials")
    parser.add_argument("--damages", default=",".join(DAMAGES),
                        help="comma-separated damage kinds ('' for none)")
    parser.add_argument("--nan", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--workdir", default="", help="scratch root (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="deit-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    cache = root / "jax_cache"
    reference = root / "reference"
    t0 = time.time()
    rc, log = run(reference, cache)
    if rc != 0:
        raise SystemExit(f"the reference run failed:\n{log[-3000:]}")
    ref = final_state(reference)
    print(f"reference: {STEPS} steps in {time.time() - t0:.0f}s", flush=True)
    rng = random.Random(args.seed)
    rows = [kill_trial(root, cache, ref, rng, i) for i in range(args.trials)]
    for row in rows:
        print(row, flush=True)
    for name in filter(None, args.damages.split(",")):
        rows.append(damage_trial(root, cache, reference, ref, name))
        print(rows[-1], flush=True)
    if args.nan:
        rows.append(nan_trial(root, cache))
        print(rows[-1], flush=True)
    totals = {"trials": len(rows), "resumed": sum(r["resumed"] for r in rows),
              "identical": sum(bool(r["identical"]) for r in rows),
              "lost": sum(not r["resumed"] or r["identical"] is False for r in rows)}
    print(f"totals: {totals} in {time.time() - t0:.0f}s", flush=True)
    return totals


if __name__ == "__main__":
    sys.exit(1 if main()["lost"] else 0)
