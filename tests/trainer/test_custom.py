"""The user's own builder, imported and called by the trainer on real digits: trained like
any trial, and each way it can go wrong named."""

from __future__ import annotations

import threading

import optuna
import pytest
from dispatch import digits_trial

from mloptimizer.messages import BUILDER_UNAVAILABLE, Decision, TrialMessage
from mloptimizer.space import Architecture, sample_architecture
from mloptimizer.spec import Constraints, Dataset, SearchSpace
from mloptimizer.trainer.custom import add_builder_path
from mloptimizer.trainer.data import DatasetCache, Splits
from mloptimizer.trainer.training import Outcome, train_trial

BUILDERS = """
import keras


def build(params, input_shape, num_classes):
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Conv2D(params["filters"], 3, activation=params["activation"])(inputs)
    x = keras.layers.Flatten()(x)
    if params.get("hidden"):
        x = keras.layers.Dense(params["hidden"], activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax")(x))


def raises(params, input_shape, num_classes):
    raise ValueError("filters must be even")


def not_a_model(params, input_shape, num_classes):
    return "a string"


def wrong_classes(params, input_shape, num_classes):
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Flatten()(inputs)
    return keras.Model(inputs, keras.layers.Dense(num_classes + 1, activation="softmax")(x))
"""

SPACE = {
    "architectures": ["custom"],
    "custom": {
        "builder": "user_models:build",
        "parameters": [
            {"name": "filters", "type": "int", "min": 8, "max": 32, "step": 8},
            {"name": "activation", "type": "categorical", "choices": ["relu", "tanh"]},
            {
                "name": "hidden",
                "type": "int",
                "min": 16,
                "max": 64,
                "log": True,
                "condition": {"parameter": "activation", "values": ["tanh"]},
            },
        ],
    },
}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Splits:
    folder = tmp_path_factory.mktemp("builders")
    (folder / "user_models.py").write_text(BUILDERS)
    add_builder_path(folder)
    splits, _ = DatasetCache(tmp_path_factory.mktemp("cache")).get(Dataset(builtin="digits"))
    return splits


def custom_trial(builder: str = "user_models:build", **params: int | float | str) -> TrialMessage:
    arch = Architecture(
        family="custom",
        classifier="gap",
        dropout=0.0,
        learning_rate=0.01,
        custom_builder=builder,
        custom_params=params or {"filters": 16, "activation": "relu"},
    )
    return digits_trial("ns.custom", 1, epochs=3).model_copy(update={"architecture": arch})


def train(trial: TrialMessage, splits: Splits) -> Outcome:
    return train_trial(trial, splits, on_epoch=lambda e, m: "continue", stop=threading.Event())


def test_the_parameters_are_sampled_as_declared_with_their_condition() -> None:
    space = SearchSpace.model_validate(SPACE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        arch = sample_architecture(trial, space)
        params = arch.custom_params
        assert params is not None
        assert arch.custom_builder == "user_models:build"
        assert params["filters"] in (8, 16, 24, 32)
        assert ("hidden" in params) == (params["activation"] == "tanh")
        if "hidden" in params:
            assert 16 <= int(params["hidden"]) <= 64
        assert set(trial.params) == {"family", "learning_rate"} | {f"custom_{k}" for k in params}
        seen.add(params["activation"])
    assert seen == {"relu", "tanh"}
    assert "custom[filters=" in arch.summary()


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"architectures": ["custom"]}, "the custom family and searchSpace.custom go together"),
        ({"custom": SPACE["custom"]}, "the custom family and searchSpace.custom go together"),
        (
            {**SPACE, "custom": {"builder": "user_models:build", "parameters": [
                {"name": "a", "type": "int", "min": 1, "max": 2},
                {"name": "a", "type": "int", "min": 1, "max": 2}]}},
            "parameter names must be unique",
        ),
        (
            {**SPACE, "custom": {"builder": "user_models:build", "parameters": [
                {"name": "a", "type": "int", "min": 1, "max": 2,
                 "condition": {"parameter": "b", "values": ["x"]}}]}},
            "a condition must name a categorical parameter",
        ),
        ({**SPACE, "custom": {"builder": "no colon"}}, "String should match pattern"),
    ],
)  # fmt: skip
def test_a_bad_custom_space_is_refused_with_the_fix(doc: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SearchSpace.model_validate(doc)


def test_a_custom_model_trains_like_any_trial(digits: Splits) -> None:
    outcome = train(custom_trial(filters=16, activation="tanh", hidden=32), digits)
    assert outcome.state == "complete", outcome.error
    assert outcome.epochs_run == 3
    assert outcome.value is not None
    assert outcome.value > 0.5  # chance is 0.1
    assert outcome.parameter_count == (9 * 16 + 16) + (6 * 6 * 16 * 32 + 32) + (32 * 10 + 10)
    assert outcome.mflops is not None
    assert outcome.mflops > 0


@pytest.mark.parametrize(
    ("builder", "reason"),
    [
        ("user_models:raises", "the builder user_models:raises raised ValueError: filters must"),
        ("user_models:not_a_model", "returned str, not a keras.Model"),
        ("user_models:wrong_classes", "it must end in a softmax over num_classes (10)"),
    ],
)
def test_a_builder_that_fails_fails_its_trial_with_the_reason(
    digits: Splits, builder: str, reason: str
) -> None:
    outcome = train(custom_trial(builder), digits)
    assert outcome.state == "failed"
    assert outcome.error is not None
    assert reason in outcome.error
    assert not outcome.error.startswith(BUILDER_UNAVAILABLE)


@pytest.mark.parametrize(
    ("builder", "reason"),
    [
        ("no_such_module:build", "cannot import no_such_module (ModuleNotFoundError"),
        ("user_models:missing", "user_models has no function missing"),
    ],
)
def test_a_builder_that_cannot_be_imported_says_so_for_the_search(
    digits: Splits, builder: str, reason: str
) -> None:
    outcome = train(custom_trial(builder), digits)
    assert outcome.state == "failed"
    assert outcome.error is not None
    assert outcome.error.startswith(BUILDER_UNAVAILABLE)
    assert reason in outcome.error
    assert "trainer image's Python path" in outcome.error


def test_a_custom_model_over_a_device_limit_is_measured_and_not_trained(digits: Splits) -> None:
    trial = custom_trial(filters=32, activation="relu").model_copy(
        update={"constraints": Constraints(max_params=200)}
    )
    epochs: list[int] = []

    def on_epoch(epoch: int, metrics: dict[str, float]) -> Decision:
        epochs.append(epoch)
        return "continue"

    outcome = train_trial(trial, digits, on_epoch=on_epoch, stop=threading.Event())
    assert outcome.state == "pruned"
    assert outcome.epochs_run == 0
    assert epochs == []
    assert outcome.parameter_count == (9 * 32 + 32) + (6 * 6 * 32 * 10 + 10)
    fits = trial.model_copy(update={"constraints": Constraints(max_params=20_000)})
    assert train(fits, digits).state == "complete"


def test_a_custom_space_on_tiny_images_is_not_judged_by_the_built_in_families_depth() -> None:
    from mloptimizer.checks import space_issues
    from mloptimizer.loading import parse_search

    folder = {"imageFolder": {"path": "x", "imageSize": [8, 8]}}
    spec = parse_search({"dataset": folder, "searchSpace": SPACE}).spec
    assert space_issues(spec) == ([], [])
    deep = {**SPACE, "architectures": ["custom", "cnn"], "cnn": {"blocks": {"min": 4, "max": 4}}}
    errors, _ = space_issues(parse_search({"dataset": folder, "searchSpace": deep}).spec)
    assert [e.path for e in errors] == ["spec.searchSpace.cnn.blocks.min"]
