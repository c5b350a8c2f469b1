"""Training images/s of one student with no teacher, on-the-fly teachers and precomputed logits.

    PYTHONPATH=. python benchmarks/teacher_modes.py --out=/tmp/teacher_modes \
        [--steps=60] [--teachers=regnety_002,regnety_160] [--views=4]

Runs the real training loop (``train.train_and_evaluate``: input pipeline, host lookup of the
stored logits, the pmapped step) on the quickstart student (``configs/quickstart.py:student``,
offline Fashion-MNIST) for ``--steps`` steps in each mode, on whatever devices JAX sees:

- ``none``: ``distillation.kind='none'`` (the same distilled model; its dist head unused);
- ``onthefly:<teacher>``: hard distillation, the teacher (random weights: the cost does not
  depend on them) run inside the step on the student's augmented batch;
- ``precomputed:eval`` / ``precomputed:crops``: hard distillation from a store written once
  by ``teacher_logits`` (eval view; ``--views`` crop-aware views) with the first teacher.

Reports the median steady-state images/s of each run (logging intervals after the first,
compiling, step; evaluation excluded) and the wall time of writing each store, as a table on
stdout and JSON lines in ``OUT/results.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="workdirs and results go here (made anew)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--teachers", default="regnety_002,regnety_160")
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--config", default="student", help="configs/quickstart.py variant")
    a = p.parse_args()

    import jax
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    from configs import quickstart
    from deit_jax import teacher_logits, train

    train.quiet_library_logs()
    teachers = a.teachers.split(",")
    os.makedirs(a.out, exist_ok=False)

    def config(**overrides):
        c = quickstart.get_config(a.config)
        c.unlock()
        c.max_steps = a.steps
        c.log_every_steps = max(a.steps // 6, 1)
        c.checkpoint_every_steps = 10 * a.steps
        c.distillation.random_teacher = True
        c.update_from_flattened_dict(overrides)
        c.lock()
        return c

    runs = {"none": config(**{"distillation.kind": "none"})}
    for t in teachers:
        runs[f"onthefly:{t}"] = config(**{"distillation.teacher": t})
    rows = []
    stores = {}
    for name, views in (("eval", 0), ("crops", a.views)):
        out = os.path.join(a.out, f"store_{name}")
        t0 = time.time()
        result = teacher_logits.write_teacher_logits(
            config(**{"distillation.teacher": teachers[0]}), out, views=views)
        seconds = time.time() - t0
        n = result["manifest"]["num_examples"]
        rows.append({"mode": f"write store:{name}", "teacher": teachers[0], "views": views,
                     "seconds": seconds, "teacher_images_per_sec": n * max(views, 1) / seconds})
        stores[name] = out
        runs[f"precomputed:{name}"] = config(**{"distillation.teacher_logits": out})
    for name, c in runs.items():
        t0 = time.time()
        results = train.train_and_evaluate(c, os.path.join(a.out, name.replace(":", "_")))
        teacher = "" if c.distillation.kind == "none" else c.distillation.teacher
        rows.append({"mode": name, "teacher": teacher.split("/")[-1],
                     "images_per_sec": results["train/images_per_sec"],
                     "wall_seconds": time.time() - t0})
    with open(os.path.join(a.out, "results.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps({**row, "devices": jax.device_count(),
                                "platform": jax.devices()[0].platform}) + "\n")
    print("| mode | teacher | train images/s | store write s (teacher images/s) |\n"
          "|---|---|---|---|")
    for row in rows:
        if "images_per_sec" in row:
            print(f"| {row['mode']} | {row['teacher']} | {row['images_per_sec']:.0f} | |")
        else:
            print(f"| {row['mode']} | {row['teacher']} | | {row['seconds']:.0f} "
                  f"({row['teacher_images_per_sec']:.0f}) |")


if __name__ == "__main__":
    main()
