"""The search space section: the architecture families, their ranges, and the head.

:mod:`mloptimizer.space` turns these models into Optuna distributions.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal, TypeVar

from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError

from mloptimizer.rules import Rule, SpecModel
from mloptimizer.spec.custom import CustomSpace

__all__ = [
    "AugmentationSpace",
    "ClassifierSpace",
    "CnnSpace",
    "Family",
    "FloatRange",
    "Head",
    "InceptionSpace",
    "IntRange",
    "KernelSize",
    "MobilenetSpace",
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
Family = Literal["cnn", "inception", "mobilenet", "custom"]
Stride = Literal[1, 2]
WIDTHS = (0.25, 0.35, 0.5, 0.75, 1.0, 1.25, 1.5)


def _a_width(value: float) -> float:
    if value not in WIDTHS:
        raise PydanticCustomError(
            "width", "width {value} is not one of {widths}", {"value": value, "widths": WIDTHS}
        )
    return value


# A width multiplier: one of WIDTHS (mypy takes no float Literal; the CRD gets the enum).
Width = Annotated[float, Field(json_schema_extra={"enum": list(WIDTHS)}), AfterValidator(_a_width)]


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


class MobilenetSpace(SpecModel):
    """MobileNetV2-style: a 3x3 stem, then inverted-residual blocks.

    Each block expands its input with a 1x1 convolution (``expansion`` times the channels),
    filters it with a depthwise 3x3 convolution (stride 1 or 2), and projects it back with
    a linear 1x1 convolution; batch normalisation after each, ReLU6 after the first two,
    and a residual connection when the stride is 1 and the channels match. Block i has
    ``width`` x (16, 24, 32, 64, 96, 160, 320)[i] channels (a multiple of 8), the stem
    ``width`` x 32. Cheap in multiply-adds and friendly to int8.
    """

    rules = (
        Rule(
            cel="self.blocks.max <= 7",
            check=lambda s: s.blocks.max <= 7,
            message="blocks.max must be at most 7, the blocks of MobileNetV2",
            field="blocks",
        ),
    )

    blocks: IntRange = Field(
        default_factory=lambda: _int_range(2, 5),
        description="Number of inverted-residual blocks (at most 7).",
    )
    expansion: IntRange = Field(
        default_factory=lambda: _int_range(1, 6),
        description="Expansion factor of each block's 1x1 convolution, sampled per block.",
    )
    widths: Annotated[
        list[Width],
        Field(min_length=1, max_length=7, json_schema_extra=SET_EXTRA),
        AfterValidator(_unique),
    ] = Field(
        default_factory=lambda: list[Width]([0.35, 0.5, 0.75, 1.0]),
        description="Width multipliers to choose from (one per model): the channels of "
        "every layer scale with it.",
    )
    stem_stride: Stride = Field(
        default=1,
        description="Stride of the 3x3 stem: 1 keeps small images (28x28) whole; 2 halves "
        "larger ones (96x96) before the first block, as MobileNetV2 does.",
    )
    strides: Annotated[
        list[Stride],
        Field(min_length=1, max_length=2, json_schema_extra=SET_EXTRA),
        AfterValidator(_unique),
    ] = Field(
        default_factory=lambda: list[Stride]([1, 2]),
        description="Strides of each block's depthwise convolution to choose from, per "
        "block: 2 halves the feature map.",
    )


class ClassifierSpace(SpecModel):
    """The head after the last block."""

    rules = (
        Rule(
            cel="self.layers.max <= 3",
            check=lambda s: s.layers.max <= 3,
            message="layers.max must be at most 3",
            field="layers",
        ),
    )

    types: Annotated[
        list[Head],
        Field(min_length=1, max_length=2, json_schema_extra=SET_EXTRA),
        AfterValidator(_unique),
    ] = Field(
        default_factory=lambda: list[Head](["gap", "mlp"]),
        description="gap (global average pooling, then softmax) and/or mlp (flatten, one "
        "to three dense layers, then softmax).",
    )
    layers: IntRange = Field(
        default_factory=lambda: _int_range(1, 1),
        description="Dense layers of the mlp head (at most 3); {min: 1, max: 2} can express "
        "a head of [256, 128].",
    )
    units: IntRange = Field(
        default_factory=lambda: _int_range(64, 512, 64),
        description="Units of each of the mlp's dense layers, sampled per layer.",
    )


def _at_most(field: str, limit: float) -> Rule:
    return Rule(
        cel=f"!has(self.{field}) || self.{field}.max <= {limit}",
        check=lambda s: getattr(s, field) is None or getattr(s, field).max <= limit,
        message=f"{field}.max must be at most {limit}, as in training.augmentation",
        field=field,
    )


_Flips = Annotated[
    list[bool],
    Field(min_length=1, max_length=2, json_schema_extra=SET_EXTRA),
    AfterValidator(_unique),
]


class AugmentationSpace(SpecModel):
    """Augmentations the sampler chooses, by the names of ``training.augmentation``.

    A field set here is searched and overrides the fixed value in ``training.augmentation``;
    a field left out keeps that fixed value. ``rotation: {min: 0, max: 0.1}`` lets TPE
    find how much rotation helps; ``horizontalFlip: [false, true]`` whether flipping does.
    """

    rules = (
        _at_most("rotation", 0.5),
        _at_most("zoom", 0.9),
        _at_most("translation", 0.5),
        _at_most("contrast", 0.9),
        _at_most("brightness", 0.9),
    )

    horizontal_flip: _Flips | None = Field(
        default=None, description="Choices for horizontalFlip, as [false, true]."
    )
    vertical_flip: _Flips | None = Field(
        default=None, description="Choices for verticalFlip, as [false, true]."
    )
    rotation: FloatRange | None = Field(
        default=None, description="Range of rotation (fraction of a turn, at most 0.5)."
    )
    zoom: FloatRange | None = Field(default=None, description="Range of zoom (at most 0.9).")
    translation: FloatRange | None = Field(
        default=None, description="Range of translation (at most 0.5)."
    )
    contrast: FloatRange | None = Field(
        default=None, description="Range of contrast (at most 0.9)."
    )
    brightness: FloatRange | None = Field(
        default=None, description="Range of brightness (at most 0.9)."
    )


class SearchSpace(SpecModel):
    """The architectures and hyperparameters the sampler chooses from; defaults are the seed's.

    Every range and choice can be overridden; a choice left with one value is fixed.
    """

    rules = (
        Rule(
            cel="self.architectures.exists(a, a == 'custom') == has(self.custom)",
            check=lambda s: ("custom" in s.architectures) == (s.custom is not None),
            message="the custom family and searchSpace.custom go together: list custom in "
            "architectures and describe its builder under custom, or neither",
            field="custom",
        ),
    )

    architectures: Annotated[
        list[Family],
        Field(min_length=1, max_length=4, json_schema_extra=SET_EXTRA),
        AfterValidator(_unique),
    ] = Field(
        default_factory=lambda: list[Family](["cnn", "inception"]),
        description="Model families to search: cnn, inception, mobilenet and/or custom "
        "(the builder of searchSpace.custom).",
    )
    cnn: CnnSpace = Field(default_factory=CnnSpace, description="The cnn family's space.")
    inception: InceptionSpace = Field(
        default_factory=InceptionSpace, description="The inception family's space."
    )
    mobilenet: MobilenetSpace = Field(
        default_factory=MobilenetSpace, description="The mobilenet family's space."
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
    augmentation: AugmentationSpace | None = Field(
        default=None,
        description="Augmentations to search, by the names of training.augmentation; "
        "omit to search none.",
    )
    custom: CustomSpace | None = Field(
        default=None,
        description="The user's own model builder and its parameters (the custom family).",
    )
