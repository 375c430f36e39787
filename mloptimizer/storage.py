"""The Optuna storage a dispatcher writes its study through: a few transactions a wave.

Optuna's relational storage commits every write on its own and reads a running trial back
from the database at each ask and tell: about 49 statements and 20 commits a trial in the
seed's space (one per suggested parameter). A search's study has one writer, the dispatch
loop of its search (the operator's, or ``mloptimizer run``'s), so :class:`SearchStorage`
keeps the study in memory, answers every read from there, and writes a trial at three
points, in Optuna's own tables (optuna-dashboard, ``mloptimizer report --storage`` and
``optuna.load_study`` read it as any study):

1. ``ask`` creates the trial: Optuna's own insert, or one of the trials :meth:`reserve`
   created together for a wave (numbered as Optuna numbers them);
2. :func:`persist`, once the broker confirmed the trial, writes its parameters and the
   attributes set so far (the architecture);
3. the tell writes the result attributes, constraint values, values and final state.

Intermediate values (one per epoch) are written as they come, with anything pending.
Inside :meth:`SearchStorage.batch` the writes of points 2 and 3 (and epoch values) wait for
the end of the block and go in one transaction of a few statements: the dispatcher batches
the trials of a wave and the messages received together, and acks those only after.

What a crash loses is what the dispatcher can recover: a trial created but never persisted
is a running trial without its architecture, which recovery interrupts (uncounted) and
replaces. Readers in other processes see a trial's parameters from point 2 on. A second
writer of the same study (two dispatchers of one search) is not supported, as before.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import threading
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import optuna
from optuna.distributions import BaseDistribution, check_distribution_compatibility
from optuna.storages import BaseStorage, RDBStorage
from optuna.study import StudyDirection
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial, TrialState

from mloptimizer import storage_sql
from mloptimizer.storage_sql import Pending, Write

__all__ = ["SearchStorage", "batched", "persist"]


@dataclass
class _Study:
    """A study's trials as this process last wrote them (the database lags by Pending)."""

    trials: dict[int, FrozenTrial]  # by number, in number order
    distributions: dict[str, BaseDistribution]  # each parameter's, for Optuna's check


class _Reads(BaseStorage):
    """The reading side of :class:`SearchStorage`: Optuna's reads of trials answered from
    the trials kept here (a study's read from the database once, on first use); study-level
    data (names, attributes, directions) straight from ``backend``. The writes are
    :class:`SearchStorage`'s."""

    def __init__(self, backend: RDBStorage) -> None:
        self.backend = backend
        self._studies: dict[int, _Study] = {}
        self._where: dict[int, tuple[int, int]] = {}  # trial id -> (study id, number)
        self._directions: dict[int, list[StudyDirection]] = {}
        self._lock = threading.RLock()

    # --- studies: the database's --------------------------------------------------------

    def create_new_study(
        self, directions: Sequence[StudyDirection], study_name: str | None = None
    ) -> int:
        return self.backend.create_new_study(directions, study_name)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self.backend.set_study_user_attr(study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self.backend.set_study_system_attr(study_id, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        return self.backend.get_study_id_from_name(study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self.backend.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        if study_id not in self._directions:  # fixed when the study is made
            self._directions[study_id] = self.backend.get_study_directions(study_id)
        return list(self._directions[study_id])

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self.backend.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self.backend.get_study_system_attrs(study_id)

    def get_all_studies(self) -> list[FrozenStudy]:
        return self.backend.get_all_studies()

    def remove_session(self) -> None:
        self.backend.remove_session()

    # --- trials: kept here ----------------------------------------------------------------

    def _study(self, study_id: int) -> _Study:
        study = self._studies.get(study_id)
        if study is None:
            loaded = self.backend.get_all_trials(study_id, deepcopy=False)
            distributions: dict[str, BaseDistribution] = {}
            for trial in loaded:
                for name, distribution in trial.distributions.items():
                    distributions.setdefault(name, distribution)
                self._where[trial._trial_id] = (study_id, trial.number)
            study = _Study({t.number: t for t in loaded}, distributions)
            self._studies[study_id] = study
        return study

    def _trial(self, trial_id: int) -> FrozenTrial:
        study_id, number = self._where[trial_id]
        return self._studies[study_id].trials[number]

    def _replace(self, trial: FrozenTrial) -> None:
        study_id, number = self._where[trial._trial_id]
        self._studies[study_id].trials[number] = trial

    def _add(self, study_id: int, trial: FrozenTrial) -> None:
        """Keep a new trial, the trials staying in number order (samplers assume it): a
        trial created while others were reserved has a higher number than theirs."""
        study = self._studies[study_id]
        self._where[trial._trial_id] = (study_id, trial.number)
        last = next(reversed(study.trials), -1)
        study.trials[trial.number] = trial
        if trial.number < last:
            study.trials = dict(sorted(study.trials.items()))

    def _known(self, trial_id: int) -> bool:
        return trial_id in self._where

    def _updatable(self, trial_id: int) -> FrozenTrial:
        trial = self._trial(trial_id)
        self.check_trial_is_updatable(trial_id, trial.state)
        return trial

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        with self._lock:
            trial = self._study(study_id).trials.get(trial_number)
            if trial is None:
                raise KeyError(f"no trial {trial_number} in study {study_id}")
            return int(trial._trial_id)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        with self._lock:
            if not self._known(trial_id):
                return self.backend.get_trial(trial_id)
            return _detached(self._trial(trial_id))

    def get_all_trials(
        self,
        study_id: int,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
    ) -> list[FrozenTrial]:
        with self._lock:
            trials = list(self._study(study_id).trials.values())
        if states is not None:
            trials = [t for t in trials if t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials


class SearchStorage(_Reads):
    """Optuna's relational storage for a study with one writer; see the module docstring.

    The reads are :class:`_Reads`'s; here, the writes of trials: kept pending, written at
    the three points, together inside :meth:`batch` (the statements: :mod:`storage_sql`).
    """

    def __init__(self, backend: RDBStorage) -> None:
        super().__init__(backend)
        self._pending: dict[int, Pending] = {}
        self._batch: list[Write] | None = None  # inside batch(): written at its end
        self._reserved: dict[int, list[FrozenTrial]] = {}  # created for the next asks

    def delete_study(self, study_id: int) -> None:
        with self._lock:
            study = self._studies.pop(study_id, None)
            for trial in study.trials.values() if study else ():
                self._where.pop(trial._trial_id, None)
                self._pending.pop(trial._trial_id, None)
        self.backend.delete_study(study_id)

    def reserve(self, study_id: int, count: int) -> None:
        """Create ``count`` running trials in one transaction for the next asks: a wave of
        trials costs one commit, not one each. Numbered as Optuna numbers them (in order
        of creation); a trial left reserved when its process dies is running without an
        architecture, which the dispatcher's recovery interrupts (not counted)."""
        with self._lock:
            study = self._study(study_id)
            pool = self._reserved.setdefault(study_id, [])
            missing = count - len(pool)
            if missing <= 0:
                return
            first = len(study.trials) + len(pool)
            pool += storage_sql.create_running(self.backend, study_id, first, missing)

    def release(self, study_id: int) -> list[int]:
        """The trials reserved and not asked for, handed over (running) for the caller to
        end; their ids."""
        with self._lock:
            pool = self._reserved.pop(study_id, [])
            for trial in pool:
                self._add(study_id, trial)
            return [int(t._trial_id) for t in pool]

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        with self._lock:
            study = self._study(study_id)
            pool = self._reserved.get(study_id)
            if template_trial is None and pool:
                trial = pool.pop(0)
                self._add(study_id, trial)
                return int(trial._trial_id)
            created = self.backend._create_new_trial(study_id, template_trial)
            self._add(study_id, created)
            for name, distribution in created.distributions.items():
                study.distributions.setdefault(name, distribution)
            return int(created._trial_id)

    def set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: BaseDistribution,
    ) -> None:
        with self._lock:
            if not self._known(trial_id):
                self.backend.set_trial_param(
                    trial_id, param_name, param_value_internal, distribution
                )
                return
            trial = copy.copy(self._updatable(trial_id))
            study = self._studies[self._where[trial_id][0]]
            previous = study.distributions.get(param_name)
            if previous is not None:
                check_distribution_compatibility(previous, distribution)
            else:
                study.distributions[param_name] = distribution
            trial.params = {
                **trial.params,
                param_name: distribution.to_external_repr(param_value_internal),
            }
            trial.distributions = {**trial.distributions, param_name: distribution}
            self._pending.setdefault(trial_id, Pending()).params[param_name] = (
                param_value_internal,
                distribution,
            )
            self._replace(trial)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._set_attr(trial_id, "user_attrs", key, value, self.backend.set_trial_user_attr)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._set_attr(trial_id, "system_attrs", key, value, self.backend.set_trial_system_attr)

    def _set_attr(
        self,
        trial_id: int,
        kind: Literal["user_attrs", "system_attrs"],
        key: str,
        value: Any,
        unknown: Callable[[int, str, Any], None],
    ) -> None:
        """Set a user or system attribute (``kind``: the name on the trial and in
        :class:`Pending`), pending; a trial not kept here goes to ``unknown`` at once."""
        with self._lock:
            if not self._known(trial_id):
                unknown(trial_id, key, value)
                return
            trial = copy.copy(self._updatable(trial_id))
            setattr(trial, kind, {**getattr(trial, kind), key: value})
            getattr(self._pending.setdefault(trial_id, Pending()), kind)[key] = value
            self._replace(trial)

    def set_trial_intermediate_value(
        self, trial_id: int, step: int, intermediate_value: float
    ) -> None:
        with self._lock:
            if not self._known(trial_id):
                self.backend.set_trial_intermediate_value(trial_id, step, intermediate_value)
                return
            trial = copy.copy(self._updatable(trial_id))
            self._write(trial_id, step=(step, intermediate_value))
            trial.intermediate_values = {**trial.intermediate_values, step: intermediate_value}
            self._replace(trial)

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        with self._lock:
            if not self._known(trial_id):
                return self.backend.set_trial_state_values(trial_id, state, values)
            if state == TrialState.RUNNING:
                # Only a waiting (enqueued) trial starts; Optuna's own update checks it.
                if not self.backend.set_trial_state_values(trial_id, state, values):
                    return False
                self._replace(self.backend.get_trial(trial_id))
                return True
            trial = copy.copy(self._updatable(trial_id))
            now = datetime.datetime.now()
            self._write(trial_id, state=state, values=values, now=now)
            trial.state = state
            if values is not None:
                trial.values = [float(v) for v in values]
            if state.is_finished():
                trial.datetime_complete = now
            self._replace(trial)
            return True

    def persist(self, trial_id: int) -> None:
        """Write what is pending of a trial (its parameters and attributes) now."""
        with self._lock:
            if self._pending.get(trial_id):
                self._write(trial_id)

    def _write(
        self,
        trial_id: int,
        *,
        state: TrialState | None = None,
        values: Sequence[float] | None = None,
        now: datetime.datetime | None = None,
        step: tuple[int, float] | None = None,
    ) -> None:
        """Write the trial's pending writes and, if given, a step or its end: now, in one
        transaction, or inside :meth:`batch` at its end.

        Pending writes are dropped only once committed (or queued): after a lost database
        the next write still has them; a dispatcher that lost one reopens the study.
        """
        write = Write(trial_id, self._pending.get(trial_id) or Pending(), state, values, now, step)
        if self._batch is not None:
            self._batch.append(write)
        else:
            self._commit([write])
        self._pending.pop(trial_id, None)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Write everything written inside in one transaction at the end (the dispatcher's
        handling of the messages received together, or a wave of trials dispatched).

        Readers here see each write at once; the database at the end. When the block or
        the commit raises, nothing of it is written: the caller reopens the study (as after
        any lost connection) and rebuilds from what the database holds.
        """
        with self._lock:
            if self._batch is not None:  # nested: the outer batch writes it
                yield
                return
            self._batch = []
            try:
                yield
                queued = self._batch
            finally:
                self._batch = None
            if queued:
                self._commit(queued)

    def _commit(self, writes: list[Write]) -> None:
        """Write ``writes`` in one transaction (:func:`storage_sql.commit`)."""
        storage_sql.commit(self.backend, writes, self.check_trial_is_updatable)


def _detached(trial: FrozenTrial) -> FrozenTrial:
    """A copy a caller may change: a live ``optuna.Trial`` adds to its frozen trial's dicts."""
    copied = copy.copy(trial)
    copied.params = dict(trial.params)
    copied.distributions = dict(trial.distributions)
    copied.user_attrs = dict(trial.user_attrs)
    copied.system_attrs = dict(trial.system_attrs)
    copied.intermediate_values = dict(trial.intermediate_values)
    return copied


@contextlib.contextmanager
def batched(study: optuna.Study) -> Iterator[None]:
    """:meth:`SearchStorage.batch` of the study's storage; other storages write at once."""
    storage = study._storage
    if isinstance(storage, SearchStorage):
        with storage.batch():
            yield
    else:
        yield


def persist(study: optuna.Study, trial_id: int) -> None:
    """Write a trial's pending parameters and attributes, when the study's storage waits
    for it (:class:`SearchStorage`); other storages wrote them already."""
    storage = study._storage
    if isinstance(storage, SearchStorage):
        storage.persist(trial_id)
