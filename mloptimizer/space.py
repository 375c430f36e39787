"""The search space: define-by-run sampling of a typed, JSON-serialisable Architecture.

One function, :func:`sample_architecture`, asks an Optuna trial for every choice in
the order the model needs it, so that choices which do not apply (inception
filters for a cnn, units for a gap head) are never sampled: TPE then models each
branch on the trials that took it. Replaying a finished trial's params through
``optuna.trial.FixedTrial`` rebuilds its architecture with the same function.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import optuna
from pydantic import BaseModel, ConfigDict, Field

from mloptimizer.spec import (
    Constraints,
    FloatRange,
    IntRange,
    Pruner,
    SamplerSpec,
    SearchSpace,
    Training,
)

__all__ = [
    "Architecture",
    "ConvBlock",
    "InceptionBlock",
    "SpaceSize",
    "build_pruner",
    "build_sampler",
    "constraint_limits",
    "sample_architecture",
    "space_size",
]


class ConvBlock(BaseModel):
    """Convolution, batch normalisation, ReLU, then 2x2 max-pooling."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    filters: int = Field(ge=1)
    kernel_size: int = Field(ge=1)


class InceptionBlock(BaseModel):
    """``modules`` inception modules, then 2x2 max-pooling."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    modules: int = Field(ge=1)
    filters_1x1: int = Field(ge=1)
    filters_3x3: int = Field(ge=1)


class Architecture(BaseModel):
    """One sampled model, enough for the trainer to build it; travels as JSON."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    family: Literal["cnn", "inception"]
    conv_blocks: tuple[ConvBlock, ...] = ()
    inception_blocks: tuple[InceptionBlock, ...] = ()
    classifier: Literal["gap", "mlp"]
    dense_units: int | None = None
    dropout: float = Field(ge=0.0, le=1.0)
    learning_rate: float = Field(gt=0.0)

    def summary(self) -> str:
        """A one-line description, as in ``cnn[32k3,64k5] mlp256 drop0.25 lr3.2e-04``."""
        if self.family == "cnn":
            blocks = ",".join(f"{b.filters}k{b.kernel_size}" for b in self.conv_blocks)
        else:
            blocks = ",".join(
                f"{b.modules}x({b.filters_1x1}/{b.filters_3x3})" for b in self.inception_blocks
            )
        head = f"mlp{self.dense_units}" if self.classifier == "mlp" else "gap"
        return f"{self.family}[{blocks}] {head} drop{self.dropout:.2f} lr{self.learning_rate:.1e}"


def _int(trial: optuna.trial.BaseTrial, name: str, r: IntRange) -> int:
    return trial.suggest_int(name, r.min, r.max, step=r.step)


def _float(trial: optuna.trial.BaseTrial, name: str, r: FloatRange) -> float:
    # TPE's log-scale draws can land an ulp or two outside the range (exp of a log):
    # what a trainer gets stays inside the declared space.
    return min(max(trial.suggest_float(name, r.min, r.max, log=r.log), r.min), r.max)


def sample_architecture(trial: optuna.trial.BaseTrial, space: SearchSpace) -> Architecture:
    """Sample one architecture from ``space`` through ``trial`` (define-by-run).

    Args:
        trial: A live trial from ``study.ask()``, or a ``FixedTrial`` to replay params.
        space: The spec's search space.

    Returns:
        The architecture; its parameter names in the study are stable across versions.
    """
    family = trial.suggest_categorical("family", list(space.architectures))
    conv: list[ConvBlock] = []
    inception: list[InceptionBlock] = []
    if family == "cnn":
        for i in range(_int(trial, "cnn_blocks", space.cnn.blocks)):
            conv.append(
                ConvBlock(
                    filters=_int(trial, f"cnn_filters_{i}", space.cnn.filters),
                    kernel_size=trial.suggest_categorical(
                        f"cnn_kernel_{i}", list(space.cnn.kernel_sizes)
                    ),
                )
            )
    else:
        s = space.inception
        for i in range(_int(trial, "inception_blocks", s.blocks)):
            inception.append(
                InceptionBlock(
                    modules=_int(trial, f"inception_modules_{i}", s.modules),
                    filters_1x1=_int(trial, f"inception_1x1_{i}", s.filters_1x1),
                    filters_3x3=_int(trial, f"inception_3x3_{i}", s.filters_3x3),
                )
            )
    classifier = trial.suggest_categorical("classifier", list(space.classifier.types))
    units = _int(trial, "dense_units", space.classifier.units) if classifier == "mlp" else None
    return Architecture(
        family=family,
        conv_blocks=tuple(conv),
        inception_blocks=tuple(inception),
        classifier=classifier,
        dense_units=units,
        dropout=_float(trial, "dropout", space.dropout),
        learning_rate=_float(trial, "learning_rate", space.learning_rate),
    )


class SpaceSize(BaseModel):
    """How big a space is: discrete architectures and continuous dimensions."""

    discrete: int
    continuous: tuple[str, ...]

    def __str__(self) -> str:
        text = f"{self.discrete:,} discrete architectures"
        if self.discrete >= 10**7:
            text = f"{self.discrete:.2e} discrete architectures"
        if self.continuous:
            text += f" x {len(self.continuous)} continuous ({', '.join(self.continuous)})"
        return text


def _count(r: IntRange) -> int:
    return (r.max - r.min) // r.step + 1


def _per_block_total(blocks: IntRange, per_block: int) -> int:
    return sum(per_block**n for n in range(blocks.min, blocks.max + 1, blocks.step))


def space_size(space: SearchSpace) -> SpaceSize:
    """Count the discrete architectures in ``space`` and name its continuous dimensions."""
    bodies = 0
    if "cnn" in space.architectures:
        c = space.cnn
        bodies += _per_block_total(c.blocks, _count(c.filters) * len(c.kernel_sizes))
    if "inception" in space.architectures:
        s = space.inception
        per_block = _count(s.modules) * _count(s.filters_1x1) * _count(s.filters_3x3)
        bodies += _per_block_total(s.blocks, per_block)
    heads = sum(_count(space.classifier.units) if t == "mlp" else 1 for t in space.classifier.types)
    continuous = tuple(
        name
        for name, r in (("dropout", space.dropout), ("learning_rate", space.learning_rate))
        if not math.isclose(r.min, r.max)
    )
    return SpaceSize(discrete=bodies * heads, continuous=continuous)


def build_sampler(spec: SamplerSpec, resumed_at: int = 0) -> optuna.samplers.BaseSampler:
    """The Optuna sampler the spec asks for, with exactly its options.

    ``resumed_at`` (trials the study holds already) moves the seed on: a sampler created
    again with the same seed would draw the start-up trials it drew before the restart.
    Device constraints need no option: TPE reads each trial's constraint values (set by
    the dispatcher with ``Trial.set_constraint``, Optuna 5's way) and learns to avoid the
    infeasible regions.
    """
    seed = spec.seed
    if seed is not None and resumed_at > 0:
        seed = (seed * 1_000_003 + resumed_at) % 2**32
    if spec.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        # multivariate, group and constant_liar are "experimental" in Optuna since 2.x.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            n_startup_trials=spec.n_startup_trials,
            n_ei_candidates=spec.n_ei_candidates,
            multivariate=spec.multivariate,
            group=spec.group,
            constant_liar=spec.constant_liar,
            seed=seed,
        )


def constraint_limits(constraints: Constraints) -> list[tuple[str, float]]:
    """The limits that are set, in a fixed order: (name, limit)."""
    named = [
        ("params", constraints.max_params),
        ("mflops", constraints.max_mflops),
        ("model_kb", constraints.max_model_kb),
    ]
    return [(name, float(limit)) for name, limit in named if limit is not None]


def build_pruner(spec: Pruner, training: Training) -> optuna.pruners.BasePruner:
    """The Optuna pruner the spec asks for; epochs are the pruner's steps."""
    if spec.type == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=spec.startup_trials, n_warmup_steps=spec.warmup_epochs
        )
    if spec.type == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=spec.min_epochs,
            max_resource=training.epochs,
            reduction_factor=spec.reduction_factor,
        )
    return optuna.pruners.NopPruner()
