"""The study of the paper's claims 1-6 at 2-core scale, offline on Fashion-MNIST.

    python -m deit_jax.reproduce --workdir=workdirs/study --jobs=2   # the grid, ~51 min, 2 cores
    python -m deit_jax.reproduce --workdir=workdirs/study --cell=hard --seeds=1   # minutes

Trains the two teachers of ``configs/study.py`` (a RegNetY convnet and a DeiT, on the same
training subset), then for each cell (none / soft / hard / hard_deit / cls2) and seed a
student, and analyses every student with ``deit_jax.analyze`` against the convnet teacher
(top-1 per head, agreement, cls/dist cosine per layer). Every run is an ordinary resumable
training run in ``WORKDIR/<name>``, so an interrupted study continues where it stopped. Writes
``WORKDIR/results.jsonl`` (one row per run), ``WORKDIR/table.md`` (mean +- std per cell) and
``WORKDIR/study.png``; prints the table. Pieces run one after another (``--cell=none``, then
``--cell=hard --first_seed=1 --seeds=2``, ...) merge into the same table, also when they run
at the same time: XLA:CPU scales poorly from one core to two, so on a 2-core machine two pieces
pinned one per core (``taskset -c 0 ...`` and ``taskset -c 1 ...``) finish the grid sooner than
one piece on both. Two pieces must not train the same teacher at once (the second stops with the
run directory's lock error): run the teachers' cells first, or give each piece its own teacher.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from deit_jax.configs import study  # noqa: E402

# What each cell needs before it can run.
TEACHER_OF = {"soft": "teacher_cnn", "hard": "teacher_cnn", "hard_deit": "teacher_deit"}
# Columns of the table: (row key, header).
COLUMNS = (("top1_cls", "cls"), ("top1_dist", "dist"), ("top1_fused", "fused"),
           ("agree_cnn", "agree w/ CNN"), ("cos_first", "cos blk1"), ("cos_last", "cos last"),
           ("cos_tokens", "cos tokens"))


def _config(arg: str, overrides: dict | None = None):
    config = study.get_config(arg)
    if overrides:
        config.unlock()
        config.update_from_flattened_dict(overrides)
        config.lock()
    return config


def run_teacher(workdir: str, role: str, *, train_size: int, epochs: float = 0.0,
                smoke: bool = False) -> dict:
    """Trains (or resumes / finds finished) one teacher; returns its row."""
    from deit_jax import train

    arg = f"role={role},train_size={train_size},epochs={epochs}" + (",smoke" if smoke else "")
    t0 = time.time()
    results = train.train_and_evaluate(_config(arg), os.path.join(workdir, role))
    return {"run": role, "cell": role, "seed": 0, "top1_cls": results["eval/top1_cls"],
            "seconds": time.time() - t0, "epochs": float(_config(arg).num_epochs)}


def run_student(workdir: str, cell: str, seed: int, *, train_size: int, epochs: float = 0.0,
                smoke: bool = False) -> dict:
    """Trains one student of ``cell`` and analyses it; returns its row of figures."""
    from deit_jax import analyze, train

    arg = (f"cell={cell},seed={seed},train_size={train_size},epochs={epochs}"
           + (",smoke" if smoke else ""))
    teacher = TEACHER_OF.get(cell)
    overrides = {"distillation.teacher_init": os.path.join(workdir, teacher)} if teacher else {}
    config = _config(arg, overrides)
    name = f"{cell}_seed{seed}"
    t0 = time.time()
    run_dir = os.path.join(workdir, name)
    train.train_and_evaluate(config, run_dir)
    seconds = time.time() - t0
    cnn = os.path.join(workdir, "teacher_cnn")
    if os.path.exists(os.path.join(cnn, "DONE")):
        cnn_model = study.get_config("role=teacher_cnn").model.name
        config = _config(arg, {**overrides, "distillation.teacher": cnn_model})
    else:
        cnn = ""  # no convnet teacher trained (a lone none/cls2 cell): no agreement figure
    figures = analyze.run(config, weights=run_dir, teacher_init=cnn, num_maps=0)
    row = {"run": name, "cell": cell, "seed": seed, "seconds": seconds,
           "epochs": float(config.num_epochs)}
    for head, value in figures["top1"].items():
        if head != "teacher":
            row[f"top1_{head}"] = value
    if "fused" in figures.get("agreement_with_teacher", {}):
        row["agree_cnn"] = figures["agreement_with_teacher"]["fused"]
    elif "cls" in figures.get("agreement_with_teacher", {}):
        row["agree_cnn"] = figures["agreement_with_teacher"]["cls"]
    if "cls_dist_cosine" in figures:
        mean = figures["cls_dist_cosine"]["mean"]
        row.update(cos_first=mean[1], cos_last=mean[-1], cos_tokens=figures[
            "learned_token_cosine"], cos_layers=mean)
    return row


def summarize(rows: list[dict]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """{cell: {column: (mean, std over seeds, n)}} of the rows (std with ddof=0 for n=1)."""
    out: dict[str, dict] = {}
    for cell in dict.fromkeys(r["cell"] for r in rows):
        cell_rows = [r for r in rows if r["cell"] == cell]
        out[cell] = {}
        for key, _ in (("top1_cls", ""),) + COLUMNS:
            values = [r[key] for r in cell_rows if key in r]
            if values:
                out[cell][key] = (float(np.mean(values)), float(np.std(values, ddof=1) if
                                  len(values) > 1 else 0.0), len(values))
    return out


def format_table(rows: list[dict]) -> str:
    """Markdown: one line per cell, mean +- std over its seeds (n = number of seeds)."""
    summary = summarize(rows)
    head = "| cell | n | " + " | ".join(h for _, h in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for cell, cols in summary.items():
        n = max(v[2] for v in cols.values())
        cells = []
        for key, _ in COLUMNS:
            if key not in cols:
                cells.append("-")
            elif key.startswith("cos"):
                cells.append(f"{cols[key][0]:.3f} ± {cols[key][1]:.3f}")
            else:
                cells.append(f"{cols[key][0]:.2f} ± {cols[key][1]:.2f}")
        lines.append(f"| {cell} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_plot(rows: list[dict], path: str) -> str:
    """Top-1 per cell and head (mean, std bars) and the cls/dist cosine per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    cells = list(summary)
    for j, (key, label) in enumerate(COLUMNS[:3]):
        means = [summary[c].get(key, (np.nan,))[0] for c in cells]
        stds = [summary[c].get(key, (0, 0))[1] for c in cells]
        ax1.bar(np.arange(len(cells)) + 0.27 * (j - 1), means, 0.27, yerr=stds, label=label,
                capsize=2)
    ax1.set_xticks(np.arange(len(cells)), cells, rotation=20)
    finite = [summary[c][k][0] for c in cells for k, _ in COLUMNS[:3] if k in summary[c]]
    if finite:
        ax1.set_ylim(max(0.0, min(finite) - 5), min(100.0, max(finite) + 2))
    ax1.set_ylabel("test top-1 (%)")
    ax1.legend(fontsize=8)
    for cell in cells:
        layers = [r["cos_layers"] for r in rows if r["cell"] == cell and "cos_layers" in r]
        if layers:
            ax2.plot(np.mean(layers, axis=0), marker="o", label=cell)
    ax2.set_xlabel("layer (0 = input)")
    ax2.set_ylabel("cosine(cls, dist)")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def load_rows(path: str) -> list[dict]:
    """The rows of an earlier ``results.jsonl`` (empty if there is none)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with each run of ``new`` replacing the row of the same name, new runs appended.

    Rows carry the ``train_size`` and ``epochs`` they were trained with; mixing regimes in one
    table (or one workdir, whose run directories are named by cell and seed only) raises
    ValueError.
    """
    rows = old + new
    sizes = {r["train_size"] for r in rows if "train_size" in r}
    student_epochs = {r["epochs"] for r in rows
                      if "epochs" in r and not r["cell"].startswith("teacher")}
    if len(sizes) > 1 or len(student_epochs) > 1:
        raise ValueError(f"results of different --train_size {sorted(sizes)} or student epochs "
                         f"{sorted(student_epochs)} in one workdir; use a new --workdir per "
                         "regime")
    merged = {r["run"]: r for r in old}
    merged.update({r["run"]: r for r in new})
    return list(merged.values())


def write_outputs(workdir: str, rows: list[dict], train_size: int) -> str:
    """Writes results.jsonl, table.md and study.png for ``rows``; returns the table's text."""
    with open(os.path.join(workdir, "results.jsonl.tmp"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(os.path.join(workdir, "results.jsonl.tmp"), os.path.join(workdir, "results.jsonl"))
    students = [r for r in rows if not r["cell"].startswith("teacher")]
    teachers = ", ".join(f"{r['cell']} {r['top1_cls']:.2f}" for r in rows
                         if r["cell"].startswith("teacher"))
    text = (f"Fashion-MNIST test top-1 (%), students on the first {train_size} training "
            f"images, mean ± std over seeds\n" + (f"teachers: {teachers}\n" if teachers else "")
            + format_table(students) + "\n")
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(text)
    if students:
        write_plot(students, os.path.join(workdir, "study.png"))
    return text


def run(workdir: str, *, cells: tuple[str, ...] = study.CELLS, seeds: int = 3,
        train_size: int = 6000, student_epochs: float = 0.0, teacher_epochs: float = 0.0,
        smoke: bool = False, first_seed: int = 0) -> list[dict]:
    """Runs the teachers the ``cells`` need, then every cell x seed; returns this call's rows.

    The study can be run in pieces (a cell, a few seeds at a time, from several shells one
    after the other): each finished run's row is merged into ``WORKDIR/results.jsonl`` at
    once (replacing an earlier row of the same run), and the table and plot are rewritten
    over all the rows there, so an interrupted or partial grid still counts.
    """
    from deit_jax import train

    check_grid(cells, seeds, first_seed)
    os.makedirs(workdir, exist_ok=True)
    results_path = os.path.join(workdir, "results.jsonl")
    merge_rows(load_rows(results_path), [{"run": "", "train_size": train_size}])  # check first
    train.quiet_library_logs()
    rows = []

    def record(row):
        row["train_size"] = train_size
        rows.append(row)
        # Pieces may run at the same time (one per core, see the module docstring): the
        # read-merge-write of results.jsonl is serialised so that no finished row is lost.
        with open(os.path.join(workdir, ".results.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            write_outputs(workdir, merge_rows(load_rows(results_path), [row]), train_size)

    for role in dict.fromkeys(TEACHER_OF[c] for c in cells if c in TEACHER_OF):
        earlier = {r["run"]: r for r in load_rows(results_path)}.get(role)
        if earlier and os.path.exists(os.path.join(workdir, role, "DONE")):
            rows.append(earlier)  # trained by an earlier piece: keep its row and wall time
            continue
        record(run_teacher(workdir, role, train_size=train_size, epochs=teacher_epochs,
                           smoke=smoke))
    for cell in cells:
        for seed in range(first_seed, first_seed + seeds):
            record(run_student(workdir, cell, seed, train_size=train_size,
                               epochs=student_epochs, smoke=smoke))
    return rows


def check_grid(cells: tuple[str, ...], seeds: int, first_seed: int) -> None:
    unknown = sorted(set(cells) - set(study.CELLS))
    if unknown:
        raise ValueError(f"unknown cell(s) {unknown}; valid: {', '.join(study.CELLS)}")
    if seeds < 1 or first_seed < 0:
        raise ValueError("--seeds must be >= 1 and --first_seed >= 0")


def plan_pieces(cells: tuple[str, ...], seeds: int, first_seed: int):
    """The grid as one-student pieces, (cell, seed), in two phases.

    Phase 1 holds, per teacher the cells need, the first piece that needs it (so each teacher is
    trained once, by one piece, and two teachers train at the same time); phase 2 the rest,
    which start once phase 1 is done (a none/cls2 student's agreement figure needs the convnet
    teacher finished).
    """
    pieces = [(c, s) for c in cells for s in range(first_seed, first_seed + seeds)]
    first = []
    for role in dict.fromkeys(TEACHER_OF[c] for c in cells if c in TEACHER_OF):
        first.append(next(p for p in pieces if TEACHER_OF.get(p[0]) == role))
    return first, [p for p in pieces if p not in first]


def run_in_parallel(workdir: str, *, cells: tuple[str, ...], seeds: int, first_seed: int,
                    jobs: int, args: list[str]) -> None:
    """Runs the grid as ``jobs`` pieces at a time, each a subprocess on its own share of cores.

    XLA:CPU gains ~1.3-1.6x from a second core on these small models, so on a 2-core machine two
    one-core pieces finish the grid in less time than one piece on both. Each piece is
    ``python -m deit_jax.reproduce --cell=C --first_seed=S --seeds=1 --cpus=...`` (its log in
    ``WORKDIR/logs``); rows merge into ``results.jsonl`` as they finish.
    """
    check_grid(cells, seeds, first_seed)
    cores = sorted(os.sched_getaffinity(0))
    if not 1 <= jobs <= len(cores):
        raise ValueError(f"--jobs={jobs}: this process may use {len(cores)} cores; pick 1 to "
                         f"{len(cores)}")
    shares = [cores[i::jobs] for i in range(jobs)]
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    failed: list[str] = []

    def run_phase(pieces):
        queue = list(pieces)
        lock = threading.Lock()

        def worker(share):
            while True:
                with lock:
                    if not queue or failed:
                        return
                    cell, seed = queue.pop(0)
                log = os.path.join(workdir, "logs", f"{cell}_seed{seed}.log")
                cmd = [sys.executable, "-m", "deit_jax.reproduce", f"--workdir={workdir}",
                       f"--cell={cell}", f"--first_seed={seed}", "--seeds=1",
                       "--cpus=" + ",".join(map(str, share)), *args]
                print(f"{time.strftime('%H:%M:%S')} {cell} seed {seed} on cores {share}: {log}",
                      flush=True)
                with open(log, "w") as f:
                    code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
                if code:
                    with lock:
                        failed.append(f"{cell} seed {seed} (exit {code}; see {log})")

        threads = [threading.Thread(target=worker, args=(share,)) for share in shares]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failed:
            raise RuntimeError("study piece(s) failed: " + "; ".join(failed))

    for phase in plan_pieces(cells, seeds, first_seed):
        run_phase(phase)


FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdirs/study", "Where every run of the study writes.")
flags.DEFINE_string("cell", "all", f"'all' or comma-separated cells of {study.CELLS}.")
flags.DEFINE_integer("seeds", 3, "Students per cell (seeds first_seed..first_seed+N-1).")
flags.DEFINE_integer("first_seed", 0, "The first seed (run more seeds of a cell later).")
flags.DEFINE_integer("train_size", 6000, "Training images (the first N of the split).")
flags.DEFINE_float("student_epochs", 0.0, "Override the students' epochs (0: configs/study.py).")
flags.DEFINE_float("teacher_epochs", 0.0, "Override the teachers' epochs (0: configs/study.py).")
flags.DEFINE_integer("jobs", 1, "Pieces run at once, each a subprocess on its own share of the "
                     "cores (2 on a 2-core machine: one core each, the fastest here).")
flags.DEFINE_string("cpus", "", "Cores this process runs on, e.g. '0' or '0,1' (what "
                    "`taskset -c` does); set by --jobs for its pieces.")


def pin_to_cpus(cpus: str) -> None:
    """Restricts this process to the cores ``cpus`` ('0' or '0,1'), as ``taskset -c`` does.

    Call it before JAX starts: XLA:CPU sizes its thread pools to the cores it may use.
    """
    os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})


def main(argv):
    del argv
    if FLAGS.cpus:
        pin_to_cpus(FLAGS.cpus)
    cells = study.CELLS if FLAGS.cell == "all" else tuple(FLAGS.cell.split(","))
    if FLAGS.jobs > 1:
        args = [f"--train_size={FLAGS.train_size}", f"--student_epochs={FLAGS.student_epochs}",
                f"--teacher_epochs={FLAGS.teacher_epochs}"]
        run_in_parallel(FLAGS.workdir, cells=cells, seeds=FLAGS.seeds,
                        first_seed=FLAGS.first_seed, jobs=FLAGS.jobs, args=args)
    else:
        run(FLAGS.workdir, cells=cells, seeds=FLAGS.seeds, train_size=FLAGS.train_size,
            student_epochs=FLAGS.student_epochs, teacher_epochs=FLAGS.teacher_epochs,
            first_seed=FLAGS.first_seed)
    with open(os.path.join(FLAGS.workdir, "table.md")) as f:
        print(f.read(), flush=True)


def console() -> None:
    """The console entry point ``deit-reproduce``."""
    from deit_jax import cli

    cli.run(main)


if __name__ == "__main__":
    console()
