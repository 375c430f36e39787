"""What augmentation and the imbalance-aware metrics cost a trainer, on CPU.

In one run, on MNIST-5k (3,500 training digits, batch 64) and one small CNN, three
settings trained in turn for ``--rounds`` rounds of ``--epochs`` epochs each:

* **plain**: ``val_accuracy``, the images as they are (the baseline);
* **augmented**: ``training.augmentation`` with rotation 0.1, zoom 0.1, translation 0.1
  and contrast 0.2 (Keras' Random* layers on the tf.data pipeline's threads);
* **f1**: ``objective.metric: val_f1_macro`` (a confusion matrix accumulated in Keras'
  own training and validation passes).

Each epoch after the first (which traces the graph) is timed from the trainer's per-epoch
reports. Printed: the median training images/s of each setting and two ratio lines,
``ratio augmentation: images/s augmented / plain`` (target >= 0.9: the cached pipeline
stays about as fast) and ``ratio f1: epoch time f1 / plain`` (target <= 1.05).

Run: ``python bench/training_extras.py`` (about 4 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import mloptimizer.trainer  # noqa: F401 - quiets TensorFlow before it is imported
from mloptimizer.messages import Decision, TrialMessage
from mloptimizer.space import Architecture, Augment, ConvBlock
from mloptimizer.spec import Dataset
from mloptimizer.trainer.data import DatasetCache, Splits
from mloptimizer.trainer.training import train_trial

MODEL = Architecture(
    family="cnn",
    conv_blocks=(ConvBlock(filters=32, kernel_size=3), ConvBlock(filters=64, kernel_size=3)),
    classifier="gap",
    dropout=0.1,
    learning_rate=2e-3,
)
AUGMENT = Augment(rotation=0.1, zoom=0.1, translation=0.1, contrast=0.2)


def trial(setting: str, epochs: int) -> TrialMessage:
    architecture = MODEL.model_copy(
        update={"augmentation": AUGMENT if setting == "augmented" else None}
    )
    return TrialMessage(
        search="bench.extras", trial_id=1, number=1, architecture=architecture,
        dataset=Dataset(builtin="mnist_5k"), epochs=epochs, batch_size=64,
        mixed_precision="off", seed=1,
        metric="val_f1_macro" if setting == "f1" else "val_accuracy",
    )  # fmt: skip


def epoch_seconds(setting: str, splits: Splits, epochs: int) -> list[float]:
    """Seconds of each epoch after the first, from the trainer's per-epoch reports."""
    marks: list[float] = []

    def on_epoch(epoch: int, metrics: dict[str, float]) -> Decision:
        marks.append(time.perf_counter())
        return "continue"

    outcome = train_trial(trial(setting, epochs), splits, on_epoch=on_epoch,
                          stop=threading.Event())  # fmt: skip
    if outcome.state != "complete":
        raise SystemExit(f"{setting}: {outcome.error}")
    return [b - a for a, b in itertools.pairwise(marks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three [3]")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per training [4]")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        splits, _ = DatasetCache(Path(tmp)).get(Dataset(builtin="mnist_5k"))
    images = len(splits.y_train)
    seconds: dict[str, list[float]] = {"plain": [], "augmented": [], "f1": []}
    for round_ in range(1, args.rounds + 1):
        for setting in seconds:  # interleaved: drift of the machine hits all three alike
            seconds[setting] += epoch_seconds(setting, splits, args.epochs)
            print(f"round {round_} {setting}: done", file=sys.stderr, flush=True)
    median = {s: statistics.median(v) for s, v in seconds.items()}
    print(f"{'setting':<10} {'s/epoch':>8} {'images/s':>9}")
    for setting, value in median.items():
        print(f"{setting:<10} {value:>8.3f} {images / value:>9.0f}")
    kept = median["plain"] / median["augmented"]
    print(f"ratio augmentation: images/s augmented / plain {kept:.3f} (target >= 0.9)")
    print(f"ratio f1: epoch time f1 / plain {median['f1'] / median['plain']:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
