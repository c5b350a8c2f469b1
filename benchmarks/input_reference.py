"""The timm/PIL reference of the input benchmark: what the official DeiT's loader does per image.

    taskset -c 1 python benchmarks/input_reference.py --data_dir=ROOT [--images=256]

torchvision ``ImageFolder(ROOT/train)`` with timm ``create_transform(224, is_training=True,
auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25, interpolation='bicubic', color_jitter=0.3)``
(the official DeiT recipe): PIL decode, RandomResizedCrop + flip, RandAugment, ToTensor,
normalise, random erasing, in this process (one loader worker's work), one torch thread.
Prints one JSON line: ``images_per_sec`` (wall) and ``cpu_ms_per_image`` (process CPU time).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from PIL import Image, ImageOps
from timm.data import auto_augment as timm_aa
from timm.data import create_transform
from torchvision.datasets import ImageFolder


def _posterize_as_pillow_9(img, bits_to_keep, **_):
    """timm's posterize with Pillow < 10's behaviour at 0 bits (a black image; DeiT ran on
    Pillow 8). Pillow >= 10 raises there, which would end the run at the first
    PosterizeIncreasing draw of magnitude ~10."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def run(data_dir: str, images: int = 256, warmup: int = 16) -> dict:
    torch.set_num_threads(1)
    timm_aa.NAME_TO_OP["PosterizeIncreasing"] = _posterize_as_pillow_9
    timm_aa.NAME_TO_OP["Posterize"] = _posterize_as_pillow_9
    transform = create_transform(224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                                 re_prob=0.25, interpolation="bicubic", color_jitter=0.3)
    dataset = ImageFolder(os.path.join(data_dir, "train"), transform=transform)
    torch.manual_seed(0)
    for i in range(warmup):
        dataset[i % len(dataset)]
    start, cpu = time.perf_counter(), time.process_time()
    batch = []
    for i in range(images):
        batch.append(dataset[i % len(dataset)][0])
        if len(batch) == 64:  # collate as the DataLoader does
            torch.stack(batch)
            batch = []
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return {"framework": "timm/PIL", "images": images, "images_per_sec": images / seconds,
            "cpu_ms_per_image": 1e3 * cpu_seconds / images, "loadavg_1min": os.getloadavg()[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--images", type=int, default=256)
    a = p.parse_args()
    print(json.dumps(run(a.data_dir, a.images)), flush=True)


if __name__ == "__main__":
    main()
