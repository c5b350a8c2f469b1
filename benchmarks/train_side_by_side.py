"""Ours against timm's eager step, alternating A B A B in separate processes, on the CPU.

    python benchmarks/train_side_by_side.py --config=ti --rounds=3
    python benchmarks/train_side_by_side.py --config=student --rounds=3 \
        --variants=timm,all,none,gelu,dense,layernorm

``--config``: ``ti`` (DeiT-Ti distilled, 224, batch 32, no teacher) or ``student`` (the
quickstart's student until 2026-12-07: 28x28, patch 7, width 96, depth 4, 3 heads, 10 classes,
batch 256) or ``quickstart`` (the quickstart's student since 2026-12-07: width 64, 2 heads, batch
128, the rest as ``student``).
``--variants``: ``timm`` (benchmarks/timm_reference.py) and lever sets of
benchmarks/cpu_levers.py (``all`` = the project as shipped, ``none`` = flax's Dense,
LayerNorm and erf GELU, a single lever name, or levers joined by ``+``: ``gelu+dense+layernorm``
= all but the head-major attention); ``@N`` after a variant runs it on N XLA CPU devices
(``--cpu_devices=N``: ``all@2``). Every round runs each variant once,
in the order given; the 1-minute load average is recorded before each run. Prints one JSON line
per run and, at the end, a Markdown table of medians and each variant's ratio to timm (the
median of the per-round ratios). ``--out`` keeps the JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = {
    "ti": ["--model=deit_tiny_distilled_patch16_224", "--batch_size=32", "--steps=5",
           "--warmup=1"],
    "student": ["--model=deit_tiny_distilled_patch16_224", "--img_size=28", "--patch_size=7",
                "--embed_dim=96", "--depth=4", "--num_heads=3", "--num_classes=10",
                "--batch_size=256", "--steps=20", "--warmup=3"],
    "quickstart": ["--model=deit_tiny_distilled_patch16_224", "--img_size=28", "--patch_size=7",
                   "--embed_dim=64", "--depth=4", "--num_heads=2", "--num_classes=10",
                   "--batch_size=128", "--steps=200", "--warmup=5"],
}


def _load() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def run_one(variant: str, config: str) -> dict:
    args = CONFIGS[config] + ["--mode=train"]
    if variant == "timm":
        cmd = [sys.executable, os.path.join(HERE, "timm_reference.py"), "--no_flops"] + args
    else:
        levers, _, devices = variant.partition("@")
        cmd = [sys.executable, os.path.join(HERE, "cpu_levers.py"), f"--levers={levers}",
               "--"] + args + ([f"--cpu_devices={devices}"] if devices else [])
    env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    load = _load()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    r = json.loads(lines[-1])
    return {"variant": variant, "config": config, "load_before": load,
            "ms_per_step": r["ms_per_step"], "images_per_sec": r["images_per_sec"],
            "cpu_seconds_per_step": r.get("cpu_seconds_per_step")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="ti", choices=sorted(CONFIGS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default="timm,all")
    p.add_argument("--out", default="")
    a = p.parse_args()
    variants = a.variants.split(",")
    rows = []
    for rnd in range(a.rounds):
        for v in variants:
            r = run_one(v, a.config)
            r["round"] = rnd
            rows.append(r)
            print(json.dumps(r), flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(json.dumps(r) + "\n")
    print(f"\n{a.config}: {a.rounds} rounds, load {min(r['load_before'] for r in rows):.2f}-"
          f"{max(r['load_before'] for r in rows):.2f}")
    print("| variant | ms/step (median) | img/s | CPU s/step | per-run ms | vs timm |")
    print("|---|---|---|---|---|---|")
    by = {v: [r for r in rows if r["variant"] == v] for v in variants}
    for v in variants:
        ms = [r["ms_per_step"] for r in by[v]]
        cpu = [r["cpu_seconds_per_step"] for r in by[v] if r["cpu_seconds_per_step"] is not None]
        ratio = "-"
        if "timm" in by and v != "timm":
            pairs = zip(by["timm"], by[v], strict=True)
            med = statistics.median(t["ms_per_step"] / r["ms_per_step"] for t, r in pairs)
            ratio = f"{med:.2f}x"
        print(f"| {v} | {statistics.median(ms):.1f} | "
              f"{statistics.median(r['images_per_sec'] for r in by[v]):.1f} | "
              f"{statistics.median(cpu):.2f} | {' / '.join(f'{m:.0f}' for m in ms)} | {ratio} |"
              if cpu else f"| {v} | {statistics.median(ms):.1f} | - | - | - | {ratio} |")


if __name__ == "__main__":
    main()
