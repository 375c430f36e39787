"""Build the compiled Keras model of one sampled :class:`~mloptimizer.space.Architecture`.

The builder checks first (:func:`check_architecture`) so that an architecture the input
cannot carry fails as a trial with a reason the user can act on, not as a Keras shape
error deep in the graph. Inputs arrive as float32 already scaled to [0, 1] by the data
pipeline, so the model has no rescaling layer. The softmax layer is always float32: under
a ``mixed_float16`` policy a float16 softmax loses the small probabilities the loss needs.
"""

from __future__ import annotations

import math
from typing import Any

import keras

from mloptimizer.space import Architecture, ConvBlock, InceptionBlock, InvertedResidual
from mloptimizer.trainer.custom import build_custom
from mloptimizer.trainer.metrics import CLASS_METRIC_FLAG, class_metrics

__all__ = [
    "ArchitectureError",
    "batch_norm_momentum",
    "build_model",
    "check_architecture",
    "parameter_count",
]

_SPACE_FIELD = {
    "cnn": "searchSpace.cnn.blocks.max",
    "inception": "searchSpace.inception.blocks.max",
}
_BLOCKS = {"cnn": "conv_blocks", "inception": "inception_blocks", "mobilenet": "mobilenet_blocks"}


class ArchitectureError(ValueError):
    """The architecture cannot be built for this input; the message says why and what to do."""


def check_architecture(arch: Architecture, input_shape: tuple[int, int, int]) -> str | None:
    """Say why ``arch`` cannot be built for images of ``input_shape``, or None if it can.

    A cnn or inception block ends with a 2x2 max-pooling, which needs a feature map of at
    least 2x2, so ``n`` blocks need images of at least ``2**n`` pixels a side; mobilenet
    blocks pad, and fit any image.

    Args:
        arch: The sampled architecture.
        input_shape: ``(height, width, channels)`` of one image.

    Returns:
        A reason naming the fix, or None.
    """
    height, width, _ = input_shape
    if min(input_shape) < 1:
        return f"input shape {input_shape} must be positive in every dimension"
    if arch.family == "custom":  # the builder's own; checked once built (custom.py)
        return None
    if not getattr(arch, _BLOCKS[arch.family]):
        return f"a {arch.family} architecture needs at least one block"
    for family, field in _BLOCKS.items():
        if family != arch.family and getattr(arch, field):
            return f"a {arch.family} architecture must not carry {field}"
    if (arch.stem_filters is None) != (arch.family != "mobilenet"):
        return "stem_filters belongs to a mobilenet architecture, and only to one"
    if arch.classifier == "mlp" and arch.dense_units is None:
        return "an mlp classifier needs dense_units"
    if arch.classifier == "gap" and arch.extra_dense_units:
        return "a gap classifier has no dense layers: extra_dense_units must be empty"
    if arch.dropout >= 1.0:
        return "dropout 1.0 drops every unit: lower searchSpace.dropout.max below 1"
    if arch.family == "mobilenet":  # strides pad ("same"): a map never shrinks below 1x1
        return None
    own = getattr(arch, _BLOCKS[arch.family])
    blocks = len(own)
    side = min(height, width)
    if side < 2**blocks:
        fits = side.bit_length() - 1  # floor(log2(side)): the most poolings this side allows
        fix = (
            f"lower {_SPACE_FIELD[arch.family]} to {fits}"
            if fits >= 1
            else "use images of at least 2x2"
        )
        plural = "block needs" if blocks == 1 else "blocks need"
        return (
            f"{blocks} pooling {plural} inputs of at least {2**blocks}x{2**blocks}, "
            f"this dataset is {height}x{width}: {fix}"
        )
    return None


def _conv_bn_relu(x: Any, filters: int, kernel_size: int, name: str) -> Any:
    # No bias: the batch normalisation that follows has its own offset (beta).
    x = keras.layers.Conv2D(
        filters, kernel_size, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    # Momentum 0.9 at most, not Keras' 0.99 (see batch_norm_momentum).
    x = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _cnn_block(x: Any, block: ConvBlock, name: str) -> Any:
    x = _conv_bn_relu(x, block.filters, block.kernel_size, name)
    return keras.layers.MaxPooling2D(2, name=f"{name}_pool")(x)


def _inception_module(x: Any, block: InceptionBlock, name: str) -> Any:
    f1, f3 = block.filters_1x1, block.filters_3x3
    f5 = max(1, f3 // 2)  # two stacked 3x3 convolutions see as far as one 5x5, more cheaply
    b1 = _conv_bn_relu(x, f1, 1, f"{name}_1x1")
    b3 = _conv_bn_relu(x, f1, 1, f"{name}_3x3_reduce")
    b3 = _conv_bn_relu(b3, f3, 3, f"{name}_3x3")
    b5 = _conv_bn_relu(x, f1, 1, f"{name}_5x5_reduce")
    b5 = _conv_bn_relu(b5, f5, 3, f"{name}_5x5a")
    b5 = _conv_bn_relu(b5, f5, 3, f"{name}_5x5b")
    bp = keras.layers.MaxPooling2D(3, strides=1, padding="same", name=f"{name}_pool")(x)
    bp = _conv_bn_relu(bp, f1, 1, f"{name}_pool_proj")
    return keras.layers.Concatenate(name=f"{name}_concat")([b1, b3, b5, bp])


def _inverted_residual(x: Any, block: InvertedResidual, name: str) -> Any:
    """MobileNetV2's block: expand (1x1), depthwise 3x3, linear projection (1x1)."""
    cin = int(x.shape[-1])
    inputs = x
    if block.expansion > 1:
        x = keras.layers.Conv2D(cin * block.expansion, 1, use_bias=False, name=f"{name}_expand")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_expand_bn")(x)
        x = keras.layers.ReLU(6.0, name=f"{name}_expand_relu")(x)
    x = keras.layers.DepthwiseConv2D(
        3, strides=block.stride, padding="same", use_bias=False, name=f"{name}_depthwise"
    )(x)
    x = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_depthwise_bn")(x)
    x = keras.layers.ReLU(6.0, name=f"{name}_depthwise_relu")(x)
    x = keras.layers.Conv2D(block.filters, 1, use_bias=False, name=f"{name}_project")(x)
    x = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_project_bn")(x)
    if block.stride == 1 and cin == block.filters:
        x = keras.layers.Add(name=f"{name}_add")([inputs, x])
    return x


def batch_norm_momentum(steps_per_epoch: int | None) -> float:
    """The moving-average momentum of every batch normalisation of a built-in model.

    Trials are short, and validation reads the moving statistics, not the batch's. With
    Keras' 0.99 they still hold their initial values after a few epochs of a few dozen
    steps, and good models score at chance (digits, inception + gap, 8 epochs: 0.13 with
    0.99, 0.91 with 0.9). On a small image folder even 0.9 is too slow: 123 images make 4
    steps an epoch, and every mobilenet's validation F1 sat at a constant prediction's
    (0.205) for 5 epochs while its training F1 rose to 0.7. So the average spans about a
    quarter of an epoch (1 - 4 / steps), capped at 0.9: after one epoch the initial values
    weigh about e^-4 = 2 %. With that, the same mobilenets validated at 0.63-0.77.
    """
    if steps_per_epoch is None:
        return 0.9
    return max(0.0, min(0.9, 1.0 - 4.0 / steps_per_epoch))


def build_model(
    arch: Architecture,
    input_shape: tuple[int, int, int],
    num_classes: int,
    metric: str = "val_accuracy",
    steps_per_epoch: int | None = None,
) -> keras.Model:
    """Build and compile the model of ``arch`` under the current global dtype policy.

    Every convolution, in both families, is followed by batch normalisation and ReLU:
    inception stacks up to three convolutions per branch and module, and without
    normalisation the larger learning rates of the space make such stacks diverge.

    Args:
        arch: The sampled architecture.
        input_shape: ``(height, width, channels)`` of one float32 image scaled to [0, 1].
        num_classes: Number of classes of the softmax output.
        metric: ``objective.metric``: val_f1_macro and val_balanced_accuracy add their
            metric (:mod:`~mloptimizer.trainer.metrics`) to the compiled ones.
        steps_per_epoch: Training steps of an epoch, which set the batch normalisations'
            momentum (:func:`batch_norm_momentum`; None: 0.9). A custom model keeps its own.

    Returns:
        A model compiled with Adam, sparse categorical cross-entropy and accuracy.

    Raises:
        ArchitectureError: :func:`check_architecture` refused ``arch`` for this input.
        ValueError: ``num_classes`` is below 2.
        BuilderUnavailable, BuilderFailed: a custom model's builder cannot be imported,
            or did not build (:mod:`~mloptimizer.trainer.custom`).
    """
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, the dataset has {num_classes}")
    if arch.family == "custom":
        return _compiled(build_custom(arch, input_shape, num_classes), arch, num_classes, metric)
    reason = check_architecture(arch, input_shape)
    if reason is not None:
        raise ArchitectureError(reason)
    inputs = keras.Input(shape=input_shape, dtype="float32", name="image")
    x = inputs
    if arch.family == "cnn":
        for i, conv in enumerate(arch.conv_blocks, start=1):
            x = _cnn_block(x, conv, f"cnn{i}")
    elif arch.family == "mobilenet":
        assert arch.stem_filters is not None  # checked above
        x = keras.layers.Conv2D(
            arch.stem_filters,
            3,
            strides=arch.stem_stride,
            padding="same",
            use_bias=False,
            name="stem_conv",
        )(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name="stem_bn")(x)
        x = keras.layers.ReLU(6.0, name="stem_relu")(x)
        for i, ir in enumerate(arch.mobilenet_blocks, start=1):
            x = _inverted_residual(x, ir, f"mobilenet{i}")
    else:
        for i, block in enumerate(arch.inception_blocks, start=1):
            for m in range(1, block.modules + 1):
                x = _inception_module(x, block, f"inception{i}_{m}")
            x = keras.layers.MaxPooling2D(2, name=f"inception{i}_pool")(x)
    if arch.classifier == "gap":
        x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    else:
        x = keras.layers.Flatten(name="flatten")(x)
        for i, units in enumerate(arch.head_units):  # the first keeps its name of old
            name = "dense" if i == 0 else f"dense_{i + 1}"
            x = keras.layers.Dense(units, activation="relu", name=name)(x)
    x = keras.layers.Dropout(arch.dropout, name="dropout")(x)
    outputs = keras.layers.Dense(
        num_classes, activation="softmax", dtype="float32", name="softmax"
    )(x)
    model = keras.Model(inputs, outputs, name=arch.family)
    momentum = batch_norm_momentum(steps_per_epoch)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum
    return _compiled(model, arch, num_classes, metric)


def _compiled(model: keras.Model, arch: Architecture, num_classes: int, metric: str) -> Any:
    """``model`` compiled as every trial is: Adam, cross-entropy, the objective's metrics
    (a custom builder's own compile, if any, is replaced)."""
    extra = class_metrics(metric, num_classes)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=arch.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy", *extra],
    )
    setattr(model, CLASS_METRIC_FLAG, bool(extra))  # portable() takes it off before a save
    return model


def parameter_count(model: keras.Model) -> int:
    """Scalars in all of the model's weights, batch-norm statistics included.

    That is Keras' "Total params"; the optimizer's slots are not counted.
    """
    return sum(math.prod(int(d) for d in w.shape) for w in model.weights)
