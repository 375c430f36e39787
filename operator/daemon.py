"""One search's life in the operator: the dispatch loop over PostgreSQL and RabbitMQ, with
the status, the trainer replicas and the Events following it.

Everything Kubernetes goes through :class:`Kube` (three calls), so this module runs — and
is tested — without kopf: the kopf daemon in ``handlers.py`` only builds a ``Kube`` and
calls :func:`run_search`. The study in PostgreSQL is the truth: after a restart the loop
reads it back and adopts the trials still in RabbitMQ, so no trial is told twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from mloptimizer.amqp import AmqpTransport
from mloptimizer.dispatch import Dispatcher, Outcome
from mloptimizer.operator.metrics import Metrics
from mloptimizer.operator.progress import (
    desired_replicas,
    now_rfc3339,
    set_condition,
    status_from_counts,
)
from mloptimizer.spec import ArchitectureSearchSpec
from mloptimizer.study import TrialRecord, open_study, study_name

__all__ = ["Kube", "SearchConfig", "StatusReporter", "StopFlag", "run_search"]

log = logging.getLogger(__name__)


class StopFlag(Protocol):
    """A threading.Event, or kopf's ``stopped`` flag of a sync daemon."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> Any: ...


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


@dataclass
class SearchConfig:
    """Where one search's study and queues live, and how often to tell Kubernetes."""

    namespace: str
    name: str
    storage_url: str
    broker_url: str
    queue_prefix: str = "mlopt"
    status_interval: float = 1.0  # at most one status patch a second per search
    max_backoff: float = 30.0
    stale_after: float | None = 3600.0  # a trial silent this long is retried

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
    _replicas: int | None = None
    _best_number: int | None = None
    _refusal: str | None = None

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

    def tick(self, dispatcher: Dispatcher) -> None:
        self.spec = dispatcher.spec
        replicas = desired_replicas(len(dispatcher.in_flight), self.spec.workers, ended=False)
        if replicas != self._replicas:
            self.kube.scale(replicas)
            self._replicas = replicas
            self._dirty = True
        if self._dirty and self.clock() - self._last_patch >= self.interval:
            self.flush(dispatcher)

    def flush(self, dispatcher: Dispatcher, **extra: Any) -> None:
        """Patch the status now."""
        patch = status_from_counts(dispatcher.counts, self.spec)
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
    latest_spec: Callable[[], tuple[ArchitectureSearchSpec, str | None]] | None = None,
    metrics: Metrics | None = None,
    price_of: Callable[[str], float | None] | None = None,
) -> Outcome | None:
    """Run a search until it ends or ``stop`` is set; returns how it ended (None: stopped).

    A lost broker or database is retried with backoff and shown as ``Degraded``; the loop
    then resumes from the study. ``latest_spec`` returns the spec as edited while the search
    runs (budget, parallelism and worker bounds take effect at once) and why the last edit
    was refused, if it was (shown as ``Degraded``, reason ``SpecChangeRefused``).
    ``price_of`` gives the USD/hour of the machine a worker id runs on (a GPU pool's).
    """
    reporter = StatusReporter(kube, spec, config.status_interval, generation, metrics=metrics)
    reporter.conditions = set_condition(
        [], "Ready", "True", "Dispatching", "the search is dispatching trials"
    )
    backoff = 0.5
    while not stop.is_set():
        try:
            study = open_study(spec, config.study, config.storage_url)
            transport = AmqpTransport(
                config.broker_url, config.study, prefix=config.queue_prefix, max_backoff=2.0
            )
            dispatcher = Dispatcher(
                study,
                spec,
                transport,
                search=config.study,
                observer=reporter,
                stale_after=config.stale_after,
                price_of=price_of,
            )
        except Exception as error:  # broker or database unreachable: degrade, retry
            backoff = _degraded(reporter, kube, error, backoff, config.max_backoff, stop)
            continue
        if backoff > 0.5:
            reporter.conditions = set_condition(
                reporter.conditions,
                "Degraded",
                "False",
                "Connected",
                "broker and database reachable",
            )
            backoff = 0.5
        started = now_rfc3339()
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
            startTime=study.user_attrs.get("start_time_rfc3339", started),
            conditions=set_condition(
                reporter.conditions, "Progressing", "True", "Dispatching", "trials in flight"
            ),
        )
        if "start_time_rfc3339" not in study.user_attrs:
            study.set_user_attr("start_time_rfc3339", started)

        def should_stop(dispatcher: Dispatcher = dispatcher) -> bool:
            if latest_spec is not None:
                dispatcher.spec, refusal = latest_spec()
                reporter.note_refusal(refusal)
            return stop.is_set()

        try:
            outcome = dispatcher.run(should_stop=should_stop)
        except Exception as error:  # lost mid-run: the study keeps what was told
            backoff = _degraded(reporter, kube, error, backoff, config.max_backoff, stop)
            continue
        if outcome.reason == "interrupted":
            return None
        _finish(reporter, dispatcher, kube, outcome)
        return outcome
    return None


def _degraded(
    reporter: StatusReporter,
    kube: Kube,
    error: Exception,
    backoff: float,
    max_backoff: float,
    stop: StopFlag,
) -> float:
    message = f"{type(error).__name__}: {error}"[:500]
    log.warning("search degraded (%s); retrying in %.1fs", message, backoff)
    reporter.conditions = set_condition(
        reporter.conditions, "Degraded", "True", "ConnectionLost", message
    )
    try:
        kube.patch_status({"conditions": reporter.conditions, "message": f"retrying: {message}"})
    except Exception:  # the API may be down too; the next patch will say it
        log.exception("could not patch the status")
    stop.wait(backoff)
    return min(backoff * 2, max_backoff)


def _finish(reporter: StatusReporter, dispatcher: Dispatcher, kube: Kube, outcome: Outcome) -> None:
    kube.scale(0)
    reporter._replicas = 0
    conditions = reporter.conditions
    conditions = set_condition(conditions, "Progressing", "False", "Finished", outcome.message)
    conditions = set_condition(
        conditions,
        "Complete",
        "True",
        "Failed" if outcome.failed else _reason(outcome),
        outcome.message,
    )
    reporter.flush(
        dispatcher,
        phase="Failed" if outcome.failed else "Succeeded",
        completionTime=now_rfc3339(),
        message=outcome.message,
        conditions=conditions,
    )
    kube.event("Warning" if outcome.failed else "Normal", "Finished", outcome.message)


def _reason(outcome: Outcome) -> str:
    return {
        "maxTrials": "MaxTrialsReached",
        "target": "TargetReached",
        "timeout": "TimeoutReached",
        "maxCostUSD": "CostLimitReached",
    }.get(outcome.reason, "Finished")
