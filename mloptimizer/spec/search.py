"""The whole spec: every section under one model, and the rules that span sections."""

from __future__ import annotations

from pydantic import Field

from mloptimizer.rules import Rule, SpecModel
from mloptimizer.spec.dataset import Dataset
from mloptimizer.spec.objective import Budget, Objective
from mloptimizer.spec.output import Output
from mloptimizer.spec.search_space import SearchSpace
from mloptimizer.spec.services import Broker, Storage
from mloptimizer.spec.training import Pruner, SamplerSpec, Training
from mloptimizer.spec.workers import Workers

__all__ = ["ArchitectureSearchSpec"]


class ArchitectureSearchSpec(SpecModel):
    """One neural-architecture search: data, objective, budget, sampler, space and workers."""

    rules = (
        Rule(
            cel="!has(self.training.refine) || self.training.refine.topK <= self.budget.maxTrials",
            check=lambda s: (
                s.training.refine is None or s.training.refine.top_k <= s.budget.max_trials
            ),
            message="training.refine.topK must not exceed budget.maxTrials",
            field="training",
        ),
        Rule(
            cel="!has(self.output.pvc) || !has(self.workers.gpuPool) "
            "|| self.workers.gpuPool.mode != 'Direct'",
            check=lambda s: (
                s.output.pvc is None
                or s.workers.gpu_pool is None
                or s.workers.gpu_pool.mode != "Direct"
            ),
            message="output.pvc cannot reach trainers on rented machines outside the cluster "
            "(gpuPool mode Direct): use output.s3, or gpuPool mode Node",
            field="output",
        ),
        Rule(
            cel="!has(self.objective.tradeoff) || self.objective.tradeoff != 'costUSD' "
            "|| has(self.workers.pricePerHour) || has(self.workers.gpuPool)",
            check=lambda s: (
                s.objective.tradeoff != "costUSD"
                or s.workers.price_per_hour is not None
                or s.workers.gpu_pool is not None
            ),
            message="objective.tradeoff costUSD needs a price: set workers.pricePerHour (what "
            "an hour of a trainer costs), or rent from workers.gpuPool",
            field="objective",
        ),
        Rule(
            cel="self.pruner.type != 'hyperband' || self.pruner.minEpochs < self.training.epochs",
            check=lambda s: s.pruner.type != "hyperband" or s.pruner.min_epochs < s.training.epochs,
            message="pruner.minEpochs must be below training.epochs for hyperband to have "
            "rungs; raise training.epochs or use pruner.type median",
            field="pruner",
        ),
    )

    dataset: Dataset = Field(description="What the trainers learn from.")
    objective: Objective = Field(
        default_factory=Objective, description="What the search optimises."
    )
    budget: Budget = Field(default_factory=Budget, description="When the search stops.")
    sampler: SamplerSpec = Field(
        default_factory=SamplerSpec, description="How the next architecture is chosen."
    )
    pruner: Pruner = Field(
        default_factory=Pruner, description="How unpromising trials are stopped early."
    )
    training: Training = Field(default_factory=Training, description="How each trial trains.")
    search_space: SearchSpace = Field(
        default_factory=SearchSpace,
        description="The architectures and hyperparameters to choose from.",
    )
    workers: Workers = Field(
        default_factory=Workers, description="The trainer pods that consume trials."
    )
    storage: Storage = Field(default_factory=Storage, description="Where the study lives.")
    broker: Broker = Field(default_factory=Broker, description="How trials reach trainers.")
    output: Output = Field(
        default_factory=Output,
        description="The best model: its export formats, and where the cluster delivers it.",
    )
