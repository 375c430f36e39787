"""What refine adds, with and without its learning-rate schedule, on MNIST-5k.

For each of ``--seeds`` seeds, in one run:

1. explore: ``--explore`` architectures drawn at random from the space of
   ``bench/mnist-5k-hour.yaml``, each trained for its 3 epochs at a constant rate (as a
   search's explore phase trains them), scored by val_accuracy;
2. refine the ``--top`` best of them twice, from scratch, for ``--refine-epochs``, with
   the same training seed:

   * **constant**: the searched rate throughout and the last epoch kept (``refine:
     {schedule: constant, patience: 0}``, refine as it was before the schedule);
   * **cosine**: the defaults (``schedule: cosine``, ``patience: 5``): warm-up, cosine
     decay to 1% of the searched rate, early stop, the best epoch's weights kept.

Printed: every refined trial's explored value and each side's refined val_accuracy and
test accuracy (MNIST-5k's 500 test digits, which neither phase saw), then the medians and
``ratio refine gain: ...``: the median gain of refine over the explored value on each side
and the median test accuracy. The cosine side's value is its best epoch's (that is what
it keeps), so the test accuracy, not the gain, is the fair comparison of the two models.

Run: ``python bench/refine_gain.py`` (about 20 minutes on 2 CPU cores); ``--help`` for
the options. Progress goes to stderr, the table and ratio line to stdout. Each seed runs in
a fresh process (Keras keeps memory across fits; see bench/search_efficiency.py's
``Jobs``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import mloptimizer.trainer  # noqa: F401 - quiets TensorFlow before it is imported
from mloptimizer.loading import load_search
from mloptimizer.messages import TrialMessage
from mloptimizer.space import Architecture, sample_architecture

import numpy as np  # isort: skip
import optuna  # isort: skip

REPO = Path(__file__).resolve().parent.parent
SPACE_FILE = REPO / "bench" / "mnist-5k-hour.yaml"
SIDES: dict[str, tuple[Literal["constant", "cosine"], int]] = {
    "constant": ("constant", 0),  # (schedule, patience)
    "cosine": ("cosine", 5),
}


@dataclass(frozen=True)
class Refined:
    """One refined trial: its explored value, then each side's (val_accuracy, test
    accuracy, epochs run)."""

    seed: int
    summary: str
    explored: float
    sides: dict[str, tuple[float, float, int]]


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def seed_job(seed: int, explore: int, top: int, refine_epochs: int) -> list[Refined]:
    """Explore ``explore`` random architectures, refine the ``top`` best on both sides."""
    from mloptimizer.trainer.data import load_dataset, make_dataset
    from mloptimizer.trainer.training import train_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_search(SPACE_FILE).spec
    with tempfile.TemporaryDirectory() as tmp:
        splits = load_dataset(spec.dataset, cache_dir=Path(tmp))

    def train(
        architecture: Architecture, number: int, epochs: int, side: str | None
    ) -> tuple[float, float, int]:
        schedule, patience = SIDES[side] if side else ("constant", 0)
        message = TrialMessage(
            search="bench.refine-gain",
            trial_id=number,
            number=number,
            phase="refine" if side else "explore",
            architecture=architecture,
            dataset=spec.dataset,
            epochs=epochs,
            batch_size=spec.training.batch_size,
            mixed_precision="off",
            metric="val_accuracy",
            seed=seed * 1000 + number,
            schedule=schedule,
            patience=patience,
        )
        kept: dict[str, Any] = {}
        started = time.perf_counter()
        outcome = train_trial(
            message, splits, on_epoch=lambda e, m: "continue", stop=threading.Event(),
            keep_model=kept,
        )  # fmt: skip
        if outcome.state != "complete" or outcome.value is None:
            log(f"  seed {seed} trial {number}: {outcome.state} {outcome.error}")
            return 0.0, 0.0, outcome.epochs_run
        batches = make_dataset(splits.x_test, splits.y_test, batch_size=256, shuffle=False, seed=0)
        predicted = np.argmax(kept["model"].predict(batches, verbose=0), axis=1)
        test = float(np.mean(predicted == np.asarray(splits.y_test)))
        log(
            f"  seed {seed} trial {number} {side or 'explore':>8}: val {outcome.value:.4f} "
            f"test {test:.4f} {outcome.epochs_run} epochs {time.perf_counter() - started:5.1f}s "
            f"{architecture.summary()}"
        )
        return float(outcome.value), test, outcome.epochs_run

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed))
    explored = []
    for number in range(explore):
        trial = study.ask()
        architecture = sample_architecture(trial, spec.search_space)
        value, _, _ = train(architecture, number, spec.training.epochs, None)
        study.tell(trial, value)
        explored.append((value, number, architecture))
    best = sorted(explored, key=lambda row: (-row[0], row[1]))[:top]
    refined = []
    for k, (value, _, architecture) in enumerate(best):
        number = explore + k  # a refine trial's own number, hence its own training seed
        sides = {side: train(architecture, number, refine_epochs, side) for side in SIDES}
        refined.append(Refined(seed, architecture.summary(), value, sides))
    return refined


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds, one exploration each [5]")
    parser.add_argument("--explore", type=int, default=8, help="explored trials a seed [8]")
    parser.add_argument("--top", type=int, default=2, help="refined trials a seed [2]")
    parser.add_argument("--refine-epochs", type=int, default=12, help="refine epochs [12]")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    rows: list[Refined] = []
    pool = ProcessPoolExecutor(
        max_workers=1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1
    )
    for seed in range(1, args.seeds + 1):
        log(f"seed {seed}")
        rows += pool.submit(seed_job, seed, args.explore, args.top, args.refine_epochs).result()
    pool.shutdown()
    print(
        f"refine on MNIST-5k: the {args.top} best of {args.explore} explored trials (3 epochs) "
        f"refined for {args.refine_epochs} epochs, {args.seeds} seeds "
        f"({(time.perf_counter() - started) / 60:.1f} min)"
    )
    print(f"{'seed':>4}  {'explored':>8}  {'constant val/test/ep':>22}  {'cosine val/test/ep':>22}")
    for row in rows:
        cells = "".join(
            f"  {row.sides[s][0]:>8.4f} {row.sides[s][1]:>7.4f} {row.sides[s][2]:>4}" for s in SIDES
        )
        print(f"{row.seed:>4}  {row.explored:>8.4f}{cells}  {row.summary}")
    gain = {s: statistics.median(r.sides[s][0] - r.explored for r in rows) for s in SIDES}
    test = {s: statistics.median(r.sides[s][1] for r in rows) for s in SIDES}
    ahead = sum(r.sides["cosine"][1] > r.sides["constant"][1] for r in rows)
    print(
        "ratio refine gain: median gain over the explored value "
        f"cosine {gain['cosine'] * 100:+.1f} vs constant {gain['constant'] * 100:+.1f} points; "
        f"median test accuracy {test['cosine']:.4f} vs {test['constant']:.4f} "
        f"(cosine ahead on {ahead} of {len(rows)} trials)"
    )


if __name__ == "__main__":
    main()
