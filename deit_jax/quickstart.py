"""The offline quickstart: a CNN teacher, then a distilled DeiT, on Fashion-MNIST.

    python -m deit_jax.quickstart --workdir=workdirs/quickstart

Both stages are ordinary runs of ``train.train_and_evaluate`` with ``configs/quickstart.py``
(``:teacher`` then ``:student`` with the teacher's workdir as ``teacher_init``), so they
resume like any run. Ends with a table of top-1 accuracies, the student's agreement with its
teacher and the cosine between its cls and dist token embeddings after the first and the last
block (``deit_jax.analyze``, whose JSON and plots go to ``WORKDIR/analysis``).
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdirs/quickstart", "Where both runs write.")
flags.DEFINE_float("teacher_epochs", 0.0, "Override the teacher's epochs (0: the config's).")
flags.DEFINE_float("student_epochs", 0.0, "Override the student's epochs (0: the config's).")


def run(workdir: str, teacher_epochs: float = 0.0, student_epochs: float = 0.0) -> dict:
    """Runs both stages; returns {'teacher': eval results, 'student': eval results}."""
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    from deit_jax import analyze, train
    from deit_jax.configs import quickstart

    train.quiet_library_logs()

    teacher_dir = os.path.join(workdir, "teacher")
    t0 = time.time()
    teacher_config = quickstart.get_config(f"teacher,epochs={teacher_epochs}")
    teacher = train.train_and_evaluate(teacher_config, teacher_dir)
    t1 = time.time()
    student_config = quickstart.get_config(f"student,epochs={student_epochs}")
    student_config.unlock()
    student_config.distillation.teacher_init = teacher_dir
    student_config.lock()
    student_dir = os.path.join(workdir, "student")
    student = train.train_and_evaluate(student_config, student_dir)
    t2 = time.time()
    figures = analyze.run(student_config, weights=student_dir, teacher_init=teacher_dir,
                          out_dir=os.path.join(workdir, "analysis"))
    return {"teacher": teacher, "student": student, "analysis": figures,
            "teacher_seconds": t1 - t0, "student_seconds": t2 - t1,
            "analysis_seconds": time.time() - t2}


def format_table(results: dict) -> str:
    teacher, student = results["teacher"], results["student"]
    rows = [("teacher: RegNetY, 3 stages (CNN)", teacher["eval/top1_cls"],
             teacher.get("eval_ema/top1_cls")),
            ("student DeiT, cls head", student["eval/top1_cls"], student.get("eval_ema/top1_cls")),
            ("student DeiT, dist head", student["eval/top1_dist"],
             student.get("eval_ema/top1_dist")),
            ("student DeiT, fused (cls+dist)/2", student["eval/top1_fused"],
             student.get("eval_ema/top1_fused"))]
    with_ema = any(ema is not None for _, _, ema in rows)
    lines = ["Fashion-MNIST test top-1 (10,000 images; chance 10%)",
             f"| {'model':<34} | top-1 |" + (" EMA top-1 |" if with_ema else ""),
             f"|{'-' * 36}|-------|" + ("-----------|" if with_ema else "")]
    for name, top1, ema in rows:
        ema_s = (f" {ema:9.2f} |" if ema is not None else " " * 10 + " |") if with_ema else ""
        lines.append(f"| {name:<34} | {top1:5.2f} |{ema_s}")
    figures = results.get("analysis")
    if figures:
        cos = figures["cls_dist_cosine"]
        agree = figures["agreement_with_teacher"]["fused"]
        last = len(cos["mean"]) - 1
        lines += ["",
                  "The dist token (paper: learned tokens cos 0.06, last layer 0.93)",
                  f"| {'figure':<48} | value |",
                  f"|{'-' * 50}|-------|",
                  f"| {'cos(cls, dist) of the learned tokens':<48} | "
                  f"{figures['learned_token_cosine']:5.2f} |",
                  f"| {'cos(cls, dist) embeddings after block 1':<48} | {cos['mean'][1]:5.2f} |",
                  f"| {f'cos(cls, dist) embeddings after block {last} (last)':<48} | "
                  f"{cos['mean'][-1]:5.2f} |",
                  f"| {'student (fused) agrees with the teacher, %':<48} | {agree:5.2f} |"]
    lines.append(f"teacher {results['teacher_seconds']:.0f}s, student "
                 f"{results['student_seconds']:.0f}s, analysis "
                 f"{results.get('analysis_seconds', 0):.0f}s")
    return "\n".join(lines)


def main(argv):
    del argv
    results = run(FLAGS.workdir, FLAGS.teacher_epochs, FLAGS.student_epochs)
    print(format_table(results), flush=True)


def console() -> None:
    """The console entry point ``deit-quickstart``."""
    from deit_jax import cli

    cli.run(main)


if __name__ == "__main__":
    console()
