"""What may change while a search runs: one rule (mloptimizer.changes), for the operator's
live edits, the dispatcher, and `mloptimizer run` resuming a study."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import optuna
import pytest

from mloptimizer.changes import FIXED, LIVE, refusal
from mloptimizer.dispatch import Dispatcher
from mloptimizer.spec import ArchitectureSearchSpec
from mloptimizer.study import StudyMismatch, best_of, open_study, record

README = Path(__file__).resolve().parent.parent / "README.md"
POOL = {"apiKeySecretRef": {"name": "v", "key": "k"}, "joinSecretRef": {"name": "j"}}


def spec(**fields: Any) -> ArchitectureSearchSpec:
    return ArchitectureSearchSpec.model_validate({"dataset": {"builtin": "digits"}, **fields})


def test_every_spec_field_is_either_fixed_or_live() -> None:
    fields = {f.alias or n for n, f in ArchitectureSearchSpec.model_fields.items()}
    assert set(FIXED) | set(LIVE) == fields
    assert not set(FIXED) & set(LIVE)


@pytest.mark.parametrize(
    ("edit", "refused_field"),
    [
        ({"budget": {"maxTrials": 40, "parallelism": 4}}, None),
        ({"training": {"epochs": 3}}, None),
        ({"pruner": {"type": "hyperband"}}, None),
        ({"workers": {"maxReplicas": 9}}, None),
        ({"dataset": {"builtin": "mnist"}}, "spec.dataset"),
        ({"objective": {"metric": "val_loss"}}, "spec.objective"),
        ({"sampler": {"seed": 7}}, "spec.sampler"),
        ({"searchSpace": {"architectures": ["cnn"]}}, "spec.searchSpace"),
        ({"storage": {"secretRef": {"name": "db", "key": "url"}}}, "spec.storage"),
        ({"broker": {"secretRef": {"name": "mq", "key": "url"}}}, "spec.broker"),
        ({"workers": {"gpuPool": POOL}}, "spec.workers.gpuPool"),
    ],
)
def test_the_rule(edit: dict[str, Any], refused_field: str | None) -> None:
    running, new = spec(), spec(**edit)
    why = refusal(running, new)
    if refused_field is None:
        assert why is None
    else:
        assert why is not None
        assert why.startswith(refused_field)
        assert "cannot" in why


def test_a_pools_bounds_may_change_but_not_its_mode() -> None:
    running = spec(workers={"gpuPool": POOL})
    assert refusal(running, spec(workers={"gpuPool": {**POOL, "maxReplicas": 5}})) is None
    direct = {**POOL, "mode": "Direct", "brokerEndpoint": "amqps://b:5671/"}
    assert "gpuPool" in (refusal(running, spec(workers={"gpuPool": direct})) or "")


def test_readme_lists_the_same_fields() -> None:
    text = README.read_text()
    rows = re.findall(r"^\| `spec\.(\w+)` \| (fixed|live) \|", text, re.M)
    assert {name for name, kind in rows if kind == "fixed"} == set(FIXED)
    assert {name for name, kind in rows if kind == "live"} == set(LIVE)


def test_the_dispatcher_applies_an_edit_and_rebuilds_the_pruner(tmp_path: Path) -> None:
    hyperband = {"pruner": {"type": "hyperband", "minEpochs": 1}, "training": {"epochs": 3}}
    running = spec(**hyperband)
    study = open_study(running, "ns.s", f"sqlite:///{tmp_path / 's.db'}")

    class Idle:
        durable = False

        def send(self, trial: Any) -> None: ...

        def receive(self, timeout: float) -> list[Any]:
            return []

        def close(self) -> None: ...

        def queued(self) -> int | None:
            return None

    dispatcher = Dispatcher(study, running, Idle(), search="ns.s")
    assert isinstance(study.pruner, optuna.pruners.HyperbandPruner)
    assert study.pruner._max_resource == 3
    longer = spec(pruner=hyperband["pruner"], training={"epochs": 9})
    assert dispatcher.update_spec(longer) is None
    assert dispatcher.spec == longer
    assert isinstance(study.pruner, optuna.pruners.HyperbandPruner)
    assert study.pruner._max_resource == 9  # hyperband's max_resource follows the epochs
    assert dispatcher.update_spec(spec(training={"epochs": 9})) is None  # median now
    assert isinstance(study.pruner, optuna.pruners.MedianPruner)
    refused = spec(training={"epochs": 9}, searchSpace={"architectures": ["inception"]})
    why = dispatcher.update_spec(refused)
    assert why is not None
    assert why.startswith("spec.searchSpace")
    assert list(dispatcher.spec.search_space.architectures) == ["cnn", "inception"]
    # the study keeps the spec in force: a resumed run is judged against it
    with pytest.raises(StudyMismatch, match=r"spec\.searchSpace"):
        open_study(refused, "ns.s", f"sqlite:///{tmp_path / 's.db'}")
    reopened = open_study(spec(training={"epochs": 12}), "ns.s", f"sqlite:///{tmp_path / 's.db'}")
    assert reopened.user_attrs["spec"]["training"]["epochs"] == 12


def test_the_best_trial_is_the_earliest_of_equal_values() -> None:
    study = optuna.create_study(direction="maximize")
    for value in (0.5, 0.9, 0.9, 0.7):
        study.add_trial(optuna.trial.create_trial(value=value))
    trials = [record(t) for t in study.get_trials()]
    best = best_of(list(reversed(trials)), "maximize")  # order of finishing does not matter
    assert best is not None
    assert best.number == 1
    low = best_of(trials, "minimize")
    assert low is not None
    assert low.number == 0
    assert best_of([], "maximize") is None
