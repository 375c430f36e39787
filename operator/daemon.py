"""One search's life in the operator: the dispatch loop over PostgreSQL and RabbitMQ, with
the status, the trainer replicas and the Events following it.

Everything Kubernetes goes through :class:`Kube` (four calls), so this module runs — and
is tested — without kopf: the kopf daemon builds a ``Kube`` and calls :func:`run_search`.
The study in PostgreSQL is the truth: after a restart the loop reads it back and adopts the
trials still in RabbitMQ, so no trial is told twice.

Errors by kind: a lost broker or database, or a Kubernetes API that is not there yet or
overloaded (:func:`mloptimizer.faults.lost_service` with
:func:`~mloptimizer.operator.kube.kube_outage`), is waited out with backoff
(:class:`~mloptimizer.faults.Resume`) and shown as ``Degraded``/``ConnectionLost``; a
study made from another search cannot succeed and ends the search as ``Failed``; anything
else is a bug: it is logged once with its traceback, shown as ``Degraded``/``InternalError``,
and the daemon stops (an operator restart tries again) instead of retrying it forever.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import optuna

from mloptimizer.amqp import AmqpTransport, prefetch_for
from mloptimizer.capability import round_token
from mloptimizer.dispatch import Dispatcher, EpochProgress, Outcome, trial_message
from mloptimizer.faults import Resume, StopFlag
from mloptimizer.messages import CHECKPOINTS_DIR, ReportData, TrialMessage
from mloptimizer.operator.delivery import FinalJobChannel, Where, deliver_best
from mloptimizer.operator.kube import kube_outage
from mloptimizer.operator.metrics import Metrics
from mloptimizer.operator.objectstore import TrialCheckpoints
from mloptimizer.operator.progress import (
    ReplicaPlan,
    now_rfc3339,
    set_condition,
    status_from_counts,
)
from mloptimizer.reporting import report_data
from mloptimizer.sizing import trainer_budget
from mloptimizer.spec import ArchitectureSearchSpec
from mloptimizer.study import (
    Attr,
    StudyMismatch,
    TrialRecord,
    best_of,
    capability_key,
    open_study,
    records,
    study_name,
)

__all__ = [
    "Kube",
    "SearchConfig",
    "StatusReporter",
    "StopFlag",
    "resume_delivery",
    "run_search",
]

log = logging.getLogger(__name__)


class Kube(Protocol):
    """The Kubernetes side of one search."""

    def patch_status(self, patch: dict[str, Any]) -> None:
        """Merge ``patch`` into the search's status."""

    def scale(self, replicas: int) -> None:
        """Set the trainer Deployment's replicas."""

    def event(self, type_: str, reason: str, message: str) -> None:
        """Emit a Kubernetes Event on the search (type_ Normal or Warning)."""

    def ready_replicas(self) -> int:
        """Trainer pods ready now (the Deployment's ``status.readyReplicas``)."""

    def mark_busy(self, busy: dict[str, int]) -> None:
        """Before a scale-down: make the trainer pods in ``busy`` (pod name -> epochs done of
        the trial it trains) cost more to delete than idle ones."""


@dataclass
class SearchConfig:
    """Where one search's study and queues live, and how often to tell Kubernetes."""

    namespace: str
    name: str
    storage_url: str = field(repr=False)  # carries a password
    broker_url: str = field(repr=False)  # carries a password
    queue_prefix: str = "mlopt"
    status_interval: float = 1.0  # at most one status patch a second per search
    max_backoff: float = 30.0
    stale_after: float | None = 3600.0  # a trial silent this long is retried
    uid: str | None = None  # the search object's uid, kept by its study

    @property
    def study(self) -> str:
        return study_name(self.namespace, self.name)


@dataclass
class StatusReporter:
    """Turns dispatcher events into coalesced status patches, replicas and Events."""

    kube: Kube
    spec: ArchitectureSearchSpec
    interval: float
    generation: int | None = None
    clock: Callable[[], float] = time.monotonic
    conditions: list[dict[str, Any]] = field(default_factory=list)
    metrics: Metrics | None = None
    _dirty: bool = True
    _last_patch: float = -1e9
    plan: ReplicaPlan = field(default_factory=ReplicaPlan)
    _replicas: int | None = None
    _best_number: int | None = None
    _refusal: str | None = None
    _busy: dict[int, tuple[str, int]] = field(default_factory=dict)  # trial: (pod, epochs)

    def note_refusal(self, refusal: str | None) -> None:
        """Show (or clear) a refused spec change as a Degraded condition."""
        if refusal == self._refusal:
            return
        self._refusal = refusal
        if refusal:
            self.conditions = set_condition(
                self.conditions, "Degraded", "True", "SpecChangeRefused", refusal
            )
        else:
            self.conditions = set_condition(
                self.conditions, "Degraded", "False", "SpecAccepted", "the spec in force"
            )
        self._dirty = True

    def started(self, trial: TrialRecord, dispatcher: Dispatcher) -> None:
        self._dirty = True
        if self.metrics is not None:
            self.metrics.dispatched(dispatcher.search, dispatcher.last_dispatch_seconds)

    def finished(self, trial: TrialRecord, dispatcher: Dispatcher) -> None:
        self._dirty = True
        self._busy.pop(trial.number, None)
        if self.metrics is not None:
            self.metrics.finished(dispatcher.search, trial)
        best = dispatcher.counts.best
        if best is not None and best.number != self._best_number and best.value is not None:
            if self._best_number is not None or trial.number == best.number:
                self.kube.event(
                    "Normal",
                    "NewBest",
                    f"trial {best.number} reached {self.spec.objective.metric} "
                    f"{best.value:.4f}: {best.architecture.summary() if best.architecture else ''}",
                )
            self._best_number = best.number
        if trial.state == "failed" and not trial.interrupted:
            self.kube.event(
                "Warning", "TrialFailed", f"trial {trial.number} failed: {trial.error or '?'}"
            )

    def progressed(self, epoch: EpochProgress) -> None:
        """Epochs show in the trainers' logs and the status follows finished trials; here
        only which pod trains what, and how far (see :meth:`scale`)."""
        pod = epoch.worker_id.partition("@")[0]
        if pod:
            self._busy[epoch.number] = (pod, epoch.epoch)

    def tick(self, dispatcher: Dispatcher) -> None:
        self.spec = dispatcher.spec
        self.note_refusal(dispatcher.refused)
        replicas = self.plan.replicas(len(dispatcher.in_flight), self.spec.workers, self.clock())
        if replicas != self._replicas:
            self.scale(replicas)
        if self._dirty and self.clock() - self._last_patch >= self.interval:
            self.flush(dispatcher)

    def scale(self, replicas: int) -> None:
        """Set the trainer replicas (and show them in the next status patch). Fewer than
        now: Kubernetes picks the pods to remove, so the busy ones are marked first
        (``controller.kubernetes.io/pod-deletion-cost``): idle trainers go before one in
        the middle of a trial. A trainer removed anyway costs at most an epoch (its trial's
        checkpoint)."""
        if self._replicas is not None and replicas < self._replicas and self._busy:
            try:
                self.kube.mark_busy({pod: epochs for pod, epochs in self._busy.values()})
            except Exception as error:  # a refused or lost API: scale anyway
                log.warning("could not mark the busy trainers before scaling down: %s", error)
        self.kube.scale(replicas)
        self._replicas = replicas
        self._dirty = True

    def flush(self, dispatcher: Dispatcher, **extra: Any) -> None:
        """Patch the status now."""
        patch = status_from_counts(dispatcher.counts, self.spec, dispatcher.running)
        patch["phase"] = "Refining" if dispatcher.refine_started else "Running"
        patch["workers"] = {"desired": self._replicas or 0, "ready": self.kube.ready_replicas()}
        patch["observedGeneration"] = self.generation
        patch.update(extra)
        if "conditions" not in patch:
            patch["conditions"] = self.conditions
        self.kube.patch_status(patch)
        if self.metrics is not None:
            transport = dispatcher.transport
            queued = transport.queued() if isinstance(transport, AmqpTransport) else None
            self.metrics.update(dispatcher.search, dispatcher, queued)
        self._dirty = False
        self._last_patch = self.clock()


def run_search(
    config: SearchConfig,
    spec: ArchitectureSearchSpec,
    kube: Kube,
    *,
    stop: StopFlag,
    generation: int | None = None,
    latest_spec: Callable[[], ArchitectureSearchSpec | str] | None = None,
    metrics: Metrics | None = None,
    price_of: Callable[[str], float | None] | None = None,
    destination: Where | None = None,
) -> Outcome | None:
    """Run a search until it ends or ``stop`` is set; returns how it ended (None: stopped).

    A lost broker or database is retried with backoff and shown as ``Degraded``; the loop
    then resumes from the study. ``latest_spec`` returns the spec as last edited (or why the
    edit could not be read); the dispatcher applies what may change
    (:meth:`~mloptimizer.dispatch.Dispatcher.update_spec`) and a refusal shows as
    ``Degraded``, reason ``SpecChangeRefused``.
    ``price_of`` gives the USD/hour of the machine a worker id runs on (a GPU pool's).
    ``destination``: where the best model is delivered when the search succeeds
    (:func:`~mloptimizer.operator.delivery.deliver_best`).
    """
    reporter = StatusReporter(kube, spec, config.status_interval, generation, metrics=metrics)
    reporter.conditions = set_condition(
        [], "Ready", "True", "Dispatching", "the search is dispatching trials"
    )
    resume = Resume(
        stop,
        (kube_outage,),
        cap=config.max_backoff,
        say=lambda line: log.warning("search %s: %s", config.study, line),
        on_wait=lambda _what, error: _degraded(reporter, kube, error),
    )
    checkpoints = _bucket_checkpoints(config, spec, destination)
    try:
        while not stop.is_set():
            try:
                dispatcher = _start(config, spec, kube, reporter, resume, price_of, checkpoints)
                outcome = dispatcher.run(should_stop=stop.is_set, latest_spec=latest_spec)
            except StudyMismatch as error:  # cannot succeed: the search ends
                _mismatch(reporter, kube, error)
                return None
            except Exception as error:
                if resume.retry(error):  # broker, database or API away: degraded, then again
                    continue  # the study keeps what was told
                _internal(reporter, kube, error)
                return None
            if outcome.reason == "interrupted":
                return None
            best = dispatcher.counts.best
            output = dispatcher.spec.output
            delivering = (
                destination is not None
                and (output.pvc is not None or output.s3 is not None)
                and not outcome.failed
                and best is not None
                and best.architecture is not None
            )
            _finish(reporter, dispatcher, kube, outcome, delivering=delivering)
            if delivering and best is not None and best.architecture is not None:
                message = trial_message(
                    dispatcher.spec,
                    search=config.study,
                    number=best.number,
                    trial_id=best.trial_id,
                    phase=best.phase,
                    architecture=best.architecture,
                )
                assert destination is not None
                _deliver(
                    config,
                    dispatcher.spec,
                    message,
                    kube,
                    reporter.conditions,
                    stop,
                    destination,
                    capability_key(dispatcher.study),
                    report_data(
                        dispatcher.study,
                        dispatcher.spec,
                        {"reason": outcome.reason, "message": outcome.message},
                    ),
                )
            return outcome
        return None
    finally:
        if checkpoints is not None:
            checkpoints.close()  # its removals finished, its thread ended


def _bucket_checkpoints(
    config: SearchConfig, spec: ArchitectureSearchSpec, destination: Where | None
) -> TrialCheckpoints | None:
    """Where trials keep their checkpoints when the search delivers to a bucket: trainers
    then share no folder (an ``output.pvc`` search's keep theirs on the claim)."""
    if destination is None or spec.output.s3 is None or spec.output.pvc is not None:
        return None
    try:
        found = destination()
    except Exception as error:  # its Secret unusable: the final job will say so
        log.warning("search %s: no checkpoints in its bucket: %s", config.study, error)
        return None
    if found is None or found.bucket is None:
        return None
    return TrialCheckpoints(found.bucket, f"{found.folder}/{CHECKPOINTS_DIR}")


def _start(
    config: SearchConfig,
    spec: ArchitectureSearchSpec,
    kube: Kube,
    reporter: StatusReporter,
    resume: Resume,
    price_of: Callable[[str], float | None] | None,
    checkpoints: TrialCheckpoints | None = None,
) -> Dispatcher:
    """The search's dispatcher over its study and queues, said in the status and Events."""
    study, in_force = _open(spec, config)
    transport = AmqpTransport(
        config.broker_url,
        config.study,
        prefix=config.queue_prefix,
        max_backoff=2.0,
        prefetch=prefetch_for(in_force.budget.parallelism),
    )
    dispatcher = Dispatcher(
        study,
        in_force,
        transport,
        search=config.study,
        observer=reporter,
        stale_after=config.stale_after,
        price_of=price_of,
        memory_budget=trainer_budget(in_force),
        checkpoints=checkpoints,
    )
    resume.back()
    if _is_degraded(reporter):  # back: say so (the next flush writes it)
        reporter.conditions = set_condition(
            reporter.conditions, "Degraded", "False", "Connected", "broker and database reachable"
        )
    resumed = bool(study.get_trials(deepcopy=False))
    kube.event(
        "Normal",
        "Resumed" if resumed else "Started",
        f"study {config.study}: "
        + ("resumed from the database" if resumed else "dispatching the first trials"),
    )
    reporter.flush(
        dispatcher,
        studyName=config.study,
        startTime=_rfc3339(study.user_attrs.get(Attr.STARTED_AT)),
        conditions=set_condition(
            reporter.conditions, "Progressing", "True", "Dispatching", "trials in flight"
        ),
    )
    return dispatcher


def _deliver(
    config: SearchConfig,
    spec: ArchitectureSearchSpec,
    best: TrialMessage,
    kube: Kube,
    conditions: list[dict[str, Any]],
    stop: StopFlag,
    where: Where,
    key: str,
    report: ReportData | None = None,
) -> None:
    """The final job of ``best`` (:func:`~mloptimizer.operator.delivery.deliver_best`);
    ``key``: the study's capability key, from which each round's token derives; ``report``:
    the study's part of the report the job delivers with the model."""
    deliver_best(
        best,
        list(spec.output.formats),
        where,
        kube,
        stop,
        channel=lambda: FinalJobChannel(config.broker_url, config.study, config.queue_prefix),
        conditions=conditions,
        silence=config.stale_after or 3600.0,
        max_backoff=config.max_backoff,
        token_of=lambda round_: round_token(key, best.trial_id, round_),
        report=report,
    )


def resume_delivery(
    config: SearchConfig,
    spec: ArchitectureSearchSpec,
    kube: Kube,
    conditions: list[dict[str, Any]],
    stop: StopFlag,
    where: Where,
) -> None:
    """After an operator restart: the final job of a search that ended while it ran."""
    study = open_study(spec, config.study, config.storage_url, owner=config.uid)
    objective = spec.objective
    best = best_of(records(study), objective.study_direction, objective.tradeoff)
    if best is None or best.architecture is None:
        return
    message = trial_message(
        spec,
        search=config.study,
        number=best.number,
        trial_id=best.trial_id,
        phase=best.phase,
        architecture=best.architecture,
    )
    report = report_data(study, spec, None)
    _deliver(
        config, spec, message, kube, list(conditions), stop, where, capability_key(study), report
    )


def _open(
    spec: ArchitectureSearchSpec, config: SearchConfig
) -> tuple[optuna.Study, ArchitectureSearchSpec]:
    """The search's study and the spec it runs under. A search edited while no operator ran
    goes on under its study's spec; the edit then shows as refused, from the dispatcher."""
    try:
        return open_study(spec, config.study, config.storage_url, owner=config.uid), spec
    except StudyMismatch as mismatch:
        if mismatch.stored is None or not mismatch.same_owner:
            raise  # a new search under an old study's name: it cannot go on
        log.warning("%s: going on under the study's own spec", mismatch)
        stored = mismatch.stored
        return open_study(stored, config.study, config.storage_url, owner=config.uid), stored


def _is_degraded(reporter: StatusReporter) -> bool:
    return any(
        c["type"] == "Degraded" and c["status"] == "True" and c["reason"] == "ConnectionLost"
        for c in reporter.conditions
    )


def _rfc3339(epoch: Any) -> str:
    """The study's start (Unix time) as RFC 3339; now for a study that has none."""
    moment = (
        datetime.datetime.fromtimestamp(float(epoch), datetime.UTC)
        if isinstance(epoch, int | float)
        else datetime.datetime.now(datetime.UTC)
    )
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _mismatch(reporter: StatusReporter, kube: Kube, error: StudyMismatch) -> None:
    """The study was made from another search: nothing to retry, the search fails."""
    message = str(error)[:4000]
    log.error("search failed: %s", message)
    conditions = set_condition(reporter.conditions, "Ready", "False", "StudyMismatch", message)
    conditions = set_condition(conditions, "Complete", "True", "StudyMismatch", message)
    kube.patch_status(
        {"phase": "Failed", "message": message, "conditions": conditions,
         "completionTime": now_rfc3339()}
    )  # fmt: skip
    kube.scale(0)
    kube.event("Warning", "StudyMismatch", message[:1024])


def _internal(reporter: StatusReporter, kube: Kube, error: Exception) -> None:
    """A bug: log it once with its traceback, say so in the status, stop this daemon."""
    log.exception("search stopped by an internal error")
    message = f"internal error ({type(error).__name__}: {error}); see the operator log"[:4000]
    reporter.conditions = set_condition(
        reporter.conditions, "Degraded", "True", "InternalError", message
    )
    try:
        kube.patch_status({"conditions": reporter.conditions, "message": message})
    except Exception:  # the API may be down too; the log has it
        log.exception("could not patch the status")
    return None


def _degraded(reporter: StatusReporter, kube: Kube, error: BaseException) -> None:
    """While a service is away: ``Degraded``/``ConnectionLost``, with the error."""
    message = f"{type(error).__name__}: {error}"[:500]
    reporter.conditions = set_condition(
        reporter.conditions, "Degraded", "True", "ConnectionLost", message
    )
    try:
        kube.patch_status({"conditions": reporter.conditions, "message": f"retrying: {message}"})
    except Exception as patch_error:  # the API may be down too; the next patch will say it
        log.warning("could not patch the status: %s", patch_error)


def _finish(
    reporter: StatusReporter,
    dispatcher: Dispatcher,
    kube: Kube,
    outcome: Outcome,
    *,
    delivering: bool = False,
) -> None:
    # The final job keeps one trainer, warm, rather than stop them all and start a cold one.
    reporter.scale(1 if delivering else 0)
    conditions = reporter.conditions
    if delivering:  # set with the phase, so that a restart in between resumes the job
        conditions = set_condition(
            conditions, "Delivered", "Unknown", "Delivering", "the final job is starting"
        )
    conditions = set_condition(conditions, "Progressing", "False", "Finished", outcome.message)
    conditions = set_condition(
        conditions,
        "Complete",
        "True",
        _reason(outcome),
        outcome.message,
    )
    reporter.flush(
        dispatcher,
        phase="Failed" if outcome.failed else "Succeeded",
        completionTime=now_rfc3339(),
        message=outcome.message,
        conditions=conditions,
    )
    reporter.conditions = conditions
    kube.event("Warning" if outcome.failed else "Normal", "Finished", outcome.message)


def _reason(outcome: Outcome) -> str:
    return {
        "maxTrials": "MaxTrialsReached",
        "target": "TargetReached",
        "timeout": "TimeoutReached",
        "maxCostUSD": "CostLimitReached",
        "builderUnavailable": "BuilderUnavailable",
    }.get(outcome.reason, "Failed" if outcome.failed else "Finished")
