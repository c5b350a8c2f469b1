"""results.jsonl (from run_all.sh) -> a markdown table, medians over rounds.

    python benchmarks/make_table.py /tmp/deit_jax_bench/cpu-.../results.jsonl [--env=env.txt]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

FRAMEWORKS = ("jax", "torch_eager", "torch_compile")
SHORT = {"deit_tiny_distilled_patch16_224": "DeiT-Ti dist", "deit_small_distilled_patch16_224":
         "DeiT-S dist", "deit_base_distilled_patch16_224": "DeiT-B dist"}


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(records: list[dict]) -> str:
    """One row per (model, teacher, mode, dtype, batch) with every framework side by side."""
    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        key = (r["model"], r["teacher"] or "-", r["mode"], r["dtype"], r["batch_size"])
        groups[key][r["framework"]].append(r)

    def med(rs, field):
        values = [r[field] for r in rs if r.get(field) is not None]
        return statistics.median(values) if values else None

    lines = [
        "| model | teacher | mode | dtype | batch | ours img/s (ms/step) | timm eager img/s "
        "(ms/step) | timm compile img/s (ms/step) | ours / eager | ours / compile | "
        "compile s (ours / eager 1st step / torch.compile) | GFLOP/img (XLA / torch) | "
        "CPU s/step (ours / eager / compile) | MFU ours | load | rounds |",
        "|" + "---|" * 16,
    ]
    for key in sorted(groups):
        fw = groups[key]
        ips = {f: med(fw.get(f, []), "images_per_sec") for f in FRAMEWORKS}
        ms = {f: med(fw.get(f, []), "ms_per_step") for f in FRAMEWORKS}
        comp = {f: med(fw.get(f, []), "compile_seconds") for f in FRAMEWORKS}

        ratio = {f: ips["jax"] / ips[f] if ips["jax"] and ips[f] else None for f in FRAMEWORKS}
        cell = {f: f"{_fmt(ips[f], '.2f')} ({_fmt(ms[f], '.0f')})" if ips[f] else "-"
                for f in FRAMEWORKS}

        gflops = [med(fw.get(f, []), "flops_per_image") for f in ("jax", "torch_eager")]
        gflops = " / ".join(_fmt(g and g / 1e9, ".2f") for g in gflops)
        cpu = {f: med(fw.get(f, []), "cpu_seconds_per_step") for f in FRAMEWORKS}
        load = med([r for rs in fw.values() for r in rs], "loadavg_1min")
        rounds = max((len(v) for v in fw.values()), default=0)
        model, teacher, mode, dtype, batch = key
        lines.append(
            f"| {SHORT.get(model, model)} | {teacher} | {mode} | {dtype} | {batch} | "
            f"{cell['jax']} | {cell['torch_eager']} | {cell['torch_compile']} | "
            f"{_fmt(ratio['torch_eager'], '.2f')} | {_fmt(ratio['torch_compile'], '.2f')} | "
            f"{' / '.join(_fmt(comp[f], '.0f') for f in FRAMEWORKS)} | {gflops} | "
            f"{' / '.join(_fmt(cpu[f], '.1f') for f in FRAMEWORKS)} | "
            f"{_fmt(med(fw.get('jax', []), 'mfu'), '.1%')} | {_fmt(load, '.1f')} | {rounds} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("results")
    p.add_argument("--env", default="")
    a = p.parse_args()
    with open(a.results) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if a.env:
        with open(a.env) as f:
            print("\n".join(f"    {line.rstrip()}" for line in f) + "\n")
    print(table(records))


if __name__ == "__main__":
    main()
