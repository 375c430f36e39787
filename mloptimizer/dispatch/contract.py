"""What the dispatch loop agrees on with its transports, its observers and its caller.

A transport hands trials to trainers and brings their messages back as :class:`Inbound`;
an observer hears of trials started and finished; the caller gets an :class:`Outcome`.
:func:`trial_message` is the one derivation of what a trainer is sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from mloptimizer.messages import (
    CheckpointUrls,
    Decision,
    ProgressMessage,
    ResultMessage,
    TrialMessage,
)
from mloptimizer.space import Architecture
from mloptimizer.spec import ArchitectureSearchSpec
from mloptimizer.study import TrialRecord, trial_seed

if TYPE_CHECKING:
    from mloptimizer.dispatch.loop import Dispatcher

__all__ = [
    "CheckpointKeeper",
    "Counts",
    "DeadTrial",
    "EpochProgress",
    "Inbound",
    "Malformed",
    "Observer",
    "Outcome",
    "StopReason",
    "Transport",
    "trial_message",
]

StopReason = Literal[
    "maxTrials",
    "target",
    "timeout",
    "maxCostUSD",
    "maxFailedTrials",
    "builderUnavailable",
    "interrupted",
]


@dataclass(frozen=True)
class DeadTrial:
    """A trial the broker or a trainer gave up on (the dead-letter queue), and why."""

    message: TrialMessage
    reason: str
    # its delivery limit ran out: every delivery ended with its trainer gone (killed,
    # preempted, out of memory), rather than a trainer refusing it
    exhausted: bool = False


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


class CheckpointKeeper(Protocol):
    """Where trials keep their checkpoints when trainers share no folder (the operator's
    bucket): signed URLs for each trial's message, and the clean-up once it ended."""

    def urls(self, trial_id: int) -> CheckpointUrls: ...

    def discard(self, trial_id: int) -> None: ...


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
    worker_id: str = ""  # the trainer that reported it (a pod: "<pod>@<node>")

    @property
    def eta_seconds(self) -> float:
        """The trial's remaining time at its pace so far."""
        return self.seconds_per_epoch * max(0, self.epochs - self.epoch)


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
    (:attr:`~mloptimizer.dispatch.Dispatcher.running`).
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


def trial_message(
    spec: ArchitectureSearchSpec,
    *,
    search: str,
    number: int,
    trial_id: int,
    phase: Literal["explore", "refine"],
    architecture: Architecture,
    progress_timeout: float = 5.0,
    token: str | None = None,
    checkpoint: CheckpointUrls | None = None,
) -> TrialMessage:
    """What trainers are sent for trial ``number``: the one derivation, so that a model the
    report retrains is the model the trial trained (epochs by phase, seed by number).
    ``token``: the trial's capability (None: a fresh random one, for a message nobody
    answers to the dispatcher, such as a retrain); ``checkpoint``: the URLs of its
    checkpoints in a bucket (None: the trainers' folder, if any)."""
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
        class_weights=training.class_weights,
        constraints=spec.objective.constraints,
        seed=trial_seed(spec.sampler.seed, number),
        schedule=refine.schedule if refine is not None else "constant",
        patience=refine.patience if refine is not None else 0,
        progress_timeout_seconds=progress_timeout,
        measure_model_kb=spec.objective.tradeoff == "modelKB"
        or (
            spec.objective.constraints is not None
            and spec.objective.constraints.max_model_kb is not None
        ),
        checkpoint=checkpoint,
        **({"token": token} if token is not None else {}),
    )
