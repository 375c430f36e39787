"""The search space section: the architecture families, their ranges, and the head.

:mod:`mloptimizer.space` turns these models into Optuna distributions.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal, TypeVar

from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError

from mloptimizer.rules import Rule, SpecModel

__all__ = [
    "ClassifierSpace",
    "CnnSpace",
    "Family",
    "FloatRange",
    "Head",
    "InceptionSpace",
    "IntRange",
    "KernelSize",
    "SearchSpace",
]

_T = TypeVar("_T")


def _unique(values: list[_T]) -> list[_T]:
    for index, value in enumerate(values):
        if value in values[:index]:  # named at its index, as the API server does
            raise PydanticCustomError(
                "duplicate",
                "duplicate value {value}; list each value once",
                {"index": index, "value": json.dumps(value)},
            )
    return values


# A list whose items are distinct: `x-kubernetes-list-type: set` in the CRD.
SET_EXTRA = {"x-kubernetes-list-type": "set"}


class IntRange(SpecModel):
    """Integers from min to max inclusive, every step."""

    rules = (
        Rule(
            cel="self.min <= self.max",
            check=lambda s: s.min <= s.max,
            message="min must be <= max",
            field="min",
        ),
        Rule(
            cel="(self.max - self.min) % self.step == 0",
            check=lambda s: (s.max - s.min) % s.step == 0,
            message="max - min must be a multiple of step, as Optuna requires",
            field="step",
        ),
    )

    min: int = Field(ge=1, le=100_000, description="Smallest value.")
    max: int = Field(ge=1, le=100_000, description="Largest value.")
    step: int = Field(default=1, ge=1, le=100_000, description="Distance between values.")


class FloatRange(SpecModel):
    """Real numbers in [0, 1] from min to max, uniform or log-uniform."""

    rules = (
        Rule(
            cel="self.min <= self.max",
            check=lambda s: s.min <= s.max,
            message="min must be <= max",
            field="min",
        ),
        Rule(
            cel="!self.log || self.min > 0.0",
            check=lambda s: not s.log or s.min > 0.0,
            message="a log-uniform range needs min > 0",
            field="min",
        ),
    )

    min: float = Field(ge=0.0, le=1.0, description="Smallest value.")
    max: float = Field(ge=0.0, le=1.0, description="Largest value.")
    log: bool = Field(default=False, description="Sample log-uniformly.")


def _int_range(lo: int, hi: int, step: int = 1) -> IntRange:
    return IntRange(min=lo, max=hi, step=step)


KernelSize = Literal[1, 3, 5, 7, 9, 11]
Head = Literal["gap", "mlp"]
Family = Literal["cnn", "inception"]


class CnnSpace(SpecModel):
    """Plain CNN: blocks of convolution, batch normalisation, ReLU and 2x2 max-pooling."""

    blocks: IntRange = Field(
        default_factory=lambda: _int_range(1, 4),
        description="Number of convolution blocks.",
    )
    filters: IntRange = Field(
        default_factory=lambda: _int_range(16, 256, 16),
        description="Filters of each block, sampled per block.",
    )
    kernel_sizes: Annotated[
        list[KernelSize],
        Field(min_length=1, max_length=6, json_schema_extra=SET_EXTRA),
        AfterValidator(_unique),
    ] = Field(
        default_factory=lambda: list[KernelSize]([3, 5, 7]),
        description="Square kernel sizes to choose from, per block.",
    )


class InceptionSpace(SpecModel):
    """Inception: blocks of modules with 1x1, 1x1->3x3, 1x1->5x5 and pool->1x1 branches."""

    blocks: IntRange = Field(
        default_factory=lambda: _int_range(1, 3),
        description="Number of inception blocks; each ends with 2x2 max-pooling.",
    )
    modules: IntRange = Field(
        default_factory=lambda: _int_range(1, 3),
        description="Inception modules per block, sampled per block.",
    )
    filters_1x1: IntRange = Field(
        default_factory=lambda: _int_range(16, 128, 16),
        alias="filters1x1",
        description="Filters of the 1x1 branches, sampled per block.",
    )
    filters_3x3: IntRange = Field(
        default_factory=lambda: _int_range(16, 192, 16),
        alias="filters3x3",
        description="Filters of the 3x3 (and 5x5) branches, sampled per block.",
    )


class ClassifierSpace(SpecModel):
    """The head after the last block."""

    types: Annotated[
        list[Head],
        Field(min_length=1, max_length=2, json_schema_extra=SET_EXTRA),
        AfterValidator(_unique),
    ] = Field(
        default_factory=lambda: list[Head](["gap", "mlp"]),
        description="gap (global average pooling, then softmax) and/or mlp (flatten, one "
        "dense layer, then softmax).",
    )
    units: IntRange = Field(
        default_factory=lambda: _int_range(64, 512, 64),
        description="Units of the mlp's dense layer.",
    )


class SearchSpace(SpecModel):
    """The architectures and hyperparameters the sampler chooses from; defaults are the seed's.

    Every range and choice can be overridden; a choice left with one value is fixed.
    """

    architectures: Annotated[
        list[Family],
        Field(min_length=1, max_length=2, json_schema_extra=SET_EXTRA),
        AfterValidator(_unique),
    ] = Field(
        default_factory=lambda: list[Family](["cnn", "inception"]),
        description="Model families to search: cnn and/or inception.",
    )
    cnn: CnnSpace = Field(default_factory=CnnSpace, description="The cnn family's space.")
    inception: InceptionSpace = Field(
        default_factory=InceptionSpace, description="The inception family's space."
    )
    classifier: ClassifierSpace = Field(
        default_factory=ClassifierSpace, description="The classifier head's space."
    )
    dropout: FloatRange = Field(
        default_factory=lambda: FloatRange(min=0.0, max=0.5),
        description="Dropout before the softmax layer.",
    )
    learning_rate: FloatRange = Field(
        default_factory=lambda: FloatRange(min=1e-4, max=1e-2, log=True),
        description="Adam's learning rate.",
    )
