"""Checks that need more than the schema: whether the search space fits the data.

The CRD and the spec model agree field by field; what they cannot see is that, say,
four 2x2 poolings do not fit 8x8 digits. Such a search would only fail trial after trial,
so ``mloptimizer validate``, ``mloptimizer run`` and the operator refuse it up front,
naming the field and the value that fits. Limits that only *some* samples exceed are
warnings: those trials fail and are counted, the others run.
"""

from __future__ import annotations

from mloptimizer.loading import SpecIssue
from mloptimizer.spec import ArchitectureSearchSpec

__all__ = ["BUILTIN_SIDE", "input_side", "space_issues"]

# The smaller side of each built-in dataset's images, in pixels.
BUILTIN_SIDE = {"digits": 8, "mnist": 28, "fashion_mnist": 28, "mnist_5k": 28, "cifar10": 32}


def input_side(spec: ArchitectureSearchSpec) -> int:
    """The smaller side of the search's input images."""
    dataset = spec.dataset
    if dataset.builtin is not None:
        return BUILTIN_SIDE[dataset.builtin]
    assert dataset.image_folder is not None
    return min(dataset.image_folder.image_size)


def space_issues(spec: ArchitectureSearchSpec) -> tuple[list[SpecIssue], list[SpecIssue]]:
    """``(errors, warnings)``: block counts the input images cannot hold.

    Every block ends with a 2x2 pooling, so ``n`` blocks need a side of ``2**n`` pixels.
    """
    side = input_side(spec)
    fits = side.bit_length() - 1  # the most poolings this side allows
    what = (
        f"dataset {spec.dataset.builtin}" if spec.dataset.builtin else "dataset.imageFolder"
    ) + f" ({side}x{side})"
    errors: list[SpecIssue] = []
    warnings: list[SpecIssue] = []
    space = spec.search_space
    for family in space.architectures:
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
        elif blocks.max > fits:
            warnings.append(
                SpecIssue(
                    f"{path}.max",
                    f"{what} holds at most {fits} blocks; sampled {family} models with more "
                    f"fail: lower {family}.blocks.max to {fits}",
                )
            )
    return errors, warnings
