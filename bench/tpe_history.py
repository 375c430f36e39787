"""TPE over a bounded history against Optuna's TPE over all of it, in 2,000-trial searches.

The dispatcher's sampler (:class:`~mloptimizer.sampling.WindowedTPESampler`) weighs the
25 best and the 250 most recent finished trials once more than 275 have finished; up to
then it samples exactly as Optuna's TPE. Whether that costs search quality shows only in
long searches, where training real models is out of reach on 2 CPU cores, so both
samplers search the real space (the default ``SearchSpace()``, through
:func:`~mloptimizer.space.sample_architecture`, the spec's TPE options) for the maximum of
a fixed function of the architecture (:func:`score`: a learning rate near 3e-3, three
blocks, a moderate dropout and an mlp head score best; seeded noise of 0.003 a trial).
Four trials are in flight at each ask (the constant liar sees them), as with 4 trainers.

Prints, per sampler, the median (min-max) over ``--seeds`` of the best score after 200,
500, 1,000 and 2,000 trials, and the median ask + sample time of trials 176-225 and of the
last 50, with their ratio. Run: ``python bench/tpe_history.py`` (about 15 minutes).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
import warnings

import optuna

from mloptimizer.sampling import WindowedTPESampler
from mloptimizer.space import Architecture, sample_architecture
from mloptimizer.spec import SamplerSpec, SearchSpace

CHECKPOINTS = (200, 500, 1000, 2000)
IN_FLIGHT = 4


def score(architecture: Architecture, rng: random.Random) -> float:
    """The function both samplers maximize: at most about 0.99, with noise."""
    blocks = len(architecture.conv_blocks or architecture.inception_blocks or [])
    value = 0.99
    value -= 0.05 * (math.log10(architecture.learning_rate) - math.log10(3e-3)) ** 2
    value -= 0.01 * abs(blocks - 3)
    value -= 0.2 * (architecture.dropout - 0.2) ** 2
    value -= 0.0 if architecture.classifier == "mlp" else 0.01
    value -= 0.005 if architecture.family == "inception" else 0.0
    return value + rng.gauss(0.0, 0.003)


def tpe(spec: SamplerSpec, seed: int, windowed: bool) -> optuna.samplers.BaseSampler:
    options = {
        "n_startup_trials": spec.n_startup_trials,
        "n_ei_candidates": spec.n_ei_candidates,
        "multivariate": spec.multivariate,
        "group": spec.group,
        "constant_liar": spec.constant_liar,
        "seed": seed,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if windowed:
            return WindowedTPESampler(**options)  # type: ignore[arg-type]
        return optuna.samplers.TPESampler(**options)  # type: ignore[arg-type]


def search(windowed: bool, seed: int, trials: int) -> tuple[list[float], dict[int, float]]:
    """Best score after each trial, and each trial's ask + sample seconds."""
    study = optuna.create_study(direction="maximize", sampler=tpe(SamplerSpec(), seed, windowed))
    space, rng = SearchSpace(), random.Random(seed)
    running: list[tuple[optuna.trial.Trial, float]] = []
    best, curve, seconds = -math.inf, [], {}
    for number in range(trials):
        began = time.perf_counter()
        trial = study.ask()
        architecture = sample_architecture(trial, space)
        seconds[number] = time.perf_counter() - began
        running.append((trial, score(architecture, rng)))
        if len(running) >= IN_FLIGHT or number == trials - 1:
            done, value = running.pop(0)
            study.tell(done, value)
            best = max(best, value)
        curve.append(best)
    for trial, value in running:
        study.tell(trial, value)
        best = max(best, value)
    curve[-1] = best
    return curve, seconds


def median_ms(seconds: dict[int, float], numbers: range) -> float:
    return statistics.median(seconds[n] for n in numbers) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="searches per sampler (default 3)")
    parser.add_argument("--trials", type=int, default=2000, help="trials a search (default 2000)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    checkpoints = [n for n in CHECKPOINTS if n <= args.trials]
    late = range(args.trials - 50, args.trials)
    rows: dict[str, tuple[list[list[float]], list[float], list[float]]] = {}
    for windowed in (False, True):
        name = "windowed (ours)" if windowed else "Optuna TPE, all"
        curves, early, last = [], [], []
        for seed in range(args.seeds):
            began = time.perf_counter()
            curve, seconds = search(windowed, seed, args.trials)
            curves.append(curve)
            early.append(median_ms(seconds, range(176, 226)))
            last.append(median_ms(seconds, late))
            print(
                f"[{name} seed {seed}] best {curve[-1]:.4f}; ask+sample {early[-1]:.1f} ms at "
                f"176-225, {last[-1]:.1f} ms at the last 50; {time.perf_counter() - began:.0f} s",
                flush=True,
            )
        rows[name] = (curves, early, last)

    print(f"\n{args.seeds} seeds x {args.trials} trials, {IN_FLIGHT} in flight")
    print(
        f"{'sampler':<18} "
        + " ".join(f"{f'best of {n}':>22}" for n in checkpoints)
        + f" {'ms 176-225':>11} {'ms last 50':>11} {'ratio':>6}"
    )
    for name, (curves, early, last) in rows.items():
        cells = []
        for n in checkpoints:
            at = [c[n - 1] for c in curves]
            cells.append(f"{statistics.median(at):.4f} ({min(at):.4f}-{max(at):.4f})")
        e, la = statistics.median(early), statistics.median(last)
        print(
            f"{name:<18} "
            + " ".join(f"{c:>22}" for c in cells)
            + f" {e:>11.1f} {la:>11.1f} {la / e:>6.2f}"
        )
    full, ours = rows["Optuna TPE, all"], rows["windowed (ours)"]
    gap = statistics.median(c[-1] for c in ours[0]) - statistics.median(c[-1] for c in full[0])
    spread = max(c[-1] for c in full[0]) - min(c[-1] for c in full[0])
    print(
        f"ratio windowed time at the last 50 / at 176-225: "
        f"{statistics.median(ours[2]) / statistics.median(ours[1]):.2f} (target <= 2); "
        f"best of {args.trials}: windowed - all {gap:+.4f} (seed spread of all: {spread:.4f})"
    )


if __name__ == "__main__":
    main()
