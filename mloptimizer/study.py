"""The Optuna study of a search: open or resume it, and read it back as trial records.

A search's study is named ``<namespace>.<name>`` and lives in any Optuna storage (SQLite
for a local run, PostgreSQL for the operator). What Optuna does not keep itself travels in
trial user attributes, under the names in :class:`Attr`; :func:`records` turns a study into
plain :class:`TrialRecord` values for the dispatch loop, the report and the status.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import optuna
import sqlalchemy.exc
from optuna.trial import FrozenTrial, TrialState

from mloptimizer.capability import KEY_ATTR, new_key
from mloptimizer.changes import refusal
from mloptimizer.space import Architecture, build_pruner, build_sampler
from mloptimizer.spec import ArchitectureSearchSpec, Tradeoff
from mloptimizer.storage import SearchStorage

__all__ = [
    "SIZE_ATTRS",
    "Attr",
    "StudyMismatch",
    "TrialRecord",
    "best_of",
    "cached_frozen",
    "capability_key",
    "end_open_trials",
    "end_trial",
    "open_study",
    "pareto_front",
    "record",
    "records",
    "size_of",
    "storage_url",
    "stored_trial",
    "study_name",
    "study_pruner",
    "trial_id_of",
    "trial_seed",
]


class Attr:
    """Names of the trial and study user attributes MLOptimizer writes."""

    PHASE = "phase"  # explore | refine
    ARCHITECTURE = "architecture"
    REFINES = "refines"  # number of the explore trial a refine trial retrains
    RETRY_OF = "retry_of"  # number of the interrupted trial this one replaces
    RETRIES = "retries"  # how many times a trial gone silent was retried
    INTERRUPTED = "interrupted"  # failed only because the run stopped: not counted
    TOO_LARGE = "too_large"  # failed unsent: the model cannot fit a trainer's memory
    INFEASIBLE = "infeasible"  # why the trial breaks a device constraint: never the best
    MFLOPS = "mflops"
    MODEL_KB = "model_kb"
    ERROR = "error"
    RESULT = "result"  # the fields below, written at once when the result is told
    WORKER = "worker_id"
    DEVICE = "device"
    ATTEMPT = "attempt"
    RESUMED_AT = "resumed_at"  # epochs the ending attempt restored from a checkpoint
    REDONE_EPOCHS = "redone_epochs"  # epochs trained again after a trainer went away
    REDONE_USD = "redone_usd"  # ... and what they cost
    SAVED_USD = "saved_usd"  # epochs resumed attempts did not train again, in dollars
    SECONDS = "train_seconds"
    EPOCH_SECONDS = "epoch_seconds"  # an epoch's time after the first: no start-up costs
    FIXED_SECONDS = "fixed_seconds"  # the trial's time beyond its epochs at that pace
    EPOCHS = "epochs_run"
    VAL_ACCURACY = "val_accuracy"
    VAL_LOSS = "val_loss"
    PARAMETERS = "parameter_count"
    COST = "cost_usd"
    # study attributes
    SPEC = "spec"  # the spec the study runs under (the last accepted one)
    OWNER = "search_uid"  # the cluster object the study belongs to now
    FINGERPRINT = "search_fingerprint"  # what versions before SPEC stored
    STARTED_AT = "started_at"  # Unix time of the study's creation


class StudyMismatch(ValueError):
    """The study exists and cannot go on under the spec given.

    Attributes:
        stored: the spec the study runs under (None for a study of an older version).
        same_owner: the study belongs to the same search object (its uid), which was
            edited, rather than to an earlier search of the same name.
    """

    def __init__(
        self, message: str, stored: ArchitectureSearchSpec | None, same_owner: bool
    ) -> None:
        super().__init__(message)
        self.stored = stored
        self.same_owner = same_owner


def study_name(namespace: str, name: str) -> str:
    """The study (and queue) name of a search."""
    return f"{namespace}.{name}"


def storage_url(url: str) -> str:
    """The SQLAlchemy URL of a storage: plain ``postgresql://`` DSNs use psycopg2.

    SQLAlchemy 2.1 maps ``postgresql://`` to psycopg 3, which we do not ship; users (and
    Secrets) carry the standard DSN, so the driver is chosen here.
    """
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg2://" + url[len(scheme) :]
    return url


def trial_seed(sampler_seed: int | None, number: int) -> int:
    """The training seed of trial ``number``: fixed by the search's seed, distinct per trial."""
    return ((sampler_seed or 0) * 1_000_003 + number) % 2**31


def study_pruner(spec: ArchitectureSearchSpec) -> optuna.pruners.BasePruner:
    """The spec's pruner; none under a tradeoff (Optuna cannot prune multi-objective)."""
    if spec.objective.tradeoff:
        return optuna.pruners.NopPruner()
    return build_pruner(spec.pruner, spec.training)


# Optuna makes its tables (and alembic's) on the first open of a database. Two searches
# opened at once on a fresh database race to make them: in one process the lock orders
# them; across processes the loser's DDL fails ("already exists") and it tries again.
_SCHEMA_LOCK = threading.Lock()
_SCHEMA_RACE = (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError)


def _create_or_load(spec: ArchitectureSearchSpec, name: str, storage: str) -> optuna.Study:
    for attempt in range(3):
        try:
            with _SCHEMA_LOCK:
                return optuna.create_study(
                    study_name=name,
                    storage=_dispatcher_storage(storage),
                    sampler=build_sampler(spec.sampler),
                    pruner=study_pruner(spec),
                    directions=spec.objective.study_directions,
                    load_if_exists=True,
                )
        except _SCHEMA_RACE:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _dispatcher_storage(url: str) -> optuna.storages.BaseStorage:
    """The storage a dispatcher writes its study through: :class:`SearchStorage` on
    PostgreSQL and SQLite (the databases it writes in bulk), else Optuna's own."""
    backend = optuna.storages.RDBStorage(storage_url(url))
    if backend.engine.name in ("postgresql", "sqlite"):
        return SearchStorage(backend)
    return optuna.storages._CachedStorage(backend)


def open_study(
    spec: ArchitectureSearchSpec, name: str, storage: str, owner: str | None = None
) -> optuna.Study:
    """Create the study, or load it when it exists and ``spec`` may continue it.

    The study is opened for its dispatcher, its one writer: through
    :class:`~mloptimizer.storage.SearchStorage` (a few transactions a wave of trials).

    The study keeps the spec it runs under (a user attribute); a later spec may continue it
    only where :func:`~mloptimizer.changes.refusal` allows, the same rule as for a live
    edit under the operator, and becomes the stored one. ``owner`` (the search's uid in
    the cluster) is kept too, so that a refusal can tell an edited search from a new one
    that took an old name.

    Raises:
        StudyMismatch: the stored study's dataset, objective, sampler or search space (or
            the rest of what cannot change) differ from ``spec``: its trials could not be
            compared with new ones.
    """
    study = _create_or_load(spec, name, storage)
    stored = study.user_attrs.get(Attr.SPEC)
    previous = ArchitectureSearchSpec.model_validate(stored) if stored is not None else None
    same_owner = owner is not None and study.user_attrs.get(Attr.OWNER) == owner
    if stored is None and Attr.FINGERPRINT in study.user_attrs:  # made by an older version
        changed = sorted(
            k for k, v in legacy_fingerprint(spec).items()
            if study.user_attrs[Attr.FINGERPRINT].get(k) != v
        )  # fmt: skip
        why = f"{', '.join('spec.' + c for c in changed)} cannot change" if changed else None
    elif stored is None:
        why = None
        study.set_user_attr(Attr.STARTED_AT, time.time())
    else:
        assert previous is not None
        why = refusal(previous, spec)
    if why:
        raise StudyMismatch(
            f"study {name!r} cannot go on under this spec: {why}; restore the old values, "
            "or start a new study (another --out folder or another metadata.name)",
            previous,
            same_owner,
        )
    remember_spec(study, spec)
    held = len(study.get_trials(deepcopy=False))
    if held:  # resumed: a sampler seeded as before would repeat its start-up trials
        study.sampler = build_sampler(spec.sampler, resumed_at=held)
    previous_owner = study.user_attrs.get(Attr.OWNER)
    if owner is not None and previous_owner != owner:
        if previous_owner is not None:
            # An earlier search of this name was deleted: its trials in flight died with it.
            end_open_trials(study, "its search was deleted")
        study.set_user_attr(Attr.OWNER, owner)
    return study


def end_open_trials(study: optuna.Study, why: str) -> int:
    """Fail every trial still running or waiting (a deleted search's); returns how many.

    Failed as interrupted: they used no budget of a search that may take the name again.
    """
    ended = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        end_trial(study, trial, f"interrupted: {why}", interrupted=True)
        ended += 1
    return ended


def end_trial(
    study: optuna.Study,
    trial: optuna.trial.Trial | FrozenTrial,
    error: str,
    *,
    interrupted: bool = False,
    attrs: dict[str, Any] | None = None,
) -> None:
    """Fail ``trial`` with ``error``: the one write of every trial that ends without a result.

    ``interrupted``: it failed only because its run or search stopped, so it uses no budget
    (not counted toward ``maxFailedTrials``); ``attrs`` are written with it. A live trial
    is told (the sampler hears of it); a frozen one, which may still be waiting and cannot
    be told, is failed through the storage.
    """
    written = {**(attrs or {}), Attr.ERROR: error}
    if interrupted:
        written[Attr.INTERRUPTED] = True
    if isinstance(trial, optuna.trial.Trial):
        for key, value in written.items():
            trial.set_user_attr(key, value)
        study.tell(trial, state=TrialState.FAIL)
        return
    trial_id = trial_id_of(trial)
    for key, value in written.items():
        study._storage.set_trial_user_attr(trial_id, key, value)
    study._storage.set_trial_state_values(trial_id, TrialState.FAIL)


def remember_spec(study: optuna.Study, spec: ArchitectureSearchSpec) -> None:
    """Keep ``spec`` as the one the study runs under (on creation and accepted edits)."""
    dumped = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    if study.user_attrs.get(Attr.SPEC) != dumped:
        study.set_user_attr(Attr.SPEC, dumped)


def legacy_fingerprint(spec: ArchitectureSearchSpec) -> dict[str, str]:
    """The hashes older versions stored instead of the spec, to check their studies."""
    fixed = ("dataset", "objective", "sampler", "searchSpace")
    fields = spec.model_dump(mode="json", by_alias=True, include=set(fixed))
    return {
        name: hashlib.sha256(json.dumps(fields[name], sort_keys=True).encode()).hexdigest()[:16]
        for name in fixed
    }


# --- Optuna internals, named once ------------------------------------------------------
# The dispatch loop needs a few things Optuna keeps private: a live trial's frozen state
# (cached by the trial itself: no database round trip) and a trial by id.


def cached_frozen(trial: optuna.trial.Trial) -> FrozenTrial:
    """The frozen state a live trial caches (params and attributes as set so far)."""
    frozen: FrozenTrial = trial._cached_frozen_trial
    return frozen


def trial_id_of(trial: optuna.trial.Trial | FrozenTrial) -> int:
    """The trial's id, unique in the storage (``number`` is unique in the study)."""
    return int(trial._trial_id)


def stored_trial(study: optuna.Study, trial_id: int) -> FrozenTrial:
    """One trial as the storage has it now."""
    return study._storage.get_trial(trial_id)


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the dispatch loop, the report and the status see it."""

    number: int
    trial_id: int
    phase: Literal["explore", "refine"]
    state: Literal["waiting", "running", "complete", "pruned", "failed"]
    value: float | None
    architecture: Architecture | None
    params: dict[str, Any]
    interrupted: bool
    refines: int | None
    error: str | None
    seconds: float
    cost_usd: float
    attrs: dict[str, Any]

    @property
    def finished(self) -> bool:
        return self.state in ("complete", "pruned", "failed")

    @property
    def feasible(self) -> bool:
        """Whether the trial meets the search's device constraints (or it has none)."""
        return not self.attrs.get(Attr.INFEASIBLE)

    @property
    def family(self) -> str | None:
        """The architecture family sampled (its ``family`` parameter); None when the space
        has no such choice (a user's own model)."""
        family = self.params.get("family")
        return family if isinstance(family, str) else None

    @property
    def counted(self) -> bool:
        """Whether the trial uses up budget: an interrupted trial is replaced, not counted."""
        return not self.interrupted and self.state != "waiting"


_STATES: dict[TrialState, Literal["waiting", "running", "complete", "pruned", "failed"]] = {
    TrialState.WAITING: "waiting",
    TrialState.RUNNING: "running",
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
}


def record(trial: FrozenTrial) -> TrialRecord:
    """A :class:`TrialRecord` from Optuna's frozen trial."""
    attrs = dict(trial.user_attrs)
    attrs.update(attrs.pop(Attr.RESULT, None) or {})
    architecture = attrs.get(Attr.ARCHITECTURE)
    return TrialRecord(
        number=trial.number,
        trial_id=trial_id_of(trial),
        phase="refine" if attrs.get(Attr.PHASE) == "refine" else "explore",
        state=_STATES[trial.state],
        value=trial.values[0]
        if trial.state == TrialState.COMPLETE and trial.values
        else _pruned_value(trial),
        architecture=Architecture.model_validate(architecture) if architecture else None,
        params=dict(trial.params),
        interrupted=bool(attrs.get(Attr.INTERRUPTED, False)),
        refines=attrs.get(Attr.REFINES),
        error=attrs.get(Attr.ERROR),
        seconds=float(attrs.get(Attr.SECONDS, 0.0)),
        cost_usd=float(attrs.get(Attr.COST, 0.0)),
        attrs=attrs,
    )


def _pruned_value(trial: FrozenTrial) -> float | None:
    if trial.state == TrialState.PRUNED and trial.values:
        return float(trial.values[0])
    return None


def capability_key(study: optuna.Study) -> str:
    """The study's key for its trials' capability tokens (:mod:`mloptimizer.capability`),
    made on first use and kept as a study system attribute: trusted storage, never sent,
    and there for a restarted dispatcher that adopts trials in flight."""
    storage, study_id = study._storage, study._study_id
    key = storage.get_study_system_attrs(study_id).get(KEY_ATTR)
    if not isinstance(key, str):
        key = new_key()
        storage.set_study_system_attr(study_id, KEY_ATTR, key)
    return key


def records(study: optuna.Study) -> list[TrialRecord]:
    """Every trial of the study, in number order."""
    return [record(t) for t in study.get_trials(deepcopy=False)]


def best_of(
    trials: list[TrialRecord],
    direction: Literal["maximize", "minimize"],
    tradeoff: Tradeoff | None = None,
) -> TrialRecord | None:
    """The best complete feasible trial: the highest (or lowest) value, then (under a
    tradeoff) the smallest, then the earliest.

    The one definition of "the best trial" for the dispatch loop, the status, the console
    and the report, so that they never name two different trials of equal value. Under a
    tradeoff it is the Pareto front's most accurate member.
    """
    complete = [t for t in trials if t.state == "complete" and t.value is not None and t.feasible]
    if not complete:
        return None
    sign = -1.0 if direction == "maximize" else 1.0

    def size(t: TrialRecord) -> float:
        found = size_of(t, tradeoff) if tradeoff else None
        return found if found is not None else 0.0

    return min(complete, key=lambda t: (sign * float(t.value or 0.0), size(t), t.number))


# The trial attribute holding each tradeoff's size figure.
SIZE_ATTRS: dict[Tradeoff, str] = {
    "params": Attr.PARAMETERS,
    "mflops": Attr.MFLOPS,
    "modelKB": Attr.MODEL_KB,
    "costUSD": Attr.COST,
}


def size_of(trial: TrialRecord, tradeoff: Tradeoff) -> float | None:
    """The trial's size figure of ``tradeoff`` (parameters, MFLOPs, int8 KB or its dollars),
    if known."""
    value = trial.attrs.get(SIZE_ATTRS[tradeoff])
    return float(value) if value is not None else None


def pareto_front(
    trials: list[TrialRecord], direction: Literal["maximize", "minimize"], tradeoff: Tradeoff
) -> list[TrialRecord]:
    """The complete feasible trials no other one beats on both accuracy and size, most
    accurate first (as :func:`best_of` orders them): Optuna's ``best_trials`` of the study, read
    from records so that the status and report need no second query."""
    sign = -1.0 if direction == "maximize" else 1.0
    points = [
        (sign * float(t.value), size, t)
        for t in trials
        if t.state == "complete" and t.value is not None and t.feasible
        and (size := size_of(t, tradeoff)) is not None
    ]  # fmt: skip
    # One sweep, most accurate first (the status asks each second, over every trial): a
    # trial is on the front when it is the smallest of its accuracy and smaller than
    # every more accurate one; equal trials are all on it, as in Optuna.
    front: list[TrialRecord] = []
    smaller_than = math.inf  # the smallest size of the more accurate trials
    points.sort(key=lambda p: (p[0], p[1], p[2].number))
    for _, group in itertools.groupby(points, key=lambda p: p[0]):
        tied = list(group)
        least = tied[0][1]
        if least < smaller_than:
            front += [t for _, size, t in tied if size == least]
            smaller_than = least
    return front
