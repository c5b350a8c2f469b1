"""The input-pipeline comparison in one command: deit_jax's host side against timm/PIL.

    python benchmarks/input_side_by_side.py [--data_dir=ROOT] [--rounds=3] [--images=256]

On the same JPEGs (``input_make_data.py`` makes 256 ImageNet-size ones into /tmp when no
``--data_dir`` is given), alternating A B C A B C ... so that a machine's load drifts over all
of them alike, each pinned to CPU 1 (``taskset -c 1``):

  A  python -m deit_jax.benchmark --mode=input --on_device=true   (host: decode, crop, flip)
  B  benchmarks/input_reference.py                                (timm create_transform)
  C  python -m deit_jax.benchmark --mode=input --on_device=false  (host: PIL-exact recipe, Pillow)
  E  ... --on_device=false --host_library=tensorflow              (the same as TF graph ops)
  D  ... --on_device=true --host_resize=fast                     (one resize pass, no antialias)

then A, D and C on two cores (``taskset -c 0,1``) for the scaling. Prints every JSON record, then a
table of medians: images/s (wall), CPU ms per image (process time: less sensitive to other
processes on the core), and both as ratios to timm; the 1-minute load average is recorded with
each run (the figures are only comparable on a quiet machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd: list[str], cpus: str) -> dict:
    out = subprocess.run(["taskset", "-c", cpus, sys.executable, *cmd], cwd=ROOT, check=True,
                         capture_output=True, text=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}).stdout
    record = json.loads(out.strip().splitlines()[-1])
    record["load_after"] = os.getloadavg()[0]
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--images", type=int, default=256)
    a = p.parse_args()
    data_dir = a.data_dir or "/tmp/deit_jax_input_bench"
    if not os.path.isdir(os.path.join(data_dir, "train")):
        subprocess.run([sys.executable, "benchmarks/input_make_data.py", f"--out={data_dir}"],
                       cwd=ROOT, check=True)
    n = f"--images={a.images}"
    bench = ["-m", "deit_jax.benchmark", "--mode=input", f"--data_dir={data_dir}", n,
             "--batch_size=64"]
    runs = {
        "A deit_jax on_device=true (1 core)": (bench + ["--on_device=true"], "1"),
        "B timm/PIL create_transform (1 core)": (
            ["benchmarks/input_reference.py", f"--data_dir={data_dir}", n], "1"),
        "C deit_jax on_device=false, PIL-exact, Pillow (1 core)": (
            bench + ["--on_device=false"], "1"),
        "E deit_jax on_device=false, PIL-exact, TF ops (1 core)": (
            bench + ["--on_device=false", "--host_library=tensorflow"], "1"),
        "D deit_jax on_device=true, host_resize=fast (1 core)": (
            bench + ["--on_device=true", "--host_resize=fast"], "1"),
    }
    results: dict[str, list[dict]] = {k: [] for k in runs}
    for _ in range(a.rounds):
        for name, (cmd, cpus) in runs.items():
            results[name].append(_run(cmd, cpus))
            print(json.dumps({"run": name, **results[name][-1]}), flush=True)
    twos = {"A' deit_jax on_device=true (2 cores)": ["--on_device=true"],
            "D' deit_jax on_device=true, host_resize=fast (2 cores)":
                ["--on_device=true", "--host_resize=fast"],
            "C' deit_jax on_device=false, Pillow (2 cores)": ["--on_device=false"]}
    for _ in range(a.rounds):
        for two, flags in twos.items():
            results.setdefault(two, []).append(_run(bench + flags, "0,1"))
            print(json.dumps({"run": two, **results[two][-1]}), flush=True)

    def med(name, key):
        return statistics.median(r[key] for r in results[name])

    timm = "B timm/PIL create_transform (1 core)"
    print(f"\n{a.rounds} rounds x {a.images} images, medians; load = 1-min load average")
    print("| pipeline | images/s | CPU ms/image | x timm (images/s) | x timm (CPU ms) | load |")
    print("|---|---|---|---|---|---|")
    for name in results:
        print(f"| {name} | {med(name, 'images_per_sec'):.1f} | "
              f"{med(name, 'cpu_ms_per_image'):.2f} | "
              f"{med(name, 'images_per_sec') / med(timm, 'images_per_sec'):.2f} | "
              f"{med(timm, 'cpu_ms_per_image') / med(name, 'cpu_ms_per_image'):.2f} | "
              f"{med(name, 'loadavg_1min'):.1f} |")
    ones = ("A deit_jax on_device=true (1 core)",
            "D deit_jax on_device=true, host_resize=fast (1 core)",
            "C deit_jax on_device=false, PIL-exact, Pillow (1 core)")
    for two, one in zip(twos, ones, strict=True):
        print(f"2 cores / 1 core ({one[:1]}, images/s): "
              f"{med(two, 'images_per_sec') / med(one, 'images_per_sec'):.2f}")


if __name__ == "__main__":
    main()
