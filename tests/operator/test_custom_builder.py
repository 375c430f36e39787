"""The user's own builder on the cluster path: the operator samples the declared parameters
and never imports the builder; trainers import it from their Python path, as a trainer image
built ``FROM`` ours with the module on ``PYTHONPATH`` does (see README, "Your images, your
model, your device"). Real API server, PostgreSQL, RabbitMQ and `mloptimizer trainer`s.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import optuna
import yaml
from cluster import Cluster, run_operator
from services import TrainerProcess
from test_operator import condition, finished, name, operator_config, search, start_trainer

from mloptimizer.operator.main import shared_memo
from mloptimizer.study import Attr, records, storage_url

__all__ = ["name"]  # the fixture, shared with test_operator

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def custom_search(search_name: str, max_trials: int) -> dict[str, Any]:
    """examples/custom-model.yaml's space and constraint, in a small budget."""
    example = yaml.safe_load((EXAMPLES / "custom-model.yaml").read_text())["spec"]
    return search(
        search_name,
        budget={"maxTrials": max_trials, "parallelism": 2},
        training={"epochs": 2, "batchSize": 32, "mixedPrecision": "off"},
        objective={"metric": "val_accuracy", "constraints": {"maxParams": 30_000}},
        searchSpace=example["searchSpace"],
    )


async def test_trainers_import_the_users_builder_and_the_operator_only_samples(
    cluster: Cluster, postgres_dsn: str, name: str, tmp_path: Path
) -> None:
    image_path = tmp_path / "image-python-path"  # what a derived image adds to PYTHONPATH
    image_path.mkdir()
    shutil.copy(EXAMPLES / "custom_model.py", image_path / "custom_model.py")
    trainers: list[TrainerProcess] = []
    try:
        async with run_operator(cluster, memo=shared_memo(operator_config(postgres_dsn))):
            await cluster.create("archsearch", custom_search(name, max_trials=4))
            for i in (1, 2):
                trainers.append(
                    await start_trainer(
                        cluster,
                        "default",
                        name,
                        tmp_path,
                        f"c{i}",
                        env={"PYTHONPATH": str(image_path)},
                    )
                )
            done = await cluster.wait_for("archsearch", "default", name, finished, timeout=300)
    finally:
        for trainer in trainers:
            trainer.stop()
    # the operator (this process) never imported the user's module
    assert "custom_model" not in sys.modules
    assert done is not None
    assert done["status"]["phase"] == "Succeeded", done["status"].get("message")
    study = optuna.load_study(study_name=f"default.{name}", storage=storage_url(postgres_dsn))
    trials = records(study)
    assert len(trials) == 4
    for t in trials:
        assert t.state == "complete", t.attrs
        assert t.architecture is not None
        assert t.architecture.family == "custom"
        params = t.architecture.custom_params or {}
        assert {"width", "blocks", "activation", "residual"} <= set(params)
        assert ("dropout" in params) == (params["residual"] == "yes")
        assert t.attrs[Attr.PARAMETERS] > 0  # measured by the trainer on the built model
        assert t.feasible == (t.attrs[Attr.PARAMETERS] <= 30_000)
    assert {t.attrs["worker_id"] for t in trials} <= {"c1", "c2"}


async def test_trainers_without_the_builder_fail_the_search_with_the_reason(
    cluster: Cluster, postgres_dsn: str, name: str, tmp_path: Path
) -> None:
    trainer: TrainerProcess | None = None
    try:
        async with run_operator(cluster, memo=shared_memo(operator_config(postgres_dsn))):
            await cluster.create("archsearch", custom_search(name, max_trials=6))
            trainer = await start_trainer(cluster, "default", name, tmp_path, "plain")
            done = await cluster.wait_for("archsearch", "default", name, finished, timeout=180)
            scaled = await cluster.get("deployments", "default", f"{name}-trainer")
    finally:
        if trainer is not None:
            trainer.stop()
    assert done is not None
    status = done["status"]
    assert status["phase"] == "Failed"
    assert "cannot import custom_model" in status["message"]
    assert "trainer image's Python path" in status["message"]  # the fix, named
    assert condition(done, "Complete")["reason"] == "BuilderUnavailable"
    assert scaled is not None
    assert scaled["spec"]["replicas"] == 0
    study = optuna.load_study(study_name=f"default.{name}", storage=storage_url(postgres_dsn))
    assert len(records(study)) < 6  # the search stopped instead of failing every trial
