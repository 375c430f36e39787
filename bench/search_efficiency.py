"""Search efficiency: TPE against random search on a real objective, same trial budget.

Measures, in one run:

(a) the median best val_accuracy after each trial count, over ``--seeds`` searches per
    sampler of ``--trials`` trials each (TPE with ``--startup-trials`` random start-up
    trials, and random search); every trial trains, for real, an architecture sampled by
    :func:`~mloptimizer.space.sample_architecture` and scores its last-epoch val_accuracy;
(b) the trials each sampler needs to reach random search's median best-of-``--trials``
    (the threshold), lower median over seeds, and the ratio TPE/random (target <= 0.5),
    and each sampler's median best-of-10/20/30 with its quartiles;
(c) TPE's median best-of-``--trials`` against random search's best over all its trials,
    pooled over its seeds (at least ``--pool`` trials: extra random trials are run when
    seeds x trials falls short);
(d) because one training run is noisy (about ±0.006 on 1,000 validation images, more on
    digits' 359), every run's best architecture retrained on ``--retrain-seeds`` fresh
    training seeds; (c) is judged on the retrained means (target: TPE above random).
(e) the median value of the trials after the start-up ones, and the share of them below
    0.9: whether TPE learned where the poor models are, which a saturated best-of-N hides.

The comparison is paired: trial ``k`` of the runs with sampler seed ``s`` trains with the
same training seed under both samplers, and TPE's start-up trials come from a random sampler
of the same seed, so both samplers' first trials coincide. A failed trial (NaN loss) scores
0 for the running best. Studies live in memory; no pruner. Each search and each
retraining runs in a fresh process (see :class:`Jobs`).

Run: ``python bench/search_efficiency.py`` (digits, about 20 minutes on 2 CPU cores) or
``python bench/search_efficiency.py --dataset mnist_5k --trials 30`` (real digits: the
space of ``bench/mnist-5k-hour.yaml``, 3 epochs, 6-12 s a trial, about an hour);
``--help`` for the options. Progress goes to stderr; the tables and the two target lines
(``ratio ...``) to stdout; the curves to ``--plot`` (PNG).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import mloptimizer.trainer  # noqa: F401 - quiets TensorFlow before it is imported
from mloptimizer.loading import load_search
from mloptimizer.messages import TrialMessage
from mloptimizer.space import Architecture, build_sampler, sample_architecture, space_size
from mloptimizer.spec import Dataset, SamplerSpec, SearchSpace
from mloptimizer.trainer.data import load_dataset
from mloptimizer.trainer.training import train_trial

import matplotlib  # isort: skip
import matplotlib.pyplot as plt  # isort: skip
import numpy as np  # isort: skip
import optuna  # isort: skip
from matplotlib.ticker import MaxNLocator  # isort: skip

matplotlib.use("Agg")  # pyplot picks its backend at the first figure: files only, no display

REPO = Path(__file__).resolve().parent.parent
SAMPLERS = ("tpe", "random")
NAMES = {"tpe": "TPE", "random": "random"}
# dataset: (search file whose space is searched, None for the seed's space; epochs; batch)
DEFAULTS: dict[str, tuple[Path | None, int, int]] = {
    "digits": (REPO / "examples" / "digits-quick.yaml", 3, 32),
    "mnist_5k": (REPO / "bench" / "mnist-5k-hour.yaml", 3, 64),
}
RUN_SEED_STRIDE = 100_000  # trial k of the runs with sampler seed s trains with seed s*stride+k
FRESH_SEED = 2**31 - 1  # retraining seeds count down from here, far from every search's seeds
RATIO_TARGET = 0.5  # the seed's claim: 20 TPE trials where random search needs 60 or more
BEST_OF = (10, 20, 30)
POOR = 0.9  # a trial's val_accuracy below this is one a good sampler learns to avoid


@dataclass(frozen=True)
class Setup:
    """What every worker process needs to train trials; picklable."""

    dataset: Dataset
    epochs: int
    batch_size: int
    space: SearchSpace
    startup_trials: int
    cache_dir: Path | None


@dataclass(frozen=True)
class TrialResult:
    """One trained trial: its 1-based number in its run, value (None: failed) and model."""

    number: int
    value: float | None
    architecture: Architecture
    seconds: float
    error: str | None = None

    @property
    def score(self) -> float:
        """The value for the running best: a failed trial scores 0."""
        return 0.0 if self.value is None else self.value


@dataclass
class Run:
    """One search: a sampler, its seed and its trials in order."""

    sampler: str
    seed: int
    trials: list[TrialResult] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.sampler} s{self.seed}"

    def running_best(self) -> list[float]:
        """Best score after 1, 2, ... trials."""
        return [float(x) for x in np.maximum.accumulate([t.score for t in self.trials])]

    def best(self) -> TrialResult:
        """The best trial; the earliest one on a tie."""
        return max(self.trials, key=lambda t: (t.score, -t.number))

    def trials_to_reach(self, threshold: float) -> float:
        """The first trial count whose running best is >= threshold; inf if never."""
        for n, best in enumerate(self.running_best(), start=1):
            if best >= threshold:
                return float(n)
        return math.inf

    def to_json(self) -> dict[str, object]:
        return {
            "sampler": self.sampler,
            "seed": self.seed,
            "trials": [
                {
                    "number": t.number,
                    "value": t.value,
                    "seconds": round(t.seconds, 3),
                    "architecture": t.architecture.model_dump(mode="json"),
                    "error": t.error,
                }
                for t in self.trials
            ],
        }


class Objective:
    """Trains architectures on splits loaded once per process."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.dataset = setup.dataset
        with tempfile.TemporaryDirectory() as tmp:
            self.splits = load_dataset(self.dataset, cache_dir=setup.cache_dir or Path(tmp))
        self.trainings = 0

    def train(self, architecture: Architecture, seed: int) -> TrialResult:
        """One training run; ``number`` of the result is left 0 for the caller to set."""
        message = TrialMessage(
            search="bench.search-efficiency",
            trial_id=self.trainings,
            number=self.trainings,
            architecture=architecture,
            dataset=self.dataset,
            epochs=self.setup.epochs,
            batch_size=self.setup.batch_size,
            mixed_precision="off",
            metric="val_accuracy",
            seed=seed,
        )
        self.trainings += 1
        started = time.perf_counter()
        outcome = train_trial(
            message, self.splits, on_epoch=lambda epoch, metrics: "continue", stop=threading.Event()
        )
        seconds = time.perf_counter() - started
        if outcome.state != "complete" or outcome.value is None:
            return TrialResult(0, None, architecture, seconds, outcome.error or outcome.state)
        return TrialResult(0, outcome.value, architecture, seconds)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def search_job(setup: Setup, sampler: str, seed: int, trials: int, progress: str) -> Run:
    """One in-memory study of ``trials`` trials through ask/tell (in a worker process)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    objective = Objective(setup)
    spec = SamplerSpec.model_validate(
        {"type": sampler, "seed": seed, "nStartupTrials": setup.startup_trials}
    )
    study = optuna.create_study(direction="maximize", sampler=build_sampler(spec))
    run = Run(sampler, seed)
    for k in range(trials):
        trial = study.ask()
        architecture = sample_architecture(trial, setup.space)
        result = objective.train(architecture, seed * RUN_SEED_STRIDE + k)
        if result.value is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, result.value)
        run.trials.append(
            TrialResult(k + 1, result.value, architecture, result.seconds, result.error)
        )
        shown = "failed" if result.value is None else f"{result.value:.4f}"
        log(
            f"{progress} {run.label} trial {k + 1:>3}/{trials}: {shown:>7} "
            f"(best {run.running_best()[-1]:.4f}) {result.seconds:5.1f}s "
            f"{architecture.summary()}" + (f" [{result.error[:80]}]" if result.error else "")
        )
    return run


def retrain_job(setup: Setup, architecture: Architecture, seeds: Sequence[int]) -> list[float]:
    """Scores of ``architecture`` trained once per seed, failures 0 (in a worker process)."""
    objective = Objective(setup)
    scores = []
    for seed in seeds:
        result = objective.train(architecture, seed)
        scores.append(result.score)
        log(
            f"[retrain] seed {seed}: {result.score:.4f} {result.seconds:5.1f}s "
            f"{architecture.summary()}"
        )
    return scores


class Jobs:
    """Runs each search and each retraining in a fresh process, one at a time.

    Keras 3 on TensorFlow keeps memory from every model built and fit, ``clear_session``
    notwithstanding (keras-team/keras#17458): in one long-lived process each later trial
    trains slower (about 8 MB and +0.6% per small-CNN trial on digits, measured). A fresh
    process per job keeps trial times comparable from the first run to the last.
    """

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.trainings = 0
        self._retrained: dict[str, list[float]] = {}
        self._pool = ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1
        )

    def search(self, sampler: str, seed: int, trials: int, progress: str) -> Run:
        run = self._pool.submit(search_job, self.setup, sampler, seed, trials, progress).result()
        self.trainings += trials
        return run

    def retrain(self, architecture: Architecture, seeds: Sequence[int]) -> list[float]:
        """Scores of ``architecture`` on ``seeds``; an architecture is retrained once."""
        key = architecture.model_dump_json()
        if key not in self._retrained:
            job = self._pool.submit(retrain_job, self.setup, architecture, list(seeds))
            self._retrained[key] = job.result()
            self.trainings += len(seeds)
        return self._retrained[key]

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


def lower_median(values: Sequence[float]) -> float:
    """The lower median: a value of the list, and finite while at least half are finite."""
    return sorted(values)[(len(values) - 1) // 2]


def trials_text(n: float, trials: int) -> str:
    return f">{trials}" if math.isinf(n) else f"{n:g}"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def plot(
    runs: dict[str, list[Run]],
    threshold: float,
    pooled_best: float,
    pooled_n: int,
    startup_trials: int,
    title: str,
    path: Path,
) -> None:
    """Median running best per sampler against trial count, interquartile range shaded."""
    colors = {"tpe": "tab:blue", "random": "tab:orange"}
    fig, ax = plt.subplots(figsize=(7.0, 4.5), dpi=120)
    for sampler, sampler_runs in runs.items():
        curves = np.array([run.running_best() for run in sampler_runs])
        x = np.arange(1, curves.shape[1] + 1)
        q1, mid, q3 = np.percentile(curves, [25, 50, 75], axis=0)
        name = NAMES[sampler]
        ax.plot(x, mid, color=colors[sampler], lw=2, marker=".", label=f"{name} median")
        ax.fill_between(x, q1, q3, color=colors[sampler], alpha=0.2, label=f"{name} quartiles")
    ax.axhline(threshold, color="grey", ls="--", lw=1, label="threshold: random median best")
    ax.axhline(
        pooled_best, color="tab:red", ls=":", lw=1, label=f"random best of {pooled_n} (pooled)"
    )
    trials = len(next(iter(runs.values()))[0].trials)
    if 0 < startup_trials < trials:
        ax.axvline(startup_trials + 0.5, color="tab:blue", ls=":", lw=1, alpha=0.6)
        ax.text(
            startup_trials + 0.6,
            0.02,
            "TPE models from here",
            transform=ax.get_xaxis_transform(),
            fontsize=8,
            color="tab:blue",
        )
    # From the lower median curve's first point up: the story is at the top of the range.
    every = [np.array([run.running_best() for run in rs]) for rs in runs.values()]
    low = min(float(np.median(c[:, 0])) for c in every)
    high = max([float(c.max()) for c in every] + [pooled_best])
    ax.set_ylim(max(0.0, low - 0.005), min(1.0, high + 0.005))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trials")
    ax.set_ylabel("best val_accuracy so far")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset",
        choices=sorted(DEFAULTS),
        default="digits",
        help="digits (default, minutes) or mnist_5k (1,000 validation images; about an hour "
        "for 5 seeds x 30 trials on 2 CPUs)",
    )
    parser.add_argument("--seeds", type=int, default=5, help="searches per sampler (default 5)")
    parser.add_argument("--trials", type=int, default=20, help="trials per search (default 20)")
    parser.add_argument(
        "--pool",
        type=int,
        default=60,
        help="fewest random trials pooled for random's best; extra random trials fill the "
        "gap when seeds x trials falls short (default 60)",
    )
    parser.add_argument(
        "--epochs", type=int, help="epochs per trial (default: 3 for digits, 2 for mnist_5k)"
    )
    parser.add_argument(
        "--batch-size", type=int, help="batch size (default: 32 for digits, 64 for mnist_5k)"
    )
    parser.add_argument(
        "--space",
        type=Path,
        help="search file whose searchSpace is searched (default: examples/digits-quick.yaml "
        "for digits, bench/mnist-5k-hour.yaml for mnist_5k)",
    )
    parser.add_argument(
        "--startup-trials",
        type=int,
        default=SamplerSpec().n_startup_trials,
        help=f"TPE's random start-up trials (default {SamplerSpec().n_startup_trials}, the spec's)",
    )
    parser.add_argument(
        "--retrain-seeds",
        type=int,
        default=3,
        help="fresh training seeds each run's best architecture is retrained on (default 3)",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        help="PNG of the curves (default: bench/search_efficiency.png for digits, "
        "bench/search_efficiency_mnist_5k.png for mnist_5k)",
    )
    parser.add_argument("--json", type=Path, help="also write every trial's result here")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="dataset cache folder (default: a temporary one; digits and mnist_5k are offline)",
    )
    args = parser.parse_args()
    if args.plot is None:
        suffix = "" if args.dataset == "digits" else f"_{args.dataset}"
        args.plot = REPO / "bench" / f"search_efficiency{suffix}.png"
    if min(args.seeds, args.trials, args.retrain_seeds) < 1 or args.startup_trials < 0:
        parser.error("--seeds, --trials and --retrain-seeds must be >= 1, --startup-trials >= 0")
    return args


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    space_file, default_epochs, default_batch = DEFAULTS[args.dataset]
    space_file = args.space or space_file
    space = load_search(space_file).spec.search_space if space_file else SearchSpace()
    if space_file is None:
        space_name = "the default SearchSpace()"
    elif space_file.resolve().is_relative_to(REPO):
        space_name = str(space_file.resolve().relative_to(REPO))
    else:
        space_name = str(space_file)
    epochs = args.epochs or default_epochs
    batch_size = args.batch_size or default_batch
    setup = Setup(
        Dataset(builtin=args.dataset),
        epochs,
        batch_size,
        space,
        args.startup_trials,
        args.cache_dir,
    )
    splits = Objective(setup).splits  # for the header; each job loads its own
    extra_n = max(0, args.pool - args.seeds * args.trials)
    print(
        f"search efficiency on {args.dataset}: {len(splits.y_train)} train / "
        f"{len(splits.y_val)} validation images {splits.input_shape}; space {space_name} "
        f"({space_size(space)}); {epochs} epochs per trial, batch {batch_size}, "
        f"mixed precision off, no pruner\n"
        f"{args.seeds} seeds x {args.trials} trials per sampler (TPE: {args.startup_trials} "
        f"random start-up trials, multivariate, group, 24 EI candidates); random pool: the "
        f"random runs' {args.seeds * args.trials} trials"
        + (f" + {extra_n} extra random trials" if extra_n else "")
        + f"; retraining on {args.retrain_seeds} fresh seeds",
        flush=True,
    )

    jobs = Jobs(setup)
    try:
        # The searches: samplers alternate, so a drift in machine speed hits both alike.
        runs: dict[str, list[Run]] = {sampler: [] for sampler in SAMPLERS}
        for seed in range(args.seeds):
            for sampler in SAMPLERS:
                progress = f"[run {len(runs['tpe']) + len(runs['random']) + 1}/{2 * args.seeds}]"
                runs[sampler].append(jobs.search(sampler, seed, args.trials, progress))
        extra = jobs.search("random", args.seeds, extra_n, "[pool]") if extra_n else None
        pooled = [
            (run, t) for run in [*runs["random"], *([extra] if extra else [])] for t in run.trials
        ]
        pooled_run, pooled_best = max(pooled, key=lambda rt: (rt[1].score, -rt[1].number))

        # Retraining: every run's best (the pooled best is one of them) on fresh seeds.
        fresh = [FRESH_SEED - i for i in range(args.retrain_seeds)]
        for sampler in SAMPLERS:
            for run in runs[sampler]:
                jobs.retrain(run.best().architecture, fresh)
        pool_scores = jobs.retrain(pooled_best.architecture, fresh)
    finally:
        jobs.close()
    wall = time.perf_counter() - started

    # --- (a) the curves ---
    curves = {s: np.array([run.running_best() for run in runs[s]]) for s in SAMPLERS}
    print("\n(a) best val_accuracy after n trials: median [quartiles] over seeds")
    print(f"{'n':>3} {'TPE':>24} {'random':>24}")
    for n in range(args.trials):
        cells = []
        for s in SAMPLERS:
            q1, mid, q3 = np.percentile(curves[s][:, n], [25, 50, 75])
            cells.append(f"{mid:.4f} [{q1:.4f}-{q3:.4f}]")
        print(f"{n + 1:>3} {cells[0]:>24} {cells[1]:>24}")

    # --- (b) trials to reach random's median best-of-budget ---
    threshold = float(np.median(curves["random"][:, -1]))
    reach = {s: [run.trials_to_reach(threshold) for run in runs[s]] for s in SAMPLERS}
    needed = {s: lower_median(reach[s]) for s in SAMPLERS}
    print(
        f"\n(b) trials to reach random's median best-of-{args.trials} = {threshold:.4f} "
        f"(lower median over seeds; >{args.trials}: not reached)"
    )
    for s in SAMPLERS:
        per_seed = ", ".join(trials_text(n, args.trials) for n in reach[s])
        print(f"{NAMES[s]:>7}: {trials_text(needed[s], args.trials):>4}  (per seed: {per_seed})")
    # Finite: at least half of the random runs reach their own median best.
    ratio = needed["tpe"] / needed["random"]
    print("\nbest-of-n: median [quartiles] over seeds")
    for n in [n for n in BEST_OF if n <= args.trials]:
        cells = []
        for s in SAMPLERS:
            q1, mid, q3 = np.percentile(curves[s][:, n - 1], [25, 50, 75])
            cells.append(f"{NAMES[s]} {mid:.4f} [{q1:.4f}-{q3:.4f}]")
        print(f"best-of-{n}: " + "; ".join(cells))

    # --- (e) what each sampler proposes once TPE models ---
    print(
        f"\n(e) the trials after the {args.startup_trials} start-up trials: the median value "
        f"and the share below {POOR} (lower is what TPE learned to avoid), per seed"
    )
    for s in SAMPLERS:
        cells = []
        for run in runs[s]:
            after = [t.score for t in run.trials if t.number > args.startup_trials]
            if after:
                poor = sum(v < POOR for v in after) / len(after)
                cells.append(f"{statistics.median(after):.3f}/{poor:.0%}")
        print(f"{NAMES[s]:>7}: " + ", ".join(cells))

    # --- (c, d) best architectures, found and retrained ---
    print(
        f"\n(c,d) each run's best architecture: val_accuracy found (one run) and retrained "
        f"on {args.retrain_seeds} fresh seeds (mean ± std)"
    )
    print(f"{'run':<12} {'trial':>5} {'found':>7} {'retrained':>17}  architecture")
    retrained: dict[str, list[float]] = {s: [] for s in SAMPLERS}
    for s in SAMPLERS:
        for run in runs[s]:
            best = run.best()
            mean, sd = mean_std(jobs.retrain(best.architecture, fresh))
            retrained[s].append(mean)
            print(
                f"{run.label:<12} {best.number:>5} {best.score:>7.4f} {mean:>8.4f} ± {sd:.4f}  "
                f"{best.architecture.summary()}"
            )
    pool_mean, pool_sd = mean_std(pool_scores)
    tpe_top = max((run.best() for run in runs["tpe"]), key=lambda t: t.score)
    tpe_top_mean, _ = mean_std(jobs.retrain(tpe_top.architecture, fresh))
    rows = [
        (f"TPE median best-of-{args.trials}", np.median(curves["tpe"][:, -1]), retrained["tpe"]),
        (
            f"random median best-of-{args.trials}",
            np.median(curves["random"][:, -1]),
            retrained["random"],
        ),
        (
            f"random best of {len(pooled)} (pooled, {pooled_run.label} #{pooled_best.number})",
            pooled_best.score,
            [pool_mean],
        ),
        (
            f"TPE best of {args.seeds * args.trials} (pooled, for reference)",
            tpe_top.score,
            [tpe_top_mean],
        ),
    ]
    print(f"\n{'':<50} {'found':>7} {'retrained':>9}")
    for name, found, scores in rows:
        print(f"{name:<50} {found:>7.4f} {statistics.median(scores):>9.4f}")
    print("(a median row's retrained value is the median over seeds of each run's retrained best)")

    title = (
        f"{args.dataset}: best val_accuracy, median of {args.seeds} seeds x {args.trials} "
        f"trials, {epochs} epochs/trial"
    )
    plot(runs, threshold, pooled_best.score, len(pooled), args.startup_trials, title, args.plot)
    if args.json:
        named = {s: runs[s] for s in SAMPLERS} | {"random_extra": [extra] if extra else []}
        data = {k: [run.to_json() for run in v] for k, v in named.items()}
        args.json.write_text(json.dumps(data, indent=1))
    print(f"\nplot: {args.plot}; {jobs.trainings} trainings in {wall / 60:.1f} min")

    tpe_retrained = statistics.median(retrained["tpe"])
    gap = tpe_retrained - pool_mean
    standard_error = pool_sd / math.sqrt(len(pool_scores))
    print(
        f"ratio trials to threshold TPE/random: {ratio:.3f} "
        f"({trials_text(needed['tpe'], args.trials)} / "
        f"{trials_text(needed['random'], args.trials)}; target <= {RATIO_TARGET}): "
        + ("met" if ratio <= RATIO_TARGET else "not met")
    )
    print(
        f"ratio TPE median best-of-{args.trials} / random best of {len(pooled)}, retrained: "
        f"{tpe_retrained / pool_mean:.4f} ({tpe_retrained:.4f} vs {pool_mean:.4f} ± "
        f"{pool_sd:.4f}, difference {gap:+.4f}, standard error of random's mean "
        f"{standard_error:.4f}; target: TPE above): " + ("met" if gap > 0 else "not met")
    )


if __name__ == "__main__":
    main()
