"""The claims study: its configs, one real cell on a tiny budget, the table's arithmetic."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from configs import study
from deit_jax import reproduce


def test_study_configs_per_cell():
    assert study.get_config("cell=none").model.name == "deit_tiny_patch16_224"
    soft = study.get_config("cell=soft")
    assert (soft.distillation.kind, soft.distillation.tau, soft.distillation.alpha) == (
        "soft", 3.0, 0.1)
    deit = study.get_config("cell=hard_deit")
    assert (deit.distillation.kind, deit.distillation.teacher) == ("hard",
                                                                  "deit_fmnist_patch7_28")
    assert study.get_config("cell=cls2").distillation.kind == "cls2"
    teacher = study.get_config("role=teacher_deit")
    assert teacher.model.name == "deit_fmnist_patch7_28" and teacher.model.embed_dim is None
    assert study.get_config("train_size=600").dataset.train_split == "train[:600]"
    # The student the grid of docs/REPRODUCTION.md was measured with, whatever the quickstart's.
    for cell in ("none", "hard", "cls2"):
        c = study.get_config(f"cell={cell}")
        assert (c.model.patch_size, c.model.embed_dim, c.model.depth, c.model.num_heads,
                c.optim.lr, c.optim.b2) == (
            7, 96, 4, 3, 4e-3, 0.999)
    with pytest.raises(ValueError, match="cell must be one of"):
        study.get_config("cell=bogus")


def test_table_is_mean_and_std_over_seeds():
    rows = [{"cell": "hard", "top1_cls": 80.0, "top1_dist": 82.0, "top1_fused": 81.0,
             "cos_first": 0.1, "cos_last": 0.9, "cos_tokens": 0.0},
            {"cell": "hard", "top1_cls": 84.0, "top1_dist": 84.0, "top1_fused": 85.0,
             "cos_first": 0.3, "cos_last": 0.7, "cos_tokens": 0.2},
            {"cell": "none", "top1_cls": 79.0, "agree_cnn": 88.5}]
    summary = reproduce.summarize(rows)
    mean, std, n = summary["hard"]["top1_fused"]
    assert (mean, n) == (83.0, 2) and std == pytest.approx(np.std([81, 85], ddof=1))
    table = reproduce.format_table(rows)
    assert "| hard | 2 | 82.00 ± 2.83 | 83.00 ± 1.41 | 83.00 ± 2.83 | - | 0.200 ± 0.141 |" in table
    assert "| none | 1 | 79.00 ± 0.00 | - | - | 88.50 ± 0.00 | - |" in table


def test_one_cell_on_a_tiny_budget_writes_its_row(tmp_path):
    workdir = str(tmp_path / "study")
    rows = reproduce.run(workdir, cells=("cls2",), seeds=1, smoke=True, student_epochs=2.0)
    assert [r["run"] for r in rows] == ["cls2_seed0"]
    row = rows[0]
    assert (row["epochs"], row["train_size"]) == (2.0, 6000)
    for key in ("top1_cls", "top1_dist", "top1_fused"):
        assert 0.0 <= row[key] <= 100.0
    assert -1.0 <= row["cos_last"] <= 1.0 and len(row["cos_layers"]) == 5  # input + 4 blocks
    with open(os.path.join(workdir, "results.jsonl")) as f:
        assert json.loads(f.readline())["run"] == "cls2_seed0"
    table = open(os.path.join(workdir, "table.md")).read()
    assert f"| cls2 | 1 | {row['top1_cls']:.2f} ± 0.00 |" in table
    assert os.path.getsize(os.path.join(workdir, "study.png")) > 2000
    assert os.path.exists(os.path.join(workdir, "cls2_seed0", "DONE"))


def test_quickstart_teacher_is_regnety_002_without_its_last_stage():
    import jax
    import jax.numpy as jnp
    import timm

    from deit_jax import models

    ref = timm.create_model("regnety_002", num_classes=10)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # Stem and stages 1-3 as timm's (s4 dropped), the head on 152 channels instead of 368.
    expected = count(ref) - count(ref.s4) - count(ref.head.fc) + 152 * 10 + 10
    model = models.create_model("regnety_002_3stage", num_classes=10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)), train=False)
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == expected
    assert model.apply(variables, jnp.ones((2, 28, 28, 3)), train=False).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown override"):
        models.create_model("regnety_002_3stage", img_size=28)


def test_pieces_of_the_grid_merge_into_one_table(tmp_path):
    workdir = str(tmp_path)
    first = {"run": "hard_seed0", "cell": "hard", "seed": 0, "top1_fused": 80.0,
             "train_size": 600}
    reproduce.write_outputs(workdir, [first], 600)
    path = os.path.join(workdir, "results.jsonl")
    again = dict(first, top1_fused=82.0)  # the same run measured again replaces its row
    other = {"run": "hard_seed1", "cell": "hard", "seed": 1, "top1_fused": 86.0,
             "train_size": 600}
    merged = reproduce.merge_rows(reproduce.load_rows(path), [again, other])
    assert [r["top1_fused"] for r in merged] == [82.0, 86.0]
    text = reproduce.write_outputs(workdir, merged, 600)
    assert "| hard | 2 | - | - | 84.00 ± 2.83 |" in text
    assert len(reproduce.load_rows(path)) == 2
    with pytest.raises(ValueError, match="new --workdir"):
        reproduce.merge_rows(merged, [dict(other, run="none_seed0", train_size=6000)])
    with pytest.raises(ValueError, match="student epochs"):
        reproduce.merge_rows([dict(first, epochs=30.0)], [dict(other, epochs=10.0)])


def test_a_later_piece_keeps_the_finished_teachers_row(tmp_path, monkeypatch):
    workdir = str(tmp_path)
    os.makedirs(os.path.join(workdir, "teacher_cnn"))
    open(os.path.join(workdir, "teacher_cnn", "DONE"), "w").write("690")
    teacher = {"run": "teacher_cnn", "cell": "teacher_cnn", "seed": 0, "top1_cls": 84.0,
               "seconds": 405.0, "train_size": 600}
    reproduce.write_outputs(workdir, [teacher], 600)

    def no_teacher_run(*args, **kwargs):
        raise AssertionError("a finished teacher must not be rerun")

    monkeypatch.setattr(reproduce, "run_teacher", no_teacher_run)
    monkeypatch.setattr(reproduce, "run_student", lambda workdir, cell, seed, **kw: {
        "run": f"{cell}_seed{seed}", "cell": cell, "seed": seed, "top1_fused": 80.0 + seed})
    rows = reproduce.run(workdir, cells=("soft",), seeds=2, first_seed=1, train_size=600)
    assert [r["run"] for r in rows] == ["teacher_cnn", "soft_seed1", "soft_seed2"]
    saved = reproduce.load_rows(os.path.join(workdir, "results.jsonl"))
    assert saved[0]["seconds"] == 405.0 and len(saved) == 3
    assert "| soft | 2 | - | - | 81.50 ± 0.71 |" in open(os.path.join(workdir, "table.md")).read()


def test_pieces_running_at_the_same_time_lose_no_row(tmp_path, monkeypatch):
    """Two pieces (one per core) finishing together: both rows end up in results.jsonl.

    load_rows is slowed so that, without the lock around read-merge-write, both pieces read the
    empty file before either writes, and the second write drops the first row.
    """
    import threading
    import time

    workdir = str(tmp_path)
    slow_load = reproduce.load_rows

    def load_rows(path):
        rows = slow_load(path)
        time.sleep(0.3)
        return rows

    monkeypatch.setattr(reproduce, "load_rows", load_rows)
    monkeypatch.setattr(reproduce, "run_student", lambda workdir, cell, seed, **kw: {
        "run": f"{cell}_seed{seed}", "cell": cell, "seed": seed, "top1_cls": 80.0 + seed})
    pieces = [threading.Thread(target=reproduce.run, args=(workdir,),
                               kwargs=dict(cells=(cell,), seeds=1, train_size=600))
              for cell in ("none", "cls2")]
    for piece in pieces:
        piece.start()
    for piece in pieces:
        piece.join()
    saved = slow_load(os.path.join(workdir, "results.jsonl"))
    assert sorted(r["run"] for r in saved) == ["cls2_seed0", "none_seed0"]


def test_the_grid_in_pieces_trains_each_teacher_once_first():
    first, rest = reproduce.plan_pieces(("none", "soft", "hard", "hard_deit"), 2, 0)
    assert first == [("soft", 0), ("hard_deit", 0)]
    assert rest == [("none", 0), ("none", 1), ("soft", 1), ("hard", 0), ("hard", 1),
                    ("hard_deit", 1)]
    assert reproduce.plan_pieces(("none", "cls2"), 1, 3) == ([], [("none", 3), ("cls2", 3)])


def test_parallel_pieces_get_their_own_cores_and_a_failure_stops_the_grid(tmp_path,
                                                                          monkeypatch):
    import subprocess
    import time

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    calls = []

    def fake_call(cmd, **kwargs):
        calls.append(cmd)
        time.sleep(0.05)
        return 0

    monkeypatch.setattr(subprocess, "call", fake_call)
    reproduce.run_in_parallel(str(tmp_path), cells=("none", "hard", "hard_deit"), seeds=2,
                              first_seed=0, jobs=2, args=["--train_size=600"])
    pieces = [(c[4], c[5]) for c in calls]
    assert sorted(pieces[:2]) == [("--cell=hard", "--first_seed=0"),
                                  ("--cell=hard_deit", "--first_seed=0")]  # the teachers first
    assert len(pieces) == 6 and len(set(pieces)) == 6
    assert {c[7] for c in calls} == {"--cpus=0,2", "--cpus=1,3"}
    assert all(c[-1] == "--train_size=600" and c[6] == "--seeds=1" for c in calls)

    calls.clear()
    monkeypatch.setattr(subprocess, "call", lambda cmd, **kw: calls.append(cmd) or
                        (1 if cmd[4] == "--cell=soft" else 0))
    with pytest.raises(RuntimeError, match=r"soft seed 0 \(exit 1; see .*soft_seed0.log"):
        reproduce.run_in_parallel(str(tmp_path), cells=("soft", "none"), seeds=1,
                                  first_seed=0, jobs=2, args=[])
    assert [c[4] for c in calls] == ["--cell=soft"]  # phase 2 (none) never started
    with pytest.raises(ValueError, match="--jobs=8: this process may use 4 cores"):
        reproduce.run_in_parallel(str(tmp_path), cells=("none",), seeds=1, first_seed=0,
                                  jobs=8, args=[])


def test_cpus_pins_the_process_to_those_cores():
    """What --jobs gives each piece: the process may then run on those cores only."""
    import subprocess
    import sys

    first = min(os.sched_getaffinity(0))
    code = ("import os; from deit_jax import reproduce; "
            f"reproduce.pin_to_cpus('{first}'); print(sorted(os.sched_getaffinity(0)))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.path.dirname(
                             os.path.dirname(os.path.abspath(__file__)))}).stdout
    assert out.split("\n")[-2] == f"[{first}]"
