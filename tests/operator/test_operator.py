"""The operator end to end: kopf with our handlers against a real Kubernetes API server for
ArchitectureSearch (the emulator behind the routing proxy for core and apps objects, or a real
cluster: see ``cluster.py``), the machine's PostgreSQL and RabbitMQ, and real
`mloptimizer trainer` processes.

The trainers are started by the test, as the Deployment's pods would be, and the test asserts
the Deployment the operator asked for (the emulator has no Deployment controller).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pika
import pytest
from cluster import Cluster, ensure_namespace, run_operator
from k8s import run_kubectl
from services import RABBITMQ_URL, TrainerProcess

from mloptimizer.operator.config import OperatorConfig
from mloptimizer.operator.handlers import FINISHED
from mloptimizer.operator.main import shared_memo
from mloptimizer.study import records, storage_url

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def name() -> Iterator[str]:
    found = f"search-{uuid.uuid4().hex[:6]}"
    yield found
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    channel = connection.channel()
    for namespace in ("default", "team-b"):
        for queue in ("trials", "progress", "results", "dead"):
            channel.queue_delete(f"mlopt.{namespace}.{found}.{queue}")
    connection.close()


def search(name: str, namespace: str = "default", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "dataset": {"builtin": "digits"},
        "budget": {"maxTrials": 4, "parallelism": 2},
        "sampler": {"seed": 1, "nStartupTrials": 2},
        "pruner": {"type": "none"},
        "training": {"epochs": 2, "batchSize": 32, "mixedPrecision": "off"},
        "searchSpace": {
            "architectures": ["cnn"],
            "cnn": {"blocks": {"min": 1, "max": 1}, "filters": {"min": 16, "max": 32}},
            "classifier": {"types": ["mlp"], "units": {"min": 32, "max": 64, "step": 32}},
        },
        "workers": {"minReplicas": 0, "maxReplicas": 3, "pricePerHour": 0.3},
    }
    body.update(spec)
    return {
        "apiVersion": "mloptimizer.io/v1alpha1",
        "kind": "ArchitectureSearch",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }


def operator_config(dsn: str) -> OperatorConfig:
    return OperatorConfig(
        database_url=dsn, broker_url=RABBITMQ_URL, liveness_port=0, metrics_port=None
    )


def finished(obj: Any) -> bool:
    return obj is not None and obj.get("status", {}).get("phase") in FINISHED


async def test_apply_runs_the_search_to_succeeded_and_the_study_agrees(
    cluster: Cluster, postgres_dsn: str, name: str, tmp_path: Path
) -> None:
    trainers = [TrainerProcess(RABBITMQ_URL, f"default.{name}", tmp_path, f"t{i}") for i in (1, 2)]
    try:
        async with run_operator(cluster, memo=shared_memo(operator_config(postgres_dsn))):
            created = await cluster.create("archsearch", search(name))
            deployment = await cluster.wait_for(
                "deployments", "default", f"{name}-trainer", timeout=30
            )
            assert deployment is not None
            (owner,) = deployment["metadata"]["ownerReferences"]
            assert owner["uid"] == created["metadata"]["uid"]
            assert owner["kind"] == "ArchitectureSearch"
            env = {
                e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
            }
            assert env["MLOPT_BROKER_URL"]["valueFrom"]["secretKeyRef"]["name"] == f"{name}-broker"
            secret = await cluster.get("secrets", "default", f"{name}-broker")
            assert secret is not None

            running = await cluster.wait_for(
                "archsearch",
                "default",
                name,
                lambda o: o is not None and o.get("status", {}).get("phase") == "Running",
                timeout=60,
            )
            assert running is not None
            done = await cluster.wait_for("archsearch", "default", name, finished, timeout=300)
            assert done is not None
            scaled = await cluster.get("deployments", "default", f"{name}-trainer")
            assert scaled is not None
            listed = await run_kubectl(
                cluster.kubeconfig, "get", "archsearch", name, "-n", "default"
            )
    finally:
        for trainer in trainers:
            trainer.stop()

    status = done["status"]
    assert status["phase"] == "Succeeded", status.get("message")
    assert scaled["spec"]["replicas"] == 0  # no trainers once the search ended
    study = optuna.load_study(study_name=f"default.{name}", storage=storage_url(postgres_dsn))
    trials = records(study)
    assert len(trials) == 4
    assert status["trials"]["complete"] == sum(t.state == "complete" for t in trials)
    assert status["best"]["number"] == study.best_trial.number
    assert status["best"]["value"] == pytest.approx(study.best_value, abs=1e-6)
    assert status["progress"] == "4/4"
    assert status["cost"]["usd"] > 0
    assert status["observedGeneration"] == created["metadata"]["generation"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Complete"]["reason"] == "MaxTrialsReached"
    reasons = {e["reason"] for e in await cluster.list("events", "default")}
    assert {"Started", "NewBest", "Finished"} <= reasons
    print(listed.stdout)
    header = listed.stdout.splitlines()[0].split()
    assert header[:3] == ["NAME", "PHASE", "TRIALS"]
    assert "Succeeded" in listed.stdout
    assert "4/4" in listed.stdout


async def test_restarting_the_operator_mid_search_completes_it_telling_each_trial_once(
    cluster: Cluster, postgres_dsn: str, name: str, tmp_path: Path
) -> None:
    trainers = [TrainerProcess(RABBITMQ_URL, f"default.{name}", tmp_path, f"t{i}") for i in (1, 2)]
    memo_config = operator_config(postgres_dsn)
    try:
        async with run_operator(cluster, memo=shared_memo(memo_config)):
            await cluster.create(
                "archsearch", search(name, budget={"maxTrials": 6, "parallelism": 2})
            )
            await cluster.wait_for(
                "archsearch",
                "default",
                name,
                lambda o: (
                    o is not None and o.get("status", {}).get("trials", {}).get("complete", 0) >= 1
                ),
                timeout=120,
            )
        # the operator is gone; trials in flight stay in RabbitMQ
        async with run_operator(cluster, memo=shared_memo(memo_config)):
            done = await cluster.wait_for("archsearch", "default", name, finished, timeout=300)
    finally:
        for trainer in trainers:
            trainer.stop()
    assert done is not None
    assert done["status"]["phase"] == "Succeeded"
    study = optuna.load_study(study_name=f"default.{name}", storage=storage_url(postgres_dsn))
    trials = records(study)
    assert len([t for t in trials if t.counted]) == 6
    assert all(t.state == "complete" for t in trials)
    assert "Resumed" in {e["reason"] for e in await cluster.list("events", "default")}


async def test_deleting_a_running_search_removes_its_queues_deployment_and_finalizer(
    cluster: Cluster, postgres_dsn: str, name: str
) -> None:
    async with run_operator(cluster, memo=shared_memo(operator_config(postgres_dsn))):
        await cluster.create("archsearch", search(name))
        await cluster.wait_for(
            "archsearch",
            "default",
            name,
            lambda o: o is not None and o.get("status", {}).get("phase") == "Running",
            timeout=60,
        )
        assert await cluster.get("deployments", "default", f"{name}-trainer") is not None
        await cluster.delete("archsearch", "default", name)
        await cluster.wait_for("archsearch", "default", name, lambda o: o is None, timeout=60)
    assert await cluster.get("deployments", "default", f"{name}-trainer") is None
    assert await cluster.get("secrets", "default", f"{name}-broker") is None
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    channel = connection.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker):
        channel.queue_declare(f"mlopt.default.{name}.trials", passive=True)
    connection.close()


async def poll(check: Any, timeout: float) -> None:
    """Poll what cannot be awaited (a process's log file)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


def condition(obj: Any, type_: str) -> dict[str, Any]:
    found = [c for c in (obj or {}).get("status", {}).get("conditions", []) if c["type"] == type_]
    return found[0] if found else {}


async def test_budget_edits_apply_at_once_and_a_fixed_field_edit_is_refused(
    cluster: Cluster, postgres_dsn: str, name: str, tmp_path: Path
) -> None:
    trainer = TrainerProcess(RABBITMQ_URL, f"default.{name}", tmp_path, "t1")
    try:
        async with run_operator(cluster, memo=shared_memo(operator_config(postgres_dsn))):
            body = search(name, budget={"maxTrials": 2, "parallelism": 1})
            await cluster.create("archsearch", body)
            await cluster.wait_for(
                "archsearch",
                "default",
                name,
                lambda o: o is not None and o.get("status", {}).get("phase") == "Running",
                timeout=60,
            )
            # the search space cannot change under a running study
            await cluster.patch(
                "archsearch",
                "default",
                name,
                {"spec": {"searchSpace": {"architectures": ["inception"]}}},
            )
            refused = await cluster.wait_for(
                "archsearch",
                "default",
                name,
                lambda o: condition(o, "Degraded").get("reason") == "SpecChangeRefused",
                timeout=60,
            )
            assert "spec.searchSpace cannot change" in condition(refused, "Degraded")["message"]
            # restore it and raise maxTrials: accepted while the search runs
            await cluster.patch(
                "archsearch",
                "default",
                name,
                {"spec": {"searchSpace": {"architectures": ["cnn"]}, "budget": {"maxTrials": 4}}},
            )
            done = await cluster.wait_for("archsearch", "default", name, finished, timeout=300)
    finally:
        trainer.stop()
    assert done is not None
    assert done["status"]["phase"] == "Succeeded"
    assert done["status"]["progress"] == "4/4"
    assert condition(done, "Degraded")["status"] == "False"
    study = optuna.load_study(study_name=f"default.{name}", storage=storage_url(postgres_dsn))
    trials = records(study)
    assert len(trials) == 4
    assert {t.architecture.family for t in trials if t.architecture} == {"cnn"}


async def test_two_searches_in_two_namespaces_stay_apart(
    cluster: Cluster, postgres_dsn: str, name: str, tmp_path: Path
) -> None:
    trainers = [
        TrainerProcess(RABBITMQ_URL, f"{ns}.{name}", tmp_path, f"t-{ns}")
        for ns in ("default", "team-b")
    ]
    await ensure_namespace(cluster, "team-b")
    try:
        async with run_operator(cluster, memo=shared_memo(operator_config(postgres_dsn))):
            await cluster.create("archsearch", search(name, "default"))
            await cluster.create(
                "archsearch", search(name, "team-b", budget={"maxTrials": 3, "parallelism": 1})
            )
            a = await cluster.wait_for("archsearch", "default", name, finished, timeout=300)
            b = await cluster.wait_for("archsearch", "team-b", name, finished, timeout=300)
    finally:
        for trainer in trainers:
            trainer.stop()
    assert a is not None
    assert b is not None
    assert (a["status"]["phase"], b["status"]["phase"]) == ("Succeeded", "Succeeded")
    assert (a["status"]["progress"], b["status"]["progress"]) == ("4/4", "3/3")
    for namespace, count, worker in (("default", 4, "t-default"), ("team-b", 3, "t-team-b")):
        study = optuna.load_study(
            study_name=f"{namespace}.{name}", storage=storage_url(postgres_dsn)
        )
        trials = records(study)
        assert len(trials) == count
        assert {t.attrs["worker_id"] for t in trials} == {worker}  # its own trainer only
        deployment = await cluster.get("deployments", namespace, f"{name}-trainer")
        assert deployment is not None


async def test_a_space_too_deep_for_the_data_fails_that_search_and_others_go_on(
    cluster: Cluster, postgres_dsn: str, name: str
) -> None:
    deep = {
        "architectures": ["cnn"],
        "cnn": {"blocks": {"min": 4, "max": 4}},
    }
    async with run_operator(cluster, memo=shared_memo(operator_config(postgres_dsn))):
        await cluster.create("archsearch", search(f"{name}-bad", searchSpace=deep))
        await cluster.create("archsearch", search(name))
        bad = await cluster.wait_for("archsearch", "default", f"{name}-bad", finished, timeout=60)
        good = await cluster.wait_for(
            "archsearch",
            "default",
            name,
            lambda o: o is not None and o.get("status", {}).get("phase") == "Running",
            timeout=60,
        )
        await cluster.delete("archsearch", "default", name)
        await cluster.wait_for("archsearch", "default", name, lambda o: o is None, timeout=60)
    assert bad is not None
    assert good is not None
    assert bad["status"]["phase"] == "Failed"
    assert "spec.searchSpace.cnn.blocks.min" in bad["status"]["message"]
    assert condition(bad, "Complete")["reason"] == "InvalidSpec"
    assert await cluster.get("deployments", "default", f"{name}-bad-trainer") is None
    warnings = [e for e in await cluster.list("events", "default") if e["reason"] == "InvalidSpec"]
    assert warnings


async def test_a_trainer_killed_mid_trial_loses_nothing_and_the_trial_is_told_once(
    cluster: Cluster, postgres_dsn: str, name: str, tmp_path: Path
) -> None:
    victim = TrainerProcess(RABBITMQ_URL, f"default.{name}", tmp_path, "victim")
    survivor: TrainerProcess | None = None
    try:
        async with run_operator(cluster, memo=shared_memo(operator_config(postgres_dsn))):
            budget = {"maxTrials": 3, "parallelism": 1}
            training = {"epochs": 20, "batchSize": 32, "mixedPrecision": "off"}
            await cluster.create("archsearch", search(name, budget=budget, training=training))
            # the victim is the only trainer: it takes trial 0; kill it once it trains
            await poll(lambda: "(attempt 1)" in victim.log(), timeout=120)
            victim.process.kill()
            victim.process.wait()
            survivor = TrainerProcess(RABBITMQ_URL, f"default.{name}", tmp_path, "survivor")
            done = await cluster.wait_for("archsearch", "default", name, finished, timeout=300)
    finally:
        victim.stop()
        if survivor is not None:
            survivor.stop()
    assert done is not None
    assert done["status"]["phase"] == "Succeeded"
    study = optuna.load_study(study_name=f"default.{name}", storage=storage_url(postgres_dsn))
    trials = records(study)
    assert len(trials) == 3
    assert all(t.state == "complete" for t in trials)
    first = trials[0]
    assert first.attrs["worker_id"] == "survivor"
    assert first.attrs["attempt"] == 2  # redelivered by RabbitMQ, told once
