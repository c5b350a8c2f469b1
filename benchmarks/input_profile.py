"""Per-stage CPU cost of the host input pipeline: where an image's milliseconds go.

    taskset -c 1 python benchmarks/input_profile.py --data_dir=ROOT [--images=256]

Runs tf.data pipelines over the same ImageFolder files, each adding one stage of the training
transform (read + decode, whole then crop-aware, RandomResizedCrop + flip, RandAugment,
normalise, random erasing; the 'fast' crop resize on its own; Pillow's crop and RandAugment,
``aug.host_library='pillow'``), then the real ``input_pipeline.train_batches`` (corrupt-file
fallback, batching) for both values of ``aug.on_device``, ``aug.host_library`` and, on the
device path, ``aug.host_resize``; prints a JSON line per
pipeline and a table of the CPU ms per image (process CPU time, all threads) and each stage's
share (the difference to the previous).
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
from deit_jax import data_sources, input_pipeline  # noqa: E402
from deit_jax.augment import erasing, host, pillow, policy, randaugment  # noqa: E402

SIZE = 224


def _stages(seed_of):
    ra = policy.parse_rand_augment("rand-m9-mstd0.5-inc1")

    def decode(source):
        return lambda i: input_pipeline.load_example(source, i)["image"]

    def crop_decode(source):  # crop-aware: only the crop's window of a JPEG is decoded
        return lambda i: data_sources.decode_crop(
            source.load_encoded(i)["encoded"],
            lambda h, w: host.train_view(seed_of(i), h, w))

    def crop(source, resize="pil"):
        return lambda i: host.crop_flip(*crop_decode(source)(i), size=SIZE, resize=resize)

    def rand_aug(source):
        return lambda i: randaugment.rand_augment(crop(source)(i), seed_of(i), **ra)

    def normalise(source):
        return lambda i: host.normalize(rand_aug(source)(i))

    def erase(source):
        return lambda i: erasing.random_erasing(normalise(source)(i), seed_of(i), prob=0.25)

    def pillow_crop(source):  # aug.host_library='pillow': Pillow's own resize and flip
        return lambda i: pillow.transform(*crop_decode(source)(i), None, size=SIZE)

    def pillow_rand_aug(source):  # ... and RandAugment, in the same numpy call
        return lambda i: pillow.transform(*crop_decode(source)(i),
                                          randaugment.rand_augment_layers(seed_of(i), **ra),
                                          size=SIZE)

    def shape_of(stage):  # the decoded size only, so that unequal images batch
        return lambda source: lambda i: tf.shape(stage(source)(i)[0] if stage is crop_decode
                                                 else stage(source)(i))

    return {"read+decode (whole image)": shape_of(decode),
            "read+decode (crop-aware)": shape_of(crop_decode),
            "+crop/resize/flip (host_resize=pil)": crop, "+RandAugment": rand_aug,
            "+normalise": normalise, "+erasing": erase,
            "crop-aware decode +crop/resize/flip (host_resize=fast)":
                lambda source: crop(source, "fast"),
            "crop-aware decode +crop/resize/flip (Pillow)": pillow_crop,
            "crop-aware decode +crop/resize/flip +RandAugment (Pillow)": pillow_rand_aug}


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
    for on_device, resize, library in ((True, "fast", "pillow"), (True, "pil", "pillow"),
                                       (True, "pil", "tensorflow"), (False, "pil", "pillow"),
                                       (False, "pil", "tensorflow")):
        c.aug.on_device, c.aug.host_resize, c.aug.host_library = on_device, resize, library
        layout = input_pipeline.Layout(batch, 0, 1, 1)
        rate, ms = _time(input_pipeline.train_batches(c, source, layout, image_size=SIZE),
                         images, batch)
        rows.append({"stage": f"train_batches(on_device={on_device}, host_resize={resize}, "
                              f"host_library={library})",
                     "images_per_sec": rate, "cpu_ms_per_image": ms})
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
    by_name = {row["stage"]: row["cpu_ms_per_image"] for row in rows}
    prev = 0.0
    for row in rows:
        ms, name = row["cpu_ms_per_image"], row["stage"]
        if name.endswith("+RandAugment (Pillow)"):
            delta = ms - by_name["crop-aware decode +crop/resize/flip (Pillow)"]
        elif name.startswith("crop-aware"):  # its own chain from the crop-aware decode
            delta = ms - by_name["read+decode (crop-aware)"]
        elif name == "read+decode (crop-aware)":
            delta = ms - by_name["read+decode (whole image)"]
        else:
            delta = ms - prev if name.startswith(("+", "read")) else float("nan")
        print(f"| {name} | {ms:.2f} | {delta:+.2f} | |")
        prev = ms if name.startswith(("+", "read")) else prev


if __name__ == "__main__":
    main()
