"""How trials are chosen, stopped early and trained: sampler, pruner, training, refine."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mloptimizer.rules import Rule, SpecModel

__all__ = ["AUGMENTATIONS", "Augmentation", "Pruner", "Refine", "SamplerSpec", "Training"]

# The augmentations, each a Keras preprocessing layer (what it does in its field's text).
AUGMENTATIONS = (
    "horizontalFlip",
    "verticalFlip",
    "rotation",
    "zoom",
    "translation",
    "contrast",
    "brightness",
)


class Augmentation(SpecModel):
    """Random changes to each training image, drawn anew every epoch.

    Keras preprocessing layers applied to the training batches only: validation, test and
    the exported models never see them. A field left out changes nothing. The same names
    under ``searchSpace.augmentation`` let the sampler choose the value instead.
    """

    horizontal_flip: bool = Field(
        default=False, description="Mirror half the images left to right (RandomFlip)."
    )
    vertical_flip: bool = Field(
        default=False, description="Mirror half the images top to bottom (RandomFlip)."
    )
    rotation: float = Field(
        default=0.0,
        ge=0.0,
        le=0.5,
        description="Rotate by up to this fraction of a full turn either way: 0.05 is 18 "
        "degrees (RandomRotation).",
    )
    zoom: float = Field(
        default=0.0,
        ge=0.0,
        le=0.9,
        description="Zoom in or out by up to this fraction of the size (RandomZoom).",
    )
    translation: float = Field(
        default=0.0,
        ge=0.0,
        le=0.5,
        description="Shift by up to this fraction of the height and width (RandomTranslation).",
    )
    contrast: float = Field(
        default=0.0,
        ge=0.0,
        le=0.9,
        description="Scale the contrast by a factor in [1 - contrast, 1 + contrast] "
        "(RandomContrast).",
    )
    brightness: float = Field(
        default=0.0,
        ge=0.0,
        le=0.9,
        description="Add up to this fraction of the full range to every pixel, either way "
        "(RandomBrightness).",
    )


class SamplerSpec(SpecModel):
    """How the next architecture is chosen (Optuna samplers)."""

    rules = (
        Rule(
            cel="!self.group || self.multivariate",
            check=lambda s: not s.group or s.multivariate,
            message="group needs multivariate: true; set group: false as well, or keep "
            "multivariate",
            field="group",
        ),
    )

    type: Literal["tpe", "random"] = Field(
        default="tpe",
        description="tpe (Tree-structured Parzen Estimator) or random (the baseline).",
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        le=2**31 - 1,
        description="Seed of the sampler; the same seed proposes the same first trials.",
    )
    n_startup_trials: int = Field(
        default=5,
        ge=0,
        le=10_000,
        alias="nStartupTrials",
        description="TPE: random trials before TPE starts modelling.",
    )
    n_ei_candidates: int = Field(
        default=24,
        ge=1,
        le=10_000,
        alias="nEICandidates",
        description="TPE: candidates scored by expected improvement per suggestion.",
    )
    multivariate: bool = Field(
        default=True,
        description="TPE: model parameters jointly rather than one by one.",
    )
    group: bool = Field(
        default=True,
        description="TPE (with multivariate): model each conditional branch (cnn, "
        "inception, mlp) separately.",
    )
    constant_liar: bool = Field(
        default=True,
        description="TPE: treat running trials as bad results so parallel workers do not "
        "all sample the same point.",
    )


class Pruner(SpecModel):
    """Stop unpromising trials early, from their per-epoch progress."""

    type: Literal["none", "median", "hyperband"] = Field(
        default="median",
        description="none, median (stop a trial below the median of earlier trials at "
        "the same epoch) or hyperband.",
    )
    startup_trials: int = Field(
        default=5,
        ge=0,
        le=10_000,
        description="median: trials that run to the end before any is pruned.",
    )
    warmup_epochs: int = Field(
        default=1,
        ge=0,
        le=10_000,
        description="median: epochs every trial runs before it can be pruned.",
    )
    min_epochs: int = Field(
        default=1,
        ge=1,
        le=10_000,
        description="hyperband: epochs of the smallest bracket (min_resource).",
    )
    reduction_factor: int = Field(
        default=3,
        ge=2,
        le=100,
        description="hyperband: 1/reductionFactor of the trials survive each rung.",
    )


class Refine(SpecModel):
    """Second phase: retrain the best trials longer (the seed's two-phase optimisation)."""

    top_k: int = Field(
        default=3, ge=1, le=1000, description="How many of the best trials to retrain."
    )
    epochs: int = Field(default=30, ge=1, le=10_000, description="Epochs of each retraining.")
    schedule: Literal["cosine", "constant"] = Field(
        default="cosine",
        description="Learning rate of a retraining: cosine warms up over the first tenth of "
        "its epochs (at least one), then decays the searched rate to 1% of it along a "
        "cosine; constant keeps the searched rate, as exploring did.",
    )
    patience: int = Field(
        default=5,
        ge=0,
        le=10_000,
        description="Stop a retraining once its objective has not improved for this many "
        "epochs; it keeps its best epoch's weights and value (0: train every epoch and "
        "keep the last).",
    )


class Training(SpecModel):
    """How each trial trains."""

    rules = (
        Rule(
            cel="!has(self.refine) || self.refine.epochs > self.epochs",
            check=lambda s: s.refine is None or s.refine.epochs > s.epochs,
            message="refine.epochs must exceed training.epochs: the refine phase retrains "
            "the best trials for longer",
            field="refine",
        ),
    )

    epochs: int = Field(default=10, ge=1, le=10_000, description="Epochs per trial.")
    batch_size: int = Field(default=64, ge=1, le=65_536, description="Images per training step.")
    mixed_precision: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="auto uses mixed_float16 only on a GPU of compute capability 7.0 or "
        'newer; on forces it; off keeps float32. Quote on and off in YAML ("off"): '
        "unquoted, YAML reads them as booleans.",
    )
    class_weights: Literal["balanced"] | None = Field(
        default=None,
        description="balanced weighs each class's loss by the inverse of its share of the "
        "training images (scikit-learn's 'balanced'), so a rare class counts as much as a "
        "common one; omit to weigh every image alike.",
    )
    augmentation: Augmentation | None = Field(
        default=None,
        description="Random flips, rotations, zooms, shifts, contrast and brightness of the "
        "training images; omit for none. searchSpace.augmentation searches them instead.",
    )
    refine: Refine | None = Field(
        default=None,
        description="Retrain the top trials with more epochs after exploration; omit to skip.",
    )
