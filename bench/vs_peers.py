"""Time-to-accuracy against peers: MLOptimizer, KerasTuner and plain Optuna, same budget.

Measures, in one run, on MNIST-5k (the built-in ``mnist_5k``: one train/validation/test
split, ``dataset.seed`` 0, for every tool), with the same epochs per trial, the same batch
size, the same search space and the same wall-clock budget per search:

(a) per tool and seed, the best validation accuracy found within the budget and when it
    was found, and the best-so-far curve against wall-clock time (``--plot``); medians over
    ``--seeds`` searches per tool;
(b) each search's final model -- chosen as each tool's documentation says, below -- retrained
    from scratch on ``--retrain-seeds`` fresh training seeds for ``--final-epochs`` and scored
    on the test split no search ever saw (mean over those seeds; median over searches);
(c) the time each tool needs to reach KerasTuner's median best (the better of its two
    tuners' medians; lower median over seeds, "never" when fewer than half of the seeds
    reach it) and the ratio to that KerasTuner tuner's own time.

Two target lines close the output: MLOptimizer's median best validation accuracy at least
every peer's, and MLOptimizer reaching KerasTuner's median best in at most 0.5x
KerasTuner's time.

The space: by default the seed's conditional space (cnn or inception, then a gap or mlp
head, dropout, learning rate) with the smaller ranges of ``examples/digits-quick.yaml``
(cnn: 1-2 blocks of 16-64 filters, kernels 3 or 5; inception: 1-2 blocks of 1-2 modules;
mlp 32-128 units; learning rate 5e-4 to 1e-2), so that a search of a few minutes on 2 CPU
cores trains about 10 trials (2 epochs: 10-70 s each). ``--space default`` searches the
seed's full default space: its models cost 2-10 minutes a trial here (median 140 M
multiply-adds an image), so a few-minute budget ends before most searches finish a trial;
use it with budgets of an hour or more, or on a GPU.

The tools:

* **MLOptimizer** -- ``mloptimizer run`` itself, in its own process, on a search file
  written here: dataset ``mnist_5k``, the space above (``searchSpace``), TPE
  sampler (its defaults, seeded), median pruner (its defaults), ``budget.timeout`` = the
  budget, ``budget.parallelism`` 1 with one local trainer, ``training.refine`` (the top
  1 retrained for ``--refine-epochs``). ``maxTrials`` is 1000 unless
  ``--mloptimizer-trials`` says otherwise, so the timeout ends the search; exploration
  closes early enough for the refine trial when it still fits after the start-up trials
  (see docs/reference.md, "Two phases"), else the search explores on to the timeout
  (each search's line says whether refine ran). Trial completion times and values are read
  from the run folder's Optuna study (``study.db``), timed from the study's creation. Final model:
  the run's best trial (what ``mloptimizer run``'s report scores).
* **KerasTuner 1.4 BayesianOptimization** and **Hyperband** -- a ``HyperModel`` that
  declares the same choices with ``hp.Choice``/``hp.Int``/``hp.Float`` in nested
  ``conditional_scope`` s (family -> block count -> per-block choices; classifier -> dense
  units) and builds the model with the project's own builder
  (:func:`mloptimizer.trainer.model.build_model`), so an architecture is the same model in
  every tool; its ``fit`` trains on the project's input pipeline
  (:func:`~mloptimizer.trainer.data.make_dataset`, uint8 images scaled per batch) with a
  per-trial seed. Each tuner keeps its defaults but for ``max_trials`` (unbounded: time
  decides) and the failed-trial cap; BayesianOptimization therefore starts with
  ``3 x`` (number of hyperparameters) random trials, as its documentation says. Hyperband
  trains at most ``--epochs`` per trial (``max_epochs``), with ``factor`` 3, or 2 when
  ``--epochs`` is below 3 (with factor 3 and 2 epochs Hyperband has one bracket: random
  search). A subclass stops the tuner when the budget has passed: no trial starts after
  it, and the trial running then is stopped and failed. KerasTuner ranks trials by the best
  epoch's ``val_accuracy`` (its default); the curves here use the last epoch's, as for the
  other tools. Final model: ``tuner.get_best_hyperparameters()[0]``, rebuilt and fitted
  anew (the KerasTuner guide's recommendation over ``get_best_models``).
* **Optuna TPE** -- ``study.optimize`` with ``TPESampler(seed=...)`` (Optuna's defaults: 10
  random start-up trials, univariate), the project's
  :func:`~mloptimizer.space.sample_architecture` and
  :func:`~mloptimizer.trainer.training.train_trial`, no pruner, no refine,
  ``timeout=`` the budget (and the trial running at the budget's end stopped). Final model:
  ``study.best_params`` replayed through ``optuna.trial.FixedTrial``.

Same for all: seeds 1 to ``--seeds`` (KerasTuner's oracle gets ``s *``
:data:`KT_SEED_STRIDE`: it draws each hyperparameter with the seed it was given plus the
draws before, so seeds 1, 2, 3 shared most of their trials, shifted), one
training at a time on this machine's cores (TensorFlow's intra-op threads
as a single local trainer of ``mloptimizer run`` gets them), float32, the training seed of
trial ``k`` of a search with seed ``s`` is ``trial_seed(s, k)`` (so MLOptimizer and plain
Optuna, whose random start-up draws coincide for the same seed, train their first trials
identically), and only trials that finished within the budget count -- for the curves and
for the final model. The clock of KerasTuner and Optuna starts after TensorFlow is imported
and the data loaded in their process, before the tuner or study is made; MLOptimizer's
starts when its study is created, so the start of its trainer process (TensorFlow's import,
the data) is inside its budget: a few seconds against it.

Each search and each retraining runs in a fresh process (see
:class:`bench.search_efficiency.Jobs` for why); tools alternate within each seed.

Run: ``python bench/vs_peers.py`` (3 seeds x 4 tools x 5-minute budgets, then the final
models' retraining: about 75 minutes on 2 CPU cores, depending on the sizes of the models
found; run it on a quiet machine), or ``python bench/vs_peers.py --quick`` (a smoke run: one
seed, one-minute budgets, one epoch, one retraining; about 6 minutes). Needs the ``bench``
extra (``pip install -e ".[bench]"``: KerasTuner, TensorBoard).
``--help`` for the options. Progress goes to stderr; the tables and the two target lines
to stdout; the curves to ``--plot`` (PNG).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import mloptimizer.trainer  # noqa: F401 - quiets TensorFlow before it is imported
from mloptimizer.checks import fitted_space
from mloptimizer.loading import load_search
from mloptimizer.local import default_threads
from mloptimizer.space import Architecture, ConvBlock, InceptionBlock, sample_architecture
from mloptimizer.space import space_size as count_space
from mloptimizer.spec import (
    API_VERSION,
    KIND,
    ArchitectureSearchSpec,
    Dataset,
    FloatRange,
    IntRange,
    SearchSpace,
)
from mloptimizer.study import Attr, best_of, record, study_name, trial_seed

import matplotlib  # isort: skip
import matplotlib.pyplot as plt  # isort: skip
import numpy as np  # isort: skip
import optuna  # isort: skip
import yaml  # isort: skip

matplotlib.use("Agg")  # pyplot picks its backend at the first figure: files only, no display

REPO = Path(__file__).resolve().parent.parent
TOOLS = ("mloptimizer", "kt_bayesian", "kt_hyperband", "optuna")
NAMES = {
    "mloptimizer": "MLOptimizer",
    "kt_bayesian": "KerasTuner Bayesian",
    "kt_hyperband": "KerasTuner Hyperband",
    "optuna": "Optuna TPE",
}
KERAS_TUNERS = ("kt_bayesian", "kt_hyperband")
COLORS = {
    "mloptimizer": "tab:blue",
    "kt_bayesian": "tab:orange",
    "kt_hyperband": "tab:green",
    "optuna": "tab:purple",
}
DATASET: Literal["mnist_5k"] = "mnist_5k"
SMALL_SPACE = REPO / "examples" / "digits-quick.yaml"  # its searchSpace: CPU-sized models
FRESH_SEED = 2**31 - 1  # retraining seeds count down from here, far from every search's seeds
UNBOUNDED_TRIALS = 1000  # maxTrials / max_trials when the budget alone should end a search
TIME_RATIO_TARGET = 0.5
STARTUP_SECONDS = 10.0  # per search, for the duration estimate: process, TensorFlow, data


@dataclass(frozen=True)
class Setup:
    """What every search and retraining needs; picklable."""

    epochs: int
    batch_size: int
    budget: float  # seconds of wall clock per search
    space: SearchSpace | None  # None: the default SearchSpace(), left out of the search file
    refine_epochs: int
    mloptimizer_trials: int
    hyperband_factor: int
    final_epochs: int
    threads: int
    work: Path

    @property
    def dataset(self) -> Dataset:
        return Dataset(builtin=DATASET)

    def spec_document(self, seed: int) -> dict[str, Any]:
        """The ``spec`` of MLOptimizer's search file for ``seed``."""
        spec: dict[str, Any] = {
            "dataset": {"builtin": DATASET},
            "budget": {
                "maxTrials": self.mloptimizer_trials,
                "parallelism": 1,
                "maxFailedTrials": UNBOUNDED_TRIALS,
                "timeout": f"{self.budget:g}s",
            },
            "sampler": {"type": "tpe", "seed": seed},
            "pruner": {"type": "median"},
            "training": {
                "epochs": self.epochs,
                "batchSize": self.batch_size,
                "mixedPrecision": "off",
                "refine": {"topK": 1, "epochs": self.refine_epochs},
            },
        }
        if self.space is not None:
            spec["searchSpace"] = self.space.model_dump(mode="json", by_alias=True)
        return spec

    def spec(self, seed: int = 0) -> ArchitectureSearchSpec:
        return ArchitectureSearchSpec.model_validate(self.spec_document(seed))

    @property
    def sampled_space(self) -> SearchSpace:
        """The space as MLOptimizer samples it (block counts fitted to 28x28 images)."""
        return fitted_space(self.spec())


@dataclass(frozen=True)
class Point:
    """One trial that finished within the budget: when (seconds from the search's start)
    and its last epoch's val_accuracy."""

    seconds: float
    value: float
    label: str


@dataclass
class Run:
    """One search of one tool: its finished trials in time order and its final model."""

    tool: str
    seed: int
    points: list[Point] = field(default_factory=list)
    final: Architecture | None = None
    pruned: int = 0
    failed: int = 0
    cut: int = 0  # stopped by the end of the budget
    note: str = ""

    @property
    def label(self) -> str:
        return f"{NAMES[self.tool]} s{self.seed}"

    def best(self) -> Point | None:
        """The best trial within the budget; the earliest on a tie."""
        if not self.points:
            return None
        return max(self.points, key=lambda p: (p.value, -p.seconds))

    def best_value(self) -> float:
        """The best val_accuracy within the budget; 0 when no trial finished."""
        best = self.best()
        return 0.0 if best is None else best.value

    def best_at(self, seconds: float) -> float:
        """Best val_accuracy of the trials finished by ``seconds``; 0 before the first."""
        return max((p.value for p in self.points if p.seconds <= seconds), default=0.0)

    def time_to(self, threshold: float) -> float:
        """Seconds until the best reaches ``threshold``; inf if it never does."""
        return min((p.seconds for p in self.points if p.value >= threshold), default=math.inf)

    def to_json(self) -> dict[str, Any]:
        return {
            "tool": self.tool,
            "seed": self.seed,
            "points": [
                {"seconds": round(p.seconds, 2), "value": p.value, "trial": p.label}
                for p in self.points
            ],
            "final": self.final.model_dump(mode="json") if self.final else None,
            "pruned": self.pruned,
            "failed": self.failed,
            "cut": self.cut,
            "note": self.note,
        }


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- the searches (each in a fresh worker process) -------------------------------------------


def _worker_start(setup: Setup) -> Any:
    """Thread pools as a single local trainer has them, then the splits (TensorFlow's first
    op must come after the thread settings)."""
    from mloptimizer.trainer.data import load_dataset
    from mloptimizer.trainer.device import configure_threads

    configure_threads(setup.threads, None)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return load_dataset(setup.dataset, cache_dir=setup.work / "cache")


def _message(setup: Setup, architecture: Architecture, seed: int, epochs: int) -> Any:
    from mloptimizer.messages import TrialMessage

    return TrialMessage(
        search="bench.vs-peers",
        trial_id=0,
        number=0,
        architecture=architecture,
        dataset=setup.dataset,
        epochs=epochs,
        batch_size=setup.batch_size,
        mixed_precision="off",
        metric="val_accuracy",
        seed=seed,
    )


def mloptimizer_search(setup: Setup, seed: int, progress: str) -> Run:
    """``mloptimizer run`` on a search file written here, then its study read back."""
    name = f"vs-peers-s{seed}"
    out = setup.work / f"mloptimizer-s{seed}"
    source = setup.work / f"{name}.yaml"
    document = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name},
        "spec": setup.spec_document(seed),
    }
    source.write_text(yaml.safe_dump(document, sort_keys=False))
    # `python -m` run from the work folder: from the repository, `mloptimizer/` there would
    # shadow the installed package (whose mloptimizer.operator and .trainer are mapped).
    command = [sys.executable, "-m", "mloptimizer.app.cli", "run", str(source)]
    command += ["--out", str(out), "--workers", "1", "--no-report"]
    lines: list[str] = []
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=setup.work
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip())
            log(f"{progress} {lines[-1]}")
        code = process.wait()
    # 1: the search failed (budget.maxFailedTrials), and its trials still count.
    if code not in (0, 1) or not any(line.startswith("search ended") for line in lines):
        raise RuntimeError(f"`{' '.join(command)}` exited {code}: {' | '.join(lines[-5:])}")
    study = optuna.load_study(
        study_name=study_name("default", name), storage=f"sqlite:///{out / 'study.db'}"
    )
    started = float(study.user_attrs[Attr.STARTED_AT])
    run = Run("mloptimizer", seed)
    within = []
    refined: list[str] = []
    explored: dict[int, float | None] = {}
    for trial in study.get_trials(deepcopy=False):
        rec = record(trial)
        if rec.phase == "explore":
            explored[rec.number] = rec.value
        elif rec.state == "complete" and rec.value is not None and rec.refines is not None:
            before = explored.get(rec.refines)
            shown = f"{before:.4f}" if before is not None else "?"
            refined.append(f"#{rec.refines} {shown} -> {rec.value:.4f}")
        if rec.state == "pruned":
            run.pruned += 1
        elif rec.state == "failed" and rec.interrupted:
            run.cut += 1
        elif rec.state == "failed":
            run.failed += 1
        if rec.state != "complete" or rec.value is None or trial.datetime_complete is None:
            continue
        seconds = trial.datetime_complete.timestamp() - started
        if seconds <= setup.budget:
            within.append(rec)
            arch = rec.architecture.summary() if rec.architecture else "?"
            run.points.append(Point(seconds, float(rec.value), f"#{rec.number} {rec.phase} {arch}"))
    run.points.sort(key=lambda p: p.seconds)
    best = best_of(within, "maximize")
    run.final = best.architecture if best is not None else None
    run.note = (
        f"refine ran ({', '.join(refined)})"
        if refined
        else "no refine (it did not fit in the budget)"
    )
    return run


def optuna_search(setup: Setup, seed: int, progress: str) -> Run:
    """Plain Optuna: ``study.optimize`` over the project's sampler and trainer, no pruner."""
    from mloptimizer.trainer.training import TrialInterrupted, train_trial

    splits = _worker_start(setup)
    space = setup.sampled_space
    run = Run("optuna", seed)

    class TrialFailed(Exception):
        """A trial that failed (NaN loss, ...): Optuna records it as FAIL and goes on."""

    started = time.monotonic()
    stop = threading.Event()
    timer = threading.Timer(setup.budget, stop.set)
    timer.daemon = True
    timer.start()
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))

    def objective(trial: optuna.trial.Trial) -> float:
        architecture = sample_architecture(trial, space)
        message = _message(setup, architecture, trial_seed(seed, trial.number), setup.epochs)
        try:
            outcome = train_trial(
                message, splits, on_epoch=lambda epoch, metrics: "continue", stop=stop
            )
        except TrialInterrupted:
            run.cut += 1
            trial.study.stop()
            raise optuna.TrialPruned("the budget ran out during this trial") from None
        seconds = time.monotonic() - started
        if outcome.state != "complete" or outcome.value is None:
            run.failed += 1
            log(f"{progress} trial {trial.number} failed: {(outcome.error or '')[:120]}")
            raise TrialFailed(outcome.error or outcome.state)
        if seconds > setup.budget:  # finished after the end: does not count, for any tool
            run.cut += 1
            trial.study.stop()
            raise optuna.TrialPruned("finished after the budget")
        value = float(outcome.value)
        run.points.append(Point(seconds, value, f"#{trial.number} {architecture.summary()}"))
        log(
            f"{progress} trial {trial.number:>3} {architecture.summary():<48} "
            f"val_accuracy {value:.4f} at {seconds:6.1f}s (best {run.best_value():.4f})"
        )
        return value

    try:
        study.optimize(objective, timeout=setup.budget, catch=(TrialFailed,))
    finally:
        timer.cancel()
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if complete:
        run.final = sample_architecture(optuna.trial.FixedTrial(study.best_params), space)
    return run


def _values(r: IntRange) -> list[int]:
    return list(range(r.min, r.max + 1, r.step))


def _kt_int(hp: Any, name: str, r: IntRange) -> Any:
    if r.min == r.max:
        return hp.Fixed(name, r.min)
    return hp.Int(name, r.min, r.max, step=r.step)


def _kt_float(hp: Any, name: str, r: FloatRange) -> Any:
    if math.isclose(r.min, r.max):
        return hp.Fixed(name, r.min)
    return hp.Float(name, r.min, r.max, sampling="log" if r.log else "linear")


def kt_architecture(hp: Any, space: SearchSpace) -> Architecture:
    """Declare the space on KerasTuner's ``hp`` (names as in ``sample_architecture``) and
    return the architecture of its current values.

    KerasTuner registers every hyperparameter it meets and returns None for one whose
    conditional scope is inactive, so each block's choices are declared for every block
    count that uses them and read only when the architecture has that block.
    """
    family = hp.Choice("family", list(space.architectures))
    conv: list[ConvBlock] = []
    inception: list[InceptionBlock] = []
    if "cnn" in space.architectures:
        c = space.cnn
        with hp.conditional_scope("family", ["cnn"]):
            blocks = _kt_int(hp, "cnn_blocks", c.blocks)
            for i in range(c.blocks.max):
                with hp.conditional_scope("cnn_blocks", [n for n in _values(c.blocks) if n > i]):
                    filters = _kt_int(hp, f"cnn_filters_{i}", c.filters)
                    kernel = hp.Choice(f"cnn_kernel_{i}", list(c.kernel_sizes))
                if family == "cnn" and i < blocks:
                    conv.append(ConvBlock(filters=filters, kernel_size=kernel))
    if "inception" in space.architectures:
        s = space.inception
        with hp.conditional_scope("family", ["inception"]):
            blocks = _kt_int(hp, "inception_blocks", s.blocks)
            for i in range(s.blocks.max):
                counts = [n for n in _values(s.blocks) if n > i]
                with hp.conditional_scope("inception_blocks", counts):
                    modules = _kt_int(hp, f"inception_modules_{i}", s.modules)
                    f1 = _kt_int(hp, f"inception_1x1_{i}", s.filters_1x1)
                    f3 = _kt_int(hp, f"inception_3x3_{i}", s.filters_3x3)
                if family == "inception" and i < blocks:
                    inception.append(
                        InceptionBlock(modules=modules, filters_1x1=f1, filters_3x3=f3)
                    )
    classifier = hp.Choice("classifier", list(space.classifier.types))
    units = None
    if "mlp" in space.classifier.types:
        with hp.conditional_scope("classifier", ["mlp"]):
            units = _kt_int(hp, "dense_units", space.classifier.units)
    return Architecture(
        family=family,
        conv_blocks=tuple(conv),
        inception_blocks=tuple(inception),
        classifier=classifier,
        dense_units=units if classifier == "mlp" else None,
        dropout=_kt_float(hp, "dropout", space.dropout),
        learning_rate=_kt_float(hp, "learning_rate", space.learning_rate),
    )


# KerasTuner's oracle draws hyperparameter number i of a search seeded s with the seed s + i
# (keras_tuner/src/engine/oracle.py, ``_seed_state``): nearby seeds draw the same values,
# shifted (in one run, seeds 1 and 2 picked the same final model, which seed 5 drew too).
# A 5-minute search draws a few hundred, so seeds this far apart never meet.
KT_SEED_STRIDE = 10_000


def keras_tuner_search(setup: Setup, tool: str, seed: int, progress: str) -> Run:
    """KerasTuner's BayesianOptimization or Hyperband, stopped when the budget has passed."""
    import keras
    import keras_tuner as kt  # type: ignore[import-untyped,import-not-found,unused-ignore]

    from mloptimizer.trainer.data import make_dataset
    from mloptimizer.trainer.model import build_model

    # KerasTuner prints the traceback of every failed trial (the one cut by the budget's
    # end too) while its DEBUG flag is on, as it is by default; the failure is counted here.
    kt_config: Any = importlib.import_module("keras_tuner.src.config")
    kt_config.DEBUG = False
    splits = _worker_start(setup)
    space = setup.sampled_space
    run = Run(tool, seed)
    started = time.monotonic()
    deadline = started + setup.budget

    class BudgetSpent(Exception):
        pass

    class Deadline(keras.callbacks.Callback):  # type: ignore[misc]
        """Stops a trial at the end of the budget (also one whose last epoch ends late)."""

        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            if time.monotonic() > deadline:
                raise BudgetSpent

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self.on_train_batch_end(0)

    class SpaceHyperModel(kt.HyperModel):  # type: ignore[misc]
        """The search space on KerasTuner, built and trained by the project's own code."""

        def __init__(self) -> None:
            super().__init__(name="mloptimizer-space")
            self.seed = trial_seed(seed, 0)
            self.value: float | None = None
            self.architecture: Architecture | None = None
            self.budget_spent = False

        def build(self, hp: Any) -> keras.Model:
            self.architecture = kt_architecture(hp, space)
            keras.utils.set_random_seed(self.seed)
            return build_model(self.architecture, splits.input_shape, splits.num_classes)

        def fit(self, hp: Any, model: keras.Model, *args: Any, **kwargs: Any) -> Any:
            train = make_dataset(
                splits.x_train,
                splits.y_train,
                batch_size=setup.batch_size,
                shuffle=True,
                seed=self.seed,
            )
            val = make_dataset(
                splits.x_val, splits.y_val, batch_size=setup.batch_size, shuffle=False, seed=0
            )
            try:
                history = model.fit(
                    train,
                    validation_data=val,
                    epochs=kwargs["epochs"],
                    initial_epoch=kwargs.get("initial_epoch", 0),
                    callbacks=[*kwargs.get("callbacks", []), Deadline()],
                    shuffle=False,  # the dataset shuffles itself, seeded per trial
                    verbose=0,
                )
            except BudgetSpent:
                self.budget_spent = True
                raise kt.errors.FailedTrialError("the budget ran out during this trial") from None
            last = {k: float(v[-1]) for k, v in history.history.items() if v}
            if not all(math.isfinite(v) for v in last.values()):
                raise kt.errors.FailedTrialError("loss became NaN")
            self.value = last["val_accuracy"]
            return history

    hypermodel = SpaceHyperModel()

    def timed(base: Any) -> Any:
        class Timed(base):  # type: ignore[misc]
            """Starts no trial once the budget has passed; records each finished trial."""

            def pre_create_trial(self) -> None:
                if time.monotonic() > deadline:
                    self.oracle.max_trials = max(1, len(self.oracle.trials))

            def on_trial_begin(self, trial: Any) -> None:
                super().on_trial_begin(trial)
                hypermodel.seed = trial_seed(seed, len(self.oracle.trials) - 1)
                hypermodel.value = None
                hypermodel.budget_spent = False

            def on_trial_end(self, trial: Any) -> None:
                seconds = time.monotonic() - started
                completed = trial.status == "COMPLETED" and hypermodel.value is not None
                if completed:
                    assert hypermodel.value is not None
                    assert hypermodel.architecture is not None
                    epochs = trial.hyperparameters.values.get("tuner/epochs", setup.epochs)
                    summary = hypermodel.architecture.summary()
                    run.points.append(
                        Point(seconds, hypermodel.value, f"#{trial.trial_id} {summary} {epochs}ep")
                    )
                    log(
                        f"{progress} trial {trial.trial_id} {summary:<48} "
                        f"val_accuracy {hypermodel.value:.4f} ({epochs} epochs) at "
                        f"{seconds:6.1f}s (best {run.best_value():.4f})"
                    )
                elif hypermodel.budget_spent:
                    run.cut += 1
                else:
                    run.failed += 1
                    log(f"{progress} trial {trial.trial_id} failed: {trial.status}")
                super().on_trial_end(trial)

        return Timed

    common: dict[str, Any] = {
        "objective": "val_accuracy",
        "seed": seed * KT_SEED_STRIDE,
        # A failed trial (NaN loss) does not end the search; ten in a row (a bug) do.
        "max_consecutive_failed_trials": 10,
        "directory": str(setup.work / "keras-tuner"),
        "project_name": f"{tool}-s{seed}",
        "overwrite": True,
    }
    with contextlib.redirect_stdout(sys.stderr):  # KerasTuner prints; stdout has the tables
        if tool == "kt_bayesian":
            tuner = timed(kt.BayesianOptimization)(
                hypermodel, max_trials=100 * UNBOUNDED_TRIALS, **common
            )
        else:
            tuner = timed(kt.Hyperband)(
                hypermodel,
                max_epochs=setup.epochs,
                factor=setup.hyperband_factor,
                hyperband_iterations=100 * UNBOUNDED_TRIALS,
                **common,
            )
        tuner.search(epochs=setup.epochs, verbose=0)
        best = tuner.get_best_hyperparameters(1)
    if best:
        run.final = kt_architecture(best[0], space)
    hyperparameters = len(tuner.oracle.get_space().space)
    run.note = f"{hyperparameters} hyperparameters"
    return run


def search_job(setup: Setup, tool: str, seed: int, progress: str) -> Run:
    """One search of ``tool`` (in a worker process); its prints go to stderr."""
    with contextlib.redirect_stdout(sys.stderr):
        if tool == "mloptimizer":
            return mloptimizer_search(setup, seed, progress)
        if tool == "optuna":
            return optuna_search(setup, seed, progress)
        return keras_tuner_search(setup, tool, seed, progress)


def retrain_job(setup: Setup, architecture: Architecture, seeds: Sequence[int]) -> list[float]:
    """Test accuracy of ``architecture`` trained once per seed, failures 0 (worker process)."""
    from mloptimizer.trainer.data import make_dataset
    from mloptimizer.trainer.training import train_trial

    splits = _worker_start(setup)
    test = make_dataset(
        splits.x_test, splits.y_test, batch_size=setup.batch_size, shuffle=False, seed=0
    )
    scores = []
    for seed in seeds:
        kept: dict[str, Any] = {}
        started = time.perf_counter()
        outcome = train_trial(
            _message(setup, architecture, seed, setup.final_epochs),
            splits,
            on_epoch=lambda epoch, metrics: "continue",
            stop=threading.Event(),
            keep_model=kept,
        )
        score = 0.0
        if outcome.state == "complete" and "model" in kept:
            _, accuracy = kept["model"].evaluate(test, verbose=0)
            score = float(accuracy)
        scores.append(score)
        log(
            f"[retrain] seed {seed}: test accuracy {score:.4f} "
            f"{time.perf_counter() - started:5.1f}s {architecture.summary()}"
        )
    return scores


class Jobs:
    """Runs each search and each retraining in a fresh process, one at a time (Keras keeps
    memory from every model built, and later trials slow down: see
    ``bench/search_efficiency.py``)."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self._retrained: dict[str, list[float]] = {}
        self._pool = ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1
        )

    def search(self, tool: str, seed: int, progress: str) -> Run:
        return self._pool.submit(search_job, self.setup, tool, seed, progress).result()

    def retrain(self, architecture: Architecture, seeds: Sequence[int]) -> list[float]:
        """Test scores of ``architecture`` on ``seeds``; an architecture is retrained once."""
        key = architecture.model_dump_json()
        if key not in self._retrained:
            job = self._pool.submit(retrain_job, self.setup, architecture, list(seeds))
            self._retrained[key] = job.result()
        return self._retrained[key]

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


# --- the report ------------------------------------------------------------------------------


def lower_median(values: Sequence[float]) -> float:
    """The lower median: a value of the list, finite while at least half are finite."""
    return sorted(values)[(len(values) - 1) // 2]


def minutes(seconds: float) -> str:
    return "never" if math.isinf(seconds) else f"{seconds / 60:.2f}"


def plot(
    runs: dict[str, list[Run]],
    budget: float,
    threshold: float | None,
    title: str,
    path: Path,
) -> None:
    """Median best-so-far val_accuracy per tool against minutes, quartiles shaded."""
    grid = np.linspace(0.0, budget, 241)
    fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=120)
    tops: list[float] = []
    lows: list[float] = []
    for tool, tool_runs in runs.items():
        curves = np.array([[run.best_at(t) for t in grid] for run in tool_runs])
        q1, mid, q3 = np.percentile(curves, [25, 50, 75], axis=0)
        name = NAMES[tool]
        ax.step(grid / 60, mid, where="post", color=COLORS[tool], lw=2, label=f"{name} median")
        ax.fill_between(grid / 60, q1, q3, step="post", color=COLORS[tool], alpha=0.15)
        tops.append(float(curves.max()))
        if (mid > 0).any():
            lows.append(float(mid[mid > 0].min()))
    if threshold is not None and threshold > 0:
        ax.axhline(threshold, color="grey", ls="--", lw=1, label="KerasTuner's median best")
    if lows:
        ax.set_ylim(max(0.0, min(lows) - 0.01), min(1.0, max(tops) + 0.005))
    ax.set_xlim(0, budget / 60)
    ax.set_xlabel("minutes of wall clock")
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
    parser.add_argument("--seeds", type=int, help="searches per tool (default 3; --quick: 1)")
    parser.add_argument(
        "--budget-minutes",
        type=float,
        help="wall clock of each search, in minutes (default 5; --quick: 1)",
    )
    parser.add_argument(
        "--epochs", type=int, help="epochs per trial, for every tool (default 2; --quick: 1)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    parser.add_argument(
        "--retrain-seeds",
        type=int,
        help="fresh training seeds each final model is retrained on (default 2; --quick: 1)",
    )
    parser.add_argument(
        "--final-epochs",
        type=int,
        help="epochs of each final model's retraining (default: --epochs)",
    )
    parser.add_argument(
        "--refine-epochs",
        type=int,
        help="MLOptimizer's training.refine.epochs, top 1 (default: 2 x --epochs)",
    )
    parser.add_argument(
        "--mloptimizer-trials",
        type=int,
        default=UNBOUNDED_TRIALS,
        help="MLOptimizer's budget.maxTrials: explored trials before its refine phase "
        f"(default {UNBOUNDED_TRIALS}: the timeout ends the search)",
    )
    parser.add_argument(
        "--hyperband-factor",
        type=int,
        help="KerasTuner Hyperband's factor (default 3, or 2 when --epochs is below 3)",
    )
    parser.add_argument(
        "--space",
        help="search file whose searchSpace every tool searches, or 'default' for the "
        "seed's full SearchSpace() (minutes a trial on a CPU) (default: "
        "examples/digits-quick.yaml, the same conditional space with CPU-sized ranges)",
    )
    parser.add_argument(
        "--tools",
        default=",".join(TOOLS),
        help=f"comma-separated subset of {','.join(TOOLS)} (default: all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 1 seed, 1-minute budgets, 1 epoch, 1 retrain seed",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=REPO / "bench" / "vs_peers.png",
        help="PNG of the curves (default: bench/vs_peers.png)",
    )
    parser.add_argument("--json", type=Path, help="also write every search's trials here")
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="keep the run folders here (MLOptimizer's runs/, KerasTuner's projects; "
        "default: a temporary folder, removed at the end)",
    )
    args = parser.parse_args()
    quick = args.quick
    args.seeds = args.seeds or (1 if quick else 3)
    args.budget_minutes = args.budget_minutes or (1.0 if quick else 5.0)
    args.epochs = args.epochs or (1 if quick else 2)
    args.retrain_seeds = args.retrain_seeds or (1 if quick else 2)
    args.final_epochs = args.final_epochs or args.epochs
    args.refine_epochs = args.refine_epochs or 2 * args.epochs
    args.hyperband_factor = args.hyperband_factor or (3 if args.epochs >= 3 else 2)
    args.space = None if args.space == "default" else Path(args.space or SMALL_SPACE)
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = sorted(set(args.tools) - set(TOOLS))
    if unknown or not args.tools:
        parser.error(f"--tools: unknown {unknown}; choose from {', '.join(TOOLS)}")
    if min(args.seeds, args.epochs, args.retrain_seeds, args.final_epochs) < 1:
        parser.error("--seeds, --epochs, --retrain-seeds and --final-epochs must be >= 1")
    if args.budget_minutes <= 0:
        parser.error("--budget-minutes must be positive")
    if args.refine_epochs <= args.epochs:
        parser.error("--refine-epochs must exceed --epochs (MLOptimizer's rule)")
    if args.hyperband_factor < 2:
        parser.error("--hyperband-factor must be >= 2")
    missing = [m for m in ("keras_tuner", "tensorboard") if not importlib.util.find_spec(m)]
    if any(t in KERAS_TUNERS for t in args.tools) and missing:
        parser.error(f'{", ".join(missing)} missing: pip install -e ".[bench]"')
    return args


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    tools: list[str] = args.tools
    space = load_search(args.space).spec.search_space if args.space else None
    with tempfile.TemporaryDirectory(prefix="vs-peers-") as tmp:
        work = (args.work_dir or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        setup = Setup(
            epochs=args.epochs,
            batch_size=args.batch_size,
            budget=args.budget_minutes * 60.0,
            space=space,
            refine_epochs=args.refine_epochs,
            mloptimizer_trials=args.mloptimizer_trials,
            hyperband_factor=args.hyperband_factor,
            final_epochs=args.final_epochs,
            threads=default_threads(1),
            work=work,
        )
        space_name = (
            "the default SearchSpace()"
            if args.space is None
            else str(args.space.resolve().relative_to(REPO))
            if args.space.resolve().is_relative_to(REPO)
            else str(args.space)
        )
        searches = args.seeds * len(tools)
        estimate = searches * (setup.budget + STARTUP_SECONDS) / 60
        print(
            f"time to accuracy on {DATASET} (3,500 train / 1,000 validation / 500 test images, "
            f"28x28x1); space {space_name} ({count_space(setup.sampled_space)}); "
            f"{args.epochs} epochs per trial, batch {args.batch_size}, float32, "
            f"{setup.threads} TensorFlow threads, one training at a time\n"
            f"{args.seeds} seeds x {len(tools)} tools, {args.budget_minutes:g} min of wall "
            f"clock per search; final models retrained {args.retrain_seeds}x for "
            f"{args.final_epochs} epochs; MLOptimizer: maxTrials {args.mloptimizer_trials}, "
            f"median pruner, refine top 1 for {args.refine_epochs} epochs; Hyperband: "
            f"max_epochs {args.epochs}, factor {args.hyperband_factor}",
            flush=True,
        )
        log(f"searches alone take about {estimate:.0f} min; retraining comes after")

        jobs = Jobs(setup)
        runs: dict[str, list[Run]] = {tool: [] for tool in tools}
        fresh = [FRESH_SEED - i for i in range(args.retrain_seeds)]
        try:
            # Tools alternate within each seed: a drift in machine speed hits them alike.
            done = 0
            for seed in range(1, args.seeds + 1):  # KerasTuner takes seed 0 for "unseeded"
                for tool in tools:
                    done += 1
                    progress = f"[{done}/{searches} {NAMES[tool]} s{seed}]"
                    log(f"{progress} searching for {args.budget_minutes:g} min")
                    runs[tool].append(jobs.search(tool, seed, progress))
                    log(f"{progress} done; {(time.perf_counter() - started) / 60:.1f} min so far")
            retrained: dict[tuple[str, int], list[float]] = {}
            for tool in tools:
                for run in runs[tool]:
                    if run.final is not None:
                        retrained[(tool, run.seed)] = jobs.retrain(run.final, fresh)
        finally:
            jobs.close()
        wall = time.perf_counter() - started
        report(args, setup, runs, retrained, wall)


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def report(
    args: argparse.Namespace,
    setup: Setup,
    runs: dict[str, list[Run]],
    retrained: dict[tuple[str, int], list[float]],
    wall: float,
) -> None:
    """The tables, the plot and the two target lines."""
    tools = list(runs)
    budget = setup.budget

    # --- per search ---
    print(
        f"\n(a) each search: trials finished within the budget / pruned / failed / cut by the "
        f"budget's end; best val_accuracy (last epoch) and when; final model's test accuracy "
        f"(mean ± sd over {args.retrain_seeds} retraining(s))"
    )
    print(
        f"{'search':<26} {'trials':>13} {'best val':>8} {'at min':>6} {'test':>16}  "
        "final model; note"
    )
    test_of: dict[tuple[str, int], float] = {}
    for tool in tools:
        for run in runs[tool]:
            best = run.best()
            counts = f"{len(run.points)}/{run.pruned}/{run.failed}/{run.cut}"
            scores = retrained.get((tool, run.seed))
            if scores:
                mean, sd = _mean_sd(scores)
                test_of[(tool, run.seed)] = mean
                test = f"{mean:.4f} ± {sd:.4f}"
            else:
                test = "-"
            final = run.final.summary() if run.final else "none"
            print(
                f"{run.label:<26} {counts:>13} "
                f"{(f'{best.value:.4f}' if best else '-'):>8} "
                f"{(f'{best.seconds / 60:.2f}' if best else '-'):>6} {test:>16}  "
                f"{final}" + (f"; {run.note}" if run.note else "")
            )
    if "mloptimizer" in tools:
        ran = sum(run.note.startswith("refine ran") for run in runs["mloptimizer"])
        print(f"MLOptimizer's refine phase ran in {ran}/{len(runs['mloptimizer'])} searches")

    # --- the curves ---
    marks = sorted({*np.arange(1.0, budget / 60, 1.0).tolist(), budget / 60})
    print("\n(b) best val_accuracy so far: median over seeds, at each minute")
    print(f"{'min':>6} " + " ".join(f"{NAMES[t]:>21}" for t in tools))
    for mark in marks:
        cells = [statistics.median(run.best_at(mark * 60) for run in runs[t]) for t in tools]
        print(f"{mark:>6.2f} " + " ".join(f"{c:>21.4f}" for c in cells))

    # --- medians and time to KerasTuner's median best ---
    median_best = {t: statistics.median(run.best_value() for run in runs[t]) for t in tools}
    median_test = {
        t: statistics.median(test_of.get((t, run.seed), 0.0) for run in runs[t]) for t in tools
    }
    kt_tools = [t for t in tools if t in KERAS_TUNERS]
    threshold: float | None = None
    kt_time = math.inf
    kt_ref = None
    if kt_tools:
        kt_ref = max(kt_tools, key=lambda t: median_best[t])
        threshold = median_best[kt_ref]
        kt_time = lower_median([run.time_to(threshold) for run in runs[kt_ref]])
    print(
        "\n(c) medians over seeds; time to reach KerasTuner's median best val_accuracy"
        + (
            f" ({threshold:.4f}, {NAMES[kt_ref]}'s) in minutes, lower median over seeds, and "
            f"its ratio to {NAMES[kt_ref]}'s own time"
            if kt_ref is not None and threshold is not None
            else " (no KerasTuner tool ran)"
        )
    )
    print(f"{'tool':<22} {'best val':>8} {'test':>8} {'to KT best':>10} {'ratio':>6}  per seed")
    ratios: dict[str, float] = {}
    for tool in tools:
        if threshold is not None and threshold > 0:
            times = [run.time_to(threshold) for run in runs[tool]]
            needed = lower_median(times)
            ratio = needed / kt_time if math.isfinite(kt_time) and kt_time > 0 else math.inf
            ratios[tool] = ratio
            per_seed = ", ".join(minutes(t) for t in times)
            reach, shown = minutes(needed), "-" if math.isinf(ratio) else f"{ratio:.2f}"
        else:
            per_seed, reach, shown = "", "-", "-"
        print(
            f"{NAMES[tool]:<22} {median_best[tool]:>8.4f} {median_test[tool]:>8.4f} "
            f"{reach:>10} {shown:>6}  {per_seed}"
        )

    title = (
        f"{DATASET}: best val_accuracy vs wall clock, median of {args.seeds} seed(s), "
        f"{args.epochs} epoch(s)/trial"
    )
    plot(runs, budget, threshold, title, args.plot)
    if args.json:
        data = {t: [run.to_json() for run in runs[t]] for t in tools}
        args.json.write_text(json.dumps(data, indent=1))
    print(f"\nplot: {args.plot}; whole bench {wall / 60:.1f} min")

    # --- the targets ---
    if "mloptimizer" not in tools:
        print("MLOptimizer did not run (--tools): no target lines")
        return
    peers = [t for t in tools if t != "mloptimizer"]
    if not peers:
        print("no peer ran (--tools): no target lines")
        return
    ours = median_best["mloptimizer"]
    beaten = [t for t in peers if median_best[t] > ours]
    shown_peers = ", ".join(f"{NAMES[t]} {median_best[t]:.4f}" for t in peers)
    print(
        f"MLOptimizer median best >= every peer's: {'met' if not beaten else 'not met'} "
        f"(val_accuracy {ours:.4f} vs {shown_peers}; test after retraining "
        f"{median_test['mloptimizer']:.4f} vs "
        + ", ".join(f"{NAMES[t]} {median_test[t]:.4f}" for t in peers)
        + ")"
    )
    ratio = ratios.get("mloptimizer", math.inf)
    shown = "-" if math.isinf(ratio) else f"{ratio:.2f}"
    met = "met" if ratio <= TIME_RATIO_TARGET else "not met"
    detail = (
        f"{minutes(lower_median([r.time_to(threshold) for r in runs['mloptimizer']]))} "
        f"vs {minutes(kt_time)} min to {threshold:.4f}"
        if threshold is not None and kt_ref is not None
        else "no KerasTuner run"
    )
    print(
        f"reaches KerasTuner's median best in <= {TIME_RATIO_TARGET}x KerasTuner's time: "
        f"ratio {shown} {met} ({detail})"
    )


if __name__ == "__main__":
    main()
