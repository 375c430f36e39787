"""The ArchitectureSearch API as a real Kubernetes API server serves it.

The server is ``k8s.io/apiextensions-apiserver`` (the CRD half of kube-apiserver) built from
Debian's packages by ``scripts/kube-apiserver``, behind the routing proxy (``cluster``
fixture); with ``MLOPT_TEST_KUBECONFIG`` set, the same tests run against that cluster. What
cel-python and the emulator cannot say is said here: the CRD is accepted (defaults checked
against the schema and its CEL rules, CEL cost budgets), the server's own verdict on every spec
of the corpus, printer columns through the Table API, ``kubectl explain``, status pruning, and
``helm install``/``upgrade``.
"""

from __future__ import annotations

import asyncio
import copy
import os
import re
import types
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pytest
import yaml
from cluster import Cluster, KubeError, ensure_crd, ensure_namespace
from k8s import Kind, run_kubectl, tools_dir
from pydantic import BaseModel
from test_crd import INVALID, VALID, model_errors

from mloptimizer.loading import parse_search
from mloptimizer.status import ArchitectureSearchStatus

ROOT = Path(__file__).resolve().parent.parent
CRD_FILE = ROOT / "crds" / "architecturesearch.yaml"
CHART = ROOT / "charts" / "mloptimizer"
CHART_CRD = CHART / "crds" / "architecturesearch.yaml"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CRD_NAME = "architecturesearches.mloptimizer.io"


def search(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "mloptimizer.io/v1alpha1",
        "kind": "ArchitectureSearch",
        "metadata": {"name": name, "namespace": "default"},
        "spec": copy.deepcopy(spec),
    }


def unique(prefix: str = "s") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --- the CRD ---------------------------------------------------------------------------------


async def test_the_crd_and_the_charts_copy_are_accepted_and_established(cluster: Cluster) -> None:
    for path in (CRD_FILE, CHART_CRD):
        # the server's full verdict on this very file (a dry-run replace validates it all:
        # structural schema, defaults against the schema and its CEL rules, CEL cost)
        answer = await _stored_spec_of(cluster, path)
        assert answer["names"]["shortNames"] == ["archsearch"]
    stored = await ensure_crd(cluster, yaml.safe_load(CRD_FILE.read_text()))
    conditions = {c["type"]: c["status"] for c in stored["status"]["conditions"]}
    assert conditions["NamesAccepted"] == "True"
    assert conditions["Established"] == "True"
    assert stored["status"]["acceptedNames"]["shortNames"] == ["archsearch"]
    schema = stored["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    # a nested default is complete: the server checked it against the CEL rules beside it
    assert schema["properties"]["budget"]["default"]["maxTrials"] == 20
    assert "x-kubernetes-validations" in schema["properties"]["budget"]


async def test_the_crd_as_first_written_is_refused_by_the_real_server(cluster: Cluster) -> None:
    """The bug a real server found: nested defaults of ``{}`` fail the CEL rules beside them."""
    crd = yaml.safe_load(CRD_FILE.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["properties"]["budget"]["default"] = {}
    crd["metadata"]["name"] = CRD_NAME
    current = await cluster.get("customresourcedefinitions", None, CRD_NAME)
    assert current is not None
    crd["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
    with pytest.raises(KubeError) as refused:
        await cluster.request(
            "PUT", cluster.path("customresourcedefinitions", None, CRD_NAME), crd,
            params={"dryRun": "All"},
        )  # fmt: skip
    assert refused.value.status == 422
    assert "properties[budget].default" in str(refused.value)
    assert "no such key: parallelism" in str(refused.value)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
async def test_every_example_is_created_with_the_models_defaults(
    cluster: Cluster, path: Path
) -> None:
    document = yaml.safe_load(path.read_text())
    name = unique(path.stem)
    body = search(name, document["spec"])
    created = await cluster.create("archsearch", body)
    try:
        expected = parse_search(document).spec.model_dump(
            by_alias=True, exclude_none=True, mode="json"
        )
        assert created["spec"] == expected  # the server's defaults are the model's
    finally:
        await cluster.delete("archsearch", "default", name)


@pytest.mark.parametrize("spec", VALID, ids=range(len(VALID)))
async def test_every_valid_spec_of_the_corpus_is_accepted(
    cluster: Cluster, spec: dict[str, Any]
) -> None:
    await cluster.create("archsearch", search(unique(), spec), dry_run=True)


# What `mloptimizer validate` (pydantic) and the API server say for the checks of the schema
# itself, in their own words; the rules (CEL) give the same sentence on both sides.
_SAME_CHECK = [
    (r"required field is missing", r"Required value"),
    (r"unknown field", r"unknown field"),
    (r"duplicate value (\S+);", r"Duplicate value: {0}"),
    (r"valid (integer|boolean|string|number)", r"must be of type {0}"),
    (r"(greater than or equal to|less than or equal to|greater than|less than) (\S+)",
     r"should be {0} {1}"),
    (r"should match pattern '(.*)'", r"should match '{0}'"),
    (r"List should have (at most|at least) (\d+) item", r"{0} {1} items"),
]  # fmt: skip


def same_meaning(model: str, server: str) -> bool:
    """Whether a message of `mloptimizer validate` says what the API server's message says."""
    if model in server:  # a CEL rule: the same sentence
        return True
    for theirs, ours in _SAME_CHECK:
        found = re.search(theirs, model)
        if found:
            return ours.format(*found.groups()) in server
    allowed = re.fullmatch(r"Input should be (.*?)( \(.*\))?", model)
    if allowed:  # an enum: the same values
        values = set(re.findall(r"'([^']*)'|(-?\d+)", allowed.group(1)))
        listed = {a or b for a, b in values}
        return "supported values" in server and all(f'"{v}"' in server for v in listed)
    return False


def server_errors(error: KubeError) -> list[tuple[str, str]]:
    """(field path, message) of each cause; a strict-decoding refusal names its field."""
    causes = [(c.get("field") or "", c.get("message", "")) for c in error.causes]
    causes = [(f, m) for f, m in causes if f and f != "<nil>"]
    unknown = re.search(r'unknown field "([^"]+)"', error.body.get("message", ""))
    if unknown:
        causes.append((unknown.group(1), "unknown field"))
    return causes


@pytest.mark.parametrize(
    ("spec", "path"), [(s, p) for _, s, p in INVALID], ids=[why for why, _, _ in INVALID]
)
async def test_every_invalid_spec_is_refused_where_and_as_validate_says(
    cluster: Cluster, spec: dict[str, Any], path: str
) -> None:
    with pytest.raises(KubeError) as refused:
        # kubectl's default: unknown fields refused (fieldValidation=Strict)
        await cluster.request(
            "POST",
            cluster.path("archsearch", "default"),
            search(unique(), spec),
            params={"dryRun": "All", "fieldValidation": "Strict"},
        )
    assert refused.value.status in (400, 422)
    server = server_errors(refused.value)
    model = [(str(issue).split(": ", 1)) for issue in model_errors(spec)]
    assert any(f.startswith(path) for f, _ in server), server
    assert any(f.startswith(path) for f, _ in model), model
    # each error of `validate` is one the server gives at the same field, in the same sense
    for field, message in model:
        at_field = [m for f, m in server if f == field]
        assert at_field, f"the server names no error at {field}: {server}"
        assert any(same_meaning(message, m) for m in at_field), (field, message, at_field)


# --- kubectl ---------------------------------------------------------------------------------


async def test_kubectl_get_shows_the_printer_columns_and_explain_describes_every_field(
    cluster: Cluster,
) -> None:
    name = unique("columns")
    await cluster.create("archsearch", search(name, {"dataset": {"builtin": "digits"}}))
    try:
        status = {
            "phase": "Running",
            "progress": "3/20",
            "best": {"number": 2, "value": 0.9861},
            "workers": {"desired": 2, "ready": 2},
            "cost": {"usd": 0.42},
        }
        await cluster.patch("archsearch", "default", name, {"status": status}, subresource="status")
        listed = await run_kubectl(cluster.kubeconfig, "get", "archsearch", name, "-n", "default")
        header, row = listed.stdout.splitlines()
        assert header.split() == ["NAME", "PHASE", "TRIALS", "BEST", "WORKERS", "COST", "AGE"]
        assert row.split()[:6] == [name, "Running", "3/20", "0.9861", "2", "0.42"]
    finally:
        await cluster.delete("archsearch", "default", name)

    explained = await run_kubectl(
        cluster.kubeconfig, "explain", "archsearch.spec", "--recursive", timeout=120
    )
    text = explained.stdout
    assert "KIND:       ArchitectureSearch" in text
    for field in ("maxTrials", "parallelism", "nStartupTrials", "gpuPool", "brokerEndpoint"):
        assert re.search(rf"\b{field}\b", text), field
    budget = await run_kubectl(cluster.kubeconfig, "explain", "archsearch.spec.budget.maxTrials")
    assert "Trials to run in the exploration phase." in budget.stdout


async def test_kubectl_apply_checks_a_search_against_the_published_schema(
    cluster: Cluster, tmp_path: Path
) -> None:
    document = yaml.safe_load((ROOT / "examples" / "digits-quick.yaml").read_text())
    document["metadata"] = {"name": unique("applied"), "namespace": "default"}
    path = tmp_path / "search.yaml"

    async def apply(doc: dict[str, Any]) -> Any:
        path.write_text(yaml.safe_dump(doc))
        return await run_kubectl(cluster.kubeconfig, "apply", "-f", str(path), check=False)

    try:
        applied = await apply(document)  # kubectl's default: strict field validation
        assert applied.returncode == 0, applied.stderr
        assert "created" in applied.stdout
        wrong = copy.deepcopy(document)
        wrong["spec"]["budget"] = {"maxTrials": 2, "parallelism": 3}
        refused = await apply(wrong)
        assert refused.returncode != 0
        assert "spec.budget.parallelism" in refused.stderr
        assert "parallelism must not exceed maxTrials" in refused.stderr
        typo = copy.deepcopy(document)
        typo["spec"]["budgett"] = {"maxTrials": 3}
        refused = await apply(typo)
        assert refused.returncode != 0
        assert 'unknown field "spec.budgett"' in refused.stderr
    finally:
        await cluster.delete("archsearch", "default", document["metadata"]["name"])


# --- status ----------------------------------------------------------------------------------


def richest(annotation: Any) -> Any:
    """A value for ``annotation`` with every optional field and list filled in."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return richest(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return richest(next(a for a in get_args(annotation) if a is not type(None)))
    if origin is Literal:
        return get_args(annotation)[-1]
    if origin is list:
        return [richest(get_args(annotation)[0])]
    if origin is dict:
        value = get_args(annotation)[1]
        if value is Any:
            return {"family": "cnn", "blocks": [{"filters": 32, "kernel": 3}], "dropout": 0.25}
        return {"some-key": richest(value)}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {
            field.alias or name: richest(field.annotation)
            for name, field in annotation.model_fields.items()
        }
    return {int: 3, float: 0.625, bool: True, str: "2026-11-30T05:00:00Z"}[annotation]


async def test_every_status_field_the_operator_can_write_survives_the_real_server(
    cluster: Cluster,
) -> None:
    status = ArchitectureSearchStatus.model_validate(richest(ArchitectureSearchStatus))
    written = status.model_dump(by_alias=True, exclude_none=True, mode="json")
    assert written["pool"]["machines"][0]["drainStartedAt"]  # really every field
    name = unique("status")
    await cluster.create("archsearch", search(name, {"dataset": {"builtin": "digits"}}))
    try:
        await cluster.patch(
            "archsearch", "default", name, {"status": written}, subresource="status"
        )
        stored = await cluster.get("archsearch", "default", name)
    finally:
        await cluster.delete("archsearch", "default", name)
    assert stored is not None
    assert stored["status"] == written  # nothing pruned, nothing changed


async def test_a_status_field_the_schema_lacks_is_pruned_and_the_proxy_notices(
    cluster: Cluster,
) -> None:
    """The check every end-to-end test relies on (``cluster`` fixture) can fail."""
    if cluster.emulator is None:
        pytest.skip("the pruning check lives in the routing proxy")
    name = unique("pruned")
    await cluster.create("archsearch", search(name, {"dataset": {"builtin": "digits"}}))
    proxy = cluster.proxy
    try:
        patch = {"status": {"phase": "Running", "notInTheSchema": {"x": 1}}}
        stored = await cluster.patch("archsearch", "default", name, patch, subresource="status")
    finally:
        await cluster.delete("archsearch", "default", name)
    assert "notInTheSchema" not in stored["status"]
    assert proxy.pruned == [f"architecturesearches/{name}: status.notInTheSchema"]
    proxy.pruned.clear()


# --- helm ------------------------------------------------------------------------------------

# The chart's kinds the emulator does not serve from the start.
CHART_KINDS = (
    Kind("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
    Kind("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False),
    Kind("rbac.authorization.k8s.io", "v1", "roles", "Role"),
    Kind("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
    Kind("apps", "v1", "statefulsets", "StatefulSet", subresources=frozenset({"status", "scale"})),
    Kind("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy"),
)


def helm_runner(home: Path, kubeconfig: Path, releases: str) -> Callable[..., Awaitable[str]]:
    """``await helm(*args)``: helm without blocking the loop that serves the proxy and the
    emulator; returns its stdout, fails the test with its output on a non-zero exit.

    Releases are kept in the PostgreSQL database ``releases`` (helm's SQL driver): helm
    writes its release Secrets as protobuf, which the emulator does not read.
    """
    env = {
        **os.environ,
        "HELM_DRIVER": "sql",
        "HELM_DRIVER_SQL_CONNECTION_STRING": f"{releases}?sslmode=disable",
        "KUBECONFIG": str(kubeconfig),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_DATA_HOME": str(home / "data"),
    }

    async def helm(*args: str) -> str:
        process = await asyncio.create_subprocess_exec(
            str(tools_dir("helm") / "helm"), *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=home,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 180)
        assert process.returncode == 0, f"helm {' '.join(args)}:\n{out.decode()}{err.decode()}"
        return out.decode()

    return helm


async def test_helm_installs_and_upgrades_the_chart_with_its_crd_on_the_real_server(
    cluster: Cluster, tmp_path: Path, postgres_dsn: str
) -> None:
    if cluster.emulator is not None:
        for kind in CHART_KINDS:
            cluster.emulator.register(kind)
    # helm installs the CRD only where it is missing: start without it
    await cluster.delete("customresourcedefinitions", None, CRD_NAME)
    await cluster.wait_for("customresourcedefinitions", None, CRD_NAME, lambda o: o is None, 60)
    namespace = "mloptimizer-system"
    await ensure_namespace(cluster, namespace)
    release = unique("mlopt")
    helm = helm_runner(tmp_path, cluster.kubeconfig, postgres_dsn)
    common = ("--namespace", namespace, "--wait=hookOnly", "--timeout", "2m")
    try:
        await helm("install", release, str(CHART), *common)
        crd = await cluster.wait_for(
            "customresourcedefinitions", None, CRD_NAME,
            lambda o: any(c["type"] == "Established" and c["status"] == "True"
                          for c in ((o or {}).get("status") or {}).get("conditions") or []),
            timeout=60,
        )  # fmt: skip
        assert crd is not None
        assert crd["spec"] == (await _stored_spec_of(cluster, CHART_CRD))
        operator = await cluster.get("deployments", namespace, f"{release}-mloptimizer-operator")
        assert operator is not None
        await helm("upgrade", release, str(CHART), *common,
            "--set", "operator.statusInterval=2",
        )  # fmt: skip
        upgraded = await cluster.get("deployments", namespace, f"{release}-mloptimizer-operator")
        assert upgraded is not None
        env = {e["name"]: e.get("value") for e in
               upgraded["spec"]["template"]["spec"]["containers"][0]["env"]}  # fmt: skip
        assert env["MLOPT_STATUS_INTERVAL"] == "2"
        history = await helm("history", release, "--namespace", namespace)
        assert "deployed" in history.splitlines()[-1]
        assert len(history.strip().splitlines()) == 3  # header, install, upgrade
        # the CRD is usable: a search is accepted by the server helm installed it on
        name = unique("after-helm")
        await cluster.create("archsearch", search(name, {"dataset": {"builtin": "digits"}}))
        await cluster.delete("archsearch", "default", name)
    finally:
        await helm("uninstall", release, "--namespace", namespace)


async def _stored_spec_of(cluster: Cluster, path: Path) -> dict[str, Any]:
    """The spec the server stores for the CRD file (defaults filled in), by a dry run."""
    body = yaml.safe_load(path.read_text())
    body["metadata"]["name"] = CRD_NAME
    stored = await cluster.get("customresourcedefinitions", None, CRD_NAME)
    assert stored is not None
    dry = copy.deepcopy(body)
    dry["metadata"]["resourceVersion"] = stored["metadata"]["resourceVersion"]
    answer = await cluster.request(
        "PUT", cluster.path("customresourcedefinitions", None, CRD_NAME), dry,
        params={"dryRun": "All"},
    )  # fmt: skip
    spec: dict[str, Any] = answer["spec"]
    return spec
