"""Objects are the search's by owner uid, never by name; Secrets and claims reach trainers
only when an admin opened them for that; each search's trainers get a NetworkPolicy.

End to end as in ``test_operator.py``: kopf with our handlers against the real API server
for ArchitectureSearch and the emulator for core, apps and networking objects (or a real
cluster), written as someone who may create searches and objects in the namespace.
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

import pytest
from cluster import RESOURCES, Cluster, run_operator
from k8s import Kind
from services import RABBITMQ_URL
from test_operator import condition, finished, operator_config, search

from mloptimizer.operator.builders import broker_secret_name, deployment_name, egress_admits
from mloptimizer.operator.main import shared_memo
from mloptimizer.operator.secretrefs import FOR_OPERATOR, FOR_TRAINERS, USABLE_LABEL

# The emulator serves core and apps; the networking API is served here, as a cluster does.
NETWORK_POLICIES = Kind("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True,
                        ("netpol",))  # fmt: skip
RESOURCES.setdefault("networkpolicies", ("networking.k8s.io", "v1", "networkpolicies", True))
RESOURCES.setdefault("persistentvolumeclaims", ("", "v1", "persistentvolumeclaims", True))


@pytest.fixture
def name() -> str:
    return f"own-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def policies(cluster: Cluster) -> Cluster:
    """The cluster, serving NetworkPolicies."""
    if cluster.emulator is not None:
        cluster.emulator.register(NETWORK_POLICIES)
    return cluster


def secret(name: str, label: str | None = None, **data: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if label is not None:
        meta["labels"] = {USABLE_LABEL: label}
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "data": encoded}


def foreign_deployment(name: str) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "web", "image": "nginx:1"}]},
            },
        },
    }


def owners(obj: Any) -> set[str]:
    return {ref["uid"] for ref in (obj or {}).get("metadata", {}).get("ownerReferences") or []}


def running(obj: Any) -> bool:
    return obj is not None and obj.get("status", {}).get("phase") in {"Pending", "Running"}


async def test_names_taken_by_objects_it_does_not_own_fail_the_search_and_stay_untouched(
    policies: Cluster, postgres_dsn: str, name: str
) -> None:
    cluster = policies
    taken_secret, taken_deployment = f"{name}-s", f"{name}-d"
    # an unlabelled <name>-broker Secret with the keys the operator writes: never adopted
    planted = await cluster.create(
        "secrets",
        secret(broker_secret_name(taken_secret), url="amqp://evil@mq/", password="pw"),
        "default",
    )
    squatter = await cluster.create(
        "deployments", foreign_deployment(deployment_name(taken_deployment)), "default"
    )
    async with run_operator(cluster, memo=shared_memo(operator_config(postgres_dsn))):
        for search_name in (taken_secret, taken_deployment):
            await cluster.create("archsearch", search(search_name))
        failed = {
            n: await cluster.wait_for("archsearch", "default", n, finished, timeout=60)
            for n in (taken_secret, taken_deployment)
        }
        for search_name, kind, child in (
            (taken_secret, "Secret", broker_secret_name(taken_secret)),
            (taken_deployment, "Deployment", deployment_name(taken_deployment)),
        ):
            done = failed[search_name]
            assert done is not None
            assert done["status"]["phase"] == "Failed"
            assert condition(done, "Complete")["reason"] == "NameConflict"
            assert (
                f"{kind} default/{child} exists and is not this search's"
                in (done["status"]["message"])
            )
        for search_name in (taken_secret, taken_deployment):
            await cluster.delete("archsearch", "default", search_name)
            await cluster.wait_for("archsearch", "default", search_name, lambda o: o is None,
                                   timeout=60)  # fmt: skip
    # neither was adopted, patched, scaled nor deleted
    kept_secret = await cluster.get("secrets", "default", planted["metadata"]["name"])
    kept_deployment = await cluster.get("deployments", "default", squatter["metadata"]["name"])
    assert kept_secret is not None
    assert kept_deployment is not None
    assert kept_secret["metadata"]["resourceVersion"] == planted["metadata"]["resourceVersion"]
    assert (
        kept_deployment["metadata"]["resourceVersion"] == (squatter["metadata"]["resourceVersion"])
    )
    assert owners(kept_secret) == owners(kept_deployment) == set()
    # the search whose Secret name was taken got no trainers of its own anywhere; the broker
    # Secret the other one did make (its own) went with it, the squatter's Deployment stayed
    assert await cluster.get("deployments", "default", deployment_name(taken_secret)) is None
    assert await cluster.get("secrets", "default", broker_secret_name(taken_deployment)) is None
    reasons = {e["reason"] for e in await cluster.list("events", "default")}
    assert "NameConflict" in reasons


async def test_a_dot_and_a_dash_name_get_separate_children_each_owned_by_its_search(
    policies: Cluster, postgres_dsn: str, name: str
) -> None:
    cluster = policies
    dotted, dashed = f"{name}.x", f"{name}-x"
    async with run_operator(cluster, memo=shared_memo(operator_config(postgres_dsn))):
        uids = {}
        for search_name in (dotted, dashed):
            created = await cluster.create("archsearch", search(search_name))
            uids[search_name] = created["metadata"]["uid"]
        for search_name in (dotted, dashed):
            found = await cluster.wait_for("archsearch", "default", search_name, running,
                                           timeout=60)  # fmt: skip
            assert found is not None
        children = {}
        for search_name in (dotted, dashed):
            for resource, child in (
                ("deployments", deployment_name(search_name)),
                ("secrets", broker_secret_name(search_name)),
            ):
                obj = await cluster.wait_for(
                    "deployments" if resource == "deployments" else "secrets",
                    "default",
                    child,
                    lambda o: o is not None,
                    timeout=60,
                )
                assert owners(obj) == {uids[search_name]}, (search_name, child)
                children[(search_name, resource)] = child
        for search_name in (dotted, dashed):
            await cluster.delete("archsearch", "default", search_name)
        for search_name in (dotted, dashed):
            await cluster.wait_for("archsearch", "default", search_name, lambda o: o is None,
                                   timeout=60)  # fmt: skip
    assert len(set(children.values())) == 4  # no two searches share a child's name
    assert children[(dashed, "deployments")] == f"{dashed}-trainer"
    for (_, resource), child in children.items():
        assert await cluster.get(resource, "default", child) is None


async def test_a_workers_edit_rewrites_the_whole_pod_template_and_the_policy_is_owned(
    policies: Cluster, postgres_dsn: str, name: str
) -> None:
    cluster = policies
    placed = {
        "minReplicas": 0,
        "maxReplicas": 2,
        "resources": {"gpu": 1, "cpu": "2", "memory": "4Gi"},
        "nodeSelector": {"gpu": "a100", "zone": "a"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    }
    async with run_operator(cluster, memo=shared_memo(operator_config(postgres_dsn))):
        created = await cluster.create("archsearch", search(name, workers=placed))
        uid = created["metadata"]["uid"]
        before = await cluster.wait_for(
            "deployments", "default", f"{name}-trainer", lambda o: o is not None, timeout=60
        )
        assert before is not None
        pod = before["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"gpu": "a100", "zone": "a"}
        assert pod["tolerations"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        policy = await cluster.wait_for(
            "networkpolicies", "default", f"{name}-trainers", lambda o: o is not None, timeout=60
        )
        assert policy is not None
        assert owners(policy) == {uid}
        assert policy["spec"]["podSelector"]["matchLabels"]["mloptimizer.io/search"] == name
        assert not reaches(policy, "169.254.169.254", 80)

        # remove a nodeSelector key, every toleration and the GPU
        await cluster.patch(
            "archsearch",
            "default",
            name,
            {
                "spec": {
                    "workers": {
                        "nodeSelector": {"zone": None},
                        "tolerations": [],
                        "resources": {"gpu": 0},
                    }
                }
            },
        )

        def rewritten(obj: Any) -> bool:
            spec = (obj or {}).get("spec", {}).get("template", {}).get("spec", {})
            limits = spec.get("containers", [{}])[0].get("resources", {}).get("limits", {})
            return spec.get("nodeSelector") == {"gpu": "a100"} and "nvidia.com/gpu" not in limits

        after = await cluster.wait_for("deployments", "default", f"{name}-trainer", rewritten,
                                       timeout=60)  # fmt: skip
        await cluster.delete("archsearch", "default", name)
        await cluster.wait_for("archsearch", "default", name, lambda o: o is None, timeout=60)
    assert after is not None
    pod = after["spec"]["template"]["spec"]
    assert "tolerations" not in pod
    assert after["spec"]["replicas"] == before["spec"]["replicas"]  # replicas stay the daemon's
    assert owners(after) == {uid}
    assert await cluster.get("networkpolicies", "default", f"{name}-trainers") is None


async def test_secrets_and_claims_reach_trainers_only_when_opened_for_that(
    policies: Cluster, postgres_dsn: str, name: str
) -> None:
    cluster = policies
    for body in (
        # S3 keys opened to the operator: never a broker URL in a trainer
        secret(f"{name}-s3", FOR_OPERATOR, url=RABBITMQ_URL, accessKeyId="AKIA"),
        # a broker URL opened to trainers: never the operator's study database
        secret(f"{name}-mq", FOR_TRAINERS, url=RABBITMQ_URL),
        # someone's own Secret under the name the operator would use
        secret(broker_secret_name(f"{name}-own"), url="amqp://theirs@mq/", password="pw"),
    ):
        await cluster.create("secrets", body, "default")
    await cluster.create(
        "persistentvolumeclaims",
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": f"{name}-pv"},
         "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}},
        "default",
    )  # fmt: skip
    broker_s3 = {"secretRef": {"name": f"{name}-s3", "key": "url"}}
    cases = {
        f"{name}-route": (
            search(f"{name}-route", broker=broker_s3),
            "SecretNotUsable",
            f"spec.broker.secretRef: Secret default/{name}-s3 is not open to searches to be "
            f"routed into trainer pods: an admin must label it (kubectl label secret {name}-s3 "
            f"-n default {USABLE_LABEL}=trainers --overwrite)",
        ),
        f"{name}-db": (
            search(f"{name}-db", storage={"secretRef": {"name": f"{name}-mq", "key": "url"}}),
            "SecretNotUsable",
            f"spec.storage.secretRef: Secret default/{name}-mq is not open to searches to be "
            "used by the operator",
        ),
        f"{name}-claim": (
            search(f"{name}-claim", output={"pvc": {"claimName": f"{name}-pv"}}),
            "ClaimNotUsable",
            f"spec.output.pvc.claimName: PersistentVolumeClaim default/{name}-pv is not open "
            f"to searches: an admin must label it (kubectl label pvc {name}-pv -n default "
            f"{USABLE_LABEL}=true)",
        ),
    }
    own = f"{name}-own"
    async with run_operator(cluster, memo=shared_memo(operator_config(postgres_dsn))):
        for body, _, _ in cases.values():
            await cluster.create("archsearch", body)
        await cluster.create(
            "archsearch",
            search(own, broker={"secretRef": {"name": f"{name}-mq", "key": "url"}}),
        )
        for search_name, (_, reason, message) in cases.items():
            done = await cluster.wait_for("archsearch", "default", search_name, finished,
                                          timeout=60)  # fmt: skip
            assert done is not None
            assert done["status"]["phase"] == "Failed"
            assert condition(done, "Complete")["reason"] == reason
            assert message in done["status"]["message"], done["status"]["message"]
            assert await cluster.get("deployments", "default", f"{search_name}-trainer") is None
        # a broker Secret opened to trainers is used; someone's <name>-broker is left alone
        deployment = await cluster.wait_for(
            "deployments", "default", deployment_name(own), lambda o: o is not None, timeout=60
        )
        assert deployment is not None
        env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["MLOPT_BROKER_URL"]["valueFrom"]["secretKeyRef"]["name"] == f"{name}-mq"
        await cluster.delete("archsearch", "default", own)
        await cluster.wait_for("archsearch", "default", own, lambda o: o is None, timeout=60)
    assert await cluster.get("secrets", "default", broker_secret_name(own)) is not None
    assert await cluster.get("deployments", "default", deployment_name(own)) is None


def reaches(policy: dict[str, Any], address: str, port: int) -> bool:
    return egress_admits(policy, address, port)


@pytest.mark.parametrize(
    ("broker_url", "output"),
    [
        ("amqp://u:p@mlopt-rabbitmq.mloptimizer-system.svc:5672/v", {}),
        ("amqp://u:p@169.254.169.254:80/v", {}),  # a broker "at" the metadata address
        ("amqp://u:p@34.90.1.7:5672/v", {"s3": {"endpoint": "http://169.254.169.254"}}),
        ("amqp://u:p@10.0.0.5/v", {"s3": {"endpoint": "https://s3.example.com"}}),
        ("amqp://u:p@[fd00::1]/v", {"s3": {"endpoint": "http://34.90.1.9:9000"}}),
    ],
)
def test_the_rendered_trainer_policy_never_reaches_the_metadata_address_nor_the_api(
    broker_url: str, output: dict[str, Any]
) -> None:
    from mloptimizer.operator.builders import build_trainer_policy
    from mloptimizer.spec import ArchitectureSearchSpec

    if output:
        output["s3"].update({"bucket": "models", "secretRef": {"name": "s3"}})
    spec = ArchitectureSearchSpec.model_validate(
        {"dataset": {"builtin": "digits"}, "output": output}
    )
    policy = build_trainer_policy("s", spec, broker_url=broker_url)
    assert policy["spec"]["ingress"] == []  # nothing reaches a trainer
    for port in (80, 443, 53, 8080):
        assert not reaches(policy, "169.254.169.254", port)
    for api in ("10.96.0.1", "172.20.0.1", "192.168.1.10"):  # in-cluster API addresses
        assert not reaches(policy, api, 443)
        assert not reaches(policy, api, 6443)
    if broker_url.startswith("amqp://u:p@34.90.1.7"):
        assert reaches(policy, "34.90.1.7", 5672)  # a broker at a public IP: its port only
        assert not reaches(policy, "34.90.1.7", 22)
    if output.get("s3", {}).get("endpoint") == "https://s3.example.com":
        assert reaches(policy, "52.95.1.4", 443)  # an endpoint by name: public, its port
        assert not reaches(policy, "52.95.1.4", 80)


@pytest.mark.parametrize(
    ("image", "allowed"),
    [
        ("registry.example.com/ml/trainer:1", True),
        ("registry.example.com:5000/x", True),
        ("registry.example.com", True),
        ("registry.example.com.evil.io/x", False),
        ("registry.example.comx/x", False),
        ("evil.io/registry.example.com/x", False),
    ],
)
def test_allowed_image_prefixes_are_anchored(image: str, allowed: bool) -> None:
    from mloptimizer.operator.lifecycle import image_allowed

    assert image_allowed(image, ("registry.example.com",)) is allowed
    assert image_allowed(image, ()) is True  # no list: any image
    # a prefix ending at a separator is taken as it is
    assert image_allowed("registry.example.com/ml/x", ("registry.example.com/ml/",))
    assert not image_allowed("registry.example.com/mlx/x", ("registry.example.com/ml",))
    assert image_allowed("r.io/t@sha256:ab", ("r.io/t",))


@pytest.mark.parametrize(
    ("workers", "field"),
    [
        ({"nodeSelector": {"node-role.kubernetes.io/control-plane": ""}}, "nodeSelector"),
        ({"nodeSelector": {"mloptimizer.io/pool": "another-search-uid"}}, "nodeSelector"),
        (
            {"tolerations": [{"key": "node-role.kubernetes.io/master", "operator": "Exists"}]},
            "tolerations[0]",
        ),
        (
            {
                "tolerations": [
                    {"key": "nvidia.com/gpu", "operator": "Exists"},
                    {"key": "mloptimizer.io/pool", "operator": "Equal", "value": "u"},
                ]
            },
            "tolerations[1]",
        ),
        ({"tolerations": [{"operator": "Exists"}]}, "tolerations[0]"),  # every taint
        ({"nodeSelector": {"gpu": "a100"}}, None),
        ({"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]}, None),
    ],
)
def test_placements_on_control_plane_or_rented_nodes_are_refused_naming_the_field(
    workers: dict[str, Any], field: str | None
) -> None:
    from mloptimizer.operator.lifecycle import placement_refusal
    from mloptimizer.spec import ArchitectureSearchSpec

    spec = ArchitectureSearchSpec.model_validate(
        {"dataset": {"builtin": "digits"}, "workers": workers}
    )
    refusal = placement_refusal(spec)
    if field is None:
        assert refusal is None
    else:
        assert refusal is not None
        assert refusal.startswith(f"spec.workers.{field}: ")
        assert "remove it" in refusal or "name the taint's key" in refusal


async def test_a_pool_leaves_alone_a_node_under_its_machines_name_that_is_not_its_own() -> None:
    """A Node named like a rented machine but without this search's pool label (the control
    plane, another search's machine) is never cordoned, drained or deleted."""
    import asyncio

    import kubernetes
    from k8s import kubernetes_configuration, start_emulator

    from mloptimizer.operator.builders import POOL_LABEL
    from mloptimizer.operator.kube import ApiPoolKube

    async with start_emulator() as emulator:
        emulator.create_object(
            "nodes", {"metadata": {"name": "m-1", "labels": {POOL_LABEL: "another-uid"}}}
        )
        emulator.create_object("nodes", {"metadata": {"name": "m-2"}})  # no pool label at all
        emulator.create_object(
            "nodes", {"metadata": {"name": "m-3", "labels": {POOL_LABEL: "our-uid"}}}
        )
        api = kubernetes.client.ApiClient(kubernetes_configuration(emulator))
        try:
            kube = ApiPoolKube("default", "s", "mloptimizer.io/search=s", api, uid="our-uid")
            for name in ("m-1", "m-2"):
                before = emulator.fetch_object("nodes", None, name)
                assert await kube.drain_node(name) is True  # nothing of ours runs there
                await kube.uncordon_node(name)
                await kube.delete_node(name)
                assert not await kube.node_ready(name)
                after = emulator.fetch_object("nodes", None, name)
                assert before is not None
                assert after is not None
                assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
            # its own machine's Node is cordoned and deleted as before
            assert await kube.drain_node("m-3") is True
            cordoned = emulator.fetch_object("nodes", None, "m-3")
            assert cordoned is not None
            assert cordoned["spec"]["unschedulable"] is True
            await kube.delete_node("m-3")
            assert emulator.fetch_object("nodes", None, "m-3") is None
        finally:
            await asyncio.to_thread(api.close)
