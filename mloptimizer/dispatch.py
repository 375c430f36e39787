"""The dispatch loop: keep trials in flight, answer progress, tell each result once.

One loop serves both the local runner (``mloptimizer run``) and the operator. It knows an
Optuna study and a :class:`Transport` (RabbitMQ, or local trainer processes), nothing of
Kubernetes or TensorFlow. The study is the source of truth: a dispatcher that restarts
reads it back, adopts the trials still running (when the transport is durable) or
re-enqueues them (when it is not), and never tells a finished trial twice.

Two phases, the seed's: *explore* samples ``budget.maxTrials`` architectures with
``training.epochs``; *refine* then retrains the ``training.refine.topK`` best for
``refine.epochs``. Both are trials of the same study, told apart by the ``phase`` user
attribute.

What the loop guarantees, whatever trainers send or the services do:

* every message is checked against the trial it claims (search, id, number, phase,
  epochs) before it touches the study; one that fails, or whose handling raises, is
  *rejected* (kept with the reason, never redelivered into a crash loop) and a trial it
  concerned is failed, so it cannot stay running;
* every trial ends: one that never sends progress has a deadline once a trainer took it;
  one the broker or a trainer gave up on (the dead-letter queue) fails with the reason; one
  whose publish was never confirmed (its architecture is written only after) is sent again
  on recovery, never adopted as queued;
* a model that cannot fit the trainer's memory is failed as ``too_large`` without being sent;
* a model over a device constraint it can be judged on before training (parameters,
  multiply-adds) is told infeasible without being sent; after training, the trainer's
  measures (and the int8 model size) decide; infeasible trials teach the sampler (their
  constraint values) and are never the best;
* a lost database or broker connection is not handled here: it propagates, and the
  caller retries the whole loop (the study knows everything the loop needs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

import optuna
from optuna.trial import TrialState

from mloptimizer.changes import refusal
from mloptimizer.checks import fitted_space
from mloptimizer.faults import transient
from mloptimizer.messages import Decision, ProgressMessage, ResultMessage, TrialMessage
from mloptimizer.sizing import ModelSize, input_shape, memory_bytes, model_size
from mloptimizer.space import Architecture, constraint_limits, sample_architecture
from mloptimizer.spec import ArchitectureSearchSpec, parse_duration
from mloptimizer.storage import SearchStorage, batched, persist
from mloptimizer.study import (
    Attr,
    TrialRecord,
    best_of,
    cached_frozen,
    pareto_front,
    record,
    records,
    remember_spec,
    stored_trial,
    study_pruner,
    trial_id_of,
    trial_seed,
)

__all__ = [
    "Counts",
    "DeadTrial",
    "Dispatcher",
    "EpochProgress",
    "Inbound",
    "Malformed",
    "Observer",
    "Outcome",
    "StopReason",
    "Transport",
    "trial_message",
]

log = logging.getLogger(__name__)

StopReason = Literal[
    "maxTrials", "target", "timeout", "maxCostUSD", "maxFailedTrials", "interrupted"
]


@dataclass(frozen=True)
class DeadTrial:
    """A trial the broker or a trainer gave up on (the dead-letter queue), and why."""

    message: TrialMessage
    reason: str


@dataclass(frozen=True)
class Malformed:
    """A message that could not be read, and why: rejected and counted like any refusal."""

    reason: str


@dataclass
class Inbound:
    """A message as received, with how to answer it, settle it (ack) or reject it."""

    message: ProgressMessage | ResultMessage | DeadTrial | Malformed
    reply: Callable[[Decision], None] = lambda _: None
    settle: Callable[[], None] = lambda: None  # ack: called once the message is handled
    # Keep the message aside with the reason (the rejected queue) and ack it.
    reject: Callable[[str], None] = lambda _: None


class Transport(Protocol):
    """How trials reach trainers and their messages come back."""

    #: Whether trials in flight survive the dispatcher (broker queues do; local
    #: trainer processes do not). Decides what a restart does with running trials.
    durable: bool

    def send(self, trial: TrialMessage) -> None:
        """Hand a trial to the trainers (returns once it is safely queued)."""

    def receive(self, timeout: float) -> list[Inbound]:
        """Messages that arrived, waiting up to ``timeout`` seconds for the first."""

    def close(self) -> None:
        """Release connections and processes."""

    def queued(self) -> int | None:
        """Trials not yet taken by a trainer, or None when the transport cannot tell."""


class Observer(Protocol):
    """What a progress display or the operator's status wants to hear."""

    def started(self, trial: TrialRecord, dispatcher: Dispatcher) -> None: ...

    def finished(self, trial: TrialRecord, dispatcher: Dispatcher) -> None: ...

    def tick(self, dispatcher: Dispatcher) -> None:
        """Called every loop turn (a few times a second)."""

    def progressed(self, epoch: EpochProgress) -> None:
        """Called on each epoch a trainer reports (signs of life on long trials)."""


@dataclass(frozen=True)
class EpochProgress:
    """One epoch of a trial in flight, as its trainer reported it."""

    number: int
    phase: Literal["explore", "refine"]
    epoch: int
    epochs: int
    metrics: dict[str, float]
    seconds_per_epoch: float  # since a trainer took the trial, per epoch done

    @property
    def eta_seconds(self) -> float:
        """The trial's remaining time at its pace so far."""
        return self.seconds_per_epoch * max(0, self.epochs - self.epoch)


@dataclass
class _InFlight:
    trial: optuna.trial.Trial
    message: TrialMessage
    record: TrialRecord
    sent_at: float
    last_heard: float
    reported: set[int] = field(default_factory=set)  # epochs already reported to Optuna
    heard: bool = False  # a trainer has sent progress: the trial is being trained
    taken_at: float | None = None  # when the trials queue was first seen without it


@dataclass
class Outcome:
    """How a dispatch run ended."""

    reason: StopReason
    message: str
    failed: bool  # the search failed (maxFailedTrials), rather than ending normally


@dataclass
class Counts:
    """Finished trials by state, as the status and the progress bar show them.

    Trials in flight are not counted here: they are the dispatcher's ``in_flight``
    (:attr:`Dispatcher.running`).
    """

    complete: int = 0
    pruned: int = 0
    failed: int = 0
    too_large: int = 0  # failed before training (never sent): not counted in ``failed``
    infeasible: int = 0  # finished over a device constraint: not in ``complete``, never best
    rejected: int = 0  # messages refused (malformed, forged, or their handling failed)
    explore_used: int = 0  # explore trials counted against maxTrials (incl. running)
    cost_usd: float = 0.0
    best: TrialRecord | None = None
    history: list[TrialRecord] = field(default_factory=list)


class Dispatcher:
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
    ) -> None:
        self.study = study
        self.spec = spec
        # USD/hour of the machine a worker runs on (rented GPUs); None: workers.pricePerHour
        self.price_of = price_of
        self.transport = transport
        self.search = search
        self.observer = observer
        self.clock = clock
        self.progress_timeout = progress_timeout
        # A trial whose trainer sent progress and then nothing for ``stale_after`` seconds
        # (a hung trainer; a dead one loses its connection and the broker redelivers) is
        # failed and enqueued again, at most ``max_retries`` times.
        self.stale_after = stale_after
        # A trial a trainer took (the queue no longer holds it) must send its first
        # progress within the grace, or three times the slowest first epoch seen so far.
        self.first_progress_grace = first_progress_grace
        self.slowest_first_epoch = 0.0
        self._queue_checked = 0.0
        self.max_retries = max_retries
        # Bytes a trainer may use; a model estimated over it fails as too_large unsent.
        self.memory_budget = memory_budget
        self._told: set[int] = set()  # ids of trials finished: their copies are dropped
        self.in_flight: dict[int, _InFlight] = {}
        self.counts = Counts()
        self.stopping: Outcome | None = None
        self.waiting = 0  # enqueued trials (retries, refine) that ask() hands out first
        self.refine_started = False
        # Seconds per epoch of the explored trials that trained, to keep time for refine
        # under budget.timeout; and why exploration closed early for it (None: it did not).
        self._epoch_seconds: list[float] = []
        self._explored_pace: list[tuple[float, float]] = []  # (value, s/epoch) of complete ones
        self.explore_closed: str | None = None
        self.last_dispatch_seconds = 0.0  # ask, sample, publish and write of the latest trial
        self._started_at: float | None = None  # the study's start (Unix time)
        self.refused: str | None = None  # why the latest requested spec is not in force
        self._requested: ArchitectureSearchSpec | str | None = None
        self._recover()

    # --- start-up ----------------------------------------------------------------------

    def _recover(self) -> None:
        """Rebuild the counts from the study; adopt or re-enqueue trials left running."""
        for rec in records(self.study):
            self.refine_started |= rec.phase == "refine"
            if rec.finished:
                self._told.add(rec.trial_id)
            if rec.state == "waiting":
                self.waiting += 1
            elif rec.state == "running":
                if self.transport.durable and rec.architecture is not None:
                    message = self._message(rec.number, rec.trial_id, rec)
                    now = self.clock()
                    trial = optuna.trial.Trial(self.study, rec.trial_id)
                    frozen = stored_trial(self.study, rec.trial_id)
                    self.in_flight[rec.trial_id] = _InFlight(
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
        epochs = rec.attrs.get(Attr.EPOCHS)
        if rec.phase == "explore" and isinstance(epochs, int) and epochs > 0 and rec.seconds > 0:
            self._epoch_seconds.append(rec.seconds / epochs)
            if rec.state == "complete" and rec.value is not None and rec.feasible:
                self._explored_pace.append((rec.value, rec.seconds / epochs))
        if rec.state == "complete" and rec.value is not None and rec.feasible:
            candidates = [rec] if c.best is None else [rec, c.best]
            c.best = best_of(candidates, self._direction, self.spec.objective.tradeoff)

    @property
    def running(self) -> int:
        """Trials in flight now."""
        return len(self.in_flight)

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
        why = refusal(self.spec, new)
        if why is not None:
            return why
        old = self.spec
        if new.pruner != old.pruner or new.training.epochs != old.training.epochs:
            self.study.pruner = study_pruner(new)
        self.spec = new
        remember_spec(self.study, new)
        log.info("spec updated under the running search")
        return None

    # --- the loop ----------------------------------------------------------------------

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
                self._check_budget()
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
                self._check_stale()
                self._check_unheard()
        finally:
            self.transport.close()

    @property
    def _direction(self) -> Literal["maximize", "minimize"]:
        return self.spec.objective.study_direction

    def _explore_left(self) -> int:
        return self.spec.budget.max_trials - self.counts.explore_used

    def _fill(self) -> None:
        with self._reserving(self._fresh_to_ask()):
            while len(self.in_flight) < self.spec.budget.parallelism:
                if self.waiting > 0:
                    self.waiting -= 1
                elif self._explore_left() <= 0 or self.refine_started or self._time_for_refine():
                    return
                self._dispatch(self.study.ask())

    def _fresh_to_ask(self) -> int:
        """How many new trials the next fill asks for (enqueued ones go first)."""
        free = self.spec.budget.parallelism - len(self.in_flight) - self.waiting
        if free <= 0 or self.refine_started or self._time_for_refine():
            return 0
        return min(free, self._explore_left())

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
            trial.set_user_attr(Attr.ERROR, "interrupted: created for a wave and not sent")
            trial.set_user_attr(Attr.INTERRUPTED, True)
            self.study.tell(trial, state=TrialState.FAIL)
            self._told.add(trial_id)

    def _time_for_refine(self) -> bool:
        """Whether exploring on would leave too little of ``budget.timeout`` for refine.

        The refine phase is what turns the explored best into the model delivered, so under
        a timeout exploration closes early enough for it: when the time left is no more than
        the refine trials' estimated time (``topK`` trials of ``refine.epochs``, in waves of
        ``parallelism``, at the pace the slowest of the current top ``topK`` trained) plus
        one explore trial's at the median pace (those in flight finish first). Never before
        the sampler's start-up trials (and ``topK``) completed: refining the best of a few
        random trials is worth less than exploring. When even the refine trials no longer
        fit (a slow model became the best late), the search explores to the end instead,
        as without refine.
        """
        if self.explore_closed is not None:
            return True
        refine, timeout = self.spec.training.refine, self.spec.budget.timeout
        if refine is None or timeout is None or not self._epoch_seconds:
            return False
        if len(self._explored_pace) < max(refine.top_k, self.spec.sampler.n_startup_trials):
            return False  # too little explored for a best worth refining: explore on
        explore_pace = statistics.median(self._epoch_seconds)
        sign = -1.0 if self._direction == "maximize" else 1.0
        top = sorted(self._explored_pace, key=lambda p: sign * p[0])[: refine.top_k]
        refine_pace = max((pace for _, pace in top), default=explore_pace)
        waves = math.ceil(refine.top_k / self.spec.budget.parallelism)
        refine_needs = refine_pace * refine.epochs * waves
        reserve = refine_needs + explore_pace * self.spec.training.epochs
        left = parse_duration(timeout) - self._elapsed()
        if left > reserve or left < refine_needs:
            return False  # time to explore more; or refine no longer fits: explore to the end
        self.explore_closed = (
            f"exploration closed at {self._elapsed():.0f} s of budget.timeout {timeout} to "
            f"leave about {reserve:.0f} s for refine ({refine_pace:.1f} s an epoch for the "
            f"top {refine.top_k}, {explore_pace:.1f} for a trial in flight)"
        )
        log.info("%s", self.explore_closed)
        return True

    def _dispatch(self, trial: optuna.trial.Trial) -> None:
        began = time.perf_counter()
        architecture = sample_architecture(trial, fitted_space(self.spec))
        # The trial's own cache holds its params and enqueued attributes: no extra query.
        rec = dataclasses.replace(
            record(cached_frozen(trial)), state="running", architecture=architecture
        )
        phase = rec.phase
        if phase == "explore":
            self.counts.explore_used += 1
        shape, classes = input_shape(self.spec)
        size = model_size(architecture, shape, classes)
        too_large = self._too_large(size)
        if too_large is not None:
            self._fail_unsent(trial, rec, too_large)
            return
        violations, why = self._violations(size.parameters, size.mflops, None, trained=False)
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
        self.in_flight[trial_id_of(trial)] = _InFlight(trial, message, rec, now, now)
        log.info("trial %d sent (%s): %s", trial.number, phase, architecture.summary())
        if self.observer is not None:
            self.observer.started(rec, self)

    def _too_large(self, size: ModelSize) -> str | None:
        """Why a trainer could not hold a model of ``size``, or None when it fits."""
        if self.memory_budget is None:
            return None
        need = memory_bytes(size, self.spec.training.batch_size)
        if need <= self.memory_budget:
            return None
        return (
            f"too_large: {size.parameters / 1e6:.1f} M parameters, about "
            f"{need / 2**30:.1f} GiB to train with batches of {self.spec.training.batch_size}, "
            f"over the trainer's {self.memory_budget / 2**30:.1f} GiB (workers.resources."
            "memory); narrow the search space or raise the memory"
        )

    def _violations(
        self, params: int, mflops: float | None, model_kb: float | None, *, trained: bool
    ) -> tuple[dict[str, float], str | None]:
        """Each set constraint's excess (``<= 0``: met) and why the model breaks one.

        Before training the int8 size is unknown: only a model whose weights alone (a byte
        each) are over ``maxModelKB`` is judged then; after, a size the trainer could not
        measure counts as broken.
        """
        constraints = self.spec.objective.constraints
        if constraints is None:
            return {}, None
        measured = {"params": float(params), "mflops": mflops, "model_kb": model_kb}
        excess: dict[str, float] = {}
        broken: list[str] = []
        labels = {"params": "maxParams", "mflops": "maxMFLOPs", "model_kb": "maxModelKB"}
        for name, limit in constraint_limits(constraints):
            value = measured[name]
            if name == "model_kb" and value is None and not trained:
                # int8 holds at least a byte per weight: a model over the limit on that
                # count alone can never fit, whatever the converter does
                floor = params / 1024
                excess[name] = max(0.0, floor - limit)
                if floor > limit:
                    broken.append(
                        f"model_kb >= {floor:,.3g} (a byte per weight) > maxModelKB {limit:,.6g}"
                    )
                continue
            if value is None:
                excess[name] = 1.0 if trained else 0.0
                if trained:
                    broken.append(f"{name} not measured ({labels[name]} {limit:g})")
                continue
            excess[name] = value - limit
            if value > limit:
                shown = f"{value:,.0f}" if name == "params" else f"{value:,.3g}"
                broken.append(f"{name} {shown} > {labels[name]} {limit:,.6g}")
        return excess, "; ".join(broken) or None

    def _values(
        self, value: float | None, params: int, mflops: float | None, model_kb: float | None
    ) -> float | list[float] | None:
        """What the study is told of a complete trial: its value, and under a tradeoff its
        size figure too (None when that figure is missing)."""
        tradeoff = self.spec.objective.tradeoff
        if value is None or tradeoff is None:
            return value
        size = {"params": float(params), "mflops": mflops, "modelKB": model_kb}[tradeoff]
        return None if size is None else [value, size]

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
        worst = 0.0 if self._direction == "maximize" else 1e9
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
        # under a modelKB tradeoff, the int8 size estimated as one byte per weight
        values = self._values(worst, size.parameters, size.mflops, size.parameters / 1024)
        self.study.tell(trial, values)
        self._told.add(trial_id_of(trial))
        done = dataclasses.replace(rec, state="complete", value=worst, attrs={**rec.attrs, **attrs})
        self._count_finished(done)
        log.info("trial %d not sent: infeasible (%s)", trial.number, why)
        if self.observer is not None:
            self.observer.finished(done, self)

    def _fail_unsent(self, trial: optuna.trial.Trial, rec: TrialRecord, why: str) -> None:
        assert rec.architecture is not None
        trial.set_user_attr(Attr.ARCHITECTURE, rec.architecture.model_dump(mode="json"))
        trial.set_user_attr(Attr.ERROR, why)
        trial.set_user_attr(Attr.TOO_LARGE, True)
        self.study.tell(trial, state=TrialState.FAIL)
        self._told.add(trial_id_of(trial))
        done = dataclasses.replace(
            rec, state="failed", error=why, attrs={**rec.attrs, Attr.TOO_LARGE: True}
        )
        self._count_finished(done)
        log.info("trial %d not sent: %s", trial.number, why)
        if self.observer is not None:
            self.observer.finished(done, self)

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
        )

    # --- messages ----------------------------------------------------------------------

    def _handle(self, inbound: Inbound) -> bool:
        """Handle one message; True when it is to be settled (acked) once written, False
        when it was rejected (kept aside with the reason and acked)."""
        message = inbound.message
        why = message.reason if isinstance(message, Malformed) else self._refusal(message)
        if why is not None or isinstance(message, Malformed):
            self._reject(inbound, why or "malformed")
            return False
        try:
            if isinstance(message, ProgressMessage):
                inbound.reply(self._progress(message))
            elif isinstance(message, DeadTrial):
                self._dead(message)
            else:
                self._result(message)
        except Exception as error:
            if transient(error):
                raise  # the caller waits for the service; the message comes again
            # A bug, or data the study refuses: never redeliver it into a crash loop.
            log.exception("handling a message of trial %d failed", self._trial_number(message))
            why = f"handling it failed: {type(error).__name__}: {error}"[:1024]
            self._reject(inbound, why)
            self._fail_in_flight(self._trial_id(message), why)
            return False
        return True

    @staticmethod
    def _trial_id(message: ProgressMessage | ResultMessage | DeadTrial) -> int:
        return message.message.trial_id if isinstance(message, DeadTrial) else message.trial_id

    @staticmethod
    def _trial_number(message: ProgressMessage | ResultMessage | DeadTrial) -> int:
        return message.message.number if isinstance(message, DeadTrial) else message.number

    def _reject(self, inbound: Inbound, why: str) -> None:
        log.warning("rejected a message: %s", why)
        self.counts.rejected += 1
        inbound.reject(why)

    def _refusal(self, message: ProgressMessage | ResultMessage | DeadTrial) -> str | None:
        """Why ``message`` cannot be about a trial of this search, or None if it can be."""
        claimed = message.message if isinstance(message, DeadTrial) else message
        if claimed.search != self.search:
            return f"it claims search {claimed.search!r}, not {self.search!r}"
        flight = self.in_flight.get(claimed.trial_id)
        if flight is None:
            if claimed.trial_id in self._told:
                return None  # a copy of a finished trial: dropped (or pruned) as such
            return f"no trial with id {claimed.trial_id} is in flight in this search"
        expected = flight.message
        if claimed.number != expected.number:
            return f"trial id {claimed.trial_id} is trial {expected.number}, not {claimed.number}"
        if isinstance(message, ProgressMessage):
            if message.epoch > expected.epochs:
                return f"epoch {message.epoch} of a trial of {expected.epochs} epochs"
        elif isinstance(message, ResultMessage):
            if message.phase != expected.phase:
                return f"a {message.phase} result for a {expected.phase} trial"
            if message.epochs_run > expected.epochs or len(message.history) > expected.epochs:
                return f"more epochs than the trial's {expected.epochs}"
        return None

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

    def _fail(self, flight: _InFlight, why: str) -> None:
        """Tell ``flight``'s trial failed with ``why``; it counts toward maxFailedTrials."""
        flight.trial.set_user_attr(Attr.ERROR, why)
        self.study.tell(flight.trial, state=TrialState.FAIL)
        self.in_flight.pop(flight.message.trial_id, None)
        self._told.add(flight.message.trial_id)
        rec = dataclasses.replace(flight.record, state="failed", error=why)
        self._count_finished(rec)
        if self.observer is not None:
            self.observer.finished(rec, self)

    def _dead(self, dead: DeadTrial) -> None:
        flight = self.in_flight.get(dead.message.trial_id)
        if flight is None:
            return  # told already (a copy dead-lettered after another finished it)
        log.warning("trial %d dead-lettered: %s", dead.message.number, dead.reason)
        self._fail(flight, f"dead-lettered: {dead.reason}")

    def _progress(self, message: ProgressMessage) -> Decision:
        flight = self.in_flight.get(message.trial_id)
        if flight is None:
            # Already told (a redelivered copy still training): stop wasting the GPU.
            return "prune"
        now = self.clock()
        if not flight.heard:
            began = flight.taken_at if flight.taken_at is not None else flight.sent_at
            self.slowest_first_epoch = max(self.slowest_first_epoch, now - began)
        flight.last_heard = now
        flight.heard = True
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
                )
            )
        value = message.metrics.get(self.spec.objective.metric)
        if value is None or not math.isfinite(value) or flight.message.phase == "refine":
            return "continue"
        if self.spec.objective.tradeoff:
            return "continue"  # Optuna cannot report or prune a multi-objective trial
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
        trial = flight.trial
        price = self.price_of(message.worker_id) if self.price_of is not None else None
        if price is None:
            price = self.spec.workers.price_per_hour or 0.0
        seconds = message.train_seconds + message.dataset_load_seconds
        result: dict[str, object] = {
            Attr.WORKER: message.worker_id,
            Attr.DEVICE: message.device,
            Attr.ATTEMPT: message.attempt,
            Attr.SECONDS: seconds,
            Attr.EPOCHS: message.epochs_run,
            Attr.VAL_ACCURACY: message.val_accuracy,
            Attr.VAL_LOSS: message.val_loss,
            Attr.PARAMETERS: message.parameter_count,
            Attr.MFLOPS: message.mflops,
            Attr.MODEL_KB: message.model_kb,
            Attr.COST: price * seconds / 3600.0,
        }
        if message.error:
            result[Attr.ERROR] = message.error
        elif message.state == "complete" and message.value is None:
            result[Attr.ERROR] = f"the trainer sent no {self.spec.objective.metric}"
        trial.set_user_attr(Attr.RESULT, result)  # one write: each is a database round trip
        infeasible: dict[str, object] = {}
        if message.state in ("complete", "pruned") and self.spec.objective.constraints:
            violations, why = self._violations(
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
        values = self._values(
            message.value, message.parameter_count, message.mflops, message.model_kb
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
            seconds=seconds,
            cost_usd=float(result[Attr.COST]),  # type: ignore[arg-type]
            attrs={**flight.record.attrs, **result, **infeasible},
        )
        self._count_finished(rec)
        if self.observer is not None:
            self.observer.finished(rec, self)

    def _count_finished(self, rec: TrialRecord) -> None:
        c = self.counts
        # _count adds running/explore_used for running trials only; the trial was
        # already counted in explore_used when dispatched.
        explore_used = c.explore_used
        self._count(rec)
        c.explore_used = explore_used

    # --- ends --------------------------------------------------------------------------

    def _check_budget(self) -> None:
        if self.stopping is not None:
            return
        budget, objective, c = self.spec.budget, self.spec.objective, self.counts
        if c.failed >= max(1, budget.max_failed_trials):
            self._stop(
                "maxFailedTrials",
                f"{c.failed} trials failed (budget.maxFailedTrials {budget.max_failed_trials})",
                failed=True,
            )
        elif objective.target is not None and c.best is not None and self._reached(c.best):
            self._stop(
                "target",
                f"trial {c.best.number} reached {objective.metric} {c.best.value:.4f} "
                f"(objective.target {objective.target})",
            )
        elif budget.timeout is not None and self._elapsed() >= parse_duration(budget.timeout):
            self._stop("timeout", f"budget.timeout {budget.timeout} has passed")
        elif budget.max_cost_usd is not None and c.cost_usd >= budget.max_cost_usd:
            self._stop(
                "maxCostUSD",
                f"spent ${c.cost_usd:.2f} of budget.maxCostUSD ${budget.max_cost_usd:.2f}",
            )

    def _reached(self, best: TrialRecord) -> bool:
        target = self.spec.objective.target
        assert target is not None
        assert best.value is not None
        if self.spec.objective.study_direction == "maximize":
            return best.value >= target
        return best.value <= target

    def _elapsed(self) -> float:
        if self._started_at is None:  # read once: set when the study was made, never after
            self._started_at = float(self.study.user_attrs.get(Attr.STARTED_AT, self.clock()))
        return self.clock() - self._started_at

    def _stop(self, reason: StopReason, message: str, failed: bool = False) -> None:
        """Stop sending; cancel what is in flight (it can no longer change the outcome)."""
        log.info("search ends: %s", message)
        self.stopping = Outcome(reason, message, failed)
        for trial_id in list(self.in_flight):
            flight = self.in_flight.pop(trial_id)
            self._told.add(trial_id)
            flight.trial.set_user_attr(Attr.ERROR, f"cancelled: {message}")
            flight.trial.set_user_attr(Attr.INTERRUPTED, True)
            self.study.tell(flight.trial, state=TrialState.FAIL)

    def _check_stale(self) -> None:
        if self.stale_after is None:
            return
        now = self.clock()
        for trial_id, flight in list(self.in_flight.items()):
            if not flight.heard or now - flight.last_heard < self.stale_after:
                continue
            why = f"no progress for {self.stale_after:.0f} s (its trainer hung or was lost)"
            self._retry_or_fail(trial_id, why)

    @property
    def first_progress_deadline(self) -> float:
        """Seconds a taken trial may go without its first progress message."""
        return max(self.first_progress_grace, 3.0 * self.slowest_first_epoch)

    def _check_unheard(self) -> None:
        """End trials a trainer took and never reported on (hung before its first epoch).

        A trial still in the queue is waiting for a trainer, which may take any time; so
        the clock starts when the transport says the trials queue is empty.
        """
        unheard = [f for f in self.in_flight.values() if not f.heard]
        now = self.clock()
        if not unheard or not self.transport.durable or now - self._queue_checked < 5.0:
            return
        self._queue_checked = now
        if any(f.taken_at is None for f in unheard):
            if self.transport.queued() != 0:
                return
            for flight in unheard:
                flight.taken_at = flight.taken_at if flight.taken_at is not None else now
        deadline = self.first_progress_deadline
        for flight in unheard:
            assert flight.taken_at is not None
            if now - flight.taken_at >= deadline:
                why = f"no first progress {deadline:.0f} s after a trainer took it"
                self._retry_or_fail(flight.message.trial_id, why)

    def _retry_or_fail(self, trial_id: int, why: str) -> None:
        """Enqueue a lost trial again, at most ``max_retries`` times, then fail it."""
        flight = self.in_flight.pop(trial_id)
        retries = int(flight.record.attrs.get(Attr.RETRIES, 0))
        if retries < self.max_retries:
            if flight.record.phase == "explore":
                self.counts.explore_used -= 1  # its retry takes the slot again
            self._interrupt(trial_id, why, retries=retries + 1)
            return
        self._fail(flight, f"{why}; given up after {retries} retries")

    def _interrupt(self, trial_id: int, why: str, retries: int | None = None) -> None:
        """Fail a trial that did not finish and enqueue the same parameters again."""
        frozen = stored_trial(self.study, trial_id)
        trial = optuna.trial.Trial(self.study, trial_id)
        self._told.add(trial_id)
        trial.set_user_attr(Attr.ERROR, f"interrupted: {why}")
        trial.set_user_attr(Attr.INTERRUPTED, True)
        self.study.tell(trial, state=TrialState.FAIL)
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

    def _interrupted(self) -> Outcome:
        if not self.transport.durable:
            for trial_id in list(self.in_flight):
                self.in_flight.pop(trial_id)
                self._interrupt(trial_id, "the run was interrupted")
        return Outcome("interrupted", "interrupted; run again to resume", failed=False)

    def _next_phase(self) -> bool:
        """After exploration, enqueue the refine trials once; False when nothing is left."""
        refine = self.spec.training.refine
        if self.waiting > 0:
            return True
        if refine is None or self.refine_started:
            return False
        explored = [r for r in records(self.study) if r.phase == "explore"]
        tradeoff = self.spec.objective.tradeoff
        if tradeoff:  # the front's most accurate members
            ranked = pareto_front(explored, self._direction, tradeoff)[: refine.top_k]
        else:
            ranked = []
            while len(ranked) < refine.top_k and (best := best_of(explored, self._direction)):
                ranked.append(best)  # best first, the earliest of equal values first
                explored.remove(best)
        if not ranked:
            return False
        for rec in ranked:
            self.study.enqueue_trial(
                rec.params, user_attrs={Attr.PHASE: "refine", Attr.REFINES: rec.number}
            )
            self.waiting += 1
        self.refine_started = True
        log.info(
            "refine: retraining the top %d%s for %d epochs",
            len(ranked),
            " of the Pareto front" if tradeoff else "",
            refine.epochs,
        )
        return True

    def _end(self) -> Outcome:
        c = self.counts
        if self.explore_closed is not None:  # refine done within budget.timeout
            best = (
                f"best trial {c.best.number}: {self.spec.objective.metric} {c.best.value:.4f}"
                if c.best is not None and c.best.value is not None
                else "no trial completed"
            )
            return Outcome(
                "timeout",
                f"{c.explore_used} trials explored, then refined within budget.timeout "
                f"{self.spec.budget.timeout}; {best}",
                failed=False,
            )
        best = (
            f"best trial {c.best.number}: {self.spec.objective.metric} {c.best.value:.4f}"
            if c.best is not None and c.best.value is not None
            else "no feasible trial completed"
            if c.infeasible
            else "no trial completed"
        )
        return Outcome("maxTrials", f"{c.explore_used} trials explored; {best}", failed=False)


def trial_message(
    spec: ArchitectureSearchSpec,
    *,
    search: str,
    number: int,
    trial_id: int,
    phase: Literal["explore", "refine"],
    architecture: Architecture,
    progress_timeout: float = 5.0,
) -> TrialMessage:
    """What trainers are sent for trial ``number``: the one derivation, so that a model the
    report retrains is the model the trial trained (epochs by phase, seed by number)."""
    training = spec.training
    refine = training.refine if phase == "refine" else None
    return TrialMessage(
        search=search,
        trial_id=trial_id,
        number=number,
        phase=phase,
        architecture=architecture,
        dataset=spec.dataset,
        epochs=refine.epochs if refine is not None else training.epochs,
        batch_size=training.batch_size,
        mixed_precision=training.mixed_precision,
        metric=spec.objective.metric,
        seed=trial_seed(spec.sampler.seed, number),
        progress_timeout_seconds=progress_timeout,
        measure_model_kb=spec.objective.tradeoff == "modelKB"
        or (
            spec.objective.constraints is not None
            and spec.objective.constraints.max_model_kb is not None
        ),
    )
