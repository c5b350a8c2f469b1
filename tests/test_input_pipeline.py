"""Input pipeline: sources, class order, determinism, resume, repeated augmentation, per-process
split, exact evaluation, corrupt files and start-up errors, on data made in the test."""

from __future__ import annotations

import collections
import io
import logging
import math
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from configs import common
from deit_jax import augment
from deit_jax import input_pipeline as ip
from deit_jax.augment import host as host_aug

IMG = 16  # model input size in these tests: small keeps RandAugment cheap


def make_config(**aug):
    """The recipe on the host-exact path (``aug.on_device=False``) unless ``aug`` says so."""
    c = common.base_config()
    c.seed = 3
    # These sets hold fewer than 256 examples: the official RASampler's N // 256 * 256 epoch
    # (test_ra_epoch_length_matches_the_official_sampler) would keep none of them.
    c.aug.ra_multiple = 1
    c.aug.on_device = False
    for k, v in aug.items():
        c.aug[k] = v
    return c


def save_image(path: str, rng: np.random.RandomState, fmt: str, shape=(20, 28)) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.randint(0, 256, (*shape, 3), dtype=np.uint8)).save(path, fmt)


def tv_samples(root: str):
    from torchvision.datasets import ImageFolder

    tv = ImageFolder(root)
    return tv.classes, tv.samples


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """root/train and root/val with tricky class and file names, JPEG, PNG and PPM files."""
    root = str(tmp_path_factory.mktemp("imagefolder"))
    rng = np.random.RandomState(0)
    train = {
        "B": ["x.JPG", "a.png", "sub/z.jpeg", "sub/deeper/y.Png", "notes.txt"],
        "a": ["1.jpg", "10.jpg", "2.jpg", "A.JPEG"],
        "a10": ["img.PPM", "img2.jpg"],
        "a2": ["q.png", "sub dir/r.jpg", "sub-dir/s.jpg"],
        "_under": ["k.jpg", "j.png"],
    }
    formats = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".ppm": "PPM"}
    for split, classes in (("train", train), ("val", {"a": ["v.jpg"], "a2": ["w.png", "u.jpg"],
                                                        "B": ["t.JPG"]})):
        for name, files in classes.items():
            for f in files:
                path = os.path.join(root, split, name, f)
                ext = os.path.splitext(f)[1].lower()
                if ext in formats:
                    save_image(path, rng, formats[ext], shape=(18 + len(f), 24))
                else:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "w") as fh:
                        fh.write("not an image, and not an image extension either")
    return root


def tiny_builders():
    """Two in-memory TFDS builders: plain ImageNet-like, and ReaL-like (original_label,
    real_label), defined once per process (TFDS registers them by class name)."""

    class DeitTestImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=5)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(20, 0),
                    "validation": self._generate_examples(7, 1)}

        def _generate_examples(self, n, seed):
            rng = np.random.RandomState(seed)
            for i in range(n):
                yield i, {"image": rng.randint(0, 256, (20 + i, 24, 3), dtype=np.uint8),
                          "label": i % 5}

    class DeitTestReal(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "original_label": tfds.features.ClassLabel(num_classes=5),
                "real_label": tfds.features.Sequence(tfds.features.ClassLabel(num_classes=5)),
                "file_name": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"validation": self._generate_examples(9)}

        def _generate_examples(self, n):
            rng = np.random.RandomState(2)
            for i in range(n):
                yield i, {"image": rng.randint(0, 256, (24, 20, 3), dtype=np.uint8),
                          "original_label": i % 5,
                          "real_label": [(i + k) % 5 for k in range(i % 3)],
                          "file_name": f"ILSVRC2012_val_{i:08d}.JPEG"}

    return DeitTestImages, DeitTestReal


_BUILDERS = tiny_builders()


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    for cls in _BUILDERS:
        cls(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def collect(batches, n):
    return [next(batches) for _ in range(n)]


# ---------------------------------------------------------------------------------- sources


def test_class_and_file_order_match_torchvision(folder):
    train_root = os.path.join(folder, "train")
    classes, samples = tv_samples(train_root)
    source = ip.image_folder(train_root)
    assert list(source.class_names) == classes == ["B", "_under", "a", "a10", "a2"]
    assert source.num_examples == len(samples) == 15  # notes.txt is not an image file
    assert [source.where(i) for i in range(source.num_examples)] == [p for p, _ in samples]
    labels = [int(ip.load_example(source, tf.constant(i, tf.int64))["label"])
              for i in range(source.num_examples)]
    assert labels == [t for _, t in samples]

    # val maps by class name: its own ImageFolder would number 'a' 0 and 'a2' 2 instead.
    val = ip.get_source(config_for(folder), "eval", IMG)
    _, val_samples = tv_samples(os.path.join(folder, "val"))
    by_name = {os.path.basename(os.path.dirname(p)): classes.index(
        os.path.basename(os.path.dirname(p))) for p, _ in val_samples}
    assert [val.where(i) for i in range(val.num_examples)] == [p for p, _ in val_samples]
    got = [int(ip.load_example(val, tf.constant(i, tf.int64))["label"])
           for i in range(val.num_examples)]
    assert got == [by_name[os.path.basename(os.path.dirname(val.where(i)))]
                   for i in range(val.num_examples)] == [0, 2, 4, 4]


def config_for(root, **aug):
    c = make_config(**aug)
    c.dataset.name = "imagefolder"
    c.dataset.data_dir = root
    return c


def test_imagefolder_batches_shapes_ranges_and_content(folder):
    config = config_for(folder)
    source = ip.get_source(config, "train", IMG)
    layout = ip.Layout(6, 0, 1, 2)
    (batch,) = collect(ip.train_batches(config, source, layout, image_size=IMG), 1)
    # The host-exact path's PIL pixels, uint8 (the train step normalises and erases).
    assert batch["image"].shape == (2, 3, IMG, IMG, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int64
    assert batch["label"].shape == batch["index"].shape == (2, 3)
    _, samples = tv_samples(os.path.join(folder, "train"))
    # Each row's label is the label of the file its index names.
    assert [samples[i][1] for i in batch["index"].ravel()] == batch["label"].ravel().tolist()
    assert batch["image"].std() > 20

    # Eval: each image is exactly the eval transform of the file at its index (JPEG, PNG, PPM).
    batches = list(ip.eval_batches(config, source, layout, image_size=IMG))
    assert len(batches) == 3 and all(b["image"].shape == (2, 3, IMG, IMG, 3) for b in batches)
    flat = {k: np.concatenate([b[k].reshape(-1, *b[k].shape[2:]) for b in batches])
            for k in batches[0]}
    assert flat["mask"].tolist() == [1.0] * 15 + [0.0] * 3
    # PIL decodes as timm does: JPEGs must match it exactly (TF's default DCT does not).
    ppm = [i for i, (p, _) in enumerate(samples) if p.endswith(".PPM")][0]
    for row in (0, 7, 14, ppm):
        path, label = samples[flat["index"][row]]
        pixels = np.asarray(Image.open(path).convert("RGB"))
        want = augment.eval_transform(tf.constant(pixels), img_size=IMG)
        np.testing.assert_allclose(flat["image"][row], want, atol=1e-6)
        assert flat["label"][row] == label


def test_tfds_source_batches_and_real_labels(tfds_dir):
    config = make_config(auto_augment="")
    config.dataset.name = "deit_test_images"
    config.dataset.data_dir = tfds_dir
    train = ip.get_source(config, "train", IMG)
    val = ip.get_source(config, "eval", IMG)
    assert (train.num_examples, val.num_examples, train.num_classes) == (20, 7, 5)
    records = tfds.builder("deit_test_images", data_dir=tfds_dir).as_data_source("train")
    layout = ip.Layout(8, 0, 1, 2)
    batch = next(ip.train_batches(config, train, layout, image_size=IMG))
    assert batch["image"].shape == (2, 4, IMG, IMG, 3) and batch["image"].dtype == np.uint8
    assert [records[int(i)]["label"] for i in batch["index"].ravel()] == \
        batch["label"].ravel().tolist()
    assert batch["image"].std() > 20

    # ReaL through dataset.extra_eval: original_label is the label, real_label a multi-hot.
    config.dataset.extra_eval = "deit_test_real"
    extra = ip.get_extra_eval_sources(config, num_classes=5)
    assert list(extra) == ["deit_test_real"]
    real = extra["deit_test_real"]
    assert "ILSVRC2012_val_" in real.where(3)
    batches = list(ip.eval_batches(config, real, layout, image_size=IMG))
    assert len(batches) == 2
    flat = {k: np.concatenate([b[k].reshape(-1, *b[k].shape[2:]) for b in batches])
            for k in batches[0]}
    assert flat["real_label"].shape == (16, 5) and flat["real_label"].dtype == np.uint8
    assert flat["image"].dtype == np.float32 and flat["mask"].sum() == 9
    records = tfds.builder("deit_test_real", data_dir=tfds_dir).as_data_source("validation")
    for row in range(9):
        record = records[int(flat["index"][row])]
        assert flat["label"][row] == record["original_label"]
        assert sorted(np.flatnonzero(flat["real_label"][row])) == sorted(record["real_label"])
    want = augment.eval_transform(tf.constant(records[int(flat["index"][4])]["image"]),
                                  img_size=IMG)
    np.testing.assert_allclose(flat["image"][4], want, atol=1e-6)
    assert (flat["real_label"][:9].sum(-1) == 0).sum() == 3  # examples the ReaL eval skips

    config.dataset.extra_eval = "deit_test_images:validation"
    with pytest.raises(ip.DataError, match="has 5 classes, the model 10"):
        ip.get_extra_eval_sources(config, num_classes=10)


# ------------------------------------------------------------------- determinism and resume


def test_same_seed_same_stream_and_resume_at_k():
    # Random crop, flip, erasing and repeats x3 (RandAugment's graph is slow to trace; its
    # draws are stateless like the rest).
    config = make_config(auto_augment="")
    source = ip.synthetic("train", 20, 4, 20)
    layout = ip.Layout(8, 0, 1, 2)
    assert ip.steps_per_epoch(20, 8) == 2
    full = collect(ip.train_batches(config, source, layout, image_size=IMG), 6)
    again = collect(ip.train_batches(config, source, layout, image_size=IMG), 6)
    for a, b in zip(full, again, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # Resume in the middle of epoch 1: batches 3, 4 (epoch 2) and 5 exactly.
    resumed = collect(ip.train_batches(config, source, layout, image_size=IMG, start_step=3), 3)
    for a, b in zip(full[3:], resumed, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # Epochs differ in order; another seed differs in order and augmentation.
    assert not np.array_equal(full[0]["index"], full[2]["index"])
    config.seed = 4
    other = next(ip.train_batches(config, source, layout, image_size=IMG))
    assert not np.array_equal(other["index"], full[0]["index"])
    assert not np.allclose(other["image"], full[0]["image"])


_FAULTS_CODE = """
import resource, sys
import jax, jax.numpy as jnp
from configs import common
from deit_jax import input_pipeline as ip

f = jax.jit(lambda x, w: jnp.tanh(x @ w) @ w.T)  # 1 MiB buffers, above 128 KiB
x, w = jnp.ones((256, 1024)), jnp.ones((1024, 1024))

def faults_per_call():
    f(x, w).block_until_ready()
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        f(x, w).block_until_ready()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 20

c = common.base_config()
c.aug.ra_multiple, c.aug.on_device, c.aug.auto_augment = 1, False, ""
if sys.argv[1] == "generator":  # the control: what Dataset.from_generator does
    import tensorflow as tf
    spec = tf.TensorSpec([], tf.int64)
    next(iter(tf.data.Dataset.from_generator(lambda: iter([1]), output_signature=spec)))
else:
    batches = ip.train_batches(c, ip.synthetic("train", 20, 4, 20), ip.Layout(8, 0, 1, 2),
                               image_size=16)
    next(batches)
print(faults_per_call())  # the first XLA buffers come after the pipeline, as in a run
"""


def test_the_training_stream_leaves_mallocs_mmap_threshold_alone():
    # A GeneratorDataset pins glibc's mmap threshold at 128 KiB (TensorFlow's Python 3.11
    # patch): every XLA buffer above it is then a fresh mmap, ~2,000 page faults per call of f
    # here against ~100, and the quickstart's CPU step ran ~1.6x slower. The control (a
    # from_generator dataset) shows that the measurement sees the pin.
    import subprocess
    import sys

    # One CPU device, as the quickstart runs (the suite's 8 fake devices split the buffers),
    # and glibc's malloc (a preloaded tcmalloc ignores mallopt: the control would see no pin).
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env.update(PYTHONPATH=os.path.dirname(os.path.dirname(__file__)), XLA_FLAGS="")
    faults = {p: float(subprocess.run([sys.executable, "-c", _FAULTS_CODE, p], check=True,
                                      capture_output=True, text=True, env=env,
                                      timeout=300).stdout.split()[-1])
              for p in ("train_batches", "generator")}
    assert faults["generator"] > 4 * faults["train_batches"] + 200, faults


def test_streams_run_without_tf_datas_autotuning_model():
    # With it, destroying an iterator waited on one of its threads (most likely the model's,
    # asleep up to a minute): closing the training stream after a stage took 14-42 s in 4 of
    # 7 runs (the quickstart; docs/PERFORMANCE.md).
    assert ip._options().autotune.enabled is False


def test_in_memory_sources_skip_the_fallback_and_give_the_same_batches():
    # Array sources (Fashion-MNIST, synthetic) map load directly; the batches must be those of
    # the decode-with-fallback path, crop-free recipe (the quickstart's) and a cropping one.
    import dataclasses

    source = ip.synthetic("train", 20, 4, 20)
    assert source.in_memory
    layout = ip.Layout(8, 0, 1, 2)
    for crop in ((1.0, 1.0), (0.08, 1.0)):
        config = make_config(auto_augment="", scale=crop, ratio=crop if crop[0] == 1 else
                             (3 / 4, 4 / 3))
        fast = collect(ip.train_batches(config, source, layout, image_size=20), 3)
        slow = collect(ip.train_batches(config, dataclasses.replace(source, in_memory=False),
                                        layout, image_size=20), 3)
        for a, b in zip(fast, slow, strict=True):
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])


def test_a_crop_of_the_output_size_is_returned_unresized_as_pil_does():
    rng = np.random.RandomState(0)
    image = rng.randint(0, 256, (28, 28, 3)).astype(np.uint8)
    for resize in host_aug.HOST_RESIZE:
        out = host_aug.crop_flip(tf.constant(image), tf.constant([0, 0, 28, 28, 0]), size=28,
                                     resize=resize).numpy()
        pil = np.asarray(Image.fromarray(image).resize((28, 28), Image.BICUBIC))
        np.testing.assert_array_equal(out, pil)
        np.testing.assert_array_equal(out, image)
    # A smaller crop is still resized (not the crop's own pixels at the corner).
    out = host_aug.crop_flip(tf.constant(image), tf.constant([2, 3, 20, 22, 0]),
                                 size=28).numpy()
    pil = np.asarray(Image.fromarray(image[2:22, 3:25]).resize((28, 28), Image.BICUBIC))
    assert np.abs(out.astype(int) - pil).max() <= 1


def test_on_device_hands_over_the_host_paths_uint8_crops_and_resumes_at_k():
    # aug.on_device: the host stops after crop + flip (the same draws as the host-exact path)
    # and hands over uint8; the train step does RandAugment, normalisation and erasing.
    source = ip.synthetic("train", 20, 4, 20)
    layout = ip.Layout(8, 0, 1, 2)
    config = make_config(on_device=True)
    full = collect(ip.train_batches(config, source, layout, image_size=IMG), 6)
    for batch in full:
        assert batch["image"].dtype == np.uint8 and batch["image"].shape == (2, 4, IMG, IMG, 3)
        assert batch["label"].shape == batch["index"].shape == (2, 4)
    # The host-exact path without photometric ops hands over the same crops, under either
    # library (aug.host_library: Pillow's resize, the default, or TF graph ops).
    plain = make_config(auto_augment="", color_jitter=0.0, re_prob=0.0)
    pillow = collect(ip.train_batches(plain, source, layout, image_size=IMG), 2)
    plain.aug.host_library = "tensorflow"
    host = collect(ip.train_batches(plain, source, layout, image_size=IMG), 2)
    tf_config = make_config(on_device=True)
    tf_config.aug.host_library = "tensorflow"
    full_tf = collect(ip.train_batches(tf_config, source, layout, image_size=IMG), 2)
    for a, a_tf, b, c in zip(full, full_tf, host, pillow, strict=False):
        for k in a:
            np.testing.assert_array_equal(a[k], c[k])
            np.testing.assert_array_equal(a_tf[k], b[k])
        # The same views (the TF resize is PIL's but for a few pixels next to these images'
        # saturated patches, up to 9 levels here): a different view would differ everywhere.
        levels = np.abs(b["image"].astype(int) - c["image"])
        assert levels.mean() < 0.2, levels.mean()
    assert len({full[0]["image"][0, i].tobytes() for i in range(4)}) == 4
    resumed = collect(ip.train_batches(config, source, layout, image_size=IMG, start_step=3), 3)
    for a, b in zip(full[3:], resumed, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


# ------------------------------------------------------- repeats and the per-process split


def two_process_epoch(config, source, steps, global_batch=8, local_devices=2):
    """Epoch 0 as seen by 2 simulated processes: {process: list of batches}."""
    return {p: collect(ip.train_batches(config, source, ip.Layout(global_batch, p, 2,
                                                                   local_devices),
                                        image_size=IMG), steps) for p in (0, 1)}


def test_repeated_augmentation_across_two_processes():
    config = make_config(auto_augment="", re_prob=0.0)  # repeats differ by crop and flip
    source = ip.synthetic("train", 24, 4, 20)
    steps = ip.steps_per_epoch(24, 8)
    out = two_process_epoch(config, source, steps)
    rows = []  # (global device, index, image)
    for p, batches in out.items():
        for b in batches:
            for d in range(2):
                rows += [(2 * p + d, int(i), img) for i, img in zip(b["index"][d], b["image"][d],
                                                                    strict=True)]
    assert len(rows) == 24  # an epoch is len(train) samples, repeats counted
    counts = collections.Counter(i for _, i, _ in rows)
    assert set(counts.values()) == {3} and len(counts) == 8
    for index in counts:
        mine = [(dev, img) for dev, i, img in rows if i == index]
        assert len({dev for dev, _ in mine}) == 3  # three different devices
        for a in range(3):
            for b in range(a + 1, 3):
                assert np.abs(mine[a][1] - mine[b][1]).max() > 0.1  # independent augmentations
    # The official RASampler, unshuffled: repeat each index 3x, pad by wrapping, deal
    # round-robin, keep the first len // replicas of each replica.
    plan = ip.epoch_plan(10, 0, 0, num_replicas=4, num_repeats=3, shuffle=False)
    order = np.repeat(np.arange(10), 3)
    order = np.concatenate([order, order[:32 - 30]])
    np.testing.assert_array_equal(plan, np.stack([order[r::4][:10 // 4] for r in range(4)]))


def official_ra_sampler(n, num_replicas, rank, num_repeats=3):
    """facebookresearch/deit samplers.py RASampler.__iter__ with shuffle=False, verbatim."""
    num_samples = int(math.ceil(n * num_repeats / num_replicas))
    total_size = num_samples * num_replicas
    num_selected_samples = int(math.floor(n // 256 * 256 / num_replicas))
    indices = np.repeat(np.arange(n), num_repeats).tolist()
    padding_size = total_size - len(indices)
    if padding_size > 0:
        indices += indices[:padding_size]
    indices = indices[rank:total_size:num_replicas]
    return indices[:num_selected_samples]


@pytest.mark.parametrize("n,replicas,per_device", [(1000, 8, 16), (1281, 8, 32), (700, 4, 25),
                                                   (3000, 16, 10)])
def test_ra_epoch_length_matches_the_official_sampler(n, replicas, per_device):
    plan = ip.epoch_plan(n, 0, 0, num_replicas=replicas, num_repeats=3, shuffle=False,
                         ra_multiple=256)
    official = np.stack([official_ra_sampler(n, replicas, r) for r in range(replicas)])
    np.testing.assert_array_equal(plan, official)
    # drop_last per replica: the official loader's steps per epoch.
    batch = replicas * per_device
    steps = ip.steps_per_epoch(n, batch, num_repeats=3, ra_multiple=256)
    assert steps == len(official[0]) // per_device
    # Rounding only to the batch (ra_multiple=1) gives the same steps when 256 divides the
    # batch, more steps otherwise.
    rounded = ip.steps_per_epoch(n, batch, num_repeats=3)
    assert rounded == n // batch and (rounded > steps) == (batch % 256 != 0)
    # Without repeats (the official DistributedSampler / RandomSampler) nothing is rounded.
    assert ip.steps_per_epoch(n, batch, ra_multiple=256) == n // batch
    with pytest.raises(ValueError, match="ra_multiple=1"):
        ip.steps_per_epoch(200, 64, num_repeats=3, ra_multiple=256)


def test_per_process_split_is_disjoint_and_covers_the_plan():
    config = make_config(auto_augment="", re_prob=0.0)
    source = ip.synthetic("train", 30, 4, 20)
    steps = ip.steps_per_epoch(30, 8)
    out = two_process_epoch(config, source, steps)
    plan = ip.epoch_plan(30, 0, config.seed, num_replicas=4, num_repeats=3)
    seen = {}  # (global device, slot in the replica's plan row) -> index
    for p, batches in out.items():
        for s, b in enumerate(batches):
            for d in range(2):
                for j, index in enumerate(b["index"][d]):
                    seen[(2 * p + d, s * 2 + j)] = int(index)
    # Every slot of every replica appears once, holding the plan's index: the processes'
    # parts are disjoint (different replicas) and together are the epoch's plan.
    assert seen == {(r, j): int(plan[r, j]) for r in range(4) for j in range(steps * 2)}
    p0 = {(k[0], k[1]) for k in seen if k[0] < 2}
    p1 = {(k[0], k[1]) for k in seen if k[0] >= 2}
    assert not p0 & p1 and len(p0) == len(p1) == steps * 4


def test_eval_covers_every_example_once_across_processes():
    config = make_config()
    source = ip.synthetic("eval", 13, 4, 20)
    per_process = {p: list(ip.eval_batches(config, source, ip.Layout(8, p, 2, 2),
                                           image_size=IMG)) for p in (0, 1)}
    assert len(per_process[0]) == len(per_process[1]) == 2
    seen = []
    for batches in per_process.values():
        for b in batches:
            assert b["image"].shape == (2, 2, IMG, IMG, 3) and b["mask"].dtype == np.float32
            seen += b["index"][b["mask"] > 0].tolist()
    assert sorted(seen) == list(range(13))

    # A slice (teacher-logit shards) is a source of its own: index 0 is example 5.
    part = source.slice(5, 11)
    (batch,) = ip.eval_batches(config, part, ip.Layout(8, 0, 1, 1), image_size=IMG)
    assert part.num_examples == 6 and part.where(0) == "synthetic[5]"
    full = next(ip.eval_batches(config, source, ip.Layout(16, 0, 1, 1), image_size=IMG))
    np.testing.assert_array_equal(batch["image"][0, :6], full["image"][0, 5:11])
    assert batch["mask"][0].tolist() == [1] * 6 + [0] * 2


# ---------------------------------------------------------------------------- corrupt files


@pytest.fixture()
def corrupt_folder(tmp_path):
    """12 good images in 3 classes plus a truncated JPEG and a text file named .jpg."""
    rng = np.random.RandomState(1)
    root = tmp_path / "data"
    for c in range(3):
        for i in range(4):
            save_image(str(root / "train" / f"c{c}" / f"{i}.jpg"), rng, "JPEG")
    buf = io.BytesIO()
    Image.fromarray(rng.randint(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "train" / "c0" / "9_truncated.jpg").write_bytes(buf.getvalue()[:300])
    (root / "train" / "c1" / "2b_text.jpg").write_text("this is not a JPEG")
    return str(root)


def test_corrupt_files_are_replaced_counted_and_logged(corrupt_folder, caplog):
    config = config_for(corrupt_folder, auto_augment="", re_prob=0.0, repeated_aug=1)
    source = ip.get_source(config, "train", IMG)
    assert source.num_examples == 14
    names = [os.path.basename(source.where(i)) for i in range(14)]
    bad = {names.index("9_truncated.jpg"), names.index("2b_text.jpg")}
    _, samples = tv_samples(os.path.join(corrupt_folder, "train"))
    layout = ip.Layout(7, 0, 1, 1)
    caplog.set_level(logging.WARNING)
    batches = ip.train_batches(config, source, layout, image_size=IMG)
    epoch = collect(batches, 2)  # one epoch: every index exactly once
    index = np.concatenate([b["index"].ravel() for b in epoch])
    label = np.concatenate([b["label"].ravel() for b in epoch])
    # Every planned slot is filled; a bad example's slot holds the next file (its index, image
    # and label: 9_truncated, last of c0 -> c1/0.jpg with label 1; 2b_text -> c1/3.jpg,
    # label 1, where the one after would be 2), so precomputed teacher logits join on the
    # example really there.
    assert sorted(index.tolist()) == sorted(
        [i for i in range(14) if i not in bad] + [i + 1 for i in bad])
    assert all(b["image"].shape == (1, 7, IMG, IMG, 3) and np.isfinite(b["image"]).all()
               for b in epoch)
    for i, lab in zip(index, label, strict=True):
        assert lab == samples[i][1]
    assert batches.errors.count == 2
    assert set(batches.errors.files.values()) == {source.where(i) for i in bad}
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "9_truncated.jpg" in logged and "2b_text.jpg" in logged
    # A second epoch counts the same files again without logging them again.
    collect(batches, 2)
    assert batches.errors.count == 4 and len(batches.errors.files) == 2

    # Eval: bad files are masked out, every good one counted once.
    evals = ip.eval_batches(config, ip.image_folder(os.path.join(corrupt_folder, "train")),
                            layout, image_size=IMG)
    flat = [(int(i), float(m)) for b in evals for i, m in zip(b["index"].ravel(),
                                                               b["mask"].ravel(), strict=True)]
    assert sorted(i for i, m in flat if m) == sorted(set(range(14)) - bad)
    assert evals.errors.count == 2


def test_stored_views_replace_the_crop_and_follow_a_replaced_file(corrupt_folder):
    """Crop-aware teacher logits: each sample is the stored view ``crops[index, view]`` of the
    example really loaded, a corrupt file's replacement included."""
    config = config_for(corrupt_folder, auto_augment="", color_jitter=0.0, re_prob=0.0,
                        repeated_aug=1)
    source = ip.get_source(config, "train", IMG)
    names = [os.path.basename(source.where(i)) for i in range(14)]
    bad = {names.index("9_truncated.jpg"), names.index("2b_text.jpg")}
    # Two views per example, all different, inside the 20x28 images; view 1 is mirrored.
    crops = np.array([[[i % 5, 3 * v + i % 4, 10 + i % 6, 12 + v, v] for v in range(2)]
                      for i in range(14)], np.int32)
    with pytest.raises(ValueError, match=r"crops must be int32 \[14, views, 5\]"):
        ip.train_batches(config, source, ip.Layout(7, 0, 1, 1), image_size=IMG,
                         crops=crops[:13])
    batches = ip.train_batches(config, source, ip.Layout(7, 0, 1, 1), image_size=IMG,
                               crops=crops)
    epoch = collect(batches, 4)
    index = np.concatenate([b["index"].ravel() for b in epoch])
    view = np.concatenate([b["view"].ravel() for b in epoch])
    image = np.concatenate([b["image"][0] for b in epoch])
    assert {i + 1 for i in bad} <= set(index.tolist()) and not bad & set(index.tolist())
    assert set(view.tolist()) == {0, 1}
    for got, i, v in zip(image, index, view, strict=True):
        raw = ip.load_example(source, tf.constant(i, tf.int64))["image"].numpy()
        top, left, h, w, flip = (int(x) for x in crops[i, v])
        pil = Image.fromarray(raw[top:top + h, left:left + w]).resize((IMG, IMG),
                                                                     Image.BICUBIC)
        want = np.asarray(pil)[:, ::-1] if flip else np.asarray(pil)  # PIL's own pixels
        np.testing.assert_array_equal(got, want)
    assert batches.errors.count == 4  # two epochs, two bad files each


def test_strict_decoding_raises_naming_the_file(corrupt_folder):
    config = config_for(corrupt_folder, auto_augment="", re_prob=0.0, repeated_aug=1)
    config.dataset.strict_decoding = True
    source = ip.get_source(config, "train", IMG)
    with pytest.raises(ip.CorruptImageError, match=r"(9_truncated|2b_text)\.jpg.*strict"):
        collect(ip.train_batches(config, source, ip.Layout(7, 0, 1, 1), image_size=IMG), 2)
    with pytest.raises(ip.CorruptImageError, match=r"eval example .*(9_truncated|2b_text)"):
        list(ip.eval_batches(config, source, ip.Layout(7, 0, 1, 1), image_size=IMG))


def test_unreadable_data_stops_the_run(tmp_path):
    for i in range(10):
        (tmp_path / "train" / "c").mkdir(parents=True, exist_ok=True)
        (tmp_path / "train" / "c" / f"{i}.jpg").write_text("garbage")
    config = config_for(str(tmp_path), auto_augment="", re_prob=0.0, repeated_aug=1)
    source = ip.get_source(config, "train", IMG)
    with pytest.raises(ip.DataError, match="8 consecutive train examples"):
        next(ip.train_batches(config, source, ip.Layout(2, 0, 1, 1), image_size=IMG))


# --------------------------------------------------------------------------- start-up errors


def test_imagefolder_startup_errors(tmp_path):
    rng = np.random.RandomState(0)
    for split, name in (("train", "cat"), ("train", "dog"), ("val", "cat")):
        save_image(str(tmp_path / split / name / "0.jpg"), rng, "JPEG")
    config = config_for(str(tmp_path))
    assert ip.get_source(config, "eval", IMG).num_examples == 1  # val may lack a class

    (tmp_path / "train" / "emu").mkdir()
    (tmp_path / "train" / "emu" / "readme.txt").write_text("no images here")
    with pytest.raises(ip.DataError, match=r"class folders .* hold no images.*'emu'"):
        ip.get_source(config, "train", IMG)
    (tmp_path / "train" / "emu" / "readme.txt").unlink()
    (tmp_path / "train" / "emu").rmdir()

    save_image(str(tmp_path / "val" / "fox" / "0.jpg"), rng, "JPEG")
    with pytest.raises(ip.DataError, match=r"training set lacks: \['fox'\]"):
        ip.get_source(config, "eval", IMG)
    config.dataset.data_dir = str(tmp_path / "nowhere")
    with pytest.raises(ip.DataError, match="does not exist"):
        ip.get_source(config, "train", IMG)


def test_tfds_startup_errors(tfds_dir, tmp_path):
    with pytest.raises(ip.DataError, match="TFDS does not know dataset 'imagenet2013'.*"
                                           "imagenet2012"):
        ip.tfds_source("imagenet2013", "train", str(tmp_path))
    with pytest.raises(ip.DataError, match="not prepared"):
        ip.tfds_source("deit_test_images", "train", str(tmp_path / "empty"))
    with pytest.raises(ip.DataError, match=r"no split 'val'.*'train'"):
        ip.tfds_source("deit_test_images", "val", tfds_dir)
    tfrecord_dir = str(tmp_path / "tfrecord")
    _BUILDERS[0](data_dir=tfrecord_dir, file_format="tfrecord").download_and_prepare()
    with pytest.raises(ip.DataError, match="tfrecord.*ArrayRecord.*convert_format"):
        ip.tfds_source("deit_test_images", "train", tfrecord_dir)


def write_idx(path, array):
    """An idx file as Fashion-MNIST ships it (gzip; magic 0 0 8 ndim, big-endian dims)."""
    import gzip

    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_splits_are_honoured_or_refused(tmp_path):
    # Train images are 0..19, test images 100..104, each filling its 28x28 image.
    for prefix, values in (("train", np.arange(20)), ("t10k", np.arange(100, 105))):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz",
                  np.broadcast_to(values[:, None, None], (len(values), 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", values % 10)
    c = common.base_config()
    c.dataset.name, c.dataset.num_classes, c.dataset.data_dir = "fashion_mnist", 10, str(tmp_path)

    def first_pixels(split, **dataset):
        c.dataset.update(dataset)
        source = ip.get_source(c, split, 28)
        return [int(source.load(tf.constant(i, tf.int64))[0][0, 0, 0])
                for i in range(source.num_examples)]

    assert first_pixels("train") == list(range(20))
    assert first_pixels("eval") == list(range(100, 105))  # 'validation', the default: the test set
    assert first_pixels("train", train_split="train[:3]") == [0, 1, 2]
    assert first_pixels("eval", eval_split="train[:4]") == [0, 1, 2, 3]  # train accuracy
    assert first_pixels("eval", eval_split="test[:2]") == [100, 101]
    assert first_pixels("train", train_split="test") == list(range(100, 105))
    for key, spec in (("eval_split", "val"), ("train_split", "train[:50%]"),
                      ("train_split", "train[:21]")):
        with pytest.raises(ip.DataError, match=f"dataset.{key}="):
            first_pixels("train" if key == "train_split" else "eval", **{key: spec})


@pytest.mark.parametrize("on_device", [True, False])
def test_input_benchmark_times_the_host_side_of_each_path(folder, on_device):
    from deit_jax import benchmark

    r = benchmark.run_input(folder, on_device=on_device, images=8, batch_size=4, warmup=1,
                            image_size=IMG)
    assert r["on_device"] is on_device and r["images"] == 8
    assert r["image_dtype"] == "uint8"  # both paths hand over uint8
    assert r["images_per_sec"] > 0 and r["cpu_ms_per_image"] > 0
    with pytest.raises(ValueError, match="at least --batch_size"):
        benchmark.run_input(folder, images=2, batch_size=4)
