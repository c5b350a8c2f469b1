"""An ImageFolder of ImageNet-size JPEGs for the input-pipeline benchmark, offline.

    python benchmarks/input_make_data.py --out=/tmp/input_bench [--images=256]

Made from the two photos scikit-learn ships (``sklearn.datasets.load_sample_images``:
china.jpg and flower.jpg, 427x640): each file is a seeded random crop of one of them (area
40-100%), resized so its shorter side is 300-500 px (ImageNet's train images average ~400x350),
maybe mirrored, saved as a quality-90 JPEG in one of 4 class folders. Deterministic.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image


def make(out: str, images: int = 256, seed: int = 0) -> str:
    from sklearn.datasets import load_sample_images  # benchmark data only

    photos = [Image.fromarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(seed)
    root = os.path.join(out, "train")
    for i in range(images):
        photo = photos[i % len(photos)]
        w, h = photo.size
        area = rng.uniform(0.4, 1.0)
        cw, ch = int(w * np.sqrt(area)), int(h * np.sqrt(area))
        left, top = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        crop = photo.crop((left, top, left + cw, top + ch))
        short = rng.integers(300, 501)
        scale = short / min(cw, ch)
        crop = crop.resize((round(cw * scale), round(ch * scale)), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        folder = os.path.join(root, f"class_{i % 4}")
        os.makedirs(folder, exist_ok=True)
        crop.save(os.path.join(folder, f"img_{i:04d}.jpg"), quality=90)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=256)
    a = p.parse_args()
    print(make(a.out, a.images))


if __name__ == "__main__":
    main()
