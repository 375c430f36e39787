"""What the search optimises and when it stops: objective, device constraints, budget."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mloptimizer.rules import Rule, SpecModel
from mloptimizer.spec.common import Duration

__all__ = ["Budget", "Constraints", "Metric", "Objective", "Tradeoff"]


class Constraints(SpecModel):
    """Limits of the device the model must run on; a trial over any of them is infeasible:
    it informs the sampler but is never the best."""

    max_params: int | None = Field(
        default=None,
        ge=1,
        le=10**10,
        description="Most weights (Keras' total parameter count). Checked before training: "
        "a larger architecture is told infeasible without being trained.",
    )
    max_mflops: float | None = Field(
        default=None,
        alias="maxMFLOPs",
        gt=0.0,
        le=10.0**7,
        description="Most millions of multiply-adds in one forward pass of one image "
        "(convolutions and dense layers). Checked before training.",
    )
    max_model_kb: float | None = Field(
        default=None,
        alias="maxModelKB",
        gt=0.0,
        le=10.0**7,
        description="Largest size in KB (1024 bytes) of the model as an int8 LiteRT file, "
        "measured by the trainer after training: the trial's model is converted. A model "
        "with more weights than the limit's bytes is told infeasible before training.",
    )


Tradeoff = Literal["params", "mflops", "modelKB", "costUSD"]
Metric = Literal["val_accuracy", "val_loss", "val_f1_macro", "val_balanced_accuracy"]


class Objective(SpecModel):
    """What the search optimises."""

    rules = (
        Rule(
            cel="!has(self.direction) || self.metric.endsWith('loss') == "
            "(self.direction == 'minimize')",
            check=lambda s: (
                s.direction is None or s.metric.endswith("loss") == (s.direction == "minimize")
            ),
            message="direction contradicts metric: losses are minimized and accuracies "
            "maximized; omit direction to take the metric's own",
            field="direction",
        ),
        Rule(
            cel="!has(self.target) || self.metric == 'val_loss' || "
            "(self.target > 0.0 && self.target <= 1.0)",
            check=lambda s: s.target is None or s.metric == "val_loss" or 0.0 < s.target <= 1.0,
            message="an accuracy or F1 target must lie in (0, 1], for example 0.95",
            field="target",
        ),
    )

    metric: Metric = Field(
        default="val_accuracy",
        description="Metric of the last epoch reported to the study, on the validation "
        "images: val_accuracy, val_loss, val_f1_macro (the mean of each class's F1) or "
        "val_balanced_accuracy (the mean of each class's recall). The last two weigh a rare "
        "class as much as a common one: use them when classes are imbalanced.",
    )
    direction: Literal["maximize", "minimize"] | None = Field(
        default=None,
        description="maximize or minimize; defaults to the metric's own (maximize "
        "accuracy, minimize loss).",
    )
    target: float | None = Field(
        default=None,
        description="Stop the search as soon as a trial reaches this value (for example "
        "0.99 val_accuracy).",
    )
    constraints: Constraints | None = Field(
        default=None,
        description="Device limits (maxParams, maxMFLOPs, maxModelKB); a trial over one is "
        "infeasible: the sampler learns from it, it is never the best.",
    )
    tradeoff: Tradeoff | None = Field(
        default=None,
        description="Search accuracy against size or dollars as two objectives (params, "
        "mflops, modelKB, or costUSD: the dollars a trial cost, its earlier attempts' epochs "
        "included; each minimized): multi-objective TPE finds the Pareto front, the most "
        "accurate model for each size or price. costUSD needs a price (workers.pricePerHour, "
        "or workers.gpuPool). The pruner is off (Optuna cannot prune "
        "multi-objective trials); refine retrains the topK most accurate front members; "
        "best is the front's most accurate feasible member.",
    )

    @property
    def study_direction(self) -> Literal["maximize", "minimize"]:
        """The direction, derived from the metric when not given."""
        if self.direction is not None:
            return self.direction
        return "minimize" if self.metric.endswith("loss") else "maximize"

    @property
    def study_directions(self) -> list[Literal["maximize", "minimize"]]:
        """The study's directions: the metric's, then the size's or cost's (minimized) under
        a tradeoff."""
        size: list[Literal["maximize", "minimize"]] = ["minimize"] if self.tradeoff else []
        return [self.study_direction, *size]


class Budget(SpecModel):
    """When the search stops."""

    rules = (
        Rule(
            cel="self.parallelism <= self.maxTrials",
            check=lambda s: s.parallelism <= s.max_trials,
            message="parallelism must not exceed maxTrials: lower parallelism or raise maxTrials",
            field="parallelism",
        ),
    )

    max_trials: int = Field(
        default=20, ge=1, le=100_000, description="Trials to run in the exploration phase."
    )
    parallelism: int = Field(
        default=1,
        ge=1,
        le=1000,
        description="Trials in flight at once; trainers scale up to this many.",
    )
    max_failed_trials: int = Field(
        default=5,
        ge=0,
        le=100_000,
        description="The search fails once this many trials have failed (0: stop at the "
        "first failure).",
    )
    timeout: Duration | None = Field(
        default=None,
        description="Wall-clock limit of the whole search, such as 45m, 6h or 1h30m. With "
        "training.refine, exploration closes early enough (estimated from the explored "
        "trials' seconds per epoch) for the refine trials to run within it.",
    )
    max_cost_usd: float | None = Field(
        default=None,
        gt=0.0,
        alias="maxCostUSD",
        description="Stop dispatching new trials once the search has cost this many US dollars.",
    )
