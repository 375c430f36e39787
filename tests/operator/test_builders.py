"""The pure builders and status functions of the operator."""

from __future__ import annotations

import dataclasses
from typing import Any

import kubernetes_validate
import pytest

from mloptimizer.dispatch import Counts
from mloptimizer.operator.builders import (
    GRACE_SECONDS,
    POOL_LABEL,
    broker_secret_name,
    build_broker_secret,
    build_trainer_deployment,
    deployment_name,
    label_value,
    network_policy_name,
    pod_price,
    sharing_env,
    trainer_labels,
    trainers_per_machine,
)
from mloptimizer.operator.progress import (
    ReplicaPlan,
    desired_replicas,
    progress_text,
    set_condition,
    status_from_counts,
)
from mloptimizer.spec import ArchitectureSearchSpec, SecretKeyRef, Workers
from mloptimizer.status import ArchitectureSearchStatus
from mloptimizer.study import Attr, TrialRecord

BROKER = SecretKeyRef(name="mq", key="url")


def make_spec(**spec: Any) -> ArchitectureSearchSpec:
    return ArchitectureSearchSpec.model_validate({"dataset": {"builtin": "digits"}, **spec})


def test_the_deployment_carries_the_search_the_broker_secret_and_a_safe_pod() -> None:
    spec = make_spec(
        workers={
            "image": "registry.example/trainer:1",
            "resources": {"gpu": 1, "cpu": "4", "memory": "16Gi"},
            "nodeSelector": {"gpu": "a100"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
        }
    )
    d = build_trainer_deployment("cifar", "team-a", spec, replicas=3, broker=BROKER)
    assert d["metadata"]["name"] == "cifar-trainer"
    assert d["spec"]["replicas"] == 3
    assert d["spec"]["selector"]["matchLabels"] == trainer_labels("cifar")
    pod = d["spec"]["template"]["spec"]
    assert d["spec"]["template"]["metadata"]["labels"] == trainer_labels("cifar")
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/trainer:1"
    assert container["args"][0] == "trainer"
    env = {e["name"]: e for e in container["env"]}
    assert env["MLOPT_BROKER_URL"]["valueFrom"]["secretKeyRef"] == {"name": "mq", "key": "url"}
    assert env["MLOPT_SEARCH"]["value"] == "team-a.cifar"
    assert "value" not in env["MLOPT_BROKER_URL"]  # never the URL itself
    limits = container["resources"]["limits"]
    assert limits == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
    assert container["resources"]["requests"] == limits
    assert pod["nodeSelector"] == {"gpu": "a100"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # the pod outlives the trainer's own SIGTERM grace period: the trial is requeued
    grace = container["args"][container["args"].index("--grace-period") + 1]
    assert int(grace) == GRACE_SECONDS < pod["terminationGracePeriodSeconds"]


POOL = {
    "apiKeySecretRef": {"name": "vastai", "key": "api-key"},
    "joinSecretRef": {"name": "k3s-join"},
    "numGpus": 4,
}


def test_a_node_pool_places_trainers_on_its_own_rented_nodes_only() -> None:
    spec = make_spec(workers={"resources": {"gpu": 2}, "gpuPool": POOL})
    uid = "0b4f3c55-3f0e-4d5e-8d1c-9a4e2b7c1f00"
    d = build_trainer_deployment("cifar", "ns", spec, replicas=1, broker=BROKER, pool_uid=uid)
    kubernetes_validate.validate(d, "1.34", strict=True)
    pod = d["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {POOL_LABEL: uid}
    assert {"key": POOL_LABEL, "operator": "Equal", "value": uid, "effect": "NoSchedule"} in (
        pod["tolerations"]
    )
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    env = {e["name"]: e for e in container["env"]}
    # the worker id names the node, so a trial's cost uses that machine's price
    assert env["MLOPT_WORKER_ID"]["value"] == "$(MLOPT_POD_NAME)@$(MLOPT_NODE_NAME)"
    assert env["MLOPT_NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    names = [e["name"] for e in container["env"]]
    assert names.index("MLOPT_NODE_NAME") < names.index("MLOPT_WORKER_ID")  # $(...) order
    assert trainers_per_machine(spec) == 2
    plain = build_trainer_deployment("cifar", "ns", make_spec(), replicas=1, broker=BROKER)
    assert "nodeSelector" not in plain["spec"]["template"]["spec"]
    assert trainers_per_machine(make_spec()) == 1


def test_status_cost_of_a_pool_is_the_pools_to_write() -> None:
    spec = make_spec(workers={"gpuPool": POOL})
    status = status_from_counts(Counts(cost_usd=3.0), spec, running=2)
    # usd and burn rate come from Vast.ai prices; the dollars redone and saved are the
    # trials' own (each at the price of the machine that trained it)
    assert set(status["cost"]) == {"gpuHours", "redoneUSD", "savedByResumeUSD"}
    direct = make_spec(
        workers={
            "minReplicas": 0,
            "gpuPool": {**POOL, "mode": "Direct", "brokerEndpoint": "amqps://b:5671/"},
        }
    )
    assert desired_replicas(5, direct.workers, ended=False) == 0
    assert desired_replicas(5, spec.workers, ended=False) == 4


def test_a_cpu_search_asks_for_no_gpu_and_an_image_folder_mounts_its_claim() -> None:
    spec = make_spec(dataset={"imageFolder": {"claimName": "road-images", "path": "cracks"}})
    d = build_trainer_deployment("roads", "ns", spec, replicas=0, broker=BROKER)
    pod = d["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    claims = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [
        {"name": "data", "persistentVolumeClaim": {"claimName": "road-images", "readOnly": True}}
    ]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLOPT_DATA_DIR"] == "/data"


def test_names_are_valid_dns_labels_even_for_long_search_names() -> None:
    name = deployment_name("a" * 253)
    assert len(name) <= 63
    assert name.endswith("-trainer")
    assert name != deployment_name("a" * 252)  # a cut name carries a hash of the whole
    secret = build_broker_secret("s", "amqp://mlopt-1:pw@mq/mlopt-1", "pw")
    assert secret["stringData"] == {"url": "amqp://mlopt-1:pw@mq/mlopt-1", "password": "pw"}
    assert secret["metadata"]["name"] == "s-broker"


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("victim.x", "victim-x"),  # a dot becomes a dash
        ("a" * 60 + "1", "a" * 60 + "2"),  # the same first 60 characters
        ("x" * 70, "x" * 71),
        ("team.a.b", "team-a.b"),
    ],
)
def test_two_search_names_never_share_a_child_name_or_trainer_labels(one: str, other: str) -> None:
    for child in (deployment_name, broker_secret_name, network_policy_name, label_value):
        assert child(one) != child(other), child.__name__
        for name in (child(one), child(other)):
            assert len(name) <= 63
            assert name[0].isalnum()
            assert name[-1].isalnum()
    assert trainer_labels(one) != trainer_labels(other)
    # a name used as it is keeps its plain children
    assert deployment_name("victim-x") == "victim-x-trainer"
    assert label_value("victim.x") == "victim.x"


@pytest.mark.parametrize(
    ("work", "ended", "expected"),
    [(0, False, 1), (2, False, 2), (9, False, 4), (3, True, 0)],
)
def test_replicas_follow_the_work_within_the_bounds(work: int, ended: bool, expected: int) -> None:
    workers = Workers.model_validate({"minReplicas": 1, "maxReplicas": 4})
    assert desired_replicas(work, workers, ended) == expected


def test_trainers_sharing_gpus_run_in_fewer_pods_that_say_how_to_share() -> None:
    shared = make_spec(workers={"trainersPerGpu": 4, "resources": {"gpu": 1}, "maxReplicas": 8})
    assert shared.workers.processes_per_pod == 4
    assert [desired_replicas(w, shared.workers, ended=False) for w in (1, 4, 5, 40)] == [
        1,
        1,
        2,
        8,
    ]
    d = build_trainer_deployment("s", "ns", shared, replicas=1, broker=BROKER)
    (container,) = d["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLOPT_TRAINERS_PER_GPU"] == "4"
    assert "MLOPT_TRAINER_MEMORY_MB" not in env
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"  # one GPU, shared
    auto = make_spec(workers={"trainersPerGpu": "auto", "resources": {"gpu": 1}})
    assert auto.workers.processes_per_pod == 1  # decided in the pod, from its GPU
    env = dict(sharing_env(auto))
    assert env["MLOPT_TRAINERS_PER_GPU"] == "auto"
    assert int(env["MLOPT_TRAINER_MEMORY_MB"]) > 0  # the largest sampled model's need
    assert sharing_env(make_spec()) == {}  # one trainer per pod: nothing to say
    # a rented machine of two GPUs holds two pods: each pays half of its price
    pooled = make_spec(workers={"gpuPool": {**POOL, "numGpus": 2}, "resources": {"gpu": 1}})
    assert pod_price(1.0, pooled) == 0.5
    assert pod_price(None, pooled) is None
    # a Direct-mode machine is one container: its processes share all its GPUs
    direct = make_spec(
        workers={
            "trainersPerGpu": 3,
            "gpuPool": {
                **POOL,
                "numGpus": 2,
                "mode": "Direct",
                "brokerEndpoint": "amqps://b:5671/",
            },
        }
    )
    assert trainers_per_machine(direct) == 1
    assert direct.workers.processes_per_pod == 6
    assert pod_price(1.0, direct) == 1.0
    assert direct.workers.cost_share(64) == 6


def test_sharing_needs_gpus_and_a_number_from_one_to_eight_or_auto() -> None:
    with pytest.raises(ValueError, match="trainersPerGpu shares GPUs"):
        make_spec(workers={"trainersPerGpu": 2})
    for bad, why in ((0, "greater than or equal to 1"), (9, "less than or equal to 8")):
        with pytest.raises(ValueError, match=why):
            make_spec(workers={"trainersPerGpu": bad, "resources": {"gpu": 1}})
    for quoted in ("2", "all"):
        with pytest.raises(ValueError, match="whole number from 1 to 8"):
            make_spec(workers={"trainersPerGpu": quoted, "resources": {"gpu": 1}})


def test_replicas_grow_at_once_and_shrink_only_once_the_lower_count_has_held() -> None:
    """Between two waves the work in flight dips: a warm trainer must not be stopped for it
    (found running the operator's Deployments as real pods: 2 -> 1 -> 2 every trial)."""
    workers = Workers.model_validate({"minReplicas": 0, "maxReplicas": 4})
    plan = ReplicaPlan(settle=30)
    assert plan.replicas(2, workers, now=0) == 2
    assert plan.replicas(1, workers, now=1) == 2  # the dip between two waves
    assert plan.replicas(2, workers, now=2) == 2
    assert plan.replicas(0, workers, now=10) == 2
    assert plan.replicas(0, workers, now=31.9) == 2  # 2 was wanted 29.9 s ago
    assert plan.replicas(0, workers, now=32.1) == 0  # 0 held for 30 s
    assert plan.replicas(3, workers, now=33) == 3  # up at once
    assert plan.replicas(9, workers, now=34) == 4  # within the bounds


def test_a_condition_keeps_its_transition_time_until_its_status_changes() -> None:
    first = set_condition([], "Degraded", "True", "ConnectionLost", "x", now="T1")
    same = set_condition(first, "Degraded", "True", "ConnectionLost", "y", now="T2")
    assert same[0]["lastTransitionTime"] == "T1"
    assert same[0]["message"] == "y"
    flipped = set_condition(same, "Degraded", "False", "Connected", now="T3")
    assert flipped[0]["lastTransitionTime"] == "T3"
    both = set_condition(flipped, "Ready", "True", "Dispatching", now="T4", generation=2)
    assert [c["type"] for c in both] == ["Degraded", "Ready"]
    assert both[1]["observedGeneration"] == 2


def record(number: int, phase: str, state: str, interrupted: bool = False) -> TrialRecord:
    return TrialRecord(
        number=number, trial_id=number, phase=phase, state=state, value=None,  # type: ignore[arg-type]
        architecture=None, params={}, interrupted=interrupted, refines=None, error=None,
        seconds=1.0, cost_usd=0.0, attrs={},
    )  # fmt: skip


def test_status_from_counts_reports_progress_cost_and_burn_rate() -> None:
    spec = make_spec(budget={"maxTrials": 10}, workers={"pricePerHour": 0.5})
    states = ["complete", "complete", "complete", "pruned", "failed"]
    history = [record(i, "explore", state) for i, state in enumerate(states)]
    history.append(record(5, "explore", "failed", interrupted=True))  # replaced, not counted
    counts = Counts(complete=3, pruned=1, failed=1, cost_usd=0.123456, history=history)
    status = status_from_counts(counts, spec, running=2)
    assert status["progress"] == "5/10"
    assert status["trials"] == {
        "complete": 3,
        "running": 2,
        "pruned": 1,
        "failed": 1,
        "infeasible": 0,
        "tooLarge": 0,
        "paretoFront": 0,
        "rejectedMessages": 0,
    }
    assert status["best"] is None
    assert status["cost"]["usd"] == 0.1235
    assert status["cost"]["burnRatePerHour"] == 1.0
    assert (status["cost"]["redoneUSD"], status["cost"]["savedByResumeUSD"]) == (0.0, 0.0)
    # trials whose trainers went away: what was trained again, what checkpoints spared
    history[0].attrs.update({Attr.REDONE_USD: 0.02, Attr.SAVED_USD: 0.1})
    history[1].attrs.update({Attr.SAVED_USD: 0.05})
    cost = status_from_counts(counts, spec, running=2)["cost"]
    assert (cost["redoneUSD"], cost["savedByResumeUSD"]) == (0.02, 0.15)
    ArchitectureSearchStatus.model_validate({"cost": cost})  # the CRD's fields


def test_status_under_a_tradeoff_counts_the_front_and_gives_the_best_size() -> None:
    from mloptimizer.status import ArchitectureSearchStatus
    from mloptimizer.study import Attr, best_of

    spec = make_spec(objective={"tradeoff": "params"})
    # (accuracy, parameters): 0 and 2 are on the front, 1 is beaten by 2 on both
    figures = [(0.95, 50_000), (0.90, 20_000), (0.92, 10_000), (0.99, 900_000)]
    history = [
        dataclasses.replace(
            record(i, "explore", "complete"),
            value=value,
            attrs={Attr.PARAMETERS: size, **({Attr.INFEASIBLE: "too big"} if i == 3 else {})},
        )
        for i, (value, size) in enumerate(figures)
    ]
    best = best_of(history, "maximize", "params")
    status = status_from_counts(Counts(complete=3, infeasible=1, history=history, best=best), spec)
    assert status["trials"]["paretoFront"] == 2  # the infeasible 0.99 is never on it
    assert status["best"]["number"] == 0
    assert status["best"]["size"] == 50_000
    ArchitectureSearchStatus.model_validate(status)  # what the CRD's status schema is made of


def test_the_trials_column_counts_explore_and_refine_apart() -> None:
    spec = make_spec(
        budget={"maxTrials": 3}, training={"epochs": 2, "refine": {"topK": 2, "epochs": 4}}
    )
    explored = [record(i, "explore", "complete") for i in range(3)]
    assert progress_text(Counts(history=explored[:2], explore_used=3), spec) == "2/3"
    assert progress_text(Counts(history=explored, explore_used=3), spec) == "3/3 +0/2"
    refined = [*explored, record(3, "refine", "complete")]
    assert progress_text(Counts(history=refined, explore_used=3), spec) == "3/3 +1/2"
    assert progress_text(Counts(history=explored, explore_used=3), make_spec()) == "3/20"


@pytest.mark.parametrize(
    "spec",
    [
        make_spec(),
        make_spec(
            dataset={"imageFolder": {"claimName": "imgs", "path": "x"}},
            workers={
                "resources": {"gpu": 2},
                "tolerations": [{"operator": "Exists"}],
                "nodeSelector": {"a": "b"},
            },
        ),
    ],
)
def test_the_deployment_validates_against_the_kubernetes_schema(
    spec: ArchitectureSearchSpec,
) -> None:
    deployment = build_trainer_deployment("s", "ns", spec, replicas=1, broker=BROKER)
    deployment["metadata"]["namespace"] = "ns"
    kubernetes_validate.validate(deployment, "1.34.0", strict=True)
    secret = build_broker_secret("s", "amqp://x", "pw")
    kubernetes_validate.validate(secret, "1.34.0", strict=True)


def test_trainer_scratch_volumes_are_bounded() -> None:
    deployment = build_trainer_deployment("s", "ns", make_spec(), replicas=1, broker=BROKER)
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    scratch = [v for v in volumes if "emptyDir" in v]
    assert scratch
    assert all(v["emptyDir"].get("sizeLimit") for v in scratch)


def test_a_rented_node_installs_a_pinned_k3s() -> None:
    from mloptimizer.operator.builders import K3S_VERSION, node_onstart

    script = node_onstart("mlopt-machine-1", "uid-1")
    assert f"INSTALL_K3S_VERSION={K3S_VERSION}" in script.replace("'", "")


@pytest.mark.parametrize(
    ("cpu", "threads"), [("2", 2), ("4", 4), ("1500m", 1), ("500m", 1), ("0.5", 1), ("16", 16)]
)
def test_trainer_pods_size_tensorflows_pool_to_their_cpu_not_the_nodes(
    cpu: str, threads: int
) -> None:
    spec = make_spec(workers={"resources": {"cpu": cpu}})
    d = build_trainer_deployment("s", "ns", spec, replicas=1, broker=BROKER)
    (container,) = d["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLOPT_INTRA_OP_THREADS"] == str(threads)
    assert "MLOPT_INTER_OP_THREADS" not in env  # TensorFlow's own inter-op pool was fastest
