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

from mloptimizer.sampling import WindowedTPESampler
from mloptimizer.spec import (
    Augmentation,
    Constraints,
    CustomSpace,
    FloatRange,
    IntRange,
    Pruner,
    SamplerSpec,
    SearchSpace,
    Training,
)

__all__ = [
    "MOBILENET_CHANNELS",
    "MOBILENET_STEM",
    "Architecture",
    "Augment",
    "ConvBlock",
    "InceptionBlock",
    "InvertedResidual",
    "SpaceSize",
    "build_pruner",
    "build_sampler",
    "constraint_limits",
    "mobilenet_channels",
    "sample_architecture",
    "sample_augmentation",
    "sample_custom",
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


# Output channels of MobileNetV2's inverted-residual stages, scaled by the width multiplier.
MOBILENET_CHANNELS = (16, 24, 32, 64, 96, 160, 320)
MOBILENET_STEM = 32


class InvertedResidual(BaseModel):
    """1x1 expansion, depthwise 3x3 (stride 1 or 2), linear 1x1 projection to ``filters``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    expansion: int = Field(ge=1, le=64)
    filters: int = Field(ge=1)
    stride: Literal[1, 2] = 1


class Augment(BaseModel):
    """The augmentation a trial trains with: ``training.augmentation``'s fields, resolved."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    horizontal_flip: bool = False
    vertical_flip: bool = False
    rotation: float = Field(default=0.0, ge=0.0, le=0.5)
    zoom: float = Field(default=0.0, ge=0.0, le=0.9)
    translation: float = Field(default=0.0, ge=0.0, le=0.5)
    contrast: float = Field(default=0.0, ge=0.0, le=0.9)
    brightness: float = Field(default=0.0, ge=0.0, le=0.9)

    def active(self) -> bool:
        """Whether it changes any image."""
        return self != Augment()

    def summary(self) -> str:
        """``aug(hflip,rot0.10)``: the changes it makes, or '' for none."""
        parts = [
            name
            for name, on in (("hflip", self.horizontal_flip), ("vflip", self.vertical_flip))
            if on
        ]
        for short, value in (
            ("rot", self.rotation),
            ("zoom", self.zoom),
            ("shift", self.translation),
            ("contrast", self.contrast),
            ("bright", self.brightness),
        ):
            if value > 0:
                parts.append(f"{short}{value:.2f}")
        return f"aug({','.join(parts)})" if parts else ""


class Architecture(BaseModel):
    """One sampled model, enough for the trainer to build it; travels as JSON.

    ``dense_units`` is the mlp head's first dense layer, ``extra_dense_units`` the ones
    after it (up to two). ``augmentation`` is None when the trial trains on the images as
    they are. A custom model is ``custom_builder`` called with ``custom_params``; it has no
    blocks nor head of ours (``classifier`` is "gap" and means nothing for it).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    family: Literal["cnn", "inception", "mobilenet", "custom"]
    conv_blocks: tuple[ConvBlock, ...] = ()
    inception_blocks: tuple[InceptionBlock, ...] = ()
    mobilenet_blocks: tuple[InvertedResidual, ...] = ()
    stem_filters: int | None = Field(default=None, ge=1)
    stem_stride: Literal[1, 2] = 1
    classifier: Literal["gap", "mlp"]
    dense_units: int | None = None
    extra_dense_units: tuple[int, ...] = Field(default=(), max_length=2)
    dropout: float = Field(ge=0.0, le=1.0)
    learning_rate: float = Field(gt=0.0)
    augmentation: Augment | None = None
    custom_builder: str | None = Field(default=None, max_length=200)
    custom_params: dict[str, int | float | str] | None = Field(default=None, max_length=32)

    @property
    def head_units(self) -> tuple[int, ...]:
        """Units of each dense layer of the head, in order (empty for gap)."""
        if self.classifier != "mlp" or self.dense_units is None:
            return ()
        return (self.dense_units, *self.extra_dense_units)

    def summary(self) -> str:
        """A one-line description, as in ``cnn[32k3,64k5] mlp256 drop0.25 lr3.2e-04``."""
        if self.family == "cnn":
            blocks = ",".join(f"{b.filters}k{b.kernel_size}" for b in self.conv_blocks)
        elif self.family == "custom":
            params = ",".join(f"{k}={_short(v)}" for k, v in (self.custom_params or {}).items())
            text = f"custom[{params}] lr{self.learning_rate:.1e}"
            if self.augmentation is not None and self.augmentation.active():
                text += " " + self.augmentation.summary()
            return text
        elif self.family == "inception":
            blocks = ",".join(
                f"{b.modules}x({b.filters_1x1}/{b.filters_3x3})" for b in self.inception_blocks
            )
        else:
            stem = f"s{self.stem_filters}" + ("/2" if self.stem_stride == 2 else "")
            blocks = ",".join(
                [stem] + [f"e{b.expansion}/{b.filters}s{b.stride}" for b in self.mobilenet_blocks]
            )
        head = "mlp" + "-".join(map(str, self.head_units)) if self.classifier == "mlp" else "gap"
        text = f"{self.family}[{blocks}] {head} drop{self.dropout:.2f} lr{self.learning_rate:.1e}"
        if self.augmentation is not None and self.augmentation.active():
            text += " " + self.augmentation.summary()
        return text


def _short(value: int | float | str) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def mobilenet_channels(base: int, width: float) -> int:
    """``base`` channels scaled by ``width``, rounded to a multiple of 8 (at least 8), as
    MobileNetV2's ``_make_divisible`` does: never more than 10 % below the exact value."""
    exact = base * width
    rounded = max(8, int(exact + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * exact else rounded


def _int(trial: optuna.trial.BaseTrial, name: str, r: IntRange) -> int:
    return trial.suggest_int(name, r.min, r.max, step=r.step)


def _float(trial: optuna.trial.BaseTrial, name: str, r: FloatRange) -> float:
    # TPE's log-scale draws can land an ulp or two outside the range (exp of a log):
    # what a trainer gets stays inside the declared space.
    return min(max(trial.suggest_float(name, r.min, r.max, log=r.log), r.min), r.max)


def sample_architecture(
    trial: optuna.trial.BaseTrial, space: SearchSpace, fixed: Augmentation | None = None
) -> Architecture:
    """Sample one architecture from ``space`` through ``trial`` (define-by-run).

    Args:
        trial: A live trial from ``study.ask()``, or a ``FixedTrial`` to replay params.
        space: The spec's search space.
        fixed: ``training.augmentation``: the augmentation of fields not searched.

    Returns:
        The architecture; its parameter names in the study are stable across versions.
    """
    family = trial.suggest_categorical("family", list(space.architectures))
    if family == "custom":
        assert space.custom is not None  # the spec's rule
        return Architecture(
            family="custom",
            classifier="gap",
            dropout=0.0,
            learning_rate=_float(trial, "learning_rate", space.learning_rate),
            augmentation=sample_augmentation(trial, space, fixed),
            custom_builder=space.custom.builder,
            custom_params=sample_custom(trial, space.custom),
        )
    conv: list[ConvBlock] = []
    inception: list[InceptionBlock] = []
    mobile: list[InvertedResidual] = []
    stem: int | None = None
    if family == "mobilenet":
        m = space.mobilenet
        width = float(trial.suggest_categorical("mobilenet_width", list(m.widths)))
        stem = mobilenet_channels(MOBILENET_STEM, width)
        for i in range(_int(trial, "mobilenet_blocks", m.blocks)):
            mobile.append(
                InvertedResidual(
                    expansion=_int(trial, f"mobilenet_expansion_{i}", m.expansion),
                    filters=mobilenet_channels(MOBILENET_CHANNELS[i], width),
                    stride=trial.suggest_categorical(f"mobilenet_stride_{i}", list(m.strides)),
                )
            )
    elif family == "cnn":
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
    units: list[int] = []
    if classifier == "mlp":
        head = space.classifier
        layers = _int(trial, "dense_layers", head.layers) if head.layers.max > 1 else 1
        # the first layer keeps its name of old, so older studies replay unchanged
        units = [
            _int(trial, "dense_units" if i == 0 else f"dense_units_{i}", head.units)
            for i in range(layers)
        ]
    return Architecture(
        family=family,
        conv_blocks=tuple(conv),
        inception_blocks=tuple(inception),
        mobilenet_blocks=tuple(mobile),
        stem_filters=stem,
        stem_stride=space.mobilenet.stem_stride if family == "mobilenet" else 1,
        classifier=classifier,
        dense_units=units[0] if units else None,
        extra_dense_units=tuple(units[1:]),
        dropout=_float(trial, "dropout", space.dropout),
        learning_rate=_float(trial, "learning_rate", space.learning_rate),
        augmentation=sample_augmentation(trial, space, fixed),
    )


def sample_custom(
    trial: optuna.trial.BaseTrial, space: CustomSpace
) -> dict[str, int | float | str]:
    """The builder's parameters, as ``custom_<name>`` in the study: the unconditional ones
    in their order, then those whose condition the values taken meet."""
    values: dict[str, int | float | str] = {}
    ordered = [p for p in space.parameters if p.condition is None]
    ordered += [p for p in space.parameters if p.condition is not None]
    for p in ordered:
        if p.condition is not None and values.get(p.condition.parameter) not in p.condition.values:
            continue
        name = f"custom_{p.name}"
        if p.type == "categorical":
            assert p.choices is not None
            values[p.name] = trial.suggest_categorical(name, list(p.choices))
            continue
        assert p.min is not None
        assert p.max is not None
        if p.type == "int":
            step = int(p.step or 1)
            values[p.name] = trial.suggest_int(name, int(p.min), int(p.max), step=step, log=p.log)
        else:
            value = trial.suggest_float(name, p.min, p.max, step=p.step, log=p.log)
            values[p.name] = min(max(value, p.min), p.max)
    return values


def sample_augmentation(
    trial: optuna.trial.BaseTrial, space: SearchSpace, fixed: Augmentation | None
) -> Augment | None:
    """The trial's augmentation: ``searchSpace.augmentation``'s fields sampled (as
    ``aug_<name>``), the others from ``training.augmentation``; None when it changes nothing."""
    values = (fixed or Augmentation()).model_dump()
    searched = space.augmentation
    if searched is not None:
        for name, choice in searched:
            if choice is None:
                continue
            if isinstance(choice, list):
                values[name] = trial.suggest_categorical(f"aug_{name}", list(choice))
            else:
                values[name] = _float(trial, f"aug_{name}", choice)
    augment = Augment(**values)
    return augment if augment.active() else None


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
    if "mobilenet" in space.architectures:
        m = space.mobilenet
        per_block = _count(m.expansion) * len(m.strides)
        bodies += len(m.widths) * _per_block_total(m.blocks, per_block)
    head = space.classifier
    mlps = _per_block_total(head.layers, _count(head.units))
    heads = sum(mlps if t == "mlp" else 1 for t in head.types)
    models = bodies * heads  # a custom model has no head of ours
    ranges = [("dropout", space.dropout)] if bodies else []
    ranges.append(("learning_rate", space.learning_rate))
    custom_continuous: list[str] = []
    if "custom" in space.architectures and space.custom is not None:
        choices = 1
        for p in space.custom.parameters:
            if p.type == "categorical":
                choices *= len(p.choices or ())
            elif p.min is not None and p.max is not None and (p.type == "int" or p.step):
                choices *= int((p.max - p.min) // (p.step or 1)) + 1
            else:
                custom_continuous.append(f"custom_{p.name}")
        models += choices  # an upper bound when conditions leave some out
    flips = 1
    if space.augmentation is not None:
        for name, choice in space.augmentation:
            if isinstance(choice, list):
                flips *= len(choice)
            elif choice is not None:
                ranges.append((f"aug_{name}", choice))
    continuous = tuple(name for name, r in ranges if not math.isclose(r.min, r.max))
    continuous += tuple(custom_continuous)
    return SpaceSize(discrete=models * flips, continuous=continuous)


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
        return WindowedTPESampler(  # Optuna's TPE over a bounded history (sampling.py)
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
