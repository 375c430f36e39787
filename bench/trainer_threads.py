"""TensorFlow thread settings of local trainers: which trains fastest, per trainer count?

``mloptimizer run`` starts ``--workers`` trainer processes on one machine and shares the
cores out among them (``mloptimizer.local.default_threads``). Pinning the pools can cost
speed (TensorFlow's default pools overlap ops across the cores), or save it (N processes
each with all-core pools oversubscribe the CPU). Measured, not guessed: for each trainer
count, every setting below trains the same model at once in that many spawned processes,
started together after a warm-up epoch, and the aggregate images/s is compared with what
``mloptimizer run`` does today.

Settings: ``default`` (TensorFlow's own pools), ``intra=C/N`` (the cores shared out,
inter-op left to TensorFlow), ``intra=C/N,inter=1``, ``intra=C/N,inter=2``; C cores, N
trainers. Model: ``cnn[48k3,32k3] mlp64`` (the one of the slowdown report) on MNIST-5k's
28x28 training images (offline; Fashion-MNIST has the same shape), batch 32.

Run: ``python bench/trainer_threads.py`` (about 6 minutes on 2 cores); ``--help``.
Prints a table per trainer count and a ratio line each: the fastest setting over the
current one.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from mloptimizer.local import default_threads

Setting = tuple[int | None, int | None]  # (intra, inter); None: TensorFlow's default


def train(
    setting: Setting, epochs: int, cache: str, start: Any, results: Any
) -> None:  # pragma: no cover - runs in a spawned process
    """One trainer: set the pools, warm up one epoch, then time ``epochs`` epochs."""
    import mloptimizer.trainer  # noqa: F401 - quiets TensorFlow before it is imported
    from mloptimizer.trainer.device import configure_threads

    configure_threads(*setting)  # before the first TensorFlow op
    from mloptimizer.space import Architecture
    from mloptimizer.spec import Dataset
    from mloptimizer.trainer.data import load_dataset, make_dataset
    from mloptimizer.trainer.model import build_model

    splits = load_dataset(Dataset(builtin="mnist_5k"), cache_dir=Path(cache))
    architecture = Architecture.model_validate(
        {
            "family": "cnn",
            "conv_blocks": [{"filters": 48, "kernel_size": 3}, {"filters": 32, "kernel_size": 3}],
            "classifier": "mlp",
            "dense_units": 64,
            "dropout": 0.1,
            "learning_rate": 0.001,
        }
    )
    model = build_model(architecture, splits.input_shape, splits.num_classes)
    data = make_dataset(splits.x_train, splits.y_train, batch_size=32, shuffle=True, seed=0)
    model.fit(data, epochs=1, verbose=0)  # tracing and warm-up, not timed
    start.wait()  # every trainer of the round times the same stretch
    began = time.perf_counter()
    model.fit(data, epochs=epochs, verbose=0)
    results.put(len(splits.y_train) * epochs / (time.perf_counter() - began))


def measure(setting: Setting, trainers: int, epochs: int, cache: str) -> float:
    """Aggregate images/s of ``trainers`` processes training at once under ``setting``."""
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(trainers), context.Queue()
    processes = [
        context.Process(target=train, args=(setting, epochs, cache, start, results))
        for _ in range(trainers)
    ]
    for process in processes:
        process.start()
    rates = [results.get(timeout=1800) for _ in processes]
    for process in processes:
        process.join()
    return float(sum(rates))


def label(setting: Setting) -> str:
    intra, inter = setting
    if intra is None and inter is None:
        return "default"
    return ",".join(f"{k}={v}" for k, v in (("intra", intra), ("inter", inter)) if v is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainers", type=int, nargs="+", default=[1, 2], help="[1 2]")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs [2]")
    parser.add_argument("--repeats", type=int, default=2, help="rounds per setting [2]")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as cache:
        for n in args.trainers:
            share = max(1, cores // n)
            current: Setting = (default_threads(n), None)  # what mloptimizer run sets today
            settings: list[Setting] = [(None, None), (share, None), (share, 1), (share, 2)]
            if current not in settings:
                settings.append(current)
            rates: dict[Setting, list[float]] = {s: [] for s in settings}
            for _ in range(args.repeats):  # rounds interleaved: a drift hits every setting
                for setting in settings:
                    rates[setting].append(measure(setting, n, args.epochs, cache))
            medians = {s: statistics.median(r) for s, r in rates.items()}
            print(f"{n} trainer(s) on {cores} cores: images/s, all trainers together")
            for setting in settings:
                mark = "  (mloptimizer run today)" if setting == current else ""
                print(f"  {label(setting):<18} {medians[setting]:8.0f}{mark}")
            best = max(settings, key=lambda s: medians[s])
            print(
                f"ratio fastest ({label(best)}) / today's ({label(current)}) with {n} "
                f"trainer(s): {medians[best] / medians[current]:.3f}"
            )


if __name__ == "__main__":
    main()
