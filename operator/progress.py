"""What the status says: phase, counts, best trial, workers, cost, conditions. Pure
functions of the dispatcher's counts, so the daemon only decides *when* to patch."""

from __future__ import annotations

import datetime
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from mloptimizer.dispatch import Counts
from mloptimizer.spec import ArchitectureSearchSpec, Workers
from mloptimizer.study import Attr, TrialRecord, pareto_front, size_of

__all__ = [
    "SCALE_DOWN_SECONDS",
    "ReplicaPlan",
    "desired_replicas",
    "now_rfc3339",
    "progress_text",
    "set_condition",
    "status_from_counts",
]

ConditionStatus = Literal["True", "False", "Unknown"]


def now_rfc3339() -> str:
    """The current time as Kubernetes writes it."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def desired_replicas(work: int, workers: Workers, ended: bool) -> int:
    """Trainer pods wanted: one per trial in flight (or per ``trainersPerGpu`` x its GPUs
    of them), within the bounds; none once ended."""
    if ended:
        return 0
    if workers.gpu_pool is not None and workers.gpu_pool.mode == "Direct":
        return workers.min_replicas  # the rented containers are the trainers
    pods = math.ceil(work / workers.processes_per_pod)  # trainers sharing a pod's GPUs
    return max(workers.min_replicas, min(workers.max_replicas, pods))


# How long a lower trainer count must hold before the Deployment shrinks (Kubernetes' HPA has
# the same idea, stabilizationWindowSeconds): between two waves of trials the work in flight
# dips for a moment, and shrinking then would stop a warm trainer and start a cold one (its
# image, TensorFlow and its dataset) a second later.
SCALE_DOWN_SECONDS = 30.0


@dataclass
class ReplicaPlan:
    """Trainer replicas that follow the work without flapping: up at once, down only once
    the lower count has held for ``settle`` seconds (the most wanted within that window)."""

    settle: float = SCALE_DOWN_SECONDS
    _wanted: deque[tuple[float, int]] = field(default_factory=deque)

    def replicas(self, work: int, workers: Workers, now: float) -> int:
        """Replicas to run at ``now`` for ``work`` trials in flight."""
        self._wanted.append((now, desired_replicas(work, workers, ended=False)))
        while self._wanted and self._wanted[0][0] < now - self.settle:
            self._wanted.popleft()
        return max(count for _, count in self._wanted)


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str = "",
    *,
    generation: int | None = None,
    now: str | None = None,
) -> list[dict[str, Any]]:
    """``conditions`` with ``type_`` set; its transition time moves only when status does."""
    previous = next((c for c in conditions if c.get("type") == type_), None)
    changed = previous is None or previous.get("status") != status
    condition = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message[:4096],
        "lastTransitionTime": (now or now_rfc3339())
        if changed
        else previous.get("lastTransitionTime"),  # type: ignore[union-attr]
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    return [c for c in conditions if c.get("type") != type_] + [condition]


def progress_text(counts: Counts, spec: ArchitectureSearchSpec) -> str:
    """The Trials column: explored trials finished / maxTrials, then the refine phase's.

    ``12/12`` while exploring; ``12/12 +2/3`` once 2 of the 3 refine trials finished.
    Interrupted trials (replaced, not counted) are left out.
    """
    explored = sum(r.phase == "explore" and r.counted for r in counts.history)
    text = f"{min(explored, 10**6)}/{spec.budget.max_trials}"
    refine = spec.training.refine
    refined = sum(r.phase == "refine" and r.counted for r in counts.history)
    if refine is not None and (refined or explored >= spec.budget.max_trials):
        text += f" +{refined}/{refine.top_k}"
    return text


def resume_dollars(trials: Iterable[TrialRecord]) -> tuple[float, float]:
    """Dollars spent on epochs trained again after a trainer went away, and dollars
    checkpoints saved (epochs resumed trials did not train again), over ``trials``."""
    redone = saved = 0.0
    for trial in trials:
        redone += float(trial.attrs.get(Attr.REDONE_USD, 0.0) or 0.0)
        saved += float(trial.attrs.get(Attr.SAVED_USD, 0.0) or 0.0)
    return redone, saved


def seconds_per_epoch(counts: Counts) -> float | None:
    """Median training seconds per epoch of the trials finished (None before any)."""
    paces = sorted(
        r.seconds / int(r.attrs[Attr.EPOCHS])
        for r in counts.history
        if r.seconds > 0 and int(r.attrs.get(Attr.EPOCHS) or 0) > 0
    )
    return paces[len(paces) // 2] if paces else None


def status_from_counts(
    counts: Counts, spec: ArchitectureSearchSpec, running: int = 0
) -> dict[str, Any]:
    """The status fields that follow the study: progress, trials, best and cost.

    ``running`` is the number of trials in flight (the dispatcher's, not a stored count).
    """
    best = counts.best
    tradeoff = spec.objective.tradeoff
    front = (
        pareto_front(counts.history, spec.objective.study_direction, tradeoff) if tradeoff else []
    )
    gpu_seconds = sum(r.seconds for r in counts.history) * max(1, spec.workers.resources.gpu)
    price = spec.workers.price_per_hour or 0.0
    redone, saved = resume_dollars(counts.history)
    cost: dict[str, Any]
    if spec.workers.gpu_pool is not None:
        # Rented machines bill while they boot and idle too: the pool writes usd and
        # burnRatePerHour from what Vast.ai charges, not from the trials' time.
        cost = {"gpuHours": round(gpu_seconds / 3600, 4)}
    else:
        cost = {
            "usd": round(counts.cost_usd, 4),
            "gpuHours": round(gpu_seconds / 3600 if spec.workers.resources.gpu else 0.0, 4),
            "burnRatePerHour": round(price * running, 4),
        }
    cost |= {"redoneUSD": round(redone, 4), "savedByResumeUSD": round(saved, 4)}
    return {
        "progress": progress_text(counts, spec),
        "trials": {
            "complete": counts.complete,
            "running": running,
            "pruned": counts.pruned,
            "failed": counts.failed,
            "infeasible": counts.infeasible,
            "tooLarge": counts.too_large,
            "paretoFront": len(front),
            "rejectedMessages": counts.rejected,
            **({"secondsPerEpoch": round(pace, 3)} if (pace := seconds_per_epoch(counts)) else {}),
        },
        "best": (
            {
                "number": best.number,
                "value": round(best.value, 6),
                "architecture": best.architecture.model_dump(mode="json")
                if best.architecture
                else {},
                **({"size": size_of(best, tradeoff)} if tradeoff else {}),
            }
            if best is not None and best.value is not None
            else None
        ),
        "cost": cost,
    }
