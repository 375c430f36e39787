"""The test suite's Kubernetes API emulator (tests/k8s.py) behaves as the clients need:
kopf, kubectl and the ``kubernetes`` client."""

from __future__ import annotations

import asyncio
import copy
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kopf
import kubernetes.client
import pytest
import yaml
from apiserver import validate_spec
from k8s import (
    REPO,
    Emulator,
    human_duration,
    json_patch,
    kubernetes_configuration,
    run_kopf_operator,
    run_kubectl,
    start_emulator,
    strategic_merge_patch,
    write_kubeconfig,
)

SEARCHES = "/apis/mloptimizer.io/v1alpha1/namespaces/default/architecturesearches"
CONFIGMAPS = "/api/v1/namespaces/default/configmaps"
DEPLOYMENTS = "/apis/apps/v1/namespaces/default/deployments"
EXAMPLE = REPO / "examples" / "digits-quick.yaml"
JSON_PATCH = {"Content-Type": "application/json-patch+json"}
MERGE_PATCH = {"Content-Type": "application/merge-patch+json"}


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    async with start_emulator() as emulator:
        yield emulator


def search(name: str = "digits-quick") -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"]["name"] = name
    return body


def configmap(name: str, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels}, "data": {"key": name}}


def deployment(name: str) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "main", "image": "busybox"}]},
            },
        },
    }


async def call(
    emulator: Emulator, method: str, path: str, body: Any = None, **options: Any
) -> tuple[int, Any]:
    async with emulator.request(method, path, json=body, **options) as response:
        return response.status, await response.json()


async def test_create_answers_201_with_the_server_fields(emulator: Emulator) -> None:
    status, created = await call(emulator, "POST", SEARCHES, search())
    assert status == 201
    meta = created["metadata"]
    assert re.fullmatch(r"[0-9a-f-]{36}", meta["uid"])
    assert meta["resourceVersion"].isdigit()
    assert meta["generation"] == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["creationTimestamp"])
    assert meta["namespace"] == "default"
    assert created["spec"]["budget"]["maxFailedTrials"] == 5  # the CRD's default
    assert "status" not in created  # the status is the controller's
    status, fetched = await call(emulator, "GET", f"{SEARCHES}/digits-quick")
    assert (status, fetched) == (200, created)

    status, again = await call(emulator, "POST", SEARCHES, search())
    assert (status, again["reason"]) == (409, "AlreadyExists")


async def test_the_kubernetes_client_gets_the_created_object(emulator: Emulator) -> None:
    def create() -> Any:
        body: Any = configmap("made")
        with kubernetes.client.ApiClient(kubernetes_configuration(emulator)) as api:
            return kubernetes.client.CoreV1Api(api).create_namespaced_config_map("default", body)

    made = await asyncio.to_thread(create)  # the client blocks: not on the emulator's loop
    assert made.metadata.name == "made"
    assert made.metadata.uid


async def test_generate_name_gives_unique_names(emulator: Emulator) -> None:
    event = {"metadata": {"generateName": "kopf-event-"}, "message": "hello"}
    names = set()
    for _ in range(3):
        status, created = await call(emulator, "POST", "/api/v1/namespaces/default/events", event)
        assert status == 201
        names.add(created["metadata"]["name"])
    assert len(names) == 3
    assert all(re.fullmatch(r"kopf-event-[a-z0-9]{5}", name) for name in names)

    status, refused = await call(emulator, "POST", CONFIGMAPS, {"metadata": {}})
    assert (status, refused["reason"]) == (422, "Invalid")
    assert refused["details"]["causes"][0]["field"] == "metadata.name"


async def test_a_stale_resource_version_is_a_conflict(emulator: Emulator) -> None:
    _, created = await call(emulator, "POST", CONFIGMAPS, configmap("a"))
    stale = created["metadata"]["resourceVersion"]
    status, updated = await call(
        emulator, "PUT", f"{CONFIGMAPS}/a", {**created, "data": {"k": "1"}}
    )
    assert status == 200
    assert int(updated["metadata"]["resourceVersion"]) > int(stale)

    status, refused = await call(emulator, "PUT", f"{CONFIGMAPS}/a", {**created, "data": {}})
    assert (status, refused["reason"]) == (409, "Conflict")
    patch = {"metadata": {"resourceVersion": stale}, "data": {"k": "2"}}
    status, refused = await call(emulator, "PATCH", f"{CONFIGMAPS}/a", patch, headers=MERGE_PATCH)
    assert (status, refused["reason"]) == (409, "Conflict")
    options = {"preconditions": {"resourceVersion": stale}}
    status, refused = await call(emulator, "DELETE", f"{CONFIGMAPS}/a", options)
    assert (status, refused["reason"]) == (409, "Conflict")
    assert emulator.fetch_object("configmaps", "default", "a") == updated


async def test_a_failed_json_patch_test_is_422(emulator: Emulator) -> None:
    _, created = await call(emulator, "POST", CONFIGMAPS, configmap("a"))
    version = created["metadata"]["resourceVersion"]
    add_finalizer = {"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]}

    wrong = [{"op": "test", "path": "/metadata/resourceVersion", "value": "0"}, add_finalizer]
    status, refused = await call(emulator, "PATCH", f"{CONFIGMAPS}/a", wrong, headers=JSON_PATCH)
    assert (status, refused["reason"]) == (422, "Invalid")
    assert emulator.fetch_object("configmaps", "default", "a") == created

    right = [{"op": "test", "path": "/metadata/resourceVersion", "value": version}, add_finalizer]
    status, patched = await call(emulator, "PATCH", f"{CONFIGMAPS}/a", right, headers=JSON_PATCH)
    assert status == 200
    assert patched["metadata"]["finalizers"] == ["x/y"]


async def test_status_changes_keep_the_generation_spec_changes_bump_it(emulator: Emulator) -> None:
    _, created = await call(emulator, "POST", SEARCHES, search())
    url = f"{SEARCHES}/digits-quick"

    status, patched = await call(
        emulator, "PATCH", f"{url}/status", {"status": {"phase": "Running"}}, headers=MERGE_PATCH
    )
    assert status == 200
    assert patched["status"]["phase"] == "Running"
    assert patched["status"]["cost"] == {
        "usd": 0.0,
        "gpuHours": 0.0,
        "burnRatePerHour": 0.0,
        "redoneUSD": 0.0,
        "savedByResumeUSD": 0.0,
    }
    assert patched["metadata"]["generation"] == 1
    assert patched["metadata"]["resourceVersion"] != created["metadata"]["resourceVersion"]

    # The main endpoint ignores the status; labels are metadata: no new generation either.
    body = {"metadata": {"labels": {"a": "b"}}, "status": {"phase": "Failed"}}
    _, patched = await call(emulator, "PATCH", url, body, headers=MERGE_PATCH)
    assert (patched["status"]["phase"], patched["metadata"]["generation"]) == ("Running", 1)

    # The /status endpoint ignores everything else.
    body = {"spec": {"budget": {"maxTrials": 99}}, "status": {"message": "m"}}
    _, patched = await call(emulator, "PATCH", f"{url}/status", body, headers=MERGE_PATCH)
    assert (patched["spec"]["budget"]["maxTrials"], patched["status"]["message"]) == (12, "m")
    assert patched["metadata"]["generation"] == 1

    body = {"spec": {"budget": {"maxTrials": 20}}}
    _, patched = await call(emulator, "PATCH", url, body, headers=MERGE_PATCH)
    assert (patched["spec"]["budget"]["maxTrials"], patched["metadata"]["generation"]) == (20, 2)

    # A patch that changes nothing writes nothing.
    _, same = await call(emulator, "PATCH", url, body, headers=MERGE_PATCH)
    assert same["metadata"]["resourceVersion"] == patched["metadata"]["resourceVersion"]


async def test_custom_resources_refuse_strategic_merge(emulator: Emulator) -> None:
    await call(emulator, "POST", SEARCHES, search())
    headers = {"Content-Type": "application/strategic-merge-patch+json"}
    status, _ = await call(emulator, "PATCH", f"{SEARCHES}/digits-quick", {}, headers=headers)
    assert status == 415


async def test_the_scale_subresource(emulator: Emulator) -> None:
    status, created = await call(emulator, "POST", DEPLOYMENTS, deployment("web"))
    assert (status, created["spec"]["replicas"]) == (201, 1)  # defaulted

    status, scale = await call(emulator, "GET", f"{DEPLOYMENTS}/web/scale")
    assert status == 200
    assert (scale["kind"], scale["apiVersion"]) == ("Scale", "autoscaling/v1")
    assert scale["spec"] == {"replicas": 1}
    assert scale["status"]["selector"] == "app=web"

    body = {"spec": {"replicas": 3}}
    status, scale = await call(
        emulator, "PATCH", f"{DEPLOYMENTS}/web/scale", body, headers=MERGE_PATCH
    )
    assert (status, scale["spec"]["replicas"]) == (200, 3)
    scaled = emulator.fetch_object("deployments", "default", "web")
    assert scaled is not None
    assert (scaled["spec"]["replicas"], scaled["metadata"]["generation"]) == (3, 2)

    stale = {**scale, "metadata": created["metadata"], "spec": {"replicas": 5}}
    status, refused = await call(emulator, "PUT", f"{DEPLOYMENTS}/web/scale", stale)
    assert (status, refused["reason"]) == (409, "Conflict")
    status, scale = await call(
        emulator, "PUT", f"{DEPLOYMENTS}/web/scale", {**scale, "spec": {"replicas": 0}}
    )
    assert (status, scale["spec"]["replicas"]) == (200, 0)


async def test_label_and_field_selectors(emulator: Emulator) -> None:
    for body in (configmap("a", app="x", tier="web"), configmap("b", app="y"), configmap("c")):
        await call(emulator, "POST", CONFIGMAPS, body)

    async def names(**params: str) -> list[str]:
        status, listed = await call(emulator, "GET", CONFIGMAPS, params=params)
        assert status == 200
        return [item["metadata"]["name"] for item in listed["items"]]

    assert await names(labelSelector="app=x") == ["a"]
    assert await names(labelSelector="app!=x") == ["b", "c"]
    assert await names(labelSelector="app in (x, y)") == ["a", "b"]
    assert await names(labelSelector="app notin (x)") == ["b", "c"]
    assert await names(labelSelector="app,!tier") == ["b"]
    assert await names(labelSelector="app=x,tier=web") == ["a"]
    assert await names(fieldSelector="metadata.name!=a") == ["b", "c"]
    assert emulator.list_objects("cm", "default", label_selector="tier")[0]["data"] == {"key": "a"}
    status, _ = await call(emulator, "GET", CONFIGMAPS, params={"labelSelector": "a b c"})
    assert status == 400


async def test_deletion_waits_for_the_finalizers(emulator: Emulator) -> None:
    body = configmap("a")
    body["metadata"]["finalizers"] = ["example.com/keep"]
    await call(emulator, "POST", CONFIGMAPS, body)

    status, marked = await call(emulator, "DELETE", f"{CONFIGMAPS}/a")
    assert status == 200
    assert marked["metadata"]["deletionTimestamp"]
    assert emulator.fetch_object("configmaps", "default", "a") == marked

    more = {"metadata": {"finalizers": ["example.com/keep", "example.com/more"]}}
    status, refused = await call(emulator, "PATCH", f"{CONFIGMAPS}/a", more, headers=MERGE_PATCH)
    assert (status, refused["reason"]) == (422, "Invalid")

    body = {"metadata": {"finalizers": []}}
    status, last = await call(emulator, "PATCH", f"{CONFIGMAPS}/a", body, headers=MERGE_PATCH)
    assert (status, last["metadata"]["finalizers"]) == (200, [])
    assert emulator.fetch_object("configmaps", "default", "a") is None
    status, _ = await call(emulator, "GET", f"{CONFIGMAPS}/a")
    assert status == 404
    status, _ = await call(emulator, "POST", CONFIGMAPS, configmap("a"))  # the name is free
    assert status == 201


async def watch(
    emulator: Emulator, path: str, into: asyncio.Queue[tuple[str, str, str]], **params: str
) -> None:
    """Put every event of a watch into ``into`` as (type, name, resourceVersion)."""
    params = {"watch": "true", "timeoutSeconds": "5", **params}
    async with emulator.get(path, params=params) as response:
        assert response.status == 200
        async for line in response.content:
            event = json.loads(line)
            meta = event["object"]["metadata"]
            await into.put((event["type"], meta["name"], meta["resourceVersion"]))


async def first_events(
    emulator: Emulator, path: str, count: int, **params: str
) -> list[tuple[str, str, str]]:
    events: asyncio.Queue[tuple[str, str, str]] = asyncio.Queue()
    watching = asyncio.create_task(watch(emulator, path, events, **params))
    try:
        return [await events.get() for _ in range(count)]
    finally:
        watching.cancel()


async def test_a_watch_resumes_from_a_resource_version(emulator: Emulator) -> None:
    _, a = await call(emulator, "POST", CONFIGMAPS, configmap("a"))
    since = a["metadata"]["resourceVersion"]
    _, a2 = await call(
        emulator, "PATCH", f"{CONFIGMAPS}/a", {"data": {"k": "v"}}, headers=MERGE_PATCH
    )
    _, b = await call(emulator, "POST", CONFIGMAPS, configmap("b"))
    await call(emulator, "POST", "/api/v1/namespaces/other/configmaps", configmap("c"))

    resumed = await first_events(emulator, CONFIGMAPS, 2, resourceVersion=since)
    assert resumed == [
        ("MODIFIED", "a", a2["metadata"]["resourceVersion"]),
        ("ADDED", "b", b["metadata"]["resourceVersion"]),
    ]

    # Without a version: the current objects first, then what happens next.
    events: asyncio.Queue[tuple[str, str, str]] = asyncio.Queue()
    watching = asyncio.create_task(watch(emulator, "/api/v1/configmaps", events))
    initial = [(await events.get())[:2] for _ in range(3)]
    assert initial == [("ADDED", "a"), ("ADDED", "b"), ("ADDED", "c")]
    emulator.delete_object("configmaps", "default", "b")
    assert (await events.get())[:2] == ("DELETED", "b")
    watching.cancel()

    named = await first_events(emulator, f"{CONFIGMAPS}/a", 1)
    assert named == [("ADDED", "a", a2["metadata"]["resourceVersion"])]


async def test_an_invalid_search_is_refused_with_422(emulator: Emulator) -> None:
    body = search()
    body["spec"]["budget"]["parallelism"] = 50  # maxTrials is 12
    expected = validate_spec(body["spec"])  # apiserver.py's verdict on the spec alone
    assert expected[0].startswith("spec.budget.parallelism: ")

    status, refused = await call(emulator, "POST", SEARCHES, body)
    assert (status, refused["reason"], refused["code"]) == (422, "Invalid", 422)
    assert refused["message"].startswith('ArchitectureSearch.mloptimizer.io "digits-quick" is')
    assert expected[0].split(": ", 1)[1] in refused["message"]
    assert [c["field"] for c in refused["details"]["causes"]] == ["spec.budget.parallelism"]

    await call(emulator, "POST", SEARCHES, search())
    patch = {"spec": {"budget": {"parallelism": 50}}}
    url = f"{SEARCHES}/digits-quick"
    status, refused = await call(emulator, "PATCH", url, patch, headers=MERGE_PATCH)
    assert status == 422
    stored = emulator.fetch_object("archsearch", "default", "digits-quick")
    assert stored is not None
    assert stored["spec"]["budget"]["parallelism"] == 2

    typo: dict[str, Any] = {"spec": {"budgte": {}}}
    params = {"fieldValidation": "Strict"}
    status, refused = await call(emulator, "PATCH", url, typo, headers=MERGE_PATCH, params=params)
    assert (status, refused["reason"]) == (400, "BadRequest")
    assert 'unknown field "spec.budgte"' in refused["message"]
    async with emulator.patch(url, json=typo, headers=MERGE_PATCH) as response:
        assert response.status == 200  # pruned, with a warning, as by default on a real server
        assert 'unknown field \\"spec.budgte\\"' in response.headers["Warning"]
        assert "budgte" not in (await response.json())["spec"]


async def test_discovery_and_the_urls_kmock_misreads(emulator: Emulator) -> None:
    status, namespaces = await call(emulator, "GET", "/api/v1/namespaces")
    assert status == 200
    assert {"default", "kube-system"} <= {n["metadata"]["name"] for n in namespaces["items"]}
    status, default = await call(emulator, "GET", "/api/v1/namespaces/default")
    assert (status, default["status"]) == (200, {"phase": "Active"})

    status, listed = await call(emulator, "GET", "/apis/apps/v1")
    assert status == 200
    entries = {r["name"]: r for r in listed["resources"]}
    assert entries["deployments/scale"]["kind"] == "Scale"
    assert entries["deployments"]["shortNames"] == ["deploy"]
    status, listed = await call(emulator, "GET", "/apis/mloptimizer.io/v1alpha1")
    entries = {r["name"]: r for r in listed["resources"]}
    assert entries["architecturesearches"]["shortNames"] == ["archsearch"]
    assert "architecturesearches/status" in entries
    assert emulator.errors == []


async def test_the_table_has_the_printer_columns(emulator: Emulator) -> None:
    await call(emulator, "POST", SEARCHES, search())
    emulator.patch_object(
        "archsearch",
        "default",
        "digits-quick",
        {"status": {"phase": "Running", "progress": "3/12", "best": {"number": 3, "value": 0.97}}},
        subresource="status",
    )
    accept = {"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"}
    status, table = await call(emulator, "GET", SEARCHES, headers=accept)
    assert (status, table["kind"]) == (200, "Table")
    names = [column["name"] for column in table["columnDefinitions"]]
    assert names == ["Name", "Phase", "Trials", "Best", "Workers", "Cost", "Age"]
    [row] = table["rows"]
    assert row["cells"][:6] == ["digits-quick", "Running", "3/12", 0.97, 0, 0.0]
    assert re.fullmatch(r"\d+s", row["cells"][6])
    assert row["object"]["metadata"]["name"] == "digits-quick"


def test_patch_helpers_and_ages() -> None:
    current = {"spec": {"containers": [{"name": "a", "image": "1"}, {"name": "b", "image": "1"}]}}
    patched = strategic_merge_patch(
        current, {"spec": {"containers": [{"name": "b", "image": "2"}, {"name": "c"}]}}
    )
    assert patched["spec"]["containers"] == [
        {"name": "a", "image": "1"},
        {"name": "b", "image": "2"},
        {"name": "c"},
    ]
    deleted = strategic_merge_patch(
        current, {"spec": {"containers": [{"name": "a", "$patch": "delete"}]}}
    )
    assert [c["name"] for c in deleted["spec"]["containers"]] == ["b"]
    doc = {"a": [1, 2], "b": {"c": 1}}
    moved = json_patch(
        doc,
        [
            {"op": "move", "from": "/b/c", "path": "/a/-"},
            {"op": "replace", "path": "/a/0", "value": 0},
            {"op": "remove", "path": "/b"},
        ],
    )
    assert moved == {"a": [0, 2, 1]}
    assert doc == {"a": [1, 2], "b": {"c": 1}}
    assert [human_duration(s) for s in (5, 150, 3700, 90000, 400 * 86400)] == [
        "5s",
        "2m30s",
        "61m",
        "25h",
        "400d",
    ]


async def test_a_kopf_operator_runs_against_it(emulator: Emulator) -> None:
    registry = kopf.OperatorRegistry()
    configuration = kubernetes_configuration(emulator)
    group, version, plural = "mloptimizer.io", "v1alpha1", "architecturesearches"

    @kopf.on.create(group, version, plural, registry=registry)
    def created(body: Any, patch: Any, name: str, namespace: str | None, **_: Any) -> None:
        assert namespace is not None
        child: Any = {"metadata": {"name": f"{name}-settings"}, "data": {"a": "b"}}
        kopf.adopt(child, owner=body)
        with kubernetes.client.ApiClient(configuration) as api:
            kubernetes.client.CoreV1Api(api).create_namespaced_config_map(namespace, child)
        kopf.info(body, reason="Started", message="the search started")
        patch.status["phase"] = "Running"

    @kopf.on.delete(group, version, plural, registry=registry)  # hence a finalizer
    def deleted(patch: Any, **_: Any) -> None:
        pass

    async with run_kopf_operator(emulator, registry=registry):
        emulator.create_object("archsearch", search())
        running = await emulator.wait_for(
            "archsearch",
            "default",
            "digits-quick",
            lambda obj: obj is not None and obj.get("status", {}).get("phase") == "Running",
        )
        assert running is not None
        assert running["metadata"]["finalizers"] == ["kopf.zalando.org/KopfFinalizerMarker"]
        child = emulator.fetch_object("configmaps", "default", "digits-quick-settings")
        assert child is not None
        assert child["metadata"]["ownerReferences"][0]["uid"] == running["metadata"]["uid"]
        [event] = await emulator.wait_until(lambda: emulator.list_objects("events", "default"))
        assert event["metadata"]["name"].startswith("kopf-event-")
        assert (event["reason"], event["message"]) == ("Started", "the search started")

        marked = emulator.delete_object("archsearch", "default", "digits-quick")
        assert marked["metadata"]["deletionTimestamp"]
        await emulator.wait_for("archsearch", "default", "digits-quick", lambda obj: obj is None)
    # No garbage collector: the adopted child stays.
    assert emulator.fetch_object("configmaps", "default", "digits-quick-settings") is not None


async def test_kubectl_applies_and_prints_the_columns(emulator: Emulator, tmp_path: Path) -> None:
    kubeconfig = write_kubeconfig(emulator, tmp_path / "kubeconfig")

    applied = await run_kubectl(kubeconfig, "apply", "--validate=false", "-f", str(EXAMPLE))
    assert applied.stdout.strip() == "architecturesearch.mloptimizer.io/digits-quick created"
    emulator.patch_object(
        "archsearch",
        "default",
        "digits-quick",
        {"status": {"phase": "Running", "progress": "3/12"}},
        subresource="status",
    )

    listed = await run_kubectl(kubeconfig, "get", "archsearch")
    header, row = listed.stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "TRIALS", "BEST", "WORKERS", "COST", "AGE"]
    assert row.split()[:3] == ["digits-quick", "Running", "3/12"]

    again = await run_kubectl(kubeconfig, "apply", "--validate=false", "-f", str(EXAMPLE))
    assert again.stdout.strip().endswith("unchanged")
    changed = yaml.safe_load(EXAMPLE.read_text())
    changed["spec"]["budget"]["maxTrials"] = 20
    configured = await run_kubectl(
        kubeconfig, "apply", "--validate=false", "-f", "-", input=yaml.safe_dump(changed).encode()
    )
    assert configured.stdout.strip().endswith("configured")
    stored = emulator.fetch_object("archsearch", "default", "digits-quick")
    assert stored is not None
    assert (stored["spec"]["budget"]["maxTrials"], stored["metadata"]["generation"]) == (20, 2)

    emulator.create_object("deployments", deployment("web"), namespace="default")
    await run_kubectl(kubeconfig, "scale", "deployment", "web", "--replicas=3")
    scaled = emulator.fetch_object("deployments", "default", "web")
    assert scaled is not None
    assert scaled["spec"]["replicas"] == 3

    # `kubectl create KIND` sends protobuf, which the emulator refuses by name.
    refused = await run_kubectl(kubeconfig, "create", "configmap", "x", check=False)
    assert refused.returncode != 0
    assert "protobuf" in refused.stderr

    deleted = await run_kubectl(kubeconfig, "delete", "archsearch", "digits-quick")
    assert "deleted" in deleted.stdout
    assert emulator.fetch_object("archsearch", "default", "digits-quick") is None
    assert emulator.errors == []


async def test_a_crd_created_through_the_api_is_served() -> None:
    crd = yaml.safe_load((REPO / "crds" / "architecturesearch.yaml").read_text())
    async with start_emulator(crds=()) as emulator:
        status, _ = await call(emulator, "GET", SEARCHES)
        assert status == 404
        status, created = await call(
            emulator, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd
        )
        assert status == 201
        conditions = {c["type"]: c["status"] for c in created["status"]["conditions"]}
        assert conditions["Established"] == "True"
        status, _ = await call(emulator, "POST", SEARCHES, copy.deepcopy(search()))
        assert status == 201
