"""The ArchitectureSearch spec: one typed model for the CRD, the operator and the local runner.

A new spec field goes on its section's model, in the module named after the section below;
then regenerate the CRD with ``mloptimizer crd`` (tests/test_crd.py checks crds/ against it).

The CRD in ``crds/architecturesearch.yaml`` is generated from these classes
(:mod:`mloptimizer.crd`): descriptions, defaults, enums, bounds and the CEL rules
all come from here, so the API server and ``mloptimizer validate`` judge a spec
by the same rules. The sections:

* :mod:`~mloptimizer.spec.common`: the API's identity, the release, shared field types;
* :mod:`~mloptimizer.spec.dataset`: ``dataset``;
* :mod:`~mloptimizer.spec.objective`: ``objective`` and ``budget``;
* :mod:`~mloptimizer.spec.training`: ``sampler``, ``pruner`` and ``training``;
* :mod:`~mloptimizer.spec.search_space`: ``searchSpace`` (and :mod:`~mloptimizer.spec.custom`,
  its ``custom``);
* :mod:`~mloptimizer.spec.workers`: ``workers`` (and its ``gpuPool``);
* :mod:`~mloptimizer.spec.services`: ``storage`` and ``broker``;
* :mod:`~mloptimizer.spec.output`: ``output``;
* :mod:`~mloptimizer.spec.search`: the whole spec and the rules across sections.
"""

from __future__ import annotations

from mloptimizer.spec.common import (
    API_VERSION,
    DURATION_PATTERN,
    GROUP,
    KIND,
    PLURAL,
    QUANTITY_PATTERN,
    RELEASE,
    VERSION,
    SecretKeyRef,
    parse_duration,
)
from mloptimizer.spec.custom import BUILDER_PATTERN, CustomCondition, CustomParameter, CustomSpace
from mloptimizer.spec.dataset import BUILTIN_DATASETS, Dataset, ImageFolder
from mloptimizer.spec.objective import Budget, Constraints, Metric, Objective, Tradeoff
from mloptimizer.spec.output import (
    EXPORT_FORMATS,
    FOLDER_PATTERN,
    ExportFormat,
    ObjectStore,
    Output,
    OutputVolume,
    S3Secret,
)
from mloptimizer.spec.search import ArchitectureSearchSpec
from mloptimizer.spec.search_space import (
    AugmentationSpace,
    ClassifierSpace,
    CnnSpace,
    FloatRange,
    InceptionSpace,
    IntRange,
    MobilenetSpace,
    SearchSpace,
)
from mloptimizer.spec.services import Broker, Storage
from mloptimizer.spec.training import (
    AUGMENTATIONS,
    Augmentation,
    Pruner,
    Refine,
    SamplerSpec,
    Training,
)
from mloptimizer.spec.workers import (
    CPU_TRAINER_IMAGE,
    GPU_TRAINER_IMAGE,
    GpuPool,
    JoinSecret,
    Resources,
    Toleration,
    Workers,
)

__all__ = [
    "API_VERSION",
    "AUGMENTATIONS",
    "BUILDER_PATTERN",
    "BUILTIN_DATASETS",
    "CPU_TRAINER_IMAGE",
    "DURATION_PATTERN",
    "EXPORT_FORMATS",
    "FOLDER_PATTERN",
    "GPU_TRAINER_IMAGE",
    "GROUP",
    "KIND",
    "PLURAL",
    "QUANTITY_PATTERN",
    "RELEASE",
    "VERSION",
    "ArchitectureSearchSpec",
    "Augmentation",
    "AugmentationSpace",
    "Broker",
    "Budget",
    "ClassifierSpace",
    "CnnSpace",
    "Constraints",
    "CustomCondition",
    "CustomParameter",
    "CustomSpace",
    "Dataset",
    "ExportFormat",
    "FloatRange",
    "GpuPool",
    "ImageFolder",
    "InceptionSpace",
    "IntRange",
    "JoinSecret",
    "Metric",
    "MobilenetSpace",
    "ObjectStore",
    "Objective",
    "Output",
    "OutputVolume",
    "Pruner",
    "Refine",
    "Resources",
    "S3Secret",
    "SamplerSpec",
    "SearchSpace",
    "SecretKeyRef",
    "Storage",
    "Toleration",
    "Tradeoff",
    "Training",
    "Workers",
    "parse_duration",
]
