"""The bulk SQL of :class:`~mloptimizer.storage.SearchStorage`: a wave's trials created in
one statement, and any number of trials' writes in one transaction of a few statements.

Optuna's relational storage writes a row at a time, each in its own commit; these write
the same rows in Optuna's own tables (so any Optuna reader sees the study as its own), a
table at a time, with the trials locked and checked once.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy.dialects.postgresql
import sqlalchemy.dialects.sqlite
from optuna.distributions import BaseDistribution, distribution_to_json
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState

__all__ = ["Pending", "Write", "commit", "create_running"]


@dataclass
class Pending:
    """Writes of one trial not in the database yet."""

    params: dict[str, tuple[float, BaseDistribution]] = field(default_factory=dict)
    user_attrs: dict[str, Any] = field(default_factory=dict)
    system_attrs: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.params or self.user_attrs or self.system_attrs)


@dataclass
class Write:
    """One trial's writes for one transaction: what was pending, and a step or its end."""

    trial_id: int
    pending: Pending
    state: TrialState | None = None
    values: Sequence[float] | None = None
    now: datetime.datetime | None = None
    step: tuple[int, float] | None = None


def create_running(backend: RDBStorage, study_id: int, first: int, count: int) -> list[FrozenTrial]:
    """Create ``count`` running trials numbered from ``first`` in one transaction, the
    study locked as Optuna locks it to number a trial; the trials as Optuna would read
    them back."""
    now = datetime.datetime.now()
    with _create_scoped_session(backend.scoped_session) as session:
        models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
        rows = [
            models.TrialModel(
                study_id=study_id,
                number=first + i,
                state=TrialState.RUNNING,
                datetime_start=now,
            )
            for i in range(count)
        ]
        session.add_all(rows)
        session.flush()
        return [
            FrozenTrial(
                number=int(row.number),
                state=TrialState.RUNNING,
                value=None,
                values=None,
                datetime_start=now,
                datetime_complete=None,
                params={},
                distributions={},
                user_attrs={},
                system_attrs={},
                intermediate_values={},
                trial_id=int(row.trial_id),
            )
            for row in rows
        ]


@dataclass
class _Rows:
    """The rows of a list of writes, a table each; later writes of a trial override
    earlier ones (keyed rows), as Optuna's one-by-one writes would."""

    params: list[models.TrialParamModel] = field(default_factory=list)
    user_attrs: dict[tuple[int, str], str] = field(default_factory=dict)
    system_attrs: dict[tuple[int, str], str] = field(default_factory=dict)
    steps: dict[tuple[int, int], tuple[float | None, Any]] = field(default_factory=dict)
    values: list[models.TrialValueModel] = field(default_factory=list)


def _rows(writes: list[Write]) -> _Rows:
    rows = _Rows()
    for w in writes:
        rows.params += [
            models.TrialParamModel(
                trial_id=w.trial_id,
                param_name=name,
                param_value=value,
                distribution_json=distribution_to_json(distribution),
            )
            for name, (value, distribution) in w.pending.params.items()
        ]
        for key, value in w.pending.user_attrs.items():
            rows.user_attrs[(w.trial_id, key)] = json.dumps(value)
        for key, value in w.pending.system_attrs.items():
            rows.system_attrs[(w.trial_id, key)] = json.dumps(value)
        if w.step is not None:
            stored = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(w.step[1])
            rows.steps[(w.trial_id, w.step[0])] = stored
        for objective, value in enumerate(w.values or ()):
            stored_value, value_type = models.TrialValueModel.value_to_stored_repr(float(value))
            rows.values.append(
                models.TrialValueModel(
                    trial_id=w.trial_id,
                    objective=objective,
                    value=stored_value,
                    value_type=value_type,
                )
            )
    return rows


def commit(
    backend: RDBStorage, writes: list[Write], check: Callable[[int, TrialState], None]
) -> None:
    """One transaction, a few statements whatever the number of writes: the trials
    locked and checked at once (``check`` raises for a trial that may not change), then
    each table's rows in one statement."""
    ids = sorted({w.trial_id for w in writes})
    rows = _rows(writes)
    with _create_scoped_session(backend.scoped_session) as session:
        trials: dict[int, Any] = {
            int(row.trial_id): row
            for row in session.query(models.TrialModel)
            .filter(models.TrialModel.trial_id.in_(ids))
            .with_for_update()
        }
        for trial_id in ids:
            if trial_id not in trials:
                raise KeyError(f"no trial with id {trial_id}")
            check(trial_id, trials[trial_id].state)
        session.add_all(rows.params)
        session.add_all(rows.values)  # a trial's values are written once, when it ends
        session.flush()
        _upsert(backend, session, models.TrialUserAttributeModel, rows.user_attrs)
        _upsert(backend, session, models.TrialSystemAttributeModel, rows.system_attrs)
        if rows.steps:
            table = models.TrialIntermediateValueModel.__table__
            statement = _insert(backend, table).values(
                [
                    {
                        "trial_id": trial_id,
                        "step": step,
                        "intermediate_value": value,
                        "intermediate_value_type": kind,
                    }
                    for (trial_id, step), (value, kind) in rows.steps.items()
                ]
            )
            session.execute(
                statement.on_conflict_do_update(
                    index_elements=["trial_id", "step"],
                    set_={
                        "intermediate_value": statement.excluded.intermediate_value,
                        "intermediate_value_type": statement.excluded.intermediate_value_type,
                    },
                )
            )
        for w in writes:
            if w.state is not None:
                trials[w.trial_id].state = w.state
                if w.state.is_finished():
                    trials[w.trial_id].datetime_complete = w.now


def _insert(backend: RDBStorage, table: Any) -> Any:
    """An INSERT that can update on conflict, in the database's dialect."""
    dialect = backend.engine.name
    if dialect == "postgresql":
        return sqlalchemy.dialects.postgresql.insert(table)
    if dialect == "sqlite":
        return sqlalchemy.dialects.sqlite.insert(table)
    raise NotImplementedError(
        f"SearchStorage writes PostgreSQL and SQLite studies, not {dialect}: use a "
        "postgresql:// or sqlite:/// storage URL"
    )


def _upsert(
    backend: RDBStorage, session: Any, model: Any, rows: dict[tuple[int, str], str]
) -> None:
    if not rows:
        return
    statement = _insert(backend, model.__table__).values(
        [{"trial_id": t, "key": k, "value_json": v} for (t, k), v in rows.items()]
    )
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["trial_id", "key"],
            set_={"value_json": statement.excluded.value_json},
        )
    )
