"""Least privilege, proven: the Kubernetes calls the operator's code makes, against the
RBAC the chart renders, for every values file — no grant unused, none missing.

The code's calls are read from the source (every ``kubernetes`` client method called or
handed to a thread in ``operator/``, by verb and resource); kopf's own calls are listed
below with why. A new call without its grant, or a grant no call uses, fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_chart import CHART, Helm, Manifests, find, helm  # noqa: F401 (the fixture)

ROOT = Path(__file__).resolve().parent.parent

Grant = tuple[str, str, str]  # (apiGroup, resource, verb)

_CALL = re.compile(
    r"(?:\bcore|\bcustom|\bapps|\bbatch|\bnetworking|\bapi|Api\([^)]*\))\."
    r"(read|list|create|patch|delete|replace)_(?:namespaced_|cluster_)?(\w+?)\b(?!_)"
)
_VERB = {
    "read": "get",
    "list": "list",
    "create": "create",
    "patch": "patch",
    "delete": "delete",
    "replace": "update",
}
_RESOURCE = {
    "secret": ("", "secrets"),
    "event": ("", "events"),
    "pod": ("", "pods"),
    "node": ("", "nodes"),
    "persistent_volume_claim": ("", "persistentvolumeclaims"),
    "network_policy": ("networking.k8s.io", "networkpolicies"),
    "deployment": ("apps", "deployments"),
    "job": ("batch", "jobs"),
    "deployment_scale": ("apps", "deployments/scale"),
    "deployment_status": ("apps", "deployments/status"),
    "custom_object": ("mloptimizer.io", "architecturesearches"),
    "custom_object_status": ("mloptimizer.io", "architecturesearches/status"),
}
# Only GPU pools make these calls (rented Nodes, and the trainer Pods drained off them).
POOL_ONLY = {("", "nodes", "get"), ("", "nodes", "patch"), ("", "nodes", "delete"),
             ("", "pods", "delete")}  # fmt: skip

# What kopf itself calls, and the one grant an admission plugin needs.
KOPF: set[Grant] = {
    ("mloptimizer.io", "architecturesearches", "list"),  # the initial listing
    ("mloptimizer.io", "architecturesearches", "watch"),  # then the watch
    ("mloptimizer.io", "architecturesearches", "patch"),  # finalizers, progress annotations
    ("mloptimizer.io", "architecturesearches/status", "patch"),  # handler results
    ("", "events", "create"),  # kopf.event / kopf.warn
    ("apiextensions.k8s.io", "customresourcedefinitions", "get"),  # resource discovery
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    # OwnerReferencesPermissionEnforcement: kopf.adopt sets blockOwnerDeletion on children
    ("mloptimizer.io", "architecturesearches/finalizers", "update"),
}
CLUSTER_WIDE: set[Grant] = {("", "namespaces", "list"), ("", "namespaces", "watch")}
PEERING = {"clusterkopfpeerings", "kopfpeerings"}


def code_calls() -> set[Grant]:
    """Every (group, resource, verb) the operator's modules call."""
    found: set[Grant] = set()
    for path in sorted((ROOT / "operator").glob("*.py")):
        for verb, resource in _CALL.findall(path.read_text()):
            assert resource in _RESOURCE, f"{path.name}: {verb}_{resource}: add it to _RESOURCE"
            group, plural = _RESOURCE[resource]
            found.add((group, plural, _VERB[verb]))
    return found


def test_the_source_scan_finds_the_calls_it_should() -> None:
    calls = code_calls()
    assert ("", "secrets", "create") in calls  # each search's broker Secret
    assert ("apps", "deployments/scale", "patch") in calls  # scaling trainers
    assert ("", "nodes", "delete") in calls  # a destroyed machine's Node
    assert ("apps", "deployments", "get") in calls  # ownership read before acting
    assert ("networking.k8s.io", "networkpolicies", "create") in calls  # trainers' policy
    assert ("", "persistentvolumeclaims", "get") in calls  # a claim's opt-in label
    assert ("batch", "jobs", "create") in calls  # a claim's verify Job
    assert ("", "pods", "list") in calls  # its termination message
    assert ("", "pods", "patch") in calls  # busy trainers' deletion cost


def operator_grants(docs: Manifests) -> set[Grant]:
    grants: set[Grant] = set()
    for kind in ("ClusterRole", "Role"):
        for role in find(docs, kind):
            for rule in role["rules"]:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        if resource in PEERING:
                            continue  # kopf peering, checked below
                        grants |= {(group, resource, verb) for verb in rule["verbs"]}
    return grants


VALUES = [None, *sorted((CHART / "ci").glob("*.yaml"))]


@pytest.mark.parametrize("values", VALUES, ids=lambda v: v.name if v else "values.yaml")
@pytest.mark.parametrize("pools", [False, True], ids=["pools-off", "pools-on"])
def test_every_grant_is_a_call_and_every_call_is_granted(
    helm: Helm,  # noqa: F811
    values: Path | None,
    pools: bool,
) -> None:
    args = ["-f", str(values)] if values else []
    args += ["--set", f"vastai.enabled={str(pools).lower()}"]
    docs = helm.template(*args)
    grants = operator_grants(docs)
    cluster_wide = not find(docs, "Role")
    needed = KOPF | code_calls()
    if not pools:
        needed -= POOL_ONLY
    if cluster_wide:
        needed |= CLUSTER_WIDE
    assert grants - needed == set(), "granted but never called"
    assert needed - grants == set(), "called but not granted"
