"""The ledger of a study's trials as the dispatch loop keeps them, and every write that
ends one: its result told, or failed, interrupted (and enqueued again) or cancelled.

Which trials are in flight, which were told (their copies are dropped), how many wait in
the queue the study hands out first, and the finished ones counted by state
(:class:`Counts`). A trial leaves the ledger by one of its methods, each of which tells
the study, marks it told and counts it, so that no trial ends twice or stays running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import optuna
from optuna.trial import TrialState

from mloptimizer.dispatch import judgements
from mloptimizer.dispatch.contract import Counts
from mloptimizer.faults import transient
from mloptimizer.messages import ResultMessage, TrialMessage
from mloptimizer.sizing import ModelSize
from mloptimizer.spec import ArchitectureSearchSpec
from mloptimizer.storage import SearchStorage
from mloptimizer.study import (
    Attr,
    TrialRecord,
    best_of,
    end_trial,
    record,
    records,
    stored_trial,
    trial_id_of,
)

__all__ = ["InFlight", "Ledger", "epoch_pace", "fixed_seconds"]

log = logging.getLogger(__name__)


@dataclass
class InFlight:
    """A trial sent to the trainers and not yet told."""

    trial: optuna.trial.Trial
    message: TrialMessage
    record: TrialRecord
    sent_at: float
    last_heard: float
    reported: set[int] = field(default_factory=set)  # epochs already reported to Optuna
    heard: bool = False  # a trainer has sent progress: the trial is being trained
    furthest: int = 0  # the last epoch any attempt told
    furthest_at_death: int = 0  # ... when its delivery limit last ran out
    revivals: int = 0  # times it was sent again after that, having got further
    trained: set[tuple[int, int]] = field(default_factory=set)  # (attempt, epoch) trained
    replayed: dict[int, int] = field(default_factory=dict)  # attempt: checkpoint epoch
    taken_at: float | None = None  # when the trials queue was first seen without it
    heard_at: dict[int, float] = field(default_factory=dict)  # epoch: when it was told

    def told(self, attempt: int, epoch: int, replay: bool) -> None:
        """Note an epoch a trainer told: how far the trial got, and what each attempt
        trained (``replay``: a resumed attempt's checkpoint epoch, trained before)."""
        self.furthest = max(self.furthest, epoch)
        if replay:
            self.replayed[attempt] = epoch
        else:
            self.trained.add((attempt, epoch))
            self.heard_at[epoch] = self.last_heard

    def epoch_seconds(self) -> float | None:
        """An epoch's time from the first epoch told to the last: without what only the
        first pays (a trainer's warm-up, the dataset's load, building the model), which
        would make every later estimate too long. None before two epochs were told."""
        if len(self.heard_at) < 2:
            return None
        first, last = min(self.heard_at), max(self.heard_at)
        return (self.heard_at[last] - self.heard_at[first]) / (last - first)

    def fixed_seconds(self, now: float, pace: float) -> float | None:
        """What the trial took at ``now`` beyond its epochs at ``pace``: its first epoch's
        excess over the others (building the model, the first step's tracing) and the time
        from its last epoch to its result (``fit``'s teardown, measuring the model): on 2 CPU
        cores, 2-6 s for a small CNN, 5-15 s for an Inception model beside 15-40 s epochs.
        None when more than one attempt trained it, or one resumed from a checkpoint: its
        clock is then not one run's."""
        if self.replayed or len({attempt for attempt, _ in self.trained}) != 1:
            return None
        if len(self.heard_at) < 2:
            return None
        first, last = min(self.heard_at), max(self.heard_at)
        began = self.taken_at if self.taken_at is not None else self.sent_at
        start = self.heard_at[first] - began - first * pace
        return max(0.0, start) + max(0.0, now - self.heard_at[last])

    def goes_on(self, exhausted: bool) -> bool:
        """Its delivery limit ran out (every delivery's trainer went away, ``exhausted``):
        whether it got further than the last time that happened. Then its checkpoint goes
        forward (preempted or killed machines, not a poison model) and it is sent again
        with a fresh delivery count: at most once per epoch gained."""
        if not exhausted or self.furthest <= self.furthest_at_death:
            return False
        self.furthest_at_death = self.furthest
        self.revivals += 1
        return True

    def death(self, reason: str, exhausted: bool) -> str:
        """Why a trial given up on fails (:meth:`goes_on` said no)."""
        why = f"dead-lettered: {reason}"
        if exhausted and self.revivals:
            why += f"; sent {self.revivals + 1} times, it never got past epoch {self.furthest}"
        return why


# Trainers the ledger remembers as warm: a bound on what a search's trainers can make the
# dispatcher keep (a worker id is a trainer's own word); past it, no trial's time beyond
# its epochs is measured, and the estimates count its epochs only.
MAX_WARM_TRAINERS = 10_000


def epoch_pace(rec: TrialRecord) -> float | None:
    """Seconds an epoch of a trained trial took: after its first epoch when it trained more
    (:meth:`InFlight.epoch_seconds`), else its whole time over its epochs; None untrained."""
    steady, epochs = rec.attrs.get(Attr.EPOCH_SECONDS), rec.attrs.get(Attr.EPOCHS)
    if isinstance(steady, int | float) and steady > 0:
        return float(steady)
    if isinstance(epochs, int) and epochs > 0 and rec.seconds > 0:
        return rec.seconds / epochs
    return None


def fixed_seconds(rec: TrialRecord) -> float | None:
    """A trained trial's seconds beyond its epochs at their pace
    (:meth:`InFlight.fixed_seconds`); None when not measured."""
    fixed = rec.attrs.get(Attr.FIXED_SECONDS)
    return max(0.0, float(fixed)) if isinstance(fixed, int | float) else None


class Ledger:
    """The trials of ``study`` in flight, told and waiting, and their counts."""

    def __init__(
        self, study: optuna.Study, spec: ArchitectureSearchSpec, clock: Callable[[], float]
    ) -> None:
        self.study = study
        self.spec = spec
        self.clock = clock
        self._told: set[int] = set()  # ids of trials finished: their copies are dropped
        self.in_flight: dict[int, InFlight] = {}
        self.counts = Counts()
        self.waiting = 0  # enqueued trials (retries, refine) that ask() hands out first
        self.refine_started = False
        # Seconds per epoch of the explored trials that trained (to keep time for refine
        # under budget.timeout), their seconds beyond their epochs, and (value, s/epoch,
        # fixed s, family) of the complete feasible ones.
        self._epoch_seconds: list[float] = []
        self._fixed_seconds: list[tuple[str | None, float | None]] = []  # (family, fixed s)
        self._explored_pace: list[tuple[float, float, float, str | None]] = []
        # (family, MFLOPs, s/epoch) of the same: the late check's estimates
        self._size_pace: list[tuple[str | None, float, float]] = []
        self._warm: set[str] = set()  # trainers (worker ids) that sent a result before

    @property
    def running(self) -> int:
        """Trials in flight now."""
        return len(self.in_flight)

    @property
    def _direction(self) -> Literal["maximize", "minimize"]:
        return self.spec.objective.study_direction

    def _finished(self, rec: TrialRecord) -> None:
        """Called once a trial finished and was counted (the dispatcher tells its observer)."""

    # --- counting ---------------------------------------------------------------------

    def _recover(self, durable: bool, message_of: Callable[[TrialRecord], TrialMessage]) -> None:
        """Rebuild the counts from the study; adopt (``durable`` transport) or re-enqueue
        trials left running."""
        for rec in records(self.study):
            self.refine_started |= rec.phase == "refine"
            if rec.finished:
                self._told.add(rec.trial_id)
            if rec.state == "waiting":
                self.waiting += 1
            elif rec.state == "running":
                if durable and rec.architecture is not None:
                    message = message_of(rec)
                    now = self.clock()
                    trial = optuna.trial.Trial(self.study, rec.trial_id)
                    frozen = stored_trial(self.study, rec.trial_id)
                    self.in_flight[rec.trial_id] = InFlight(
                        trial, message, rec, now, now, set(frozen.intermediate_values)
                    )
                    log.info("adopted trial %d, still in flight", rec.number)
                else:
                    why = (
                        "the dispatcher stopped while it ran"
                        if rec.architecture is not None
                        else "the dispatcher stopped before the broker confirmed it"
                    )
                    self._interrupt(rec.trial_id, why)
                    rec = record(stored_trial(self.study, rec.trial_id))
            self._count(rec)

    def _count(self, rec: TrialRecord) -> None:
        c = self.counts
        if rec.state == "complete" and not rec.feasible:
            c.infeasible += 1
        elif rec.state == "complete":
            c.complete += 1
        elif rec.state == "pruned":
            c.pruned += 1
        elif rec.state == "failed" and rec.attrs.get(Attr.TOO_LARGE):
            c.too_large += 1
        elif rec.state == "failed" and not rec.interrupted:
            c.failed += 1
        if rec.phase == "explore" and rec.counted:
            c.explore_used += 1
        c.cost_usd += rec.cost_usd
        if rec.finished and rec.counted:
            c.history.append(rec)
        pace = epoch_pace(rec)
        if rec.phase == "explore" and pace is not None:
            fixed = fixed_seconds(rec)
            self._epoch_seconds.append(pace)
            self._fixed_seconds.append((rec.family, fixed))
            mflops = rec.attrs.get(Attr.MFLOPS)
            if isinstance(mflops, int | float) and mflops > 0:
                self._size_pace.append((rec.family, float(mflops), pace))
            if rec.state == "complete" and rec.value is not None and rec.feasible:
                self._explored_pace.append((rec.value, pace, fixed or 0.0, rec.family))
        if rec.state == "complete" and rec.value is not None and rec.feasible:
            candidates = [rec] if c.best is None else [rec, c.best]
            c.best = best_of(candidates, self._direction, self.spec.objective.tradeoff)

    def _count_finished(self, rec: TrialRecord) -> None:
        """Count a trial this dispatcher told, and tell the observer."""
        c = self.counts
        # _count adds running/explore_used for running trials only; the trial was
        # already counted in explore_used when dispatched.
        explore_used = c.explore_used
        self._count(rec)
        c.explore_used = explore_used
        self._finished(rec)

    # --- ends without a trainer's result ----------------------------------------------

    def _fail(self, flight: InFlight, why: str) -> None:
        """Tell ``flight``'s trial failed with ``why``; it counts toward maxFailedTrials."""
        end_trial(self.study, flight.trial, why)
        self.in_flight.pop(flight.message.trial_id, None)
        self._told.add(flight.message.trial_id)
        self._count_finished(dataclasses.replace(flight.record, state="failed", error=why))

    def _fail_in_flight(self, trial_id: int, why: str) -> None:
        """Fail a trial whose message could not be handled: it must not stay running."""
        flight = self.in_flight.get(trial_id)
        if flight is None:
            return
        try:
            self._fail(flight, why)
        except Exception as error:
            if transient(error):
                raise
            log.exception("could not fail trial %d either", flight.message.number)

    def _fail_unsent(
        self, trial: optuna.trial.Trial, rec: TrialRecord, why: str, *, late: bool = False
    ) -> None:
        """Fail a trial without sending it: its model cannot fit a trainer (``too_large``),
        or (``late``) it would end too late to be worth starting, which uses no budget."""
        assert rec.architecture is not None
        attrs: dict[str, object] = {Attr.ARCHITECTURE: rec.architecture.model_dump(mode="json")}
        if not late:
            attrs[Attr.TOO_LARGE] = True
        end_trial(self.study, trial, why, attrs=attrs, interrupted=late)
        self._told.add(trial_id_of(trial))
        if late and rec.phase == "explore":
            self.counts.explore_used -= 1  # counted when asked for; an interrupted one is not
        done = dataclasses.replace(
            rec, state="failed", error=why, interrupted=late, attrs={**rec.attrs, **attrs}
        )
        log.info("trial %d not sent: %s", trial.number, why)
        self._count_finished(done)

    def _infeasible_unsent(
        self,
        trial: optuna.trial.Trial,
        rec: TrialRecord,
        violations: dict[str, float],
        why: str,
        size: ModelSize,
    ) -> None:
        """Tell a trial over a device constraint without training it: the sampler learns
        from its constraint values; its value is the worst, and it is never the best."""
        assert rec.architecture is not None
        worst = judgements.worst_value(self._direction)
        attrs = {
            Attr.ARCHITECTURE: rec.architecture.model_dump(mode="json"),
            Attr.INFEASIBLE: why,
            Attr.PARAMETERS: size.parameters,
            Attr.MFLOPS: size.mflops,
        }
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        for name, excess in violations.items():
            trial.set_constraint(name, excess)  # what TPE reads (<= 0: met)
        # under a modelKB tradeoff, the int8 size estimated as one byte per weight; under
        # costUSD it cost nothing (never trained), and it is infeasible: never on the front
        tradeoff = self.spec.objective.tradeoff
        kb = size.parameters / 1024
        self.study.tell(
            trial, judgements.objective_values(tradeoff, worst, size.parameters, size.mflops, kb)
        )
        self._told.add(trial_id_of(trial))
        done = dataclasses.replace(rec, state="complete", value=worst, attrs={**rec.attrs, **attrs})
        log.info("trial %d not sent: infeasible (%s)", trial.number, why)
        self._count_finished(done)

    def _interrupt(self, trial_id: int, why: str, retries: int | None = None) -> None:
        """Fail a trial that did not finish and enqueue the same parameters again."""
        frozen = stored_trial(self.study, trial_id)
        trial = optuna.trial.Trial(self.study, trial_id)
        self._told.add(trial_id)
        end_trial(self.study, trial, f"interrupted: {why}", interrupted=True)
        attrs = {
            Attr.PHASE: frozen.user_attrs.get(Attr.PHASE, "explore"),
            Attr.RETRY_OF: frozen.number,
        }
        if Attr.REFINES in frozen.user_attrs:
            attrs[Attr.REFINES] = frozen.user_attrs[Attr.REFINES]
        if retries is not None:
            attrs[Attr.RETRIES] = retries
        self.study.enqueue_trial(frozen.params, user_attrs=attrs)
        self.waiting += 1
        log.info("trial %d re-enqueued: %s", frozen.number, why)

    def _requeue_in_flight(self, why: str) -> None:
        """End every trial in flight as interrupted and enqueue it again (the run stops)."""
        for trial_id in list(self.in_flight):
            self.in_flight.pop(trial_id)
            self._interrupt(trial_id, why)

    def _cancel_in_flight(self, why: str) -> None:
        """End every trial in flight as interrupted (the search ends: they no longer count)."""
        for trial_id in list(self.in_flight):
            flight = self.in_flight.pop(trial_id)
            self._told.add(trial_id)
            end_trial(self.study, flight.trial, f"cancelled: {why}", interrupted=True)

    @contextlib.contextmanager
    def _reserving(self, count: int) -> Iterator[None]:
        """Create a wave's new trials in one transaction (:class:`SearchStorage`); any not
        sent at the end (the timeout closed exploration meanwhile) are ended, uncounted."""
        storage = self.study._storage
        if count < 2 or not isinstance(storage, SearchStorage):
            yield
            return
        storage.reserve(self.study._study_id, count)
        yield
        for trial_id in storage.release(self.study._study_id):
            trial = optuna.trial.Trial(self.study, trial_id)
            why = "interrupted: created for a wave and not sent"
            end_trial(self.study, trial, why, interrupted=True)
            self._told.add(trial_id)

    # --- results ----------------------------------------------------------------------

    def _tell_result(self, flight: InFlight, message: ResultMessage, price: float | None) -> None:
        """Tell ``flight``'s trial as its trainer's result says, on a machine of ``price``
        USD/hour (None: workers.pricePerHour): measures, constraints, state, once."""
        trial, objective = flight.trial, self.spec.objective
        if price is None:
            price = self.spec.workers.price_per_hour or 0.0
        price /= self.spec.workers.cost_share(message.gpu_share)  # trainers sharing a GPU
        earlier = judgements.EarlierAttempts.of(flight.trained, flight.replayed, message.attempt)
        result = judgements.result_attrs(message, price, objective.metric, earlier)
        if (epoch_seconds := flight.epoch_seconds()) is not None:
            result[Attr.EPOCH_SECONDS] = epoch_seconds
            # a trainer's first trial also pays, before and after its epochs, what no later
            # one does (the dataset's load; the first model kept): not measured
            warm = message.worker_id in self._warm
            if warm and (fixed := flight.fixed_seconds(self.clock(), epoch_seconds)) is not None:
                result[Attr.FIXED_SECONDS] = fixed
        if len(self._warm) < MAX_WARM_TRAINERS:
            self._warm.add(message.worker_id)
        trial.set_user_attr(Attr.RESULT, result)  # one write: each is a database round trip
        infeasible: dict[str, object] = {}
        if message.state in ("complete", "pruned") and objective.constraints:
            violations, why = judgements.violations(
                objective.constraints,
                message.parameter_count,
                message.mflops,
                message.model_kb,
                trained=message.state == "complete",
            )
            for name, excess in violations.items():
                trial.set_constraint(name, excess)  # what TPE reads (<= 0: met)
            if why is not None:
                infeasible = {Attr.INFEASIBLE: why}
                trial.set_user_attr(Attr.INFEASIBLE, why)
        value = message.value
        # a custom model over a limit once built is stopped untrained, as a built-in one is
        # judged unsent: told the worst value, never the best, and TPE learns the region
        untrained = bool(infeasible) and message.state == "pruned" and message.epochs_run == 0
        if untrained:
            value = judgements.worst_value(self._direction)
            message = message.model_copy(update={"state": "complete", "value": value})
        values = judgements.objective_values(
            objective.tradeoff,
            value,
            message.parameter_count,
            message.mflops,
            message.model_kb if not untrained else message.parameter_count / 1024,
            float(result[Attr.COST]),  # type: ignore[arg-type]
        )
        if message.state == "complete" and message.value is not None and values is None:
            result[Attr.ERROR] = "the trainer could not measure the model's int8 size"
            trial.set_user_attr(Attr.RESULT, result)
        if message.state == "complete" and values is not None:
            self.study.tell(trial, values)
        elif message.state == "pruned":
            self.study.tell(trial, state=TrialState.PRUNED)
        else:
            self.study.tell(trial, state=TrialState.FAIL)
        del self.in_flight[message.trial_id]
        self._told.add(message.trial_id)
        rec = dataclasses.replace(
            flight.record,
            state=message.state if message.state != "complete" or values is not None else "failed",
            value=message.value if message.state != "failed" else None,
            error=str(result.get(Attr.ERROR)) if Attr.ERROR in result else None,
            seconds=float(result[Attr.SECONDS]),  # type: ignore[arg-type]
            cost_usd=float(result[Attr.COST]),  # type: ignore[arg-type]
            attrs={**flight.record.attrs, **result, **infeasible},
        )
        self._count_finished(rec)
