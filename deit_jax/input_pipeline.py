"""Input pipeline: random-access sources, the epoch index plan, tf.data transforms, batching.

Every training batch is a pure function of ``(seed, step)``: the order of an epoch comes from
a seeded permutation (with the official RASampler's repeats), and each example's augmentation
from a stateless seed derived from ``(seed, epoch, position)``. A run resumed at step k thus
sees exactly the batches an uninterrupted run sees, without reading the first k again.

Batches are dicts of numpy arrays shaped ``[local_devices, per_device, ...]``:
``image`` float32 ``[..., H, W, 3]`` (normalised), ``label`` int32, ``index`` int64 (example
id in the split) and, for evaluation, ``mask`` (1 for real examples, 0 for padding).
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf

from deit_jax import augment

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclasses.dataclass
class Source:
    """A random-access split: ``load(index) -> (uint8 [H, W, 3] image, int32 label)`` in tf."""

    name: str
    num_examples: int
    num_classes: int
    load: callable
    class_names: tuple[str, ...] = ()


def _array_source(name: str, images: np.ndarray, labels: np.ndarray, num_classes: int) -> Source:
    images_t, labels_t = tf.constant(images), tf.constant(labels.astype(np.int32))

    def load(index):
        image = tf.gather(images_t, index)
        if image.shape[-1] == 1:  # grayscale -> 3 channels, so every model sees RGB
            image = tf.repeat(image, 3, axis=-1)
        return image, tf.gather(labels_t, index)

    return Source(name, len(labels), num_classes, load)


def _read_idx(path: str) -> np.ndarray:
    # The Debian package's gzip headers differ from upstream's (TFDS's checksums reject them);
    # the payload is the same idx format.
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = np.frombuffer(data, ">i4", count=ndim, offset=4)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str, data_dir: str | None = None, download: bool = False) -> Source:
    """Fashion-MNIST from the idx files of Debian's ``dataset-fashion-mnist`` (offline)."""
    data_dir = data_dir or FASHION_MNIST_DIR
    prefix = "train" if split == "train" else "t10k"
    image_file = os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz")
    label_file = os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz")
    if os.path.exists(image_file) and os.path.exists(label_file):
        images, labels = _read_idx(image_file)[..., None], _read_idx(label_file)
    elif download:
        import tensorflow_datasets as tfds

        ds = tfds.as_numpy(tfds.load("fashion_mnist", split="train" if split == "train"
                                     else "test", batch_size=-1))
        images, labels = ds["image"], ds["label"]
    else:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {data_dir}. Install it offline with "
            "`sudo apt-get install dataset-fashion-mnist`, point --config.dataset.data_dir at "
            "a folder holding the idx .gz files, or allow the TFDS download with "
            "--config.dataset.download=True")
    return _array_source("fashion_mnist", images, labels, 10)


def synthetic(split: str, num_examples: int, num_classes: int, image_size: int) -> Source:
    """A small learnable synthetic set (tests, benchmarks): the class sets a bright patch."""
    rng = np.random.RandomState(0 if split == "train" else 1)
    labels = np.arange(num_examples) % num_classes
    rng.shuffle(labels)
    images = rng.randint(0, 96, (num_examples, image_size, image_size, 3)).astype(np.uint8)
    side = max(image_size // 4, 1)
    for i, label in enumerate(labels):
        y, x = divmod(int(label) % 16, 4)
        images[i, y * side:(y + 1) * side, x * side:(x + 1) * side, label % 3] = 255
    return _array_source("synthetic", images, labels, num_classes)


def image_folder_classes(root: str) -> tuple[str, ...]:
    """Class folder names sorted as torchvision's ImageFolder sorts them."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"no class folders in {root} (expected root/<class>/*.jpg)")
    return tuple(classes)


def image_folder(root: str, classes: tuple[str, ...] | None = None) -> Source:
    """``root/<class>/**/*.jpg|png``, classes and files ordered as torchvision's ImageFolder."""
    found = image_folder_classes(root)
    if classes is not None and set(found) - set(classes):
        raise ValueError(f"{root} has classes not in the training set: "
                         f"{sorted(set(found) - set(classes))[:10]}")
    classes = classes or found
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_dir = os.path.join(root, name)
        files = []
        if os.path.isdir(class_dir):
            for dirpath, _, fnames in sorted(os.walk(class_dir, followlinks=True)):
                files += [os.path.join(dirpath, f) for f in sorted(fnames)
                          if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not files and found is classes:
            raise FileNotFoundError(f"class folder {class_dir} has no images ({IMAGE_EXTENSIONS})")
        paths += files
        labels += [label] * len(files)
    paths_t, labels_t = tf.constant(paths), tf.constant(np.asarray(labels, np.int32))

    def load(index):
        data = tf.io.read_file(tf.gather(paths_t, index))
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        return tf.ensure_shape(image, [None, None, 3]), tf.gather(labels_t, index)

    return Source(os.path.basename(root.rstrip("/")), len(paths), len(classes), load, classes)


def tfds_source(name: str, split: str, data_dir: str | None) -> Source:
    """A prepared TFDS dataset read by random access (ArrayRecord format)."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 - TFDS raises several types for unknown names
        raise ValueError(f"TFDS does not know dataset {name!r}: {e}") from e
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS dataset {name} is not prepared in {builder.data_dir}. Prepare it first "
            f"(`tfds build {name} --data_dir=DIR --file_format=array_record`; ImageNet needs "
            "the manual download in DIR/downloads/manual) and pass --config.dataset.data_dir")
    try:
        source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    except NotImplementedError as e:
        raise ValueError(
            f"{name} in {builder.data_dir} is stored as {builder.info.file_format}; random "
            "access (deterministic, resumable order) needs ArrayRecord: re-prepare with "
            "`--file_format=array_record`") from e
    num_classes = builder.info.features["label"].num_classes

    def fetch(index):
        record = source[int(index)]
        return record["image"], np.int32(record["label"])

    def load(index):
        data, label = tf.numpy_function(fetch, [index], [tf.string, tf.int32])
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        return tf.ensure_shape(image, [None, None, 3]), tf.ensure_shape(label, [])

    return Source(name, len(source), num_classes, load)


def get_source(config: ml_collections.ConfigDict, split: str, image_size: int) -> Source:
    """The source of ``split`` ('train' or 'eval') as ``config.dataset`` describes it."""
    ds = config.dataset
    if ds.name == "fashion_mnist":
        return fashion_mnist(split, ds.data_dir or None, ds.download)
    if ds.name == "synthetic":
        n = ds.synthetic_train_size if split == "train" else ds.synthetic_eval_size
        return synthetic(split, n, ds.num_classes, image_size)
    if ds.name == "imagefolder":
        if not ds.data_dir:
            raise ValueError("dataset.name='imagefolder' needs --config.dataset.data_dir=ROOT "
                             "(with ROOT/train/<class>/ and ROOT/val/<class>/)")
        train_classes = image_folder_classes(os.path.join(ds.data_dir, "train"))
        sub = "train" if split == "train" else "val"
        return image_folder(os.path.join(ds.data_dir, sub), train_classes)
    return tfds_source(ds.name, ds.train_split if split == "train" else ds.eval_split,
                       ds.data_dir or None)


def epoch_plan(num_examples: int, epoch: int, seed: int, *, num_replicas: int,
               num_repeats: int = 1, shuffle: bool = True) -> np.ndarray:
    """Example indices of one training epoch for every replica: ``[num_replicas, per_replica]``.

    The official RASampler: a seeded permutation, each index repeated ``num_repeats`` times
    consecutively, padded by wrapping, then dealt round-robin to replicas (here: global
    devices), so the repeats of an image land on different devices with independent
    augmentations. Each replica keeps ``num_examples // num_replicas`` indices, so an epoch is
    still ``len(train)`` samples.
    """
    order = (np.random.default_rng([seed, epoch]).permutation(num_examples) if shuffle
             else np.arange(num_examples))
    order = np.repeat(order, num_repeats)
    total = math.ceil(len(order) / num_replicas) * num_replicas
    order = np.concatenate([order, order[:total - len(order)]])
    dealt = order.reshape(-1, num_replicas).T  # dealt[r] = order[r::num_replicas]
    return dealt[:, :num_examples // num_replicas]


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the global batch maps onto processes and devices."""

    global_batch: int
    process_index: int
    process_count: int
    local_devices: int

    @property
    def per_device(self) -> int:
        return self.global_batch // (self.process_count * self.local_devices)

    @property
    def host_batch(self) -> int:
        return self.global_batch // self.process_count

    @classmethod
    def current(cls, global_batch: int) -> Layout:
        layout = cls(global_batch, jax.process_index(), jax.process_count(),
                     jax.local_device_count())
        if global_batch % (layout.process_count * layout.local_devices):
            raise ValueError(f"batch size {global_batch} is not divisible by the "
                             f"{layout.process_count * layout.local_devices} devices; pick a "
                             "multiple of the device count")
        return layout


def _per_example_seed(seed: int, epoch, position):
    base = tf.random.experimental.stateless_fold_in(tf.constant([seed, 0], tf.int64), epoch)
    return tf.random.experimental.stateless_fold_in(base, position)


def _reshape_for_devices(batch: dict, local_devices: int) -> dict:
    return {k: v.reshape(local_devices, -1, *v.shape[1:]) for k, v in batch.items()}


def train_batches(config: ml_collections.ConfigDict, source: Source, layout: Layout, *,
                  image_size: int, start_step: int = 0) -> Iterator[dict]:
    """Endless training batches for this process, starting at global step ``start_step``."""
    aug = config.aug
    num_replicas = layout.process_count * layout.local_devices
    n_steps = steps_per_epoch(source.num_examples, layout.global_batch)
    if n_steps == 0:
        raise ValueError(f"{source.num_examples} training examples give no full batch of "
                         f"{layout.global_batch}; lower batch_size")
    first = layout.process_index * layout.local_devices
    scale, ratio = tuple(aug.scale), tuple(aug.ratio)

    def transform(index, epoch, position):
        image, label = source.load(index)
        seed = _per_example_seed(config.seed, epoch, position)
        image = augment.train_transform(
            image, seed, img_size=image_size, scale=scale, ratio=ratio, hflip=aug.hflip,
            auto_augment=aug.auto_augment or None, color_jitter=aug.color_jitter,
            re_prob=aug.re_prob, re_mode=aug.re_mode, re_count=aug.re_count,
            interpolation=aug.interpolation)
        return {"image": image, "label": label, "index": tf.cast(index, tf.int64)}

    def epoch_arrays(epoch: int):
        """(index, epoch, position) of this process's examples, in batch order."""
        plan = epoch_plan(source.num_examples, epoch, config.seed, num_replicas=num_replicas,
                          num_repeats=aug.repeated_aug)
        n = n_steps * layout.per_device
        # This process's replicas (devices), step-major: each step holds each local device's
        # slice in device order, which the final reshape turns into [devices, per_device].
        rows = np.arange(first, first + layout.local_devices)
        order = plan[rows, :n].reshape(layout.local_devices, n_steps, -1)
        # Position in the epoch's global stream: distinct for every sample, repeats included.
        positions = (rows[:, None] * plan.shape[1] + np.arange(n)).reshape(order.shape)
        order, positions = (np.moveaxis(a, 1, 0).reshape(-1) for a in (order, positions))
        skip = (start_step - epoch * n_steps) * layout.host_batch
        skip = max(skip, 0)
        return order[skip:], np.full(len(order) - skip, epoch), positions[skip:]

    def epochs():
        epoch = start_step // n_steps
        while True:
            yield epoch_arrays(epoch)
            epoch += 1

    spec = tf.TensorSpec([None], tf.int64)
    ds = tf.data.Dataset.from_generator(epochs, output_signature=(spec, spec, spec)).unbatch()
    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(layout.host_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    for batch in ds.as_numpy_iterator():
        yield _reshape_for_devices(batch, layout.local_devices)


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Full global batches per epoch (the last partial batch is dropped, as the official code)."""
    return num_examples // global_batch


def eval_batches(config: ml_collections.ConfigDict, source: Source, layout: Layout, *,
                 image_size: int, batch_size: int | None = None) -> Iterator[dict]:
    """One pass over the split: every example exactly once across processes, padded + masked.

    Every process yields the same number of batches (collectives need that); padding rows
    repeat example 0 and carry ``mask == 0``.
    """
    global_batch = batch_size or layout.global_batch
    host_batch = global_batch // layout.process_count
    per_process = math.ceil(source.num_examples / layout.process_count)
    num_batches = math.ceil(per_process / host_batch)
    mine = np.arange(layout.process_index, source.num_examples, layout.process_count)
    padded = num_batches * host_batch
    mask = np.concatenate([np.ones(len(mine), np.float32), np.zeros(padded - len(mine),
                                                                     np.float32)])
    indices = np.concatenate([mine, np.zeros(padded - len(mine), np.int64)])
    crop_ratio = config.aug.eval_crop_ratio

    def transform(index, mask):
        image, label = source.load(index)
        image = augment.eval_transform(image, img_size=image_size, crop_ratio=crop_ratio,
                                       interpolation=config.aug.interpolation)
        return {"image": image, "label": label, "index": index, "mask": mask}

    ds = tf.data.Dataset.from_tensor_slices((indices, mask))
    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(host_batch).prefetch(tf.data.AUTOTUNE)
    for batch in ds.as_numpy_iterator():
        yield _reshape_for_devices(batch, layout.local_devices)
