"""The dispatch loop: keep trials in flight, answer progress, tell each result once.

:class:`Dispatcher` is the loop over a :class:`~mloptimizer.dispatch.contract.Transport`;
what it knows of the study's trials is its :class:`~mloptimizer.dispatch.ledger.Ledger`;
it asks :mod:`~mloptimizer.dispatch.judgements`, :mod:`~mloptimizer.dispatch.phases` and
:class:`~mloptimizer.dispatch.deadlines.Deadlines` what to do and does it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any, Final

import optuna

from mloptimizer.capability import trial_token
from mloptimizer.changes import refusal as spec_refusal
from mloptimizer.checks import fitted_space
from mloptimizer.dispatch import judgements
from mloptimizer.dispatch.contract import (
    CheckpointKeeper,
    DeadTrial,
    EpochProgress,
    Inbound,
    Malformed,
    Observer,
    Outcome,
    Transport,
    trial_message,
)
from mloptimizer.dispatch.deadlines import Deadlines
from mloptimizer.dispatch.ledger import InFlight
from mloptimizer.dispatch.phases import Phases
from mloptimizer.faults import transient
from mloptimizer.messages import (
    BUILDER_UNAVAILABLE,
    Decision,
    ProgressMessage,
    Receiver,
    Refuse,
    ResultMessage,
    TrialMessage,
)
from mloptimizer.sizing import input_shape, model_size
from mloptimizer.space import sample_architecture
from mloptimizer.spec import ArchitectureSearchSpec
from mloptimizer.storage import batched, persist
from mloptimizer.study import (
    Attr,
    TrialRecord,
    cached_frozen,
    capability_key,
    record,
    remember_spec,
    study_pruner,
    trial_id_of,
)

__all__ = ["RECEIVER", "Dispatcher"]

log = logging.getLogger(__name__)


class Dispatcher(Phases):
    """Runs a search's study to its end over a transport."""

    def __init__(
        self,
        study: optuna.Study,
        spec: ArchitectureSearchSpec,
        transport: Transport,
        *,
        search: str,
        observer: Observer | None = None,
        clock: Callable[[], float] = time.time,
        progress_timeout: float = 5.0,
        stale_after: float | None = None,
        first_progress_grace: float = 900.0,
        max_retries: int = 2,
        price_of: Callable[[str], float | None] | None = None,
        memory_budget: int | None = None,
        checkpoints: CheckpointKeeper | None = None,
    ) -> None:
        super().__init__(study, spec, clock)
        # USD/hour of the machine a worker runs on (rented GPUs); None: workers.pricePerHour
        self.price_of = price_of
        self.transport = transport
        self.search = search
        self.observer = observer
        self.progress_timeout = progress_timeout
        self.deadlines = Deadlines(stale_after, first_progress_grace, max_retries)
        # Bytes a trainer may use; a model estimated over it fails as too_large unsent.
        self.memory_budget = memory_budget
        self.checkpoints = checkpoints  # a bucket's, when trainers share no folder
        self.stopping: Outcome | None = None
        self.last_dispatch_seconds = 0.0  # ask, sample, publish and write of the latest trial
        self.refused: str | None = None  # why the latest requested spec is not in force
        self._requested: ArchitectureSearchSpec | str | None = None
        self._key = capability_key(study)  # trials' tokens derive from it (capability.py)
        self._recover(transport.durable, lambda rec: self._message(rec.number, rec.trial_id, rec))

    def _finished(self, rec: TrialRecord) -> None:
        if self.checkpoints is not None:
            self.checkpoints.discard(rec.trial_id)
        if self.observer is not None:
            self.observer.finished(rec, self)

    def _follow(self, requested: ArchitectureSearchSpec | str) -> None:
        if requested is self._requested:
            return
        self._requested = requested
        if isinstance(requested, str):
            self.refused = requested
        else:
            self.refused = self.update_spec(requested)

    def update_spec(self, new: ArchitectureSearchSpec) -> str | None:
        """Run under ``new`` from now on, or say why not (:func:`~mloptimizer.changes.refusal`).

        Budget, parallelism and workers act at the next loop turn, training on trials
        dispatched from then on; a pruner edit (or an epochs edit under hyperband, whose
        ``max_resource`` is the epochs) rebuilds the study's pruner at once.
        """
        if new == self.spec:
            return None
        why = spec_refusal(self.spec, new)
        if why is not None:
            return why
        old = self.spec
        if new.pruner != old.pruner or new.training.epochs != old.training.epochs:
            self.study.pruner = study_pruner(new)
        self.spec = new
        remember_spec(self.study, new)
        log.info("spec updated under the running search")
        return None

    # --- the loop ---------------------------------------------------------------------

    def run(
        self,
        should_stop: Callable[[], bool] = lambda: False,
        latest_spec: Callable[[], ArchitectureSearchSpec | str] | None = None,
    ) -> Outcome:
        """Dispatch until the search ends; returns why it ended.

        ``should_stop`` is polled between messages (Ctrl-C, an operator shutting down):
        then trials in flight stay running (durable transport) or are re-enqueued.
        ``latest_spec`` gives the spec as last requested (an edit of the running search), or
        why the last edit could not be read; each new one goes through :meth:`update_spec`,
        and :attr:`refused` says why the spec in force is not the one requested.
        """
        try:
            while True:
                if latest_spec is not None:
                    self._follow(latest_spec())
                if self.observer is not None:
                    self.observer.tick(self)
                if should_stop():
                    return self._interrupted()
                if self.stopping is None:
                    outcome = judgements.budget_stop(self.spec, self.counts, self._elapsed)
                    if outcome is not None:
                        self._stop(outcome)
                if self.stopping is None:
                    with batched(self.study):  # a wave's parameters: one transaction
                        self._fill()
                if not self.in_flight:
                    if self.stopping is not None:
                        return self.stopping
                    if not self._next_phase():
                        return self._end()
                    continue
                handled: list[Inbound] = []
                with batched(self.study):  # what came together is told in one transaction
                    for inbound in self.transport.receive(timeout=0.2):
                        if self._handle(inbound):
                            handled.append(inbound)
                for inbound in handled:  # acked once written: a lost write comes again
                    inbound.settle()
                self._check_deadlines()
        finally:
            self.transport.close()

    def _stop(self, outcome: Outcome) -> None:
        """Stop sending; cancel what is in flight (it can no longer change the outcome)."""
        log.info("search ends: %s", outcome.message)
        self.stopping = outcome
        self._cancel_in_flight(outcome.message)

    def _interrupted(self) -> Outcome:
        if not self.transport.durable:
            self._requeue_in_flight("the run was interrupted")
        return Outcome("interrupted", "interrupted; run again to resume", failed=False)

    # --- sending ----------------------------------------------------------------------

    def _fill(self) -> None:
        with self._reserving(self._fresh_to_ask()):
            while len(self.in_flight) < self.spec.budget.parallelism:
                if self.waiting > 0:
                    self.waiting -= 1
                elif self._explore_left() <= 0 or self.refine_started or self._time_for_refine():
                    return
                self._dispatch(self.study.ask())

    def _dispatch(self, trial: optuna.trial.Trial) -> None:
        began = time.perf_counter()
        architecture = sample_architecture(
            trial, fitted_space(self.spec), self.spec.training.augmentation
        )
        # The trial's own cache holds its params and enqueued attributes: no extra query.
        rec = dataclasses.replace(
            record(cached_frozen(trial)), state="running", architecture=architecture
        )
        phase = rec.phase
        if phase == "explore":
            self.counts.explore_used += 1
        if architecture.family != "custom":  # a custom model: its trainer measures it
            shape, classes = input_shape(self.spec)
            size = model_size(architecture, shape, classes)
            if self._held_back(trial, rec, size, self.memory_budget):
                return
            violations, why = judgements.violations(
                self.spec.objective.constraints, size.parameters, size.mflops, None, trained=False
            )
            if why is not None:
                self._infeasible_unsent(trial, rec, violations, why, size)
                return
        message = self._message(trial.number, trial_id_of(trial), rec)
        self.transport.send(message)
        # Written once the broker confirmed the trial: a trial running without it was
        # never queued, and recovery sends it again instead of waiting for it.
        trial.set_user_attr(Attr.ARCHITECTURE, architecture.model_dump(mode="json"))
        persist(self.study, trial_id_of(trial))  # with its parameters, in the wave's transaction
        self.last_dispatch_seconds = time.perf_counter() - began
        now = self.clock()
        self.in_flight[trial_id_of(trial)] = InFlight(trial, message, rec, now, now)
        log.info("trial %d sent (%s): %s", trial.number, phase, architecture.summary())
        if self.observer is not None:
            self.observer.started(rec, self)

    def _message(self, number: int, trial_id: int, rec: TrialRecord) -> TrialMessage:
        assert rec.architecture is not None
        return trial_message(
            self.spec,
            search=self.search,
            number=number,
            trial_id=trial_id,
            phase=rec.phase,
            architecture=rec.architecture,
            progress_timeout=self.progress_timeout,
            token=trial_token(self._key, trial_id),
            checkpoint=self.checkpoints.urls(trial_id) if self.checkpoints is not None else None,
        )

    # --- messages ---------------------------------------------------------------------

    def _handle(self, inbound: Inbound) -> bool:
        """Handle one message; True when it is to be settled (acked) once written, False
        when it was rejected (kept aside with the reason and acked)."""
        message = inbound.message
        if isinstance(message, Malformed):
            self._reject(inbound, message.reason or "malformed")
            return False
        claimed = judgements.claim_of(message)
        handler = RECEIVER.route(claimed)  # the transport checked the queue it came on
        if isinstance(handler, Refuse):
            self._reject(inbound, handler.reason)
            return False
        flight = self.in_flight.get(claimed.trial_id)
        why = judgements.refusal(
            message,
            search=self.search,
            sent=flight.message if flight is not None else None,
            told=claimed.trial_id in self._told,
        )
        if why is not None:
            self._reject(inbound, why)
            return False
        try:
            handler(self, message, inbound)
        except Exception as error:
            if transient(error):
                raise  # the caller waits for the service; the message comes again
            # A bug, or data the study refuses: never redeliver it into a crash loop.
            log.exception("handling a message of trial %d failed", claimed.number)
            why = f"handling it failed: {type(error).__name__}: {error}"[:1024]
            self._reject(inbound, why)
            self._fail_in_flight(claimed.trial_id, why)
            return False
        return True

    def _reject(self, inbound: Inbound, why: str) -> None:
        log.warning("rejected a message: %s", why)
        self.counts.rejected += 1
        inbound.reject(why)

    def _dead(self, dead: DeadTrial) -> None:
        flight = self.in_flight.get(dead.message.trial_id)
        if flight is None:
            return  # told already (a copy dead-lettered after another finished it)
        if flight.goes_on(dead.exhausted):  # preempted, not poison: sent again, not failed
            log.warning("trial %d: its trainers went away, it got further: sent again",
                        dead.message.number)  # fmt: skip
            self.deadlines.heard(flight, self.clock())
            self.transport.send(flight.message)
            return
        log.warning("trial %d dead-lettered: %s", dead.message.number, dead.reason)
        self._fail(flight, flight.death(dead.reason, dead.exhausted))

    def _progress(self, message: ProgressMessage) -> Decision:
        flight = self.in_flight.get(message.trial_id)
        if flight is None:
            # Already told (a redelivered copy still training): stop wasting the GPU.
            return "prune"
        now = self.clock()
        self.deadlines.heard(flight, now)
        flight.told(message.attempt, message.epoch, message.replay)
        if self.observer is not None and message.epoch > 0:
            began = flight.taken_at if flight.taken_at is not None else flight.sent_at
            self.observer.progressed(
                EpochProgress(
                    number=message.number,
                    phase=flight.message.phase,
                    epoch=message.epoch,
                    epochs=flight.message.epochs,
                    metrics=dict(message.metrics),
                    seconds_per_epoch=(now - began) / message.epoch,
                    worker_id=message.worker_id,
                )
            )
        if self._outlasts_refine(flight, message.epoch):
            return "prune"
        value = message.metrics.get(self.spec.objective.metric, math.nan)
        unreported = not math.isfinite(value) or flight.message.phase == "refine"
        if unreported or self.spec.objective.tradeoff:  # Optuna cannot prune multi-objective
            return "continue"
        trial = flight.trial
        if message.epoch not in flight.reported:  # a retrained copy reports again
            trial.report(value, step=message.epoch)
            flight.reported.add(message.epoch)
        return "prune" if trial.should_prune() else "continue"

    def _result(self, message: ResultMessage) -> None:
        # Left in flight until told: if anything below raises, the trial is failed for it.
        flight = self.in_flight.get(message.trial_id)
        if flight is None:
            log.info(
                "dropped a duplicate result of trial %d (attempt %d from %s): already told",
                message.number,
                message.attempt,
                message.worker_id,
            )
            return
        price = self.price_of(message.worker_id) if self.price_of is not None else None
        self._tell_result(flight, message, price)
        if (why := message.error or "").startswith(BUILDER_UNAVAILABLE) and not self.stopping:
            self._stop(Outcome("builderUnavailable", why, failed=True))  # no trial can build

    # --- deadlines --------------------------------------------------------------------

    def _check_deadlines(self) -> None:
        """Retry or fail the trials gone silent, and those never heard of once taken."""
        if self.deadlines.stale_after is not None:
            for trial_id, why in self.deadlines.stale(self.in_flight, self.clock()):
                self._retry_or_fail(trial_id, why)
        durable, queued = self.transport.durable, self.transport.queued
        for trial_id, why in self.deadlines.unheard(self.in_flight, self.clock(), durable, queued):
            self._retry_or_fail(trial_id, why)

    def _retry_or_fail(self, trial_id: int, why: str) -> None:
        """Enqueue a lost trial again, at most ``max_retries`` times, then fail it."""
        flight = self.in_flight.pop(trial_id)
        retries = self.deadlines.retries(flight)
        if self.deadlines.may_retry(flight):
            if flight.record.phase == "explore":
                self.counts.explore_used -= 1  # its retry takes the slot again
            self._interrupt(trial_id, why, retries=retries + 1)
            return
        self._fail(flight, f"{why}; given up after {retries} retries")


# What the dispatcher does with each kind that can arrive on the queues it reads
# (messages.ROUTES); the transports refuse with the same table before a message gets here.
RECEIVER: Final[Receiver[Callable[[Dispatcher, Any, Inbound], None]]] = Receiver(
    party="dispatcher",
    reads=("progress", "results", "dead"),
    handlers={
        "progress": lambda d, message, inbound: inbound.reply(d._progress(message)),
        "result": lambda d, message, inbound: d._result(message),
        "trial": lambda d, message, inbound: d._dead(message),  # given up on by the queue
        "deliver": Refuse("a final job's request: only the operator's final job sends it"),
        "delivered": Refuse("a final job's answer: the final job reads it after the search"),
    },
)
