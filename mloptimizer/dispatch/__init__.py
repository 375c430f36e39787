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

Where things are, and where a new rule goes:

* ``contract`` — what transports, observers and callers see: :class:`Transport`,
  :class:`Inbound`, :class:`Observer`, :class:`Outcome`, :class:`Counts`,
  :func:`trial_message`. A new kind of received message starts here.
* ``judgements`` — pure verdicts (no I/O): a message's refusal, too large, constraint
  violations, the values told, a result's attributes, a budget limit met. A new "is this
  acceptable" rule goes here, with a unit test in ``tests/test_judgements.py``.
* ``ledger`` — the trials in flight, told and waiting, their counts, and every write that
  ends a trial (a result told, failed, interrupted and re-enqueued, cancelled).
* ``phases`` — explore, refine, end: when exploration closes, what refine retrains, the
  outcome. A new phase rule goes here.
* ``deadlines`` — silence and first-progress timeouts, retries. A new timeout goes here.
* ``loop`` — :class:`Dispatcher` (a :class:`~mloptimizer.dispatch.phases.Phases`, itself
  a :class:`~mloptimizer.dispatch.ledger.Ledger`): the loop itself, sending trials and
  handling each received message in one method (``Dispatcher._handle``), by asking the
  modules above.
"""

from __future__ import annotations

from mloptimizer.dispatch.contract import (
    CheckpointKeeper,
    Counts,
    DeadTrial,
    EpochProgress,
    Inbound,
    Malformed,
    Observer,
    Outcome,
    StopReason,
    Transport,
    trial_message,
)
from mloptimizer.dispatch.loop import Dispatcher

__all__ = [
    "CheckpointKeeper",
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
