"""Per-stage CPU cost of the host input pipeline: where an image's milliseconds go.

    taskset -c 1 python benchmarks/input_profile.py --data_dir=ROOT [--images=256]

Runs tf.data pipelines over the same ImageFolder files, each adding one stage of the training
transform (read + decode, RandomResizedCrop + flip, RandAugment, normalise, random erasing),
then the real ``input_pipeline.train_batches`` (corrupt-file fallback, batching) for both
values of ``aug.on_device``; prints a JSON line per pipeline and a table of the CPU ms per
image (process CPU time, all threads) and each stage's share (the difference to the previous).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import common  # noqa: E402
from deit_jax import input_pipeline  # noqa: E402
from deit_jax.augment import erasing, host, policy, randaugment  # noqa: E402

SIZE = 224


def _stages(seed_of):
    ra = policy.parse_rand_augment("rand-m9-mstd0.5-inc1")

    def decode(source):
        return lambda i: input_pipeline.load_example(source, i)["image"]

    def crop(source):
        return lambda i: host.train_crop(decode(source)(i), seed_of(i), img_size=SIZE)

    def rand_aug(source):
        return lambda i: randaugment.rand_augment(crop(source)(i), seed_of(i), **ra)

    def normalise(source):
        return lambda i: host.normalize(rand_aug(source)(i))

    def erase(source):
        return lambda i: erasing.random_erasing(normalise(source)(i), seed_of(i), prob=0.25)

    def decode_only(source):  # the decoded size, so that unequal images batch
        return lambda i: tf.shape(decode(source)(i))

    return {"read+decode": decode_only, "+crop/resize/flip": crop, "+RandAugment": rand_aug,
            "+normalise": normalise, "+erasing": erase}


def _time(ds, images, batch):
    it = iter(ds)
    next(it)  # start-up and tracing
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(images // batch):
        next(it)
    n = images // batch * batch
    return n / (time.perf_counter() - start), 1e3 * (time.process_time() - cpu) / n


def run(data_dir: str, images: int = 256, batch: int = 64) -> list[dict]:
    c = common.base_config()
    c.dataset.name = "imagefolder"
    c.dataset.data_dir = data_dir
    source = input_pipeline.get_source(c, "train", SIZE)
    options = input_pipeline._options()

    def seed_of(i):
        return tf.stack([tf.cast(i, tf.int64), tf.constant(7, tf.int64)])

    rows = []
    for name, stage in _stages(seed_of).items():
        fn = stage(source)
        ds = (tf.data.Dataset.range(10**9).map(lambda i, fn=fn: fn(i % source.num_examples),
                                                num_parallel_calls=tf.data.AUTOTUNE)
              .batch(batch).prefetch(2).with_options(options))
        rate, ms = _time(ds, images, batch)
        rows.append({"stage": name, "images_per_sec": rate, "cpu_ms_per_image": ms})
    for on_device in (True, False):
        c.aug.on_device = on_device
        layout = input_pipeline.Layout(batch, 0, 1, 1)
        rate, ms = _time(input_pipeline.train_batches(c, source, layout, image_size=SIZE),
                         images, batch)
        rows.append({"stage": f"train_batches(on_device={on_device})", "images_per_sec": rate,
                     "cpu_ms_per_image": ms})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--images", type=int, default=256)
    a = p.parse_args()
    rows = run(a.data_dir, a.images)
    load = os.getloadavg()[0]
    for row in rows:
        print(json.dumps({**row, "loadavg_1min": load}))
    print(f"\n| stage (cumulative) | CPU ms/image | this stage | (load {load:.1f}) |")
    print("|---|---|---|---|")
    prev = 0.0
    for row in rows:
        ms = row["cpu_ms_per_image"]
        delta = ms - prev if row["stage"].startswith(("+", "read")) else float("nan")
        print(f"| {row['stage']} | {ms:.2f} | {delta:.2f} | |")
        prev = ms if row["stage"].startswith(("+", "read")) else prev


if __name__ == "__main__":
    main()
