"""The Optuna study of a search: open or resume it, and read it back as trial records.

A search's study is named ``<namespace>.<name>`` and lives in any Optuna storage (SQLite
for a local run, PostgreSQL for the operator). What Optuna does not keep itself travels in
trial user attributes, under the names in :class:`Attr`; :func:`records` turns a study into
plain :class:`TrialRecord` values for the dispatch loop, the report and the status.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Literal

import optuna
from optuna.trial import FrozenTrial, TrialState

from mloptimizer.space import Architecture, build_pruner, build_sampler
from mloptimizer.spec import ArchitectureSearchSpec

__all__ = [
    "Attr",
    "StudyMismatch",
    "TrialRecord",
    "fingerprint",
    "open_study",
    "records",
    "storage_url",
    "study_name",
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
    ERROR = "error"
    RESULT = "result"  # the fields below, written at once when the result is told
    WORKER = "worker_id"
    DEVICE = "device"
    ATTEMPT = "attempt"
    SECONDS = "train_seconds"
    EPOCHS = "epochs_run"
    VAL_ACCURACY = "val_accuracy"
    VAL_LOSS = "val_loss"
    PARAMETERS = "parameter_count"
    COST = "cost_usd"
    # study attributes
    FINGERPRINT = "search_fingerprint"
    STARTED_AT = "started_at"


class StudyMismatch(ValueError):
    """The study exists but was created from a different search."""


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


# Fields a running study cannot change: its trials would stop being comparable.
_FIXED_FIELDS = ("dataset", "objective", "sampler", "search_space")


def fingerprint(spec: ArchitectureSearchSpec) -> dict[str, str]:
    """A short hash of each field that must not change once the study has trials."""
    fields = spec.model_dump(mode="json", by_alias=True, include=set(_FIXED_FIELDS))
    return {
        _camel(name): hashlib.sha256(
            json.dumps(fields[_camel(name)], sort_keys=True).encode()
        ).hexdigest()[:16]
        for name in _FIXED_FIELDS
    }


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def open_study(spec: ArchitectureSearchSpec, name: str, storage: str) -> optuna.Study:
    """Create the study, or load it when it exists and was made from the same search.

    Raises:
        StudyMismatch: the stored study's dataset, objective, sampler or search space
            differ from ``spec``; its trials could not be compared with new ones.
    """
    study = optuna.create_study(
        study_name=name,
        storage=storage_url(storage),
        sampler=build_sampler(spec.sampler),
        pruner=build_pruner(spec.pruner, spec.training),
        direction=spec.objective.study_direction,
        load_if_exists=True,
    )
    wanted = fingerprint(spec)
    stored = study.user_attrs.get(Attr.FINGERPRINT)
    if stored is None:
        study.set_user_attr(Attr.FINGERPRINT, wanted)
        study.set_user_attr(Attr.STARTED_AT, time.time())
    else:
        changed = sorted(k for k in wanted if stored.get(k) != wanted[k])
        if changed:
            raise StudyMismatch(
                f"study {name!r} was created from a search with a different "
                f"{', '.join('spec.' + c for c in changed)}; these cannot change once a study "
                "has trials: restore them, or start a new study (another --out folder or "
                "another metadata.name)"
            )
    return study


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
        trial_id=trial._trial_id,
        phase="refine" if attrs.get(Attr.PHASE) == "refine" else "explore",
        state=_STATES[trial.state],
        value=trial.value if trial.state == TrialState.COMPLETE else _pruned_value(trial),
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
    if trial.state == TrialState.PRUNED and trial.value is not None:
        return float(trial.value)
    return None


def records(study: optuna.Study) -> list[TrialRecord]:
    """Every trial of the study, in number order."""
    return [record(t) for t in study.get_trials(deepcopy=False)]
