"""Trainer memory and speed over many trials in one process: why the worker restarts itself.

Measures, in one run: ``--trials`` real trials (the digits CNN the tests use) trained one
after the other in this process, as a long-lived trainer would; prints the resident memory
and seconds per trial every ``--every`` trials, then

* memory growth per trial after the first (MB) and in all, against ``--recycle-memory-mb``:
  the trial count at which a worker with that setting restarts in place;
* the slowdown: median seconds of the last 10 trials / median of trials 2-11 (the first
  pays for tracing and the dataset).

Run: ``python bench/trainer_memory.py`` (80 trials, about 2 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from mloptimizer.messages import TrialMessage
from mloptimizer.space import Architecture
from mloptimizer.spec import Dataset
from mloptimizer.trainer.data import load_dataset
from mloptimizer.trainer.device import configure_threads
from mloptimizer.trainer.memory import resident_mb
from mloptimizer.trainer.training import train_trial

ARCHITECTURE = {
    "family": "cnn",
    "conv_blocks": [{"filters": 32, "kernel_size": 3}],
    "classifier": "mlp",
    "dense_units": 64,
    "dropout": 0.1,
    "learning_rate": 0.003,
}


def trial(number: int) -> TrialMessage:
    return TrialMessage(
        search="bench.memory",
        trial_id=number + 1,
        number=number,
        architecture=Architecture.model_validate(ARCHITECTURE),
        dataset=Dataset(builtin="digits"),
        epochs=2,
        batch_size=32,
        mixed_precision="off",
        metric="val_accuracy",
        seed=number,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=80, help="trials in one process")
    parser.add_argument("--every", type=int, default=10, help="print every N trials")
    parser.add_argument(
        "--recycle-memory-mb", type=float, default=1024.0, help="the trainer's default"
    )
    args = parser.parse_args()
    if args.trials < 22:
        parser.error("--trials must be at least 22 (two windows of 10 after the first)")
    configure_threads(2, 1)
    cache = Path(tempfile.gettempdir()) / "mloptimizer-bench-cache"  # digits needs none
    splits = load_dataset(Dataset(builtin="digits"), cache_dir=cache)
    seconds: list[float] = []
    memory: list[float] = []
    for number in range(args.trials):
        began = time.perf_counter()
        outcome = train_trial(
            trial(number), splits, on_epoch=lambda e, m: "continue", stop=threading.Event()
        )
        seconds.append(time.perf_counter() - began)
        memory.append(resident_mb() or 0.0)
        if outcome.state != "complete":
            print(f"trial {number} {outcome.state}: {outcome.error}", file=sys.stderr)
            return 1
        if number % args.every == 0 or number == args.trials - 1:
            print(f"trial {number:4d}: {seconds[-1]:.2f} s, resident {memory[-1]:.0f} MB")
    growth = (memory[-1] - memory[0]) / (args.trials - 1)
    early = statistics.median(seconds[1:11])
    late = statistics.median(seconds[-10:])
    print(f"memory: +{growth:.1f} MB per trial, +{memory[-1] - memory[0]:.0f} MB in all")
    if growth > 0:
        print(
            f"a trainer with --recycle-memory-mb {args.recycle_memory_mb:.0f} restarts in "
            f"place about every {args.recycle_memory_mb / growth:.0f} trials"
        )
    print(f"seconds per trial (median): trials 2-11 {early:.2f}, last 10 {late:.2f}")
    print(f"ratio slowdown (last 10 / trials 2-11): {late / early:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
