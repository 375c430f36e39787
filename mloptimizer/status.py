"""The ArchitectureSearch status: what the operator writes and `kubectl get archsearch` shows."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import Field

from mloptimizer.formats import EXPORT_FORMATS
from mloptimizer.rules import SpecModel

__all__ = [
    "PHASES",
    "ArchitectureSearchStatus",
    "Artifact",
    "BestTrial",
    "Condition",
    "Cost",
    "PoolMachine",
    "PoolStatus",
    "TrialCounts",
    "WorkerCounts",
]

Phase = Literal["Pending", "Running", "Refining", "Succeeded", "Failed"]
PHASES: tuple[str, ...] = get_args(Phase)


class TrialCounts(SpecModel):
    """Trials of the study by state."""

    complete: int = Field(default=0, ge=0, description="Trials that finished and were told.")
    running: int = Field(default=0, ge=0, description="Trials in flight.")
    pruned: int = Field(default=0, ge=0, description="Trials stopped early by the pruner.")
    failed: int = Field(
        default=0, ge=0, description="Trials that failed (counted by budget.maxFailedTrials)."
    )
    infeasible: int = Field(
        default=0,
        ge=0,
        description="Trials over objective.constraints (never the best; most are judged "
        "before training and never trained).",
    )
    too_large: int = Field(
        default=0,
        ge=0,
        description="Trials failed unsent: their model cannot fit workers.resources.memory.",
    )
    pareto_front: int = Field(
        default=0,
        ge=0,
        description="Under objective.tradeoff: complete feasible trials on the Pareto front "
        "(no other one is both as accurate and smaller, and better in one).",
    )
    rejected_messages: int = Field(
        default=0,
        ge=0,
        description="Messages refused (malformed, forged or failing to handle), kept in the "
        "search's rejected queue; since the operator started serving the search.",
    )
    seconds_per_epoch: float | None = Field(
        default=None,
        ge=0.0,
        description="Median training seconds per epoch of the trials finished so far (a GPU "
        "pool prices what a preemption costs with it).",
    )


class BestTrial(SpecModel):
    """The best trial so far."""

    number: int = Field(ge=0, description="Trial number in the Optuna study.")
    value: float = Field(description="Its objective value.")
    architecture: dict[str, Any] = Field(
        default_factory=dict, description="Its architecture, as the trainer built it."
    )
    size: float | None = Field(
        default=None,
        description="Under objective.tradeoff: its size figure (parameters, MFLOPs or int8 KB) or "
        "its dollars (costUSD).",
    )


class WorkerCounts(SpecModel):
    """Trainer replicas."""

    desired: int = Field(default=0, ge=0, description="Replicas the operator asked for.")
    ready: int = Field(default=0, ge=0, description="Replicas ready to train.")


class Cost(SpecModel):
    """What the search has cost."""

    usd: float = Field(default=0.0, ge=0.0, description="US dollars spent so far.")
    gpu_hours: float = Field(default=0.0, ge=0.0, description="GPU-hours used so far.")
    burn_rate_per_hour: float = Field(
        default=0.0, ge=0.0, description="Current spend in USD per hour."
    )
    redone_usd: float = Field(
        default=0.0,
        ge=0.0,
        alias="redoneUSD",
        description="USD spent on epochs trained again because a trainer went away (killed, "
        "preempted) after training them, at each trial's own pace and price.",
    )
    saved_by_resume_usd: float = Field(
        default=0.0,
        ge=0.0,
        alias="savedByResumeUSD",
        description="USD not spent thanks to checkpoints: the epochs resumed trials went on "
        "from instead of training them again.",
    )


class PoolMachine(SpecModel):
    """One machine a GPU pool rented (kept after it is destroyed, for the cost)."""

    name: str = Field(
        max_length=63, description="Node name (Node mode) or worker id (Direct mode), vast-*."
    )
    instance_id: int = Field(ge=0, description="The Vast.ai instance id.")
    host: int = Field(default=0, ge=0, description="The Vast.ai machine_id it runs on.")
    price_per_hour: float = Field(ge=0.0, description="What it bills in USD/hour.")
    state: Literal["Provisioning", "Ready", "Draining", "Destroyed"] = Field(
        description="Provisioning, Ready, Draining or Destroyed."
    )
    rented_at: str = Field(description="When it was rented (RFC 3339).")
    ready_at: str | None = Field(default=None, description="When it became ready (RFC 3339).")
    drain_started_at: str | None = Field(
        default=None, description="When it began draining (RFC 3339)."
    )
    ended_at: str | None = Field(default=None, description="When it was destroyed (RFC 3339).")
    reason: str = Field(default="", max_length=256, description="Why it was destroyed.")
    interruptible: bool = Field(
        default=False, description="Rented as an interruptible (spot) machine, at a bid."
    )


class SpotEvidence(SpecModel):
    """What interruptible machines of one GPU type did for this search."""

    hours: float = Field(default=0.0, ge=0.0, description="Machine-hours run interruptible.")
    preemptions: int = Field(default=0, ge=0, description="Machines taken back by Vast.ai.")


class PoolStatus(SpecModel):
    """The GPU pool of a search: machines, hosts avoided and what they cost."""

    desired: int = Field(default=0, ge=0, description="Machines the pool wants now.")
    ready: int = Field(default=0, ge=0, description="Machines ready to train.")
    machines: list[PoolMachine] = Field(
        default_factory=list, description="Machines rented, the destroyed ones last."
    )
    avoided_hosts: list[int] = Field(
        default_factory=list,
        description="Vast.ai machine_ids not rented again (a machine there never became ready).",
    )
    retired_usd: float = Field(
        default=0.0,
        ge=0.0,
        alias="retiredUSD",
        description="Cost of destroyed machines no longer listed in machines.",
    )
    spent_usd: float = Field(
        default=0.0, ge=0.0, alias="spentUSD", description="Total rental cost so far in USD."
    )
    burn_rate_per_hour: float = Field(
        default=0.0, ge=0.0, description="What the machines rented now bill, in USD/hour."
    )
    message: str = Field(default="", max_length=1024, description="What the pool is doing.")
    interruptions: dict[str, SpotEvidence] = Field(
        default_factory=dict,
        description="Per GPU type: spot machine-hours ended and preemptions seen; "
        "interruptible: auto prices spot offers with the rate they give.",
    )


class Artifact(SpecModel):
    """One file the final job delivered (or one export format it could not make)."""

    format: str = Field(
        max_length=32,
        description=f"{', '.join(EXPORT_FORMATS)}, or report (report.md, artifacts.json, "
        "summary.json and the report's pictures).",
    )
    uri: str | None = Field(
        default=None,
        max_length=2048,
        description="Where it is: s3://bucket/key, or pvc://claim/path. Absent when not made.",
    )
    bytes: int | None = Field(default=None, ge=0, description="Its size.")
    test_accuracy: float | None = Field(
        default=None,
        description="Accuracy of the artifact itself on the test split (LiteRT's interpreter "
        "for .tflite).",
    )
    latency_ms: float | None = Field(
        default=None, description="Median one-image latency on the trainer that exported it."
    )
    error: str | None = Field(
        default=None, max_length=4096, description="Why this format was not delivered."
    )
    sha256: str | None = Field(
        default=None, max_length=64, description="The file's SHA-256 (hex), as reported."
    )
    verified: bool | None = Field(
        default=None,
        description="True: the operator read the file back and its size and SHA-256 match "
        "(s3: on receipt; pvc: a read-only Job with the operator's image); false: only the "
        "trainer's word (a pvc with no verify image set, or a Job that could not look).",
    )


class Condition(SpecModel):
    """A Kubernetes-style condition (Ready, Progressing, Degraded, Complete)."""

    type: str = Field(
        max_length=64, description="Ready, Progressing, Degraded, Complete or Delivered."
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(default="", max_length=128, description="CamelCase reason.")
    message: str = Field(default="", max_length=4096, description="Human-readable detail.")
    last_transition_time: str | None = Field(
        default=None, description="When the status last changed (RFC 3339)."
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="Generation the condition was set for."
    )


class ArchitectureSearchStatus(SpecModel):
    """Progress, best result, workers and cost of a search."""

    phase: Phase = Field(
        default="Pending", description="Pending, Running, Refining, Succeeded or Failed."
    )
    progress: str = Field(
        default="0/0",
        max_length=32,
        description="Explored trials finished / maxTrials, then refine trials finished / "
        "refine.topK once that phase starts: 7/20, or 20/20 +1/3.",
    )
    trials: TrialCounts = Field(default_factory=TrialCounts, description="Trials by state.")
    best: BestTrial | None = Field(default=None, description="The best trial so far.")
    workers: WorkerCounts = Field(default_factory=WorkerCounts, description="Trainer replicas.")
    cost: Cost = Field(default_factory=Cost, description="What the search has cost.")
    pool: PoolStatus | None = Field(
        default=None, description="Machines rented through workers.gpuPool."
    )
    artifacts: list[Artifact] = Field(
        default_factory=list,
        max_length=16,
        description="The best model as delivered to spec.output (pvc or s3) by the final "
        "job: one entry per file; `mloptimizer fetch NAMESPACE/NAME --to DIR` downloads them.",
    )
    study_name: str | None = Field(
        default=None, description="The Optuna study, <namespace>.<name>."
    )
    start_time: str | None = Field(default=None, description="When trials began (RFC 3339).")
    completion_time: str | None = Field(
        default=None, description="When the search ended (RFC 3339)."
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="The spec generation this status reflects."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Progressing, Degraded, Complete and Delivered (the final job: "
        "Unknown while it runs, True once spec.output has the model, False when it failed "
        "every attempt), with reasons.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    message: str = Field(default="", max_length=4096, description="What is happening now.")
