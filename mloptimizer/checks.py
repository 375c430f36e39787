"""Checks that need more than the schema: whether the search space fits the data.

The CRD and the spec model agree field by field; what they cannot see is that, say,
four 2x2 poolings do not fit 8x8 digits. A space whose *smallest* block count does not
fit would only fail trial after trial, so ``mloptimizer validate``, ``mloptimizer run`` and
the operator refuse it up front, naming the field and the value that fits. A space whose
largest counts do not fit is searched up to what fits (:func:`fitted_space`): the default
space (up to 4 blocks) is searched with 3 on 8x8 digits, silently; a ``blocks.max`` the
user wrote above what fits gets a warning that the rest is never sampled.

Memory is the other limit (:func:`size_issues`): a model over the trainer's memory is
failed unsent as ``too_large``; a space where many draws are is worth a warning, and one
where every draw is, an error.
"""

from __future__ import annotations

import optuna

from mloptimizer.loading import SpecIssue
from mloptimizer.spec import ArchitectureSearchSpec, IntRange, SearchSpace

__all__ = [
    "BUILTIN_SIDE",
    "constraint_issues",
    "fitted_space",
    "input_side",
    "max_blocks",
    "size_issues",
    "smallest_model",
    "space_issues",
    "tradeoff_issues",
]

# The smaller side of each built-in dataset's images, in pixels.
BUILTIN_SIDE = {"digits": 8, "mnist": 28, "fashion_mnist": 28, "mnist_5k": 28, "cifar10": 32}


def input_side(spec: ArchitectureSearchSpec) -> int:
    """The smaller side of the search's input images."""
    dataset = spec.dataset
    if dataset.builtin is not None:
        return BUILTIN_SIDE[dataset.builtin]
    assert dataset.image_folder is not None
    return min(dataset.image_folder.image_size)


def max_blocks(spec: ArchitectureSearchSpec) -> int:
    """The most blocks the input images hold: each block ends with a 2x2 pooling."""
    return input_side(spec).bit_length() - 1


def _fitted(blocks: IntRange, fits: int) -> IntRange:
    if blocks.max <= fits or blocks.min > fits:
        return blocks
    top = blocks.min + (fits - blocks.min) // blocks.step * blocks.step
    return IntRange(min=blocks.min, max=top, step=blocks.step)


def fitted_space(spec: ArchitectureSearchSpec) -> SearchSpace:
    """The search space as it is sampled: block counts capped at what the images hold."""
    fits = max_blocks(spec)
    space = spec.search_space
    cnn = space.cnn.model_copy(update={"blocks": _fitted(space.cnn.blocks, fits)})
    inception = space.inception.model_copy(update={"blocks": _fitted(space.inception.blocks, fits)})
    return space.model_copy(update={"cnn": cnn, "inception": inception})


def _written(spec: ArchitectureSearchSpec, family: str) -> bool:
    """Whether the spec itself sets ``searchSpace.<family>.blocks`` (not a default)."""
    space = spec.search_space
    part = space.cnn if family == "cnn" else space.inception
    return (
        "search_space" in spec.model_fields_set
        and family in space.model_fields_set
        and "blocks" in part.model_fields_set
    )


def space_issues(spec: ArchitectureSearchSpec) -> tuple[list[SpecIssue], list[SpecIssue]]:
    """``(errors, warnings)``: block counts the input images cannot hold.

    Every block ends with a 2x2 pooling, so ``n`` blocks need a side of ``2**n`` pixels.
    """
    side = input_side(spec)
    fits = max_blocks(spec)
    what = (
        f"dataset {spec.dataset.builtin}" if spec.dataset.builtin else "dataset.imageFolder"
    ) + f" ({side}x{side})"
    errors: list[SpecIssue] = []
    warnings: list[SpecIssue] = []
    space = spec.search_space
    for family in space.architectures:
        if family in ("mobilenet", "custom"):  # mobilenet pads ("same"); custom: its own
            continue
        blocks = space.cnn.blocks if family == "cnn" else space.inception.blocks
        path = f"spec.searchSpace.{family}.blocks"
        if blocks.min > fits:
            errors.append(
                SpecIssue(
                    f"{path}.min",
                    f"{blocks.min} blocks need images of at least {2**blocks.min}x"
                    f"{2**blocks.min}, but {what} holds {fits}: lower {family}.blocks.min "
                    f"(and max) to {fits}, or drop {family} from searchSpace.architectures",
                )
            )
        elif blocks.max > fits and _written(spec, family):
            top = _fitted(blocks, fits).max
            warnings.append(
                SpecIssue(
                    f"{path}.max",
                    f"{what} holds at most {fits} blocks; {family} models are searched with "
                    f"{blocks.min} to {top} blocks: lower {family}.blocks.max to {top} to say so",
                )
            )
    if not errors:
        errors.extend(constraint_issues(spec))
    warnings.extend(tradeoff_issues(spec))
    return errors, warnings


def sampled_needs(spec: ArchitectureSearchSpec, samples: int = 200) -> list[int]:
    """Bytes a trainer needs to train each of ``samples`` random draws of the space (what
    TPE draws before it learns), at ``training.batchSize``; custom models are measured by
    their trainers once built, so they are left out."""
    from mloptimizer.sizing import input_shape, memory_bytes, model_size
    from mloptimizer.space import sample_architecture

    shape, classes = input_shape(spec)
    space = fitted_space(spec)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    needs = []
    for _ in range(samples):
        architecture = sample_architecture(study.ask(), space)
        if architecture.family != "custom":
            size = model_size(architecture, shape, classes)
            needs.append(memory_bytes(size, spec.training.batch_size))
    return needs


def size_issues(
    spec: ArchitectureSearchSpec, budget: int, samples: int = 200
) -> tuple[list[SpecIssue], list[SpecIssue]]:
    """``(errors, warnings)``: the share of the space over ``budget`` bytes per trainer.

    Measured on ``samples`` random draws of the space (:func:`sampled_needs`).
    """
    needs = sampled_needs(spec, samples)
    over = sum(need > budget for need in needs)
    largest = max(needs, default=0)
    if over == 0:
        return [], []
    gib = budget / 2**30
    fix = (
        "narrow searchSpace (fewer filters or dense units, a gap classifier), lower "
        "training.batchSize, or raise workers.resources.memory"
    )
    if over == samples:
        error = SpecIssue(
            "spec.searchSpace",
            f"no sampled model fits a trainer's {gib:.1f} GiB (all {samples} random draws "
            f"need more): {fix}",
        )
        return [error], []
    share = over / samples
    if share < 0.2:
        return [], []
    warning = SpecIssue(
        "spec.searchSpace",
        f"{share:.0%} of sampled models need more than a trainer's {gib:.1f} GiB (up to "
        f"{largest / 2**30:.1f} GiB); they fail as too_large without training: {fix}",
    )
    return [], [warning]


def smallest_model(spec: ArchitectureSearchSpec) -> tuple[int, float]:
    """``(parameters, MFLOPs)``: the least of each over the space as it is sampled.

    Each is smallest with the fewest filters, units and modules and the smallest kernel;
    the block count is tried over its whole range (more blocks shrink an mlp head's
    input), and every head type the space allows.
    """
    from mloptimizer.sizing import input_shape, model_size
    from mloptimizer.space import (
        MOBILENET_CHANNELS,
        MOBILENET_STEM,
        Architecture,
        ConvBlock,
        InceptionBlock,
        InvertedResidual,
        mobilenet_channels,
    )

    shape, classes = input_shape(spec)
    space = fitted_space(spec)
    heads = space.classifier.types
    candidates: list[Architecture] = []
    for head in heads:
        units = space.classifier.units.min if head == "mlp" else None
        more = (units,) * (space.classifier.layers.min - 1) if units is not None else ()
        common = {
            "classifier": head,
            "dense_units": units,
            "extra_dense_units": more,
            "dropout": 0.0,
            "learning_rate": 0.1,
        }
        if "cnn" in space.architectures:
            cnn = space.cnn
            block = ConvBlock(filters=cnn.filters.min, kernel_size=min(cnn.kernel_sizes))
            for count in range(cnn.blocks.min, cnn.blocks.max + 1, cnn.blocks.step):
                candidates.append(
                    Architecture(family="cnn", conv_blocks=(block,) * count, **common)
                )
        if "inception" in space.architectures:
            inc = space.inception
            module = InceptionBlock(
                modules=inc.modules.min,
                filters_1x1=inc.filters_1x1.min,
                filters_3x3=inc.filters_3x3.min,
            )
            for count in range(inc.blocks.min, inc.blocks.max + 1, inc.blocks.step):
                candidates.append(
                    Architecture(family="inception", inception_blocks=(module,) * count, **common)
                )
        if "mobilenet" in space.architectures:
            mob = space.mobilenet
            width = min(mob.widths)
            for count in range(mob.blocks.min, mob.blocks.max + 1, mob.blocks.step):
                blocks = tuple(
                    InvertedResidual(
                        expansion=mob.expansion.min,
                        filters=mobilenet_channels(MOBILENET_CHANNELS[i], width),
                        stride=max(mob.strides),
                    )
                    for i in range(count)
                )
                candidates.append(
                    Architecture(
                        family="mobilenet",
                        mobilenet_blocks=blocks,
                        stem_filters=mobilenet_channels(MOBILENET_STEM, width),
                        stem_stride=mob.stem_stride,
                        **common,
                    )
                )
    sizes = [model_size(a, shape, classes) for a in candidates]
    if not sizes:  # only the custom family: its trainer measures each model
        return 0, 0.0
    return min(s.parameters for s in sizes), min(s.mflops for s in sizes)


def tradeoff_issues(spec: ArchitectureSearchSpec) -> list[SpecIssue]:
    """A pruner that cannot act under a tradeoff: Optuna cannot prune multi-objective
    trials, so every trial trains all its epochs (the search costs more than it reads)."""
    if spec.objective.tradeoff is None or spec.pruner.type == "none":
        return []
    return [
        SpecIssue(
            "spec.pruner.type",
            f"the {spec.pruner.type} pruner is off under objective.tradeoff (Optuna cannot "
            "prune multi-objective trials): every trial trains all training.epochs; set "
            "pruner.type: none to say so, or lower training.epochs",
        )
    ]


def constraint_issues(spec: ArchitectureSearchSpec) -> list[SpecIssue]:
    """Device constraints no model of the space can meet, with the smallest achievable."""
    constraints = spec.objective.constraints
    if constraints is None:
        return []
    params, mflops = smallest_model(spec)
    path = "spec.objective.constraints"
    fix = "raise it, or narrow searchSpace to smaller models (fewer filters, a gap head)"
    issues = []
    if constraints.max_params is not None and params > constraints.max_params:
        issues.append(
            SpecIssue(
                f"{path}.maxParams",
                f"the smallest model of this space has {params:,} params; maxParams "
                f"{constraints.max_params:,} cannot be met: {fix}",
            )
        )
    if constraints.max_mflops is not None and mflops > constraints.max_mflops:
        issues.append(
            SpecIssue(
                f"{path}.maxMFLOPs",
                f"the smallest model of this space needs {mflops:,.3g} MFLOPs; maxMFLOPs "
                f"{constraints.max_mflops:g} cannot be met: {fix}",
            )
        )
    smallest_kb = params / 1024  # int8: at least one byte per weight
    if constraints.max_model_kb is not None and smallest_kb > constraints.max_model_kb:
        issues.append(
            SpecIssue(
                f"{path}.maxModelKB",
                f"the smallest model of this space has {params:,} params, at least "
                f"{smallest_kb:,.1f} KB as int8 (a byte per weight); maxModelKB "
                f"{constraints.max_model_kb:g} cannot be met: {fix}",
            )
        )
    return issues
