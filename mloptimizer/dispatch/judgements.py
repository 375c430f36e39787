"""Pure judgements of the dispatch loop: no study, no transport, no clock.

Each takes what it judges and the part of the spec it judges by, and returns the verdict
(a reason, a number, a dict of attributes); the loop writes the verdicts. A new rule of
the kind "is this message / model / result acceptable" goes here, with its unit test in
``tests/test_judgements.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from mloptimizer.capability import holds
from mloptimizer.dispatch.contract import Counts, DeadTrial, Outcome
from mloptimizer.messages import ProgressMessage, ResultMessage, TrialMessage, in_range
from mloptimizer.sizing import ModelSize, memory_bytes
from mloptimizer.space import constraint_limits
from mloptimizer.spec import ArchitectureSearchSpec, Constraints, Tradeoff, parse_duration
from mloptimizer.study import Attr, TrialRecord

__all__ = [
    "EarlierAttempts",
    "budget_stop",
    "claim_of",
    "objective_values",
    "reached",
    "refusal",
    "result_attrs",
    "too_large",
    "violations",
    "worst_value",
]

Direction = Literal["maximize", "minimize"]


def too_large(size: ModelSize, batch_size: int, memory_budget: int | None) -> str | None:
    """Why a trainer with ``memory_budget`` bytes could not hold a model of ``size``, or
    None when it fits (or no budget is set)."""
    if memory_budget is None:
        return None
    need = memory_bytes(size, batch_size)
    if need <= memory_budget:
        return None
    return (
        f"too_large: {size.parameters / 1e6:.1f} M parameters, about "
        f"{need / 2**30:.1f} GiB to train with batches of {batch_size}, "
        f"over the trainer's {memory_budget / 2**30:.1f} GiB (workers.resources."
        "memory); narrow the search space or raise the memory"
    )


def violations(
    constraints: Constraints | None,
    params: int,
    mflops: float | None,
    model_kb: float | None,
    *,
    trained: bool,
) -> tuple[dict[str, float], str | None]:
    """Each set constraint's excess (``<= 0``: met) and why the model breaks one.

    Before training the int8 size is unknown: only a model whose weights alone (a byte
    each) are over ``maxModelKB`` is judged then; after, a size the trainer could not
    measure counts as broken.
    """
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


def objective_values(
    tradeoff: Tradeoff | None,
    value: float | None,
    params: int,
    mflops: float | None,
    model_kb: float | None,
    cost_usd: float = 0.0,
) -> float | list[float] | None:
    """What the study is told of a complete trial: its value, and under a tradeoff its
    size figure or its dollars too (None when that figure is missing)."""
    if value is None or tradeoff is None:
        return value
    size = {"params": float(params), "mflops": mflops, "modelKB": model_kb, "costUSD": cost_usd}[
        tradeoff
    ]
    return None if size is None else [value, size]


def worst_value(direction: Direction) -> float:
    """The value an infeasible trial is told: never better than a real one."""
    return 0.0 if direction == "maximize" else 1e9


def claim_of(
    message: ProgressMessage | ResultMessage | DeadTrial,
) -> ProgressMessage | ResultMessage | TrialMessage:
    """The part of ``message`` that names its trial (search, id, number)."""
    return message.message if isinstance(message, DeadTrial) else message


def refusal(
    message: ProgressMessage | ResultMessage | DeadTrial,
    *,
    search: str,
    sent: TrialMessage | None,
    told: bool,
) -> str | None:
    """Why ``message`` cannot be about a trial of ``search``, or None if it can be.

    ``sent`` is what was sent for the trial it claims while that trial is in flight;
    ``told`` whether that trial already finished (a copy of it is then dropped, not
    refused). A message must carry the trial's token (only the trainer that received
    the trial learns it), and a result's value must lie in its metric's range.
    """
    claimed = claim_of(message)
    if claimed.search != search:
        return f"it claims search {claimed.search!r}, not {search!r}"
    if sent is None:
        if told:
            return None  # a copy of a finished trial: dropped (or pruned) as such
        return f"no trial with id {claimed.trial_id} is in flight in this search"
    if claimed.number != sent.number:
        return f"trial id {claimed.trial_id} is trial {sent.number}, not {claimed.number}"
    if not holds(claimed.token, sent.token):
        return (
            f"it does not carry trial {sent.number}'s token: only the trainer that received "
            "the trial can speak for it"
        )
    if isinstance(message, ProgressMessage):
        if message.epoch > sent.epochs:
            return f"epoch {message.epoch} of a trial of {sent.epochs} epochs"
    elif isinstance(message, ResultMessage):
        if message.phase != sent.phase:
            return f"a {message.phase} result for a {sent.phase} trial"
        if message.epochs_run > sent.epochs or len(message.history) > sent.epochs:
            return f"more epochs than the trial's {sent.epochs}"
        if message.resumed_at > message.epochs_run:
            return f"resumed_at: {message.resumed_at} is past epochs_run {message.epochs_run}"
        if message.value is not None and not in_range(sent.metric, message.value):
            return f"value: {message.value:.6g} is out of range for {sent.metric}"
    return None


@dataclass(frozen=True)
class EarlierAttempts:
    """What the attempts before the one that ended a trial did, as their progress told:
    epochs they trained, and epochs resumed attempts went on from (their checkpoints)."""

    trained: int = 0
    resumed: int = 0

    @classmethod
    def of(
        cls, trained: set[tuple[int, int]], replayed: dict[int, int], last: int
    ) -> EarlierAttempts:
        """From (attempt, epoch) pairs trained and attempt -> checkpoint epoch, leaving out
        attempt ``last`` (its result says the same for itself, whatever progress was lost)."""
        return cls(
            trained=sum(1 for attempt, _ in trained if attempt != last),
            resumed=sum(epoch for attempt, epoch in replayed.items() if attempt != last),
        )


def result_attrs(
    message: ResultMessage,
    price_per_hour: float,
    metric: str,
    earlier: EarlierAttempts = EarlierAttempts(),
) -> dict[str, object]:
    """The attributes a result writes at once (:attr:`Attr.RESULT`): who trained it, how
    long, what it measured and cost, and the error, if any.

    The cost is the last attempt's time, plus the epochs earlier attempts trained at its
    pace: the dollars a killed or preempted trainer spent are spent. Of those, the epochs
    that had to be trained again (``redone_usd``) and the ones checkpoints spared
    (``saved_usd``: epochs resumed attempts did not train again) are kept apart."""
    seconds = message.train_seconds + message.dataset_load_seconds
    own = message.epochs_run - message.resumed_at  # trained by the last attempt
    per_epoch = price_per_hour * message.train_seconds / 3600.0 / own if own > 0 else 0.0
    redone = max(0, earlier.trained + own - message.epochs_run)
    saved = earlier.resumed + message.resumed_at
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
        Attr.COST: price_per_hour * seconds / 3600.0 + earlier.trained * per_epoch,
    }
    if redone:
        result[Attr.REDONE_EPOCHS] = redone
        result[Attr.REDONE_USD] = redone * per_epoch
    if saved:
        result[Attr.SAVED_USD] = saved * per_epoch
    if message.resumed_at:  # this attempt went on from a checkpoint: epochs not redone
        result[Attr.RESUMED_AT] = message.resumed_at
    if message.error:
        result[Attr.ERROR] = message.error
    elif message.state == "complete" and message.value is None:
        result[Attr.ERROR] = f"the trainer sent no {metric}"
    return result


def reached(direction: Direction, target: float, best: TrialRecord) -> bool:
    """Whether ``best`` reached the objective's ``target``."""
    assert best.value is not None
    if direction == "maximize":
        return best.value >= target
    return best.value <= target


def budget_stop(
    spec: ArchitectureSearchSpec, counts: Counts, elapsed: Callable[[], float]
) -> Outcome | None:
    """How the search ends now that a budget limit is met, or None while none is.

    Checked in a fixed order: failures, target, timeout, cost. ``elapsed`` (seconds since
    the study began) is asked only when a timeout is set.
    """
    budget, objective, c = spec.budget, spec.objective, counts
    if c.failed >= max(1, budget.max_failed_trials):
        return Outcome(
            "maxFailedTrials",
            f"{c.failed} trials failed (budget.maxFailedTrials {budget.max_failed_trials})",
            failed=True,
        )
    if (
        objective.target is not None
        and c.best is not None
        and reached(objective.study_direction, objective.target, c.best)
    ):
        return Outcome(
            "target",
            f"trial {c.best.number} reached {objective.metric} {c.best.value:.4f} "
            f"(objective.target {objective.target})",
            failed=False,
        )
    if budget.timeout is not None and elapsed() >= parse_duration(budget.timeout):
        return Outcome("timeout", f"budget.timeout {budget.timeout} has passed", failed=False)
    if budget.max_cost_usd is not None and c.cost_usd >= budget.max_cost_usd:
        return Outcome(
            "maxCostUSD",
            f"spent ${c.cost_usd:.2f} of budget.maxCostUSD ${budget.max_cost_usd:.2f}",
            failed=False,
        )
    return None
