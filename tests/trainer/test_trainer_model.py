"""The model builder with real Keras on the CPU: every default architecture builds, the
counts match a hand computation, too-deep models are refused with the fix, and the softmax
stays float32 under mixed precision.

Keras is reached only through the trainer's modules: importing ``mloptimizer.trainer``
first quiets TensorFlow, and Keras ships no type information for mypy.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mloptimizer.space import Architecture, sample_architecture
from mloptimizer.spec import SearchSpace
from mloptimizer.trainer.device import fresh_session
from mloptimizer.trainer.model import (
    ArchitectureError,
    build_model,
    check_architecture,
    parameter_count,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

SHAPES = [(28, 28, 1), (32, 32, 3), (96, 96, 3)]
# The autouse session fixture runs once around all examples; each example clears its own.
ONCE_AROUND = [HealthCheck.function_scoped_fixture]


@pytest.fixture(autouse=True)
def float32_session() -> Iterator[None]:
    """Each test starts and ends with an empty session under the float32 policy."""
    fresh_session("float32")
    yield
    fresh_session("float32")


def arch(**fields: Any) -> Architecture:
    base: dict[str, Any] = {
        "family": "cnn",
        "conv_blocks": [{"filters": 8, "kernel_size": 3}],
        "classifier": "gap",
        "dropout": 0.0,
        "learning_rate": 1e-3,
    }
    return Architecture.model_validate(base | fields)


def sampled(space: SearchSpace, seed: int) -> Architecture:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return sample_architecture(study.ask(), space)


# Building is the cost: a one-block mlp model on 96x96x3 has up to 6e8 weights (~14 s).
@settings(max_examples=8, deadline=None, suppress_health_check=ONCE_AROUND)
@given(seed=st.integers(0, 2**32 - 1))
def test_every_default_architecture_builds_for_common_shapes(seed: int) -> None:
    architecture = sampled(SearchSpace(), seed)
    for shape in SHAPES:
        assert check_architecture(architecture, shape) is None, (architecture.summary(), shape)
        fresh_session("float32")
        model = build_model(architecture, shape, 10)
        assert model.input.shape == (None, *shape)
        assert model.output.shape == (None, 10)
        assert model.output.dtype == "float32"
        assert parameter_count(model) > 0


TINY_SPACE = SearchSpace.model_validate(
    {
        "cnn": {"blocks": {"min": 1, "max": 6}, "filters": {"min": 2, "max": 4, "step": 2}},
        "inception": {
            "blocks": {"min": 1, "max": 4},
            "modules": {"min": 1, "max": 2},
            "filters1x1": {"min": 2, "max": 4, "step": 2},
            "filters3x3": {"min": 1, "max": 4},
        },
        "classifier": {"units": {"min": 4, "max": 8, "step": 4}},
    }
)


@settings(max_examples=12, deadline=None, suppress_health_check=ONCE_AROUND)
@given(seed=st.integers(0, 2**32 - 1), side=st.sampled_from([7, 8, 12, 16]))
def test_deep_architectures_build_or_are_refused_with_the_reason(seed: int, side: int) -> None:
    architecture = sampled(TINY_SPACE, seed)
    shape = (side, side, 1)
    reason = check_architecture(architecture, shape)
    blocks = len(architecture.conv_blocks) + len(architecture.inception_blocks)
    assert (reason is None) == (2**blocks <= side)
    fresh_session("float32")
    if reason is None:
        assert build_model(architecture, shape, 3).output.shape == (None, 3)
    else:
        with pytest.raises(ArchitectureError) as refused:
            build_model(architecture, shape, 3)
        assert str(refused.value) == reason


def test_smallest_input_for_the_depth_builds() -> None:
    # Four 2x2 poolings take 16 -> 8 -> 4 -> 2 -> 1: 16x16 is just enough.
    deep = arch(conv_blocks=[{"filters": 2, "kernel_size": 3}] * 4)
    model = build_model(deep, (16, 16, 1), 2)
    assert model.get_layer("cnn4_pool").output.shape == (None, 1, 1, 2)


@pytest.mark.parametrize(
    ("architecture", "shape", "expected"),
    [
        # conv 3*3*1*8 (no bias) + batch norm 4*8 + dense 8*10+10
        (arch(), (8, 8, 1), 72 + 32 + 90),
        # same body, 8x8 pooled to 4x4x8 = 128 flattened, dense 128*16+16, softmax 16*10+10
        (arch(classifier="mlp", dense_units=16), (8, 8, 1), 72 + 32 + 2064 + 170),
        # one module, 1x1 = 2, 3x3 = 4 (its 5x5 stand-in 4 // 2 = 2) on 4x4x1:
        #   1x1 2+8, 3x3 reduce 2+8, 3x3 3*3*2*4+16, 5x5 reduce 2+8, two 3x3 of 3*3*2*2+8,
        #   pool projection 2+8; concatenation 2+4+2+2 = 10 channels; dense 10*10+10
        (
            arch(
                family="inception",
                conv_blocks=[],
                inception_blocks=[{"modules": 1, "filters_1x1": 2, "filters_3x3": 4}],
            ),
            (4, 4, 1),
            10 + 10 + 88 + 10 + 44 + 44 + 10 + 110,
        ),
    ],
    ids=["cnn-gap", "cnn-mlp", "inception-gap"],
)
def test_parameter_count_matches_a_hand_count(
    architecture: Architecture, shape: tuple[int, int, int], expected: int
) -> None:
    assert parameter_count(build_model(architecture, shape, 10)) == expected


def test_inception_5x5_branch_keeps_at_least_one_filter() -> None:
    narrow = arch(
        family="inception",
        conv_blocks=[],
        inception_blocks=[{"modules": 2, "filters_1x1": 3, "filters_3x3": 1}],
    )
    model = build_model(narrow, (4, 4, 2), 10)
    assert model.get_layer("inception1_2_5x5b_conv").output.shape[-1] == 1
    assert model.get_layer("inception1_2_concat").output.shape[-1] == 3 + 1 + 1 + 3


def test_too_deep_cnn_is_refused_with_the_fix() -> None:
    deep = arch(conv_blocks=[{"filters": 8, "kernel_size": 3}] * 4)
    with pytest.raises(ArchitectureError) as refused:
        build_model(deep, (8, 8, 1), 10)
    assert str(refused.value) == (
        "4 pooling blocks need inputs of at least 16x16, this dataset is 8x8: "
        "lower searchSpace.cnn.blocks.max to 3"
    )


def test_too_deep_inception_names_its_own_field() -> None:
    deep = arch(
        family="inception",
        conv_blocks=[],
        inception_blocks=[{"modules": 1, "filters_1x1": 2, "filters_3x3": 2}] * 3,
    )
    reason = check_architecture(deep, (6, 9, 3))
    assert reason == (
        "3 pooling blocks need inputs of at least 8x8, this dataset is 6x9: "
        "lower searchSpace.inception.blocks.max to 2"
    )


@pytest.mark.parametrize(
    ("architecture", "expected"),
    [
        (arch(conv_blocks=[]), "a cnn architecture needs at least one block"),
        (arch(classifier="mlp"), "an mlp classifier needs dense_units"),
        (arch(dropout=1.0), "dropout 1.0 drops every unit: lower searchSpace.dropout.max below 1"),
        (
            arch(inception_blocks=[{"modules": 1, "filters_1x1": 2, "filters_3x3": 2}]),
            "a cnn architecture must not carry inception_blocks",
        ),
    ],
    ids=["no-blocks", "mlp-without-units", "dropout-1", "mixed-families"],
)
def test_unbuildable_architectures_are_refused(architecture: Architecture, expected: str) -> None:
    assert check_architecture(architecture, (8, 8, 1)) == expected
    with pytest.raises(ArchitectureError, match=expected):
        build_model(architecture, (8, 8, 1), 10)


def test_one_class_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 2 classes"):
        build_model(arch(), (8, 8, 1), 1)


def test_mixed_precision_keeps_a_float32_softmax_and_resets_cleanly() -> None:
    fresh_session("mixed_float16")
    mixed = build_model(arch(), (8, 8, 1), 10)
    assert mixed.get_layer("cnn1_conv").compute_dtype == "float16"
    assert mixed.output.dtype == "float32"
    assert type(mixed.optimizer).__name__ == "LossScaleOptimizer"

    fresh_session("float32")
    plain = build_model(arch(), (8, 8, 1), 10)
    assert {layer.dtype_policy.name for layer in plain.layers} == {"float32"}
    assert type(plain.optimizer).__name__ == "Adam"


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_small_cnn_fits_one_epoch(policy: str) -> None:
    fresh_session(policy)
    rng = np.random.default_rng(0)
    x = rng.random((64, 8, 8, 1), dtype=np.float32)
    y = rng.integers(0, 10, size=64)
    model = build_model(arch(classifier="mlp", dense_units=16, dropout=0.2), (8, 8, 1), 10)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    loss = history.history["loss"]
    assert len(loss) == 1
    assert math.isfinite(loss[0])
    assert model.predict(x[:4], verbose=0).sum(axis=1) == pytest.approx(np.ones(4), abs=1e-5)
