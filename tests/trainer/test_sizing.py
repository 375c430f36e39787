"""The dispatcher's size estimate against the model Keras builds."""

from __future__ import annotations

import pytest

from mloptimizer.sizing import memory_bytes, model_size, quantity_bytes
from mloptimizer.space import Architecture, ConvBlock, InceptionBlock, InvertedResidual
from mloptimizer.trainer.model import build_model, parameter_count

CASES = [
    (
        Architecture(
            family="cnn",
            conv_blocks=(
                ConvBlock(filters=32, kernel_size=3),
                ConvBlock(filters=48, kernel_size=5),
            ),
            classifier="mlp",
            dense_units=64,
            dropout=0.1,
            learning_rate=1e-3,
        ),
        (28, 28, 1),
        10,
    ),
    (
        Architecture(
            family="cnn",
            conv_blocks=(ConvBlock(filters=16, kernel_size=7),),
            classifier="gap",
            dropout=0.0,
            learning_rate=1e-3,
        ),
        (33, 31, 3),
        2,
    ),
    (
        Architecture(
            family="inception",
            inception_blocks=(
                InceptionBlock(modules=2, filters_1x1=16, filters_3x3=33),
                InceptionBlock(modules=1, filters_1x1=32, filters_3x3=48),
            ),
            classifier="mlp",
            dense_units=128,
            dropout=0.2,
            learning_rate=1e-3,
        ),
        (32, 32, 3),
        10,
    ),
    (  # every kind of block: no expansion, a stride of 2 on an odd side, a residual sum
        Architecture(
            family="mobilenet",
            stem_filters=16,
            mobilenet_blocks=(
                InvertedResidual(expansion=1, filters=16, stride=1),
                InvertedResidual(expansion=6, filters=24, stride=2),
                InvertedResidual(expansion=3, filters=24, stride=1),
                InvertedResidual(expansion=4, filters=40, stride=2),
            ),
            classifier="mlp",
            dense_units=64,
            extra_dense_units=(32, 16),
            dropout=0.1,
            learning_rate=1e-3,
        ),
        (29, 27, 3),
        7,
    ),
    (
        Architecture(
            family="mobilenet",
            stem_filters=8,
            stem_stride=2,
            mobilenet_blocks=(InvertedResidual(expansion=2, filters=8, stride=2),) * 2,
            classifier="gap",
            dropout=0.0,
            learning_rate=1e-3,
        ),
        (13, 8, 1),
        10,
    ),
    (  # the seed's own head, [256, 128]
        Architecture(
            family="cnn",
            conv_blocks=(ConvBlock(filters=32, kernel_size=3),),
            classifier="mlp",
            dense_units=256,
            extra_dense_units=(128,),
            dropout=0.2,
            learning_rate=1e-3,
        ),
        (28, 28, 1),
        10,
    ),
]


@pytest.mark.parametrize(("arch", "shape", "classes"), CASES)
def test_parameters_are_exactly_keras_own_count(
    arch: Architecture, shape: tuple[int, int, int], classes: int
) -> None:
    model = build_model(arch, shape, classes)
    assert model_size(arch, shape, classes).parameters == parameter_count(model)


def test_the_model_of_the_issue_is_sized_before_it_is_built() -> None:
    # The default space at 96x96 sampled this: 302 M parameters, 4.0 GiB just to build.
    arch = Architecture(
        family="cnn",
        conv_blocks=(ConvBlock(filters=256, kernel_size=3),),
        classifier="mlp",
        dense_units=512,
        dropout=0.0,
        learning_rate=1e-3,
    )
    size = model_size(arch, (96, 96, 3), 2)
    assert 301e6 < size.parameters < 303e6
    assert memory_bytes(size, 64) > quantity_bytes("4Gi")  # the default trainer memory


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [("4Gi", 4 * 2**30), ("512Mi", 512 * 2**20), ("1G", 10**9), ("1500M", 1.5e9), ("64", 64)],
)
def test_memory_quantities(quantity: str, expected: float) -> None:
    assert quantity_bytes(quantity) == int(expected)


@pytest.mark.parametrize(("arch", "shape", "classes"), CASES)
def test_multiply_adds_are_those_of_the_built_model(
    arch: Architecture, shape: tuple[int, int, int], classes: int
) -> None:
    from mloptimizer.trainer.litert import multiply_adds

    model = build_model(arch, shape, classes)
    assert model_size(arch, shape, classes).multiply_adds == multiply_adds(model)


def test_an_int8_litert_model_runs_in_the_interpreter_and_is_a_quarter_of_float() -> None:
    import numpy as np
    import tensorflow as tf

    from mloptimizer.trainer.litert import int8_litert

    arch, shape, classes = CASES[0]
    model = build_model(arch, shape, classes)
    images = np.random.default_rng(0).integers(0, 256, (120, *shape), dtype=np.uint8)
    flatbuffer = int8_litert(model, images)
    float_bytes = 4 * model_size(arch, shape, classes).parameters
    assert len(flatbuffer) < 0.35 * float_bytes
    interpreter = tf.lite.Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    (given,) = interpreter.get_input_details()
    (taken,) = interpreter.get_output_details()
    assert given["dtype"] == np.int8
    scale, zero = given["quantization"]
    image = (images[:1].astype(np.float32) / 255.0 / scale + zero).round().astype(np.int8)
    interpreter.set_tensor(given["index"], image)
    interpreter.invoke()
    assert interpreter.get_tensor(taken["index"]).shape == (1, classes)
