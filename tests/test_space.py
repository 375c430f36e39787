"""Sampling: inside the declared space, repeatable by seed, custom spaces honoured."""

from __future__ import annotations

import json
from typing import Any

import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mloptimizer.space import (
    Architecture,
    build_pruner,
    build_sampler,
    sample_architecture,
    space_size,
)
from mloptimizer.spec import IntRange, Pruner, SamplerSpec, SearchSpace, Training

optuna.logging.set_verbosity(optuna.logging.WARNING)


@st.composite
def int_ranges(draw: st.DrawFn, lo: int, hi: int, max_step: int = 1) -> dict[str, int]:
    step = draw(st.integers(1, max_step))
    low = draw(st.integers(lo, hi))
    count = draw(st.integers(0, (hi - low) // step))
    return {"min": low, "max": low + count * step, "step": step}


@st.composite
def float_ranges(draw: st.DrawFn, log: bool) -> dict[str, Any]:
    low = draw(st.floats(1e-5 if log else 0.0, 0.9))
    high = draw(st.floats(low, 1.0))
    return {"min": low, "max": high, "log": log}


@st.composite
def spaces(draw: st.DrawFn) -> SearchSpace:
    doc = {
        "architectures": draw(st.sampled_from([["cnn"], ["inception"], ["cnn", "inception"]])),
        "cnn": {
            "blocks": draw(int_ranges(1, 5)),
            "filters": draw(int_ranges(1, 300, 32)),
            "kernelSizes": draw(
                st.lists(st.sampled_from([1, 3, 5, 7, 9, 11]), min_size=1, max_size=6, unique=True)
            ),
        },
        "inception": {
            "blocks": draw(int_ranges(1, 4)),
            "modules": draw(int_ranges(1, 4)),
            "filters1x1": draw(int_ranges(1, 200, 16)),
            "filters3x3": draw(int_ranges(1, 200, 16)),
        },
        "classifier": {
            "types": draw(st.sampled_from([["gap"], ["mlp"], ["gap", "mlp"]])),
            "units": draw(int_ranges(1, 1024, 64)),
        },
        "dropout": draw(float_ranges(log=False)),
        "learningRate": draw(float_ranges(log=True)),
    }
    return SearchSpace.model_validate(doc)


def _in(value: int, r: IntRange) -> bool:
    return r.min <= value <= r.max and (value - r.min) % r.step == 0


def assert_inside(arch: Architecture, space: SearchSpace) -> None:
    assert arch.family in space.architectures
    if arch.family == "cnn":
        assert arch.inception_blocks == ()
        assert _in(len(arch.conv_blocks), space.cnn.blocks)
        for block in arch.conv_blocks:
            assert _in(block.filters, space.cnn.filters)
            assert block.kernel_size in space.cnn.kernel_sizes
    else:
        assert arch.conv_blocks == ()
        assert _in(len(arch.inception_blocks), space.inception.blocks)
        for ib in arch.inception_blocks:
            assert _in(ib.modules, space.inception.modules)
            assert _in(ib.filters_1x1, space.inception.filters_1x1)
            assert _in(ib.filters_3x3, space.inception.filters_3x3)
    assert arch.classifier in space.classifier.types
    if arch.classifier == "mlp":
        assert arch.dense_units is not None
        assert _in(arch.dense_units, space.classifier.units)
    else:
        assert arch.dense_units is None
    assert space.dropout.min <= arch.dropout <= space.dropout.max
    assert space.learning_rate.min <= arch.learning_rate <= space.learning_rate.max


def run_study(space: SearchSpace, sampler: SamplerSpec, trials: int) -> list[Architecture]:
    """Sample ``trials`` architectures, telling a value so TPE leaves its start-up phase."""
    study = optuna.create_study(direction="maximize", sampler=build_sampler(sampler))
    out = []
    for _ in range(trials):
        trial = study.ask()
        arch = sample_architecture(trial, space)
        study.tell(trial, arch.learning_rate * 100 + arch.dropout)
        out.append(arch)
    return out


@settings(max_examples=40, deadline=None)
@given(space=spaces(), seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["tpe", "random"]))
def test_every_sample_lies_inside_the_declared_space(
    space: SearchSpace, seed: int, kind: str
) -> None:
    sampler = SamplerSpec.model_validate({"type": kind, "seed": seed, "nStartupTrials": 2})
    for arch in run_study(space, sampler, trials=6):
        assert_inside(arch, space)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_same_seed_gives_the_same_first_suggestions(seed: int) -> None:
    sampler = SamplerSpec.model_validate({"seed": seed, "nStartupTrials": 3})
    first = run_study(SearchSpace(), sampler, trials=6)
    second = run_study(SearchSpace(), sampler, trials=6)
    assert first == second
    other = SamplerSpec.model_validate({"seed": (seed + 1) % 2**31, "nStartupTrials": 3})
    assert run_study(SearchSpace(), other, trials=6) != first


def test_custom_space_is_honoured() -> None:
    space = SearchSpace.model_validate(
        {
            "architectures": ["cnn"],
            "cnn": {
                "blocks": {"min": 3, "max": 3},
                "kernelSizes": [5],
                "filters": {"min": 32, "max": 32},
            },
            "classifier": {"types": ["mlp"], "units": {"min": 100, "max": 100}},
            "dropout": {"min": 0.2, "max": 0.2},
            "learningRate": {"min": 0.003, "max": 0.003},
        }
    )
    archs = run_study(space, SamplerSpec(seed=1), trials=8)
    assert {a.summary() for a in archs} == {"cnn[32k5,32k5,32k5] mlp100 drop0.20 lr3.0e-03"}
    assert space_size(space).discrete == 1
    assert space_size(space).continuous == ()


def test_architecture_is_json_and_replays_from_params() -> None:
    space = SearchSpace()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(10):
        trial = study.ask()
        arch = sample_architecture(trial, space)
        assert Architecture.model_validate(json.loads(arch.model_dump_json())) == arch
        replayed = sample_architecture(optuna.trial.FixedTrial(trial.params), space)
        assert replayed == arch


def test_conditional_params_are_only_sampled_on_their_branch() -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        arch = sample_architecture(trial, SearchSpace())
        names = set(trial.params)
        assert any(n.startswith("cnn_") for n in names) == (arch.family == "cnn")
        assert any(n.startswith("inception_") for n in names) == (arch.family == "inception")
        assert ("dense_units" in names) == (arch.classifier == "mlp")


def test_space_size_counts_the_default_space() -> None:
    size = space_size(SearchSpace())
    cnn = sum((16 * 3) ** n for n in range(1, 5))
    inception = sum((3 * 8 * 12) ** n for n in range(1, 4))
    assert size.discrete == (cnn + inception) * (1 + 8)
    assert size.continuous == ("dropout", "learning_rate")


def test_sampler_factory_passes_exactly_the_spec_options() -> None:
    spec = SamplerSpec.model_validate(
        {
            "seed": 5,
            "nStartupTrials": 7,
            "nEICandidates": 11,
            "multivariate": True,
            "group": False,
            "constantLiar": False,
        }
    )
    sampler = build_sampler(spec)
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._n_startup_trials == 7
    assert sampler._n_ei_candidates == 11
    assert sampler._multivariate is True
    assert sampler._group is False
    assert sampler._constant_liar is False
    assert isinstance(build_sampler(SamplerSpec(type="random")), optuna.samplers.RandomSampler)


@pytest.mark.parametrize(
    ("pruner", "expected"),
    [
        ({"type": "none"}, optuna.pruners.NopPruner),
        ({"type": "median", "startupTrials": 2, "warmupEpochs": 3}, optuna.pruners.MedianPruner),
        ({"type": "hyperband", "minEpochs": 2}, optuna.pruners.HyperbandPruner),
    ],
)
def test_pruner_factory(pruner: dict[str, Any], expected: type) -> None:
    built = build_pruner(Pruner.model_validate(pruner), Training(epochs=9))
    assert isinstance(built, expected)
    if isinstance(built, optuna.pruners.MedianPruner):
        assert built._n_startup_trials == 2
        assert built._n_warmup_steps == 3
    if isinstance(built, optuna.pruners.HyperbandPruner):
        assert built._min_resource == 2
        assert built._max_resource == 9


def test_the_space_is_searched_up_to_the_blocks_the_images_hold() -> None:
    from mloptimizer.checks import fitted_space, space_issues
    from mloptimizer.loading import parse_search

    spec = parse_search({"dataset": {"builtin": "digits"}}).spec  # 8x8: 3 poolings fit
    space = fitted_space(spec)
    assert (space.cnn.blocks.max, space.inception.blocks.max) == (3, 3)
    assert spec.search_space.cnn.blocks.max == 4  # the spec itself is unchanged
    assert space_issues(spec) == ([], [])  # the default space is not the user's mistake
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    depths = set()
    for _ in range(200):
        arch = sample_architecture(study.ask(), space)
        depths.add(len(arch.conv_blocks) or len(arch.inception_blocks))
    assert depths == {1, 2, 3}
    # on the step grid: 1, 3, 5 -> 1, 3
    stepped = parse_search(
        {"dataset": {"builtin": "digits"},
         "searchSpace": {"cnn": {"blocks": {"min": 1, "max": 5, "step": 2}}}}
    ).spec  # fmt: skip
    assert fitted_space(stepped).cnn.blocks.max == 3
    errors, warnings = space_issues(stepped)
    assert errors == []
    assert [w.path for w in warnings] == ["spec.searchSpace.cnn.blocks.max"]
    assert "searched with 1 to 3 blocks" in warnings[0].message
    mnist = parse_search({"dataset": {"builtin": "mnist"}}).spec  # 28x28 holds 4
    assert fitted_space(mnist) == mnist.search_space
