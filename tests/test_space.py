"""Sampling: inside the declared space, repeatable by seed, custom spaces honoured."""

from __future__ import annotations

import json
from typing import Any

import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mloptimizer.space import (
    MOBILENET_CHANNELS,
    Architecture,
    Augment,
    build_pruner,
    build_sampler,
    mobilenet_channels,
    sample_architecture,
    space_size,
)
from mloptimizer.spec import (
    Augmentation,
    FloatRange,
    IntRange,
    Pruner,
    SamplerSpec,
    SearchSpace,
    Training,
)

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


WIDTHS = [0.25, 0.35, 0.5, 0.75, 1.0, 1.25, 1.5]


@st.composite
def spaces(draw: st.DrawFn) -> SearchSpace:
    doc = {
        "architectures": draw(
            st.sampled_from(
                [["cnn"], ["inception"], ["mobilenet"], ["cnn", "inception"], ["cnn", "mobilenet"]]
            )
        ),
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
        "mobilenet": {
            "blocks": draw(int_ranges(1, 7)),
            "expansion": draw(int_ranges(1, 8)),
            "widths": draw(st.lists(st.sampled_from(WIDTHS), min_size=1, max_size=3, unique=True)),
            "strides": draw(st.sampled_from([[1], [2], [1, 2]])),
        },
        "classifier": {
            "types": draw(st.sampled_from([["gap"], ["mlp"], ["gap", "mlp"]])),
            "layers": draw(int_ranges(1, 3)),
            "units": draw(int_ranges(1, 1024, 64)),
        },
        "augmentation": {
            "horizontalFlip": draw(st.sampled_from([[False], [True], [False, True]])),
            "rotation": {"min": 0.0, "max": draw(st.floats(0.0, 0.5))},
        },
        "dropout": draw(float_ranges(log=False)),
        "learningRate": draw(float_ranges(log=True)),
    }
    return SearchSpace.model_validate(doc)


def _in(value: int, r: IntRange) -> bool:
    return r.min <= value <= r.max and (value - r.min) % r.step == 0


def assert_inside(arch: Architecture, space: SearchSpace) -> None:
    assert arch.family in space.architectures
    if arch.family == "mobilenet":
        assert arch.conv_blocks == ()
        assert arch.inception_blocks == ()
        m = space.mobilenet
        assert _in(len(arch.mobilenet_blocks), m.blocks)
        widths = [w for w in m.widths if arch.stem_filters == mobilenet_channels(32, w)]
        assert widths
        for i, ir in enumerate(arch.mobilenet_blocks):
            assert _in(ir.expansion, m.expansion)
            assert ir.stride in m.strides
            assert any(ir.filters == mobilenet_channels(MOBILENET_CHANNELS[i], w) for w in widths)
    elif arch.family == "cnn":
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
        assert _in(len(arch.head_units), space.classifier.layers)
        assert all(_in(units, space.classifier.units) for units in arch.head_units)
    else:
        assert arch.dense_units is None
        assert arch.extra_dense_units == ()
    searched = space.augmentation
    augment = arch.augmentation or Augment()
    if searched is not None:
        assert augment.horizontal_flip in (searched.horizontal_flip or [False])
        rotation = searched.rotation or FloatRange(min=0.0, max=0.0)
        assert rotation.min <= augment.rotation <= rotation.max
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


def test_mobilenet_widths_round_channels_as_mobilenet_v2_does() -> None:
    # MobileNetV2's _make_divisible(v, 8): nearest multiple of 8, at least 8, >= 90 % of v
    assert [mobilenet_channels(32, w) for w in (0.25, 0.35, 0.5, 0.75, 1.0, 1.4)] == [
        8, 16, 16, 24, 32, 48,
    ]  # fmt: skip
    assert mobilenet_channels(320, 0.35) == 112
    assert mobilenet_channels(24, 0.35) == 8


def test_a_head_of_up_to_three_layers_names_each_layers_units() -> None:
    space = SearchSpace.model_validate(
        {"classifier": {"types": ["mlp"], "layers": {"min": 1, "max": 3}}}
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    depths = set()
    for _ in range(60):
        trial = study.ask()
        arch = sample_architecture(trial, space)
        depths.add(len(arch.head_units))
        layer_names = {n for n in trial.params if n.startswith("dense_units")}
        assert len(layer_names) == trial.params["dense_layers"] == len(arch.head_units)
    assert depths == {1, 2, 3}
    # one layer (the default) samples no layer count: older studies replay unchanged
    trial = optuna.create_study().ask()
    sample_architecture(trial, SearchSpace.model_validate({"classifier": {"types": ["mlp"]}}))
    assert "dense_layers" not in trial.params
    with pytest.raises(ValueError, match=r"layers\.max must be at most 3"):
        SearchSpace.model_validate({"classifier": {"layers": {"min": 1, "max": 4}}})


def test_augmentation_is_fixed_by_training_and_searched_by_the_space() -> None:
    fixed = Augmentation.model_validate({"horizontalFlip": True, "zoom": 0.1})
    plain = SearchSpace()
    trial = optuna.create_study().ask()
    arch = sample_architecture(trial, plain, fixed)
    assert arch.augmentation == Augment(horizontal_flip=True, zoom=0.1)
    assert not any(n.startswith("aug_") for n in trial.params)
    assert "aug(hflip,zoom0.10)" in arch.summary()
    assert sample_architecture(optuna.create_study().ask(), plain).augmentation is None
    searched = SearchSpace.model_validate(
        {"augmentation": {"zoom": {"min": 0.2, "max": 0.3}, "verticalFlip": [False, True]}}
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    flips = set()
    for _ in range(20):
        trial = study.ask()
        augment = sample_architecture(trial, searched, fixed).augmentation
        assert augment is not None
        assert augment.horizontal_flip  # not searched: training's value
        assert 0.2 <= augment.zoom <= 0.3
        assert augment.zoom == trial.params["aug_zoom"]
        flips.add(augment.vertical_flip)
    assert flips == {False, True}
    with pytest.raises(ValueError, match=r"rotation\.max must be at most 0\.5"):
        SearchSpace.model_validate({"augmentation": {"rotation": {"min": 0, "max": 0.6}}})


def test_space_size_counts_mobilenet_heads_and_searched_augmentation() -> None:
    space = SearchSpace.model_validate(
        {
            "architectures": ["mobilenet"],
            "mobilenet": {"blocks": {"min": 1, "max": 2}, "expansion": {"min": 1, "max": 3},
                          "widths": [0.5, 1.0], "strides": [1, 2]},
            "classifier": {"types": ["gap", "mlp"], "layers": {"min": 1, "max": 2},
                           "units": {"min": 64, "max": 128, "step": 64}},
            "augmentation": {"horizontalFlip": [False, True], "rotation": {"min": 0, "max": 0.1}},
        }
    )  # fmt: skip
    bodies = 2 * ((3 * 2) + (3 * 2) ** 2)
    heads = 1 + (2 + 2**2)
    size = space_size(space)
    assert size.discrete == bodies * heads * 2
    assert size.continuous == ("dropout", "learning_rate", "aug_rotation")
