"""TPE over a bounded history (mloptimizer/sampling.py): what the window keeps, and that
within it the sampler proposes exactly what Optuna's TPE does."""

from __future__ import annotations

import warnings
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.study import StudyDirection
from optuna.trial import TrialState, create_trial

from mloptimizer.sampling import BEST, RECENT, WindowedTPESampler, history_window

optuna.logging.set_verbosity(optuna.logging.WARNING)
X: dict[str, BaseDistribution] = {"x": FloatDistribution(0.0, 1.0)}


def study_with(
    values: list[float | None], infeasible: frozenset[int] = frozenset()
) -> optuna.Study:
    """Trials numbered in order: a value is complete, None is pruned; then two running."""
    study = optuna.create_study(direction="maximize")
    for number, value in enumerate(values):
        study.add_trial(
            create_trial(
                state=TrialState.COMPLETE if value is not None else TrialState.PRUNED,
                value=value,
                params={"x": 0.5},
                distributions=X,
                system_attrs={"constraints:kb": 1.0 if number in infeasible else -1.0},
            )
        )
    for _ in range(2):
        study.ask(X)
    return study


def test_a_short_history_is_weighed_whole() -> None:
    study = study_with([0.1 * (i % 7) for i in range(BEST + RECENT)])
    trials = study.get_trials(deepcopy=False)
    assert history_window(trials, StudyDirection.MAXIMIZE) == trials


def test_a_long_history_keeps_the_best_the_recent_and_those_in_flight() -> None:
    n = 1000
    values: list[float | None] = [float(i % 100) / 100 for i in range(n)]
    values[10] = 5.0  # the best, but infeasible: not among the good ones
    values[20] = None  # pruned, long ago
    study = study_with(values, infeasible=frozenset({10}))
    trials = study.get_trials(deepcopy=False)
    window = history_window(trials, StudyDirection.MAXIMIZE)
    numbers = [t.number for t in window]
    assert numbers == sorted(numbers)  # the study's order
    running = [t.number for t in window if t.state == TrialState.RUNNING]
    assert running == [n, n + 1]
    recent = set(range(n - RECENT, n))
    assert recent <= set(numbers)
    feasible = [t for t in trials if t.value is not None and t.number != 10]
    best = {t.number for t in sorted(feasible, key=lambda t: -float(t.value or 0))[:BEST]}
    assert best <= set(numbers)  # the 25 best feasible: 0.99s and 0.98s, some of them recent
    old = {t.number for t in window if t.number not in recent and t.state != TrialState.RUNNING}
    assert old == best - recent
    assert 10 not in numbers  # infeasible
    assert 20 not in numbers  # pruned, and not recent
    minimized = history_window(trials, StudyDirection.MINIMIZE)
    lowest = {t.number for t in sorted(feasible, key=lambda t: float(t.value or 0))[:BEST]}
    kept = {t.number for t in minimized if t.number not in recent}
    assert kept - {n, n + 1} == lowest - recent  # minimizing, the 25 lowest are the good


def tpe(windowed: bool, **options: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        kind = WindowedTPESampler if windowed else optuna.samplers.TPESampler
        return kind(
            seed=3, n_startup_trials=5, multivariate=True, group=True, constant_liar=True,
            **options,
        )  # fmt: skip


def proposals(sampler: optuna.samplers.BaseSampler, trials: int) -> list[dict[str, Any]]:
    """What the sampler proposes in a conditional space, two trials in flight at a time."""
    study = optuna.create_study(direction="maximize", sampler=sampler)
    running: list[optuna.trial.Trial] = []
    for _ in range(trials):
        trial = study.ask()
        trial.suggest_float("x", -3, 3)
        branch = trial.suggest_categorical("branch", ["a", "b"])
        trial.suggest_int(f"y_{branch}", 1, 9)
        running.append(trial)
        if len(running) == 2:
            done = running.pop(0)
            p = done.params
            bonus = 0.1 * p["y_a"] if p["branch"] == "a" else 0.0
            study.tell(done, -((p["x"] - 1) ** 2) + bonus)
    return [t.params for t in study.trials]


def test_within_the_window_it_proposes_exactly_what_optunas_tpe_does() -> None:
    assert proposals(tpe(True), 60) == proposals(tpe(False), 60)


def test_past_the_window_it_samples_against_the_window_only() -> None:
    sampler = tpe(True, best=3, recent=10)  # a small window, to pass it quickly
    seen: list[int] = []
    view = sampler._view

    def watched(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> Any:
        window = view(study, trial)
        seen.append(len(window._get_trials(deepcopy=False)))
        return window

    sampler._view = watched
    params = proposals(sampler, 40)
    assert len(params) == 40
    assert max(seen) <= 3 + 10 + 2  # the best, the recent and those in flight
    assert seen[-1] < 38


def test_a_multi_objective_study_is_not_windowed() -> None:
    sampler = tpe(True, best=1, recent=1)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)), 12)
    trial = study.ask()
    assert sampler._view(study, trial._cached_frozen_trial) is study
