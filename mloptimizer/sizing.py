"""How big a sampled model is, worked out from its architecture without building it.

A model too large for its trainer's memory is not an exception anyone can catch: the
kernel kills the trainer, the broker redelivers the trial to the next one, and so on until
the trial is dead-lettered. So the dispatcher sizes every architecture before it sends it
(:func:`memory_bytes` against :func:`trainer_budget`) and fails the ones that cannot fit
as ``too_large`` at once. The parameter count is Keras' own (the builder in
``mloptimizer.trainer.model`` is mirrored layer by layer, and a test holds the two to the
same number); the memory is an estimate that errs on the large side.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from mloptimizer.space import Architecture, InceptionBlock, InvertedResidual
from mloptimizer.spec import ArchitectureSearchSpec

__all__ = [
    "ModelSize",
    "input_shape",
    "memory_bytes",
    "model_size",
    "quantity_bytes",
    "trainer_budget",
]

# The built-in datasets: (height, width, channels) and classes.
_BUILTIN = {
    "digits": ((8, 8, 1), 10),
    "mnist": ((28, 28, 1), 10),
    "mnist_5k": ((28, 28, 1), 10),
    "fashion_mnist": ((28, 28, 1), 10),
    "cifar10": ((32, 32, 3), 10),
}
_UNKNOWN_CLASSES = 100  # an image folder's classes are counted by the trainer, not here

# Training holds each weight with its gradient and Adam's two slots (float32: 16 bytes),
# and each activation once for the backward pass plus about half again for the gradients
# in flight (float32: 6 bytes); TensorFlow and the cached dataset take a base share.
_BYTES_PER_PARAMETER = 16
_BYTES_PER_ACTIVATION = 6
_BASE_BYTES = 768 * 2**20


@dataclass(frozen=True)
class ModelSize:
    """A model's weights (Keras' "Total params"), activations of one image (values) and
    multiply-adds of one image's forward pass (convolutions and dense layers)."""

    parameters: int
    activations: int
    multiply_adds: int = 0

    @property
    def mflops(self) -> float:
        """Millions of multiply-adds per image, as ``objective.constraints.maxMFLOPs``."""
        return self.multiply_adds / 1e6


def input_shape(spec: ArchitectureSearchSpec) -> tuple[tuple[int, int, int], int]:
    """``((height, width, channels), classes)`` of the search's images (classes bounded)."""
    dataset = spec.dataset
    if dataset.builtin is not None:
        return _BUILTIN[dataset.builtin]
    folder = dataset.image_folder
    assert folder is not None
    channels = 3 if folder.color_mode == "rgb" else 1
    return (folder.image_size[0], folder.image_size[1], channels), _UNKNOWN_CLASSES


def _conv(cin: int, filters: int, kernel: int) -> int:
    return kernel * kernel * cin * filters + 4 * filters  # no bias; batch norm: 4 per filter


def _inception(block: InceptionBlock, cin: int, pixels: int) -> tuple[int, int, int, int]:
    """(parameters, activations, multiply-adds, output channels) of one inception module."""
    f1, f3 = block.filters_1x1, block.filters_3x3
    f5 = max(1, f3 // 2)
    params = 4 * _conv(cin, f1, 1) + _conv(f1, f3, 3) + _conv(f1, f5, 3) + _conv(f5, f5, 3)
    out = 2 * f1 + f3 + f5
    # conv, batch norm and ReLU outputs of 7 convolutions, the pooling branch, the concat
    per_pixel = 3 * (4 * f1 + f3 + 2 * f5) + cin + out
    macs = pixels * (4 * cin * f1 + 9 * f1 * f3 + 9 * f1 * f5 + 9 * f5 * f5)
    return params, per_pixel * pixels, macs, out


def _inverted_residual(
    block: InvertedResidual, cin: int, height: int, width: int
) -> tuple[int, int, int, int, int]:
    """(parameters, activations, multiply-adds, output height, output width) of one block."""
    hidden = cin * block.expansion
    params = macs = activations = 0
    if block.expansion > 1:  # expand: 1x1 convolution, batch norm, ReLU6
        params += _conv(cin, hidden, 1)
        macs += height * width * cin * hidden
        activations += 3 * height * width * hidden
    out_h, out_w = math.ceil(height / block.stride), math.ceil(width / block.stride)
    pixels = out_h * out_w
    params += 9 * hidden + 4 * hidden  # depthwise 3x3 (no bias), batch norm
    macs += pixels * 9 * hidden
    activations += 3 * pixels * hidden
    params += _conv(hidden, block.filters, 1)  # linear projection, batch norm
    macs += pixels * hidden * block.filters
    activations += 2 * pixels * block.filters
    if block.stride == 1 and cin == block.filters:
        activations += pixels * block.filters  # the residual sum
    return params, activations, macs, out_h, out_w


def model_size(arch: Architecture, shape: tuple[int, int, int], classes: int) -> ModelSize:
    """Parameters and activations of ``arch`` built for images of ``shape``.

    Raises:
        ValueError: ``arch`` is a custom model: only its trainer, which builds it, knows.
    """
    if arch.family == "custom":
        raise ValueError("a custom model is measured by the trainer that builds it")
    height, width, channels = shape
    params, activations, macs = 0, height * width * channels, 0
    if arch.family == "cnn":
        for conv in arch.conv_blocks:
            params += _conv(channels, conv.filters, conv.kernel_size)
            macs += height * width * conv.kernel_size**2 * channels * conv.filters
            activations += 3 * height * width * conv.filters
            height, width, channels = height // 2, width // 2, conv.filters
            activations += height * width * channels
    elif arch.family == "mobilenet":
        stem = arch.stem_filters or 32
        height, width = math.ceil(height / arch.stem_stride), math.ceil(width / arch.stem_stride)
        params += _conv(channels, stem, 3)
        macs += height * width * 9 * channels * stem
        activations += 3 * height * width * stem
        channels = stem
        for ir in arch.mobilenet_blocks:
            p, a, m, height, width = _inverted_residual(ir, channels, height, width)
            params, activations, macs, channels = params + p, activations + a, macs + m, ir.filters
    else:
        for block in arch.inception_blocks:
            for _ in range(block.modules):
                p, a, m, channels = _inception(block, channels, height * width)
                params, activations, macs = params + p, activations + a, macs + m
            height, width = height // 2, width // 2
            activations += height * width * channels
    if arch.classifier == "gap":
        features = channels
    else:
        features = height * width * channels
        for units in arch.head_units:
            params += features * units + units
            macs += features * units
            activations += 2 * units
            features = units
    params += features * classes + classes
    macs += features * classes
    activations += 3 * features + classes
    return ModelSize(parameters=params, activations=activations, multiply_adds=macs)


def memory_bytes(size: ModelSize, batch_size: int) -> int:
    """Memory a trainer needs to train a model of ``size`` with batches of ``batch_size``."""
    return (
        _BASE_BYTES
        + _BYTES_PER_PARAMETER * size.parameters
        + _BYTES_PER_ACTIVATION * batch_size * size.activations
    )


_QUANTITY = re.compile(r"^([0-9.]+)([KMGTPE]i?|[kmun]|)$")
_UNITS = {
    "": 1,
    "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "m": 10**-3, "u": 10**-6, "n": 10**-9,
}  # fmt: skip


def quantity_bytes(quantity: str) -> int:
    """Bytes of a Kubernetes memory quantity such as ``4Gi`` or ``512M``."""
    match = _QUANTITY.match(quantity.strip())
    if match is None:
        raise ValueError(f"not a memory quantity: {quantity!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def trainer_budget(spec: ArchitectureSearchSpec) -> int:
    """The memory each trainer has: ``workers.resources.memory``, shared by the trainer
    processes of a pod under ``trainersPerGpu``."""
    return quantity_bytes(spec.workers.resources.memory) // spec.workers.processes_per_pod
