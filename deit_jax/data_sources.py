"""Random-access data sources: TFDS (ArrayRecord), ImageFolder, Fashion-MNIST, synthetic.

A :class:`Source` is one split with ``load(index)``, a TensorFlow function from an int64 scalar
index to ``(uint8 [H, W, 3] image, int32 label)`` or to a dict with ``image``, ``label`` and
extra per-example fields (ReaL's ``real_label``). ``load`` of an encoded image may fail on a
corrupt file; ``input_pipeline`` catches that per example (it never reaches the trainer).

Everything that can be wrong with the data set itself (no such folder or TFDS name, empty
class folder, val class unknown to train, TFDS data not prepared or not random access) raises
:class:`DataError` here, at start-up, with the fix in the message.
"""

from __future__ import annotations

import dataclasses
import difflib
import gzip
import os
import re
from collections.abc import Callable

import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging

from deit_jax.errors import UserError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# torchvision's IMG_EXTENSIONS: ImageFolder keeps exactly these files (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# What tf.io.decode_image reads (by content, not name); the rest is decoded with PIL.
PIL_ONLY_EXTENSIONS = (".ppm", ".pgm", ".tif", ".tiff")


class DataError(UserError, ValueError):
    """The data set is missing, empty or malformed; raised before training starts."""


@dataclasses.dataclass
class Source:
    """One split read by random access.

    ``load(index)`` maps an int64 scalar tensor to ``(image, label)`` (uint8 [H, W, 3], int32
    []) or to a dict with those two keys plus the fields of ``extras``, whose values are the
    placeholders used when an example cannot be decoded (their shapes and dtypes).
    ``describe(index)`` says where an example lives (a path, or TFDS name/split/index).
    """

    name: str
    num_examples: int
    num_classes: int
    load: Callable
    class_names: tuple[str, ...] = ()
    describe: Callable[[int], str] | None = None
    extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    # index -> dict with ``encoded`` (the file's bytes, tf.string []), ``label`` and the
    # extras, for sources of encoded images: training decodes them crop-aware (decode_crop).
    load_encoded: Callable | None = None
    # In-memory arrays (Fashion-MNIST, synthetic): every example loads, so the pipeline maps
    # ``load`` directly instead of its per-example decode-with-fallback datasets.
    in_memory: bool = False

    def where(self, index: int) -> str:
        return self.describe(index) if self.describe else f"{self.name}[{index}]"

    def slice(self, start: int, stop: int) -> Source:
        """Examples ``start .. stop - 1`` as a source of their own (index 0 = ``start``)."""
        encoded = self.load_encoded
        return dataclasses.replace(
            self, name=f"{self.name}[{start}:{stop}]", num_examples=stop - start,
            load=lambda index: self.load(index + start),
            load_encoded=encoded and (lambda index: encoded(index + start)),
            describe=lambda index: self.where(index + start))


def load_example(source: Source, index) -> dict:
    """``source.load(index)`` as a dict with ``image`` (uint8 [H, W, 3]), ``label`` and extras."""
    out = source.load(index)
    if not isinstance(out, dict):
        out = dict(zip(("image", "label"), out, strict=True))
    out["image"] = tf.ensure_shape(out["image"], [None, None, 3])
    out["label"] = tf.cast(out["label"], tf.int32)
    return out


def _array_source(name: str, images: np.ndarray, labels: np.ndarray, num_classes: int) -> Source:
    images_t, labels_t = tf.constant(images), tf.constant(labels.astype(np.int32))

    def load(index):
        image = tf.gather(images_t, index)
        if image.shape[-1] == 1:  # grayscale -> 3 channels, so every model sees RGB
            image = tf.repeat(image, 3, axis=-1)
        return image, tf.gather(labels_t, index)

    return Source(name, len(labels), num_classes, load, in_memory=True)


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
        raise DataError(
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


# ------------------------------------------------------------------------------ ImageFolder


def image_folder_classes(root: str) -> tuple[str, ...]:
    """Class folder names sorted as torchvision's ``find_classes`` sorts them."""
    if not os.path.isdir(root):
        raise DataError(f"image folder {root} does not exist")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise DataError(f"no class folders in {root} (expected {root}/<class>/*.jpg)")
    return tuple(classes)


def _list_images(class_dir: str) -> list[str]:
    """torchvision's ``make_dataset`` order: sorted walk (following links), sorted names."""
    files = []
    for dirpath, _, fnames in sorted(os.walk(class_dir, followlinks=True)):
        files += [os.path.join(dirpath, f) for f in sorted(fnames)
                  if f.lower().endswith(IMAGE_EXTENSIONS)]
    return files


def decode_image_bytes(data) -> tf.Tensor:
    """Encoded JPEG/PNG/BMP/GIF/WebP bytes -> uint8 [H, W, 3], the pixels PIL gives.

    JPEGs use the accurate integer DCT, PIL's (and so timm's) default at the same speed; TF's
    default fast DCT is off by up to ~5 grey levels on most pixels.
    """
    image = tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False))
    return tf.ensure_shape(image, [None, None, 3])


# Rows and columns decoded around a crop window: libjpeg's fancy chroma upsampling reads one
# neighbouring chroma sample, so a window decoded without a margin differs from the full
# decode on its edge pixels (up to 14 grey levels, in about half of all crops); with one pixel
# of margin every pixel is equal (tests/test_input_pipeline.py checks 4:2:0 and 4:4:4).
_CROP_MARGIN = 2
_JPEG_EOI = b"\xff\xd9"


def decode_crop(data, view_of: Callable) -> tuple[tf.Tensor, tf.Tensor]:
    """Crop-aware decoding: the pixels of one crop + flip view without decoding the rest.

    ``view_of(height, width)`` draws the view (int32 [5]: top, left, height, width, flip) from
    the image's size. A JPEG's size comes from its header and only the view's window (plus a
    small margin) is decoded (``tf.image.decode_and_crop_jpeg``); its pixels equal those of
    ``decode_image_bytes`` cropped. libjpeg stops after the window's last row, so a truncated
    file could go unnoticed when the crop lies above the damage: a JPEG that does not end
    with the end-of-image marker (truncated, or with trailing bytes) is decoded whole, which
    fails on damage as before. Other formats are decoded whole.

    Returns:
      (window uint8 [h', w', 3] containing the view, the view int32 [5] relative to it).
    """

    def jpeg():
        shape = tf.io.extract_jpeg_shape(data)
        view = tf.cast(view_of(shape[0], shape[1]), tf.int32)
        top, left = tf.maximum(view[0] - _CROP_MARGIN, 0), tf.maximum(view[1] - _CROP_MARGIN, 0)
        bottom = tf.minimum(view[0] + view[2] + _CROP_MARGIN, shape[0])
        right = tf.minimum(view[1] + view[3] + _CROP_MARGIN, shape[1])
        window = tf.image.decode_and_crop_jpeg(
            data, tf.stack([top, left, bottom - top, right - left]), channels=3,
            dct_method="INTEGER_ACCURATE")
        return window, tf.stack([view[0] - top, view[1] - left, view[2], view[3], view[4]])

    def whole():
        image = decode_image_bytes(data)
        shape = tf.shape(image)
        return image, tf.cast(view_of(shape[0], shape[1]), tf.int32)

    complete_jpeg = tf.io.is_jpeg(data) & tf.equal(tf.strings.substr(data, -2, 2), _JPEG_EOI)
    window, view = tf.cond(complete_jpeg, jpeg, whole)
    return tf.ensure_shape(window, [None, None, 3]), tf.ensure_shape(view, [5])


def _pil_decode(path) -> np.ndarray:
    from PIL import Image

    with Image.open(os.fsdecode(np.asarray(path).item())) as image:
        return np.asarray(image.convert("RGB"))


def image_folder(root: str, classes: tuple[str, ...] | None = None) -> Source:
    """``root/<class>/**/*.jpg|png|...`` as torchvision's ImageFolder reads it.

    With ``classes`` (the training split's list) labels map by folder name, so a val folder
    may lack classes without shifting the others' indices (torchvision's own val
    ImageFolder would shift them); a val class unknown to train is an error. An empty class
    folder is an error, as in torchvision.
    """
    found = image_folder_classes(root)
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(f"{root} has {len(unknown)} class folders that the training set "
                            f"lacks: {unknown[:10]}; labels map by class name, so every "
                            "evaluation class must exist in train")
        missing = sorted(set(classes) - set(found))
        if missing:
            logging.warning("%s has no folder for %d training classes (e.g. %s); evaluating on "
                            "the others", root, len(missing), missing[:5])
    paths, labels, empty = [], [], []
    for label, name in enumerate(classes):
        if name not in found:
            continue
        files = _list_images(os.path.join(root, name))
        if not files:
            empty.append(name)
        paths += files
        labels += [label] * len(files)
    if empty:
        raise DataError(f"{len(empty)} class folders in {root} hold no images "
                        f"({', '.join(IMAGE_EXTENSIONS)}): {empty[:10]}; remove them or add "
                        "images (torchvision's ImageFolder refuses them too)")
    paths_t, labels_t = tf.constant(paths), tf.constant(np.asarray(labels, np.int32))
    pil_only = [p.lower().endswith(PIL_ONLY_EXTENSIONS) for p in paths]
    pil_t = tf.constant(pil_only)

    def load(index):
        path = tf.gather(paths_t, index)

        def decode_tf():
            return decode_image_bytes(tf.io.read_file(path))

        def decode_pil():
            return tf.numpy_function(_pil_decode, [path], tf.uint8, stateful=False)

        if any(pil_only):
            image = tf.cond(tf.gather(pil_t, index), decode_pil, decode_tf)
        else:
            image = decode_tf()
        return tf.ensure_shape(image, [None, None, 3]), tf.gather(labels_t, index)

    def load_encoded(index):
        return {"encoded": tf.io.read_file(tf.gather(paths_t, index)),
                "label": tf.gather(labels_t, index)}

    return Source(os.path.basename(root.rstrip("/")), len(paths), len(classes), load, classes,
                  describe=lambda index: paths[int(index)],
                  load_encoded=None if any(pil_only) else load_encoded)


# ------------------------------------------------------------------------------------- TFDS


def _tfds_builder(name: str, data_dir: str | None):
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        base = name.split("/")[0].split(":")[0]
        close = difflib.get_close_matches(base, tfds.list_builders(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise DataError(f"TFDS does not know dataset {name!r}.{hint} (`tfds.list_builders()` "
                        "lists them; 'imagefolder', 'fashion_mnist' and 'synthetic' are the "
                        "other dataset.name values)") from e
    except Exception as e:  # noqa: BLE001 - unknown configs/versions raise assorted types
        raise DataError(f"TFDS cannot open {name!r}: {type(e).__name__}: {e}") from e


def _fetch_fn(data_source, label_key: str, real_label: bool, num_classes: int):
    """index -> (encoded image bytes, label[, real_label multi-hot]) in numpy."""

    def fetch(index):
        record = data_source[int(index)]
        out = [record["image"], np.int32(record[label_key])]
        if real_label:
            multi_hot = np.zeros(num_classes, np.uint8)
            multi_hot[np.asarray(record["real_label"], np.int64)] = 1
            out.append(multi_hot)
        return tuple(out)

    return fetch


def tfds_source(name: str, split: str | None, data_dir: str | None) -> Source:
    """A prepared TFDS dataset read by random access (ArrayRecord format).

    ``split=None`` picks the dataset's only split, else 'validation', else 'test'. Datasets
    with a ``real_label`` feature (``imagenet2012_real``) also yield ``real_label``: a
    uint8 [num_classes] multi-hot of the ReaL labels (all zeros: no valid label).
    """
    import tensorflow_datasets as tfds

    builder = _tfds_builder(name, data_dir)
    if not builder.is_prepared():
        raise DataError(
            f"TFDS dataset {name} is not prepared in {builder.data_dir}. Prepare it first "
            f"(`tfds build {name} --data_dir=DIR --file_format=array_record`; ImageNet and its "
            "ReaL labels need the manual download in DIR/downloads/manual) and pass "
            "--config.dataset.data_dir=DIR")
    splits = list(builder.info.splits)
    if split is None:
        candidates = splits if len(splits) == 1 else [
            s for s in ("validation", "test") if s in splits]
        split = candidates[0] if candidates else None
    if split is None or split.split("[")[0] not in splits:
        raise DataError(f"TFDS dataset {name} has no split {split!r}; it has {splits}")
    features = builder.info.features
    label_key = next((k for k in ("label", "original_label") if k in features), None)
    if "image" not in features or label_key is None:
        raise DataError(f"TFDS dataset {name} has features {list(features)}; an image "
                        "classification set needs 'image' and 'label'")
    num_classes = features[label_key].num_classes
    try:
        data_source = builder.as_data_source(
            split, decoders={"image": tfds.decode.SkipDecoding()})
    except NotImplementedError as e:
        raise DataError(
            f"{name} in {builder.data_dir} is stored as {builder.info.file_format.value}; "
            "random access (a deterministic, resumable order) needs ArrayRecord. Convert it "
            f"in place with `tfds convert_format --dataset_version_dir={builder.data_dir} "
            "--out_file_format=array_record` (the CLI needs apache-beam installed), or "
            "re-prepare with `tfds build ... --file_format=array_record`") from e
    real = "real_label" in features
    fetch = _fetch_fn(data_source, label_key, real, num_classes)
    types = [tf.string, tf.int32] + ([tf.uint8] if real else [])

    def load_encoded(index):
        fetched = tf.numpy_function(fetch, [index], types, stateful=False)
        out = {"encoded": tf.ensure_shape(fetched[0], []),
               "label": tf.ensure_shape(fetched[1], [])}
        if real:
            out["real_label"] = tf.ensure_shape(fetched[2], [num_classes])
        return out

    def load(index):
        out = load_encoded(index)
        return {"image": decode_image_bytes(out.pop("encoded")), **out}

    def describe(index):
        where = f"{name} {split}[{index}]"
        if "file_name" in features:
            try:
                where += f" ({data_source[int(index)]['file_name'].decode()})"
            except Exception:  # noqa: BLE001 - a description must never raise
                pass
        return where

    extras = {"real_label": np.zeros(num_classes, np.uint8)} if real else {}
    return Source(name, len(data_source), num_classes, load, describe=describe, extras=extras,
                  load_encoded=load_encoded)


# ----------------------------------------------------------------------------------- config


def get_source(config: ml_collections.ConfigDict, split: str, image_size: int) -> Source:
    """The source of ``split`` ('train' or 'eval') as ``config.dataset`` describes it."""
    ds = config.dataset
    if ds.name == "fashion_mnist":
        key = "train_split" if split == "train" else "eval_split"
        spec = ds[key]
        # 'train' | 'test' ('validation': the test set, the base config's default), each
        # optionally '[:N]', the first N examples (data-efficient studies, reproduce.py).
        match = re.fullmatch(r"(train|test|validation)(?:\[:(\d+)\])?", spec)
        if not match:
            raise DataError(f"dataset.{key}={spec!r}: Fashion-MNIST has the splits 'train' "
                            "and 'test' ('validation' = 'test'), optionally '[:N]', e.g. "
                            "'train[:6000]'")
        source = fashion_mnist("train" if match[1] == "train" else "test", ds.data_dir or None,
                               ds.download)
        if match[2] is None:
            return source
        if not 0 < int(match[2]) <= source.num_examples:
            raise DataError(f"dataset.{key}={spec!r}: N must be in 1..{source.num_examples}")
        return source.slice(0, int(match[2]))
    if ds.name == "synthetic":
        n = ds.synthetic_train_size if split == "train" else ds.synthetic_eval_size
        return synthetic(split, n, ds.num_classes, image_size)
    if ds.name == "imagefolder":
        if not ds.data_dir:
            raise DataError("dataset.name='imagefolder' needs --config.dataset.data_dir=ROOT "
                            "(with ROOT/train/<class>/ and ROOT/val/<class>/)")
        train_classes = image_folder_classes(os.path.join(ds.data_dir, "train"))
        sub = "train" if split == "train" else "val"
        return image_folder(os.path.join(ds.data_dir, sub), train_classes)
    return tfds_source(ds.name, ds.train_split if split == "train" else ds.eval_split,
                       ds.data_dir or None)


def get_extra_eval_sources(config: ml_collections.ConfigDict, num_classes: int
                           ) -> dict[str, Source]:
    """``config.dataset.extra_eval`` ('imagenet_v2:test,imagenet2012_real', TFDS
    ``name[/config][:split]``, comma-separated) as {dataset name: Source}.

    Each must predict the training set's classes (ImageNet v2 and ReaL share ImageNet-1k's
    label order). Sources of ``imagenet2012_real`` carry ``real_label``.
    """
    out = {}
    spec = config.dataset.get("extra_eval", "")
    for entry in filter(None, (s.strip() for s in spec.split(","))):
        name, _, split = entry.partition(":")
        source = tfds_source(name, split or None, config.dataset.data_dir or None)
        if source.num_classes != num_classes:
            raise DataError(f"extra_eval {entry!r} has {source.num_classes} classes, the model "
                            f"{num_classes}")
        out[name.split("/")[0]] = source
    return out
