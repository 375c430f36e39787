"""The Helm chart, with the real helm: lint, render, validate every manifest against the
Kubernetes 1.34 schemas, the values schema refusing bad values, least-privilege RBAC in both
modes, the NetworkPolicies and the generated Secrets."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from k8s import tools_dir

from mloptimizer.operator.builders import trainer_labels

ROOT = Path(__file__).parent.parent
CHART = ROOT / "charts" / "mloptimizer"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE, NAMESPACE = "mlopt", "mloptimizer-system"
TRAINER_NAME = trainer_labels("any")["app.kubernetes.io/name"]

Manifests = list[dict[str, Any]]


class Helm:
    """helm with its own config, cache and data folders; renders are cached."""

    def __init__(self, binary: Path, home: Path) -> None:
        self.binary = binary
        self.env = {
            **os.environ,
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_DATA_HOME": str(home / "data"),
        }
        self._renders: dict[tuple[str, ...], Manifests] = {}

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.binary), *args],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=CHART,  # not the repo root: its folders shadow modules
            timeout=60,
            check=False,
        )

    def template(self, *args: str) -> Manifests:
        """The rendered documents (CRDs included), or a test failure with helm's error."""
        if args not in self._renders:
            done = self.run(
                "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--include-crds", *args
            )
            assert done.returncode == 0, done.stderr
            self._renders[args] = [d for d in yaml.safe_load_all(done.stdout) if d]
        return self._renders[args]

    def refused(self, *args: str) -> str:
        """helm template's error for values it must refuse."""
        done = self.run("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
        assert done.returncode != 0, f"helm accepted {args}"
        return done.stderr


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(tools_dir("helm") / "helm", tmp_path_factory.mktemp("helm-home"))


def ci_id(path: Path | None) -> str:
    return "default" if path is None else path.name


def values_args(path: Path | None) -> tuple[str, ...]:
    return () if path is None else ("-f", str(path))


def find(docs: Manifests, kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: Manifests, kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}: {[d['metadata'] for d in found]}"
    return found[0]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def env_of(workload: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(workload)["env"]}


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"]["labels"])


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # no matchExpressions in this chart
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def secret_text(secret: dict[str, Any], key: str) -> str:
    return base64.b64decode(secret["data"][key]).decode()


# --- chart metadata, lint, schema validation of every manifest ----------------------------


def test_chart_metadata_and_the_ci_values_files() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert (chart["apiVersion"], chart["name"]) == ("v2", "mloptimizer")
    assert (chart["version"], chart["appVersion"]) == ("0.1.0", "0.1.0")
    assert [p.name for p in CI_VALUES] == [
        "dashboard-on-values.yaml",
        "external-broker-values.yaml",
        "external-database-values.yaml",
        "single-namespace-values.yaml",
    ]
    assert (CHART / ".helmignore").is_file()
    assert (CHART / "templates" / "NOTES.txt").is_file()


def test_chart_crd_is_the_repository_crd_byte_for_byte() -> None:
    chart_crd = CHART / "crds" / "architecturesearch.yaml"
    assert chart_crd.read_bytes() == (ROOT / "crds" / "architecturesearch.yaml").read_bytes(), (
        "charts/mloptimizer/crds/architecturesearch.yaml drifted from crds/: "
        "cp crds/architecturesearch.yaml charts/mloptimizer/crds/"
    )


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=ci_id)
def test_helm_lint_strict(helm: Helm, values: Path | None) -> None:
    done = helm.run("lint", "--strict", str(CHART), *values_args(values))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=ci_id)
def test_every_rendered_manifest_is_valid_for_kubernetes_1_34(
    helm: Helm, values: Path | None
) -> None:
    docs = helm.template(*values_args(values))
    for doc in docs:
        kubernetes_validate.validate(doc, "1.34.0", strict=True)
    kinds = {d["kind"] for d in docs}
    assert {"CustomResourceDefinition", "Deployment", "ServiceAccount"} <= kinds
    crd = one(docs, "CustomResourceDefinition")
    assert crd["metadata"]["name"] == "architecturesearches.mloptimizer.io"
    for doc in docs:  # namespaced objects land in the release namespace (or a watched one)
        namespace = doc["metadata"].get("namespace")
        if doc["kind"] in {"Role", "RoleBinding"} or doc["metadata"]["name"].endswith("-trainers"):
            assert namespace == "team-a"
        elif doc["kind"] not in {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}:
            assert namespace == NAMESPACE, doc["metadata"]


def test_the_values_file_is_commented_and_satisfies_a_closed_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.validate(values, schema)

    def closed(node: dict[str, Any], where: str) -> None:
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{where} is open"
            assert node.get("type") == "object", where
            for key, child in node["properties"].items():
                closed(child, f"{where}.{key}")
        if isinstance(node.get("items"), dict):
            closed(node["items"], f"{where}[]")

    closed(schema, "values")
    lines = (CHART / "values.yaml").read_text().splitlines()

    def indent(line: str) -> int:
        return len(line) - len(line.lstrip())

    def documented(i: int) -> bool:
        """A comment right above the key, or above a parent key (resources: requests: cpu)."""
        if lines[i - 1].strip().startswith("#"):
            return True
        parents = [j for j in range(i) if lines[j].strip() and indent(lines[j]) < indent(lines[i])]
        parents = [j for j in parents if not lines[j].strip().startswith("#")]
        return bool(parents) and documented(parents[-1])

    leaves = 0
    for i, line in enumerate(lines):
        key = re.match(r"^\s*([A-Za-z][A-Za-z0-9]*):(.*)$", line)
        if key and key.group(2).strip():
            leaves += 1
            assert documented(i), f"values.yaml:{i + 1} {line.strip()} has no comment"
    assert leaves > 40


# --- values the schema (or a template) refuses --------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "operator.replicaz=1"), "additional properties 'replicaz' not allowed"),
        (("--set", "rabbitmq.persistance.size=1Gi"), "additional properties 'persistance'"),
        (("--set", "operator.replicas=-1"), "/operator/replicas"),
        (("--set", "operator.replicas=2"), "/operator/peering/enabled"),
        (("--set", "rabbitmq.consumerTimeoutMs=0"), "/rabbitmq/consumerTimeoutMs"),
        (("--set", "operator.image.pullPolicy=Sometimes"), "/operator/image/pullPolicy"),
        (("--set", "operator.watchNamespaces[0]=Team_A"), "/operator/watchNamespaces/0"),
        (("--set", "rabbitmq.enabled=false"), "externalBroker.existingSecret is required"),
        (("--set", "postgresql.enabled=false"), "externalDatabase.existingSecret is required"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(
    helm: Helm, args: tuple[str, ...], message: str
) -> None:
    assert message in helm.refused(*args)


def test_more_replicas_are_accepted_with_peering_and_get_its_rbac(helm: Helm) -> None:
    on = ("--set", "operator.replicas=2", "--set", "operator.peering.enabled=true")
    docs = helm.template(*on)
    operator = one(docs, "Deployment", f"{RELEASE}-mloptimizer-operator")
    assert operator["spec"]["replicas"] == 2
    assert env_of(operator)["MLOPT_PEERING"] == "mloptimizer"
    rules = one(docs, "ClusterRole")["rules"]
    assert {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings"],
            "verbs": ["get", "list", "watch", "patch"]} in rules  # fmt: skip

    docs = helm.template(*on, "--set", "operator.watchNamespaces={team-a}")
    role = one(docs, "Role")
    assert any(r["resources"] == ["kopfpeerings"] for r in role["rules"])
    assert not any("kopf.dev" in r["apiGroups"] for r in one(docs, "ClusterRole")["rules"])

    docs = helm.template()  # standalone: no peering access, no env
    assert "MLOPT_PEERING" not in env_of(one(docs, "Deployment", f"{RELEASE}-mloptimizer-operator"))
    assert not any("kopf.dev" in r["apiGroups"] for r in one(docs, "ClusterRole")["rules"])


# --- the operator -----------------------------------------------------------------------


def test_operator_deployment_runs_hardened_with_probes_ports_and_env_from_secrets(
    helm: Helm,
) -> None:
    docs = helm.template()
    operator = one(docs, "Deployment", f"{RELEASE}-mloptimizer-operator")
    assert operator["spec"]["replicas"] == 1
    pod = operator["spec"]["template"]["spec"]
    main = container(operator)
    assert main["image"] == "ghcr.io/mloptimizer/operator:0.1.0"
    assert main["args"] == ["operator"]
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    security = main["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"name": "tmp", "mountPath": "/tmp"} in main["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports == {"health": 8080, "metrics": 9090}
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert main["resources"]["requests"]
    assert main["resources"]["limits"]

    env = env_of(operator)
    assert env["MLOPT_DATABASE_URL"] == {
        "secretKeyRef": {"name": f"{RELEASE}-mloptimizer-postgresql", "key": "url"}
    }
    assert env["MLOPT_BROKER_URL"] == {
        "secretKeyRef": {"name": f"{RELEASE}-mloptimizer-rabbitmq", "key": "url"}
    }
    assert env["MLOPT_NAMESPACES"] == ""
    assert (env["MLOPT_LIVENESS_PORT"], env["MLOPT_METRICS_PORT"]) == ("8080", "9090")
    assert env["MLOPT_QUEUE_PREFIX"] == "mlopt"
    assert (env["MLOPT_STATUS_INTERVAL"], env["MLOPT_TRIAL_SILENCE_TIMEOUT"]) == ("1", "3600")
    assert env["MLOPT_VASTAI_URL"] == "https://console.vast.ai"
    assert env["MLOPT_ORPHAN_SWEEP_INTERVAL"] == "600"
    assert env["MLOPT_VERIFY_IMAGE"] == main["image"]  # a claim's verify Job: its own image
    assert "MLOPT_VASTAI_API_KEY" not in env
    swept = helm.template(
        "--set", "vastai.sweepApiKeySecret.name=vastai", "--set", "vastai.sweepApiKeySecret.key=k"
    )
    assert env_of(one(swept, "Deployment", f"{RELEASE}-mloptimizer-operator"))[
        "MLOPT_VASTAI_API_KEY"
    ] == {"secretKeyRef": {"name": "vastai", "key": "k"}}

    service = one(docs, "Service", f"{RELEASE}-mloptimizer-metrics")
    assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(operator))
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
    ]


def test_cluster_wide_mode_uses_one_cluster_role_with_what_kopf_and_the_operator_need(
    helm: Helm,
) -> None:
    docs = helm.template("--set", "vastai.enabled=true")
    assert not find(docs, "Role")
    assert not find(docs, "RoleBinding")
    role = one(docs, "ClusterRole")
    grants = {
        (group, resource): set(rule["verbs"])
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert grants["mloptimizer.io", "architecturesearches"] == {"list", "watch", "patch"}
    assert grants["mloptimizer.io", "architecturesearches/status"] == {"patch"}
    assert grants["mloptimizer.io", "architecturesearches/finalizers"] == {"update"}
    # read before acting: a Deployment is acted on only when the search owns it
    assert grants["apps", "deployments"] == {"get", "create", "patch", "delete"}
    assert grants["apps", "deployments/scale"] == {"patch"}
    assert grants["networking.k8s.io", "networkpolicies"] == {"get", "create", "patch", "delete"}
    assert grants["", "persistentvolumeclaims"] == {"get"}  # a claim's opt-in label
    assert grants["apps", "deployments/status"] == {"get"}
    assert grants["", "secrets"] == {"get", "create", "delete"}  # no list/watch of Secrets
    assert grants["", "events"] == {"create"}
    assert grants["apiextensions.k8s.io", "customresourcedefinitions"] == {"get", "list", "watch"}
    assert grants["", "namespaces"] == {"list", "watch"}
    assert grants["", "nodes"] == {"get", "patch", "delete"}  # GPU pools' rented nodes
    assert grants["", "pods"] == {"list", "patch", "delete"}  # drained before a machine goes
    assert grants["batch", "jobs"] == {"get", "create"}  # a claim's verify Job
    assert not any("*" in rule["verbs"] or "*" in rule["resources"] for rule in role["rules"])
    without_pools = one(helm.template(), "ClusterRole")  # pools are off by default
    resources = {r for rule in without_pools["rules"] for r in rule["resources"]}
    assert "nodes" not in resources
    # pods are listed (the verify Job's termination message) and annotated (deletion cost
    # of busy trainers), never deleted
    assert [rule["verbs"] for rule in without_pools["rules"] if "pods" in rule["resources"]] == [
        ["list", "patch"]
    ]
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": f"{RELEASE}-mloptimizer", "namespace": NAMESPACE}
    ]


def test_single_namespace_mode_grants_secrets_only_in_the_watched_namespace(helm: Helm) -> None:
    docs = helm.template("-f", str(CHART / "ci" / "single-namespace-values.yaml"))
    operator = one(docs, "Deployment", f"{RELEASE}-mloptimizer-operator")
    assert env_of(operator)["MLOPT_NAMESPACES"] == "team-a"

    cluster_role = one(docs, "ClusterRole")
    assert cluster_role["rules"] == [
        {
            "apiGroups": ["apiextensions.k8s.io"],
            "resources": ["customresourcedefinitions"],
            "verbs": ["get", "list", "watch"],
        },
    ]
    role = one(docs, "Role")
    assert role["metadata"]["namespace"] == "team-a"
    secrets = [r for r in role["rules"] if "secrets" in r["resources"]]
    assert secrets == [{"apiGroups": [""], "resources": ["secrets"],
                        "verbs": ["get", "create", "delete"]}]  # fmt: skip
    assert not any("namespaces" in r["resources"] for r in role["rules"])
    binding = one(docs, "RoleBinding")
    assert binding["metadata"]["namespace"] == "team-a"
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"][0]["namespace"] == NAMESPACE

    two = helm.template("--set", "operator.watchNamespaces={team-a,team-b}")
    assert sorted(r["metadata"]["namespace"] for r in find(two, "Role")) == ["team-a", "team-b"]
    assert (
        env_of(one(two, "Deployment", f"{RELEASE}-mloptimizer-operator"))["MLOPT_NAMESPACES"]
        == "team-a,team-b"
    )


# --- RabbitMQ, PostgreSQL, the dashboard ------------------------------------------------------


def test_rabbitmq_runs_the_official_image_with_a_long_consumer_timeout_and_a_volume(
    helm: Helm,
) -> None:
    docs = helm.template()
    name = f"{RELEASE}-mloptimizer-rabbitmq"
    config = one(docs, "ConfigMap", name)["data"]["20-mloptimizer.conf"]
    assert re.search(r"^consumer_timeout = 86400000$", config, re.M), config
    # twice the message contract's body limit: no search pushes more into the operator
    from mloptimizer.messages import MAX_BODY_BYTES

    (limit,) = re.findall(r"^max_message_size = (\d+)$", config, re.M)
    assert int(limit) == 524288 == 2 * MAX_BODY_BYTES
    broker = one(docs, "StatefulSet", name)
    main = container(broker)
    assert main["image"] == "rabbitmq:4.1-management"
    assert {
        "name": "config",
        "mountPath": "/etc/rabbitmq/conf.d/20-mloptimizer.conf",
        "subPath": "20-mloptimizer.conf",
        "readOnly": True,
    } in main["volumeMounts"]
    assert {"name": "data", "mountPath": "/var/lib/rabbitmq"} in main["volumeMounts"]
    claim = broker["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert "storageClassName" not in claim["spec"]
    assert env_of(broker)["RABBITMQ_DEFAULT_PASS"] == {
        "secretKeyRef": {"name": name, "key": "password"}
    }
    service = one(docs, "Service", name)
    assert {(p["name"], p["port"]) for p in service["spec"]["ports"]} == {
        ("amqp", 5672),
        ("management", 15672),
    }
    assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(broker))

    docs = helm.template(
        "--set", "rabbitmq.consumerTimeoutMs=172800000",
        "--set", "rabbitmq.persistence.storageClass=fast",
        "--set", "rabbitmq.persistence.size=20Gi",
    )  # fmt: skip
    config = one(docs, "ConfigMap", name)["data"]["20-mloptimizer.conf"]
    assert "consumer_timeout = 172800000" in config
    claim = one(docs, "StatefulSet", name)["spec"]["volumeClaimTemplates"][0]["spec"]
    assert (claim["storageClassName"], claim["resources"]["requests"]["storage"]) == (
        "fast",
        "20Gi",
    )


def test_postgresql_runs_postgres_17_with_a_volume_and_its_url_in_a_secret(helm: Helm) -> None:
    docs = helm.template()
    name = f"{RELEASE}-mloptimizer-postgresql"
    database = one(docs, "StatefulSet", name)
    assert container(database)["image"] == "postgres:17"
    assert database["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert env_of(database)["POSTGRES_PASSWORD"] == {
        "secretKeyRef": {"name": name, "key": "password"}
    }
    assert one(docs, "Service", name)["spec"]["ports"][0]["port"] == 5432


def test_generated_credentials_live_in_secrets_never_in_values_or_plain_env(helm: Helm) -> None:
    values = (CHART / "values.yaml").read_text()
    assert not re.search(r"^\s*(password|pass|url|dsn)\s*:", values, re.M | re.I)
    docs = helm.template()
    broker = one(docs, "Secret", f"{RELEASE}-mloptimizer-rabbitmq")
    database = one(docs, "Secret", f"{RELEASE}-mloptimizer-postgresql")
    for secret in (broker, database):
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        password = secret_text(secret, "password")
        assert re.fullmatch(r"[A-Za-z0-9]{32}", password)
        assert f":{password}@" in secret_text(secret, "url")
    assert secret_text(broker, "url").startswith("amqp://mloptimizer:")
    assert secret_text(broker, "url").endswith(
        f"@{RELEASE}-mloptimizer-rabbitmq.{NAMESPACE}.svc:5672/%2F"
    )
    assert secret_text(database, "url").endswith(
        f"@{RELEASE}-mloptimizer-postgresql.{NAMESPACE}.svc:5432/mloptimizer"
    )
    # a fresh install draws new passwords; an upgrade keeps the stored ones (lookup)
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    assert 'lookup "v1" "Secret"' in helpers
    assert "randAlphaNum" in helpers
    for doc in docs:
        if doc["kind"] in {"Deployment", "StatefulSet"}:
            for var in container(doc).get("env", []):
                # no URL with credentials (user:password@) in plain env
                credentials = re.search(r"://[^/\s]*@", str(var.get("value", "")))
                assert not credentials, (doc["metadata"]["name"], var)


@pytest.mark.parametrize(
    ("values", "absent", "secret"),
    [
        ("external-database-values.yaml", "postgresql", ("MLOPT_DATABASE_URL", "studies-db")),
        ("external-broker-values.yaml", "rabbitmq", ("MLOPT_BROKER_URL", "amqp")),
    ],
)
def test_external_services_replace_the_bundled_ones(
    helm: Helm, values: str, absent: str, secret: tuple[str, str]
) -> None:
    docs = helm.template("-f", str(CHART / "ci" / values))
    assert not find(docs, "StatefulSet", f"{RELEASE}-mloptimizer-{absent}")
    assert not find(docs, "Secret", f"{RELEASE}-mloptimizer-{absent}")
    assert not find(docs, "NetworkPolicy", f"{RELEASE}-mloptimizer-{absent}")
    env = env_of(one(docs, "Deployment", f"{RELEASE}-mloptimizer-operator"))
    variable, name = secret
    assert env[variable] == {"secretKeyRef": {"name": name, "key": "url"}}


def test_dashboard_is_off_by_default_and_reads_the_study_url_from_the_secret(helm: Helm) -> None:
    assert not find(helm.template(), "Deployment", f"{RELEASE}-mloptimizer-dashboard")
    docs = helm.template("-f", str(CHART / "ci" / "dashboard-on-values.yaml"))
    name = f"{RELEASE}-mloptimizer-dashboard"
    dashboard = one(docs, "Deployment", name)
    main = container(dashboard)
    assert main["image"].startswith("ghcr.io/optuna/optuna-dashboard:")
    # the database URL is read from the variable inside the process, never put in argv
    assert main["command"] == ["python", "-c"]
    (code,) = main["args"]
    assert "os.environ['OPTUNA_STORAGE']" in code
    assert "$(OPTUNA_STORAGE)" not in json.dumps(main)
    assert env_of(dashboard)["DASHBOARD_PORT"] == "8080"
    assert env_of(dashboard)["OPTUNA_STORAGE"] == {
        "secretKeyRef": {"name": f"{RELEASE}-mloptimizer-postgresql", "key": "url"}
    }
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    service = one(docs, "Service", name)
    assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(dashboard))

    done = helm.run(
        "install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE,
        "-f", str(CHART / "ci" / "dashboard-on-values.yaml"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    notes = done.stdout.split("NOTES:", 1)[1]
    assert "kubectl apply -f examples/digits-quick.yaml" in notes
    assert "kubectl get archsearch -A -w" in notes
    assert f"port-forward svc/{name} 8080:8080" in notes


# --- NetworkPolicies --------------------------------------------------------------------


def ingress_peers(
    policy: dict[str, Any], index: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rule = policy["spec"]["ingress"][index]
    return rule["from"], rule["ports"]


def test_network_policies_admit_only_the_operator_trainers_and_dashboard(helm: Helm) -> None:
    docs = helm.template("-f", str(CHART / "ci" / "dashboard-on-values.yaml"))
    operator = pod_labels(one(docs, "Deployment", f"{RELEASE}-mloptimizer-operator"))
    dashboard = pod_labels(one(docs, "Deployment", f"{RELEASE}-mloptimizer-dashboard"))
    trainer = trainer_labels("digits-quick")
    broker_pod = pod_labels(one(docs, "StatefulSet", f"{RELEASE}-mloptimizer-rabbitmq"))
    database_pod = pod_labels(one(docs, "StatefulSet", f"{RELEASE}-mloptimizer-postgresql"))

    broker = one(docs, "NetworkPolicy", f"{RELEASE}-mloptimizer-rabbitmq")
    assert broker["spec"]["policyTypes"] == ["Ingress"]
    assert selects(broker["spec"]["podSelector"], broker_pod)
    assert not selects(broker["spec"]["podSelector"], database_pod)
    peers, ports = ingress_peers(broker)
    assert ports == [{"protocol": "TCP", "port": 5672}]
    same_namespace = [p for p in peers if "namespaceSelector" not in p]
    any_namespace = [p for p in peers if "namespaceSelector" in p]
    assert [selects(p["podSelector"], operator) for p in same_namespace] == [True]
    assert not selects(same_namespace[0]["podSelector"], trainer)
    # cluster-wide: the trainer label counts only in namespaces labelled for searches
    assert [p["namespaceSelector"] for p in any_namespace] == [
        {"matchLabels": {"mloptimizer.io/searches": "enabled"}}
    ]
    assert any_namespace[0]["podSelector"] == {
        "matchLabels": {"app.kubernetes.io/name": TRAINER_NAME}
    }
    assert selects(any_namespace[0]["podSelector"], trainer)
    assert not selects(any_namespace[0]["podSelector"], dashboard)
    assert len(broker["spec"]["ingress"]) == 2
    peers, ports = ingress_peers(broker, 1)  # the management API: the operator only
    assert ports == [{"protocol": "TCP", "port": 15672}]
    assert [selects(p["podSelector"], operator) for p in peers] == [True]
    assert not any(selects(p["podSelector"], trainer) for p in peers)

    database = one(docs, "NetworkPolicy", f"{RELEASE}-mloptimizer-postgresql")
    assert selects(database["spec"]["podSelector"], database_pod)
    peers, ports = ingress_peers(database)
    assert ports == [{"protocol": "TCP", "port": 5432}]
    assert all("namespaceSelector" not in p for p in peers)
    admitted = [labels for labels in (operator, dashboard, trainer, broker_pod)
                if any(selects(p["podSelector"], labels) for p in peers)]  # fmt: skip
    assert admitted == [operator, dashboard]

    namespaced = helm.template("-f", str(CHART / "ci" / "single-namespace-values.yaml"))
    peers, _ = ingress_peers(one(namespaced, "NetworkPolicy", f"{RELEASE}-mloptimizer-rabbitmq"))
    (trainers,) = [p for p in peers if "namespaceSelector" in p]
    assert trainers["namespaceSelector"] == {
        "matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a"]}
        ]
    }

    assert not find(helm.template("--set", "networkPolicy.enabled=false"), "NetworkPolicy")


def test_every_pod_but_the_operator_runs_without_a_service_account_token(helm: Helm) -> None:
    docs = helm.template("-f", str(CHART / "ci" / "dashboard-on-values.yaml"))
    for workload in find(docs, "Deployment") + find(docs, "StatefulSet"):
        spec = workload["spec"]["template"]["spec"]
        is_operator = workload["metadata"]["name"].endswith("-operator")
        assert spec["automountServiceAccountToken"] is is_operator, workload["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert container(workload)["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_the_kind_demo_script_parses_and_its_helm_settings_render(helm: Helm) -> None:
    script = ROOT / "scripts" / "kind-demo"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    text = script.read_text()
    for used in (
        "scripts/images",
        "charts/mloptimizer",
        "examples/digits-quick.yaml",
    ):
        assert used in text
        assert (ROOT / used).exists(), used
    sets = re.findall(r"--set ([\w.]+)=", text)
    assert sets
    rendered = helm.template(*[arg for key in sets for arg in ("--set", f"{key}=x")])
    operator = next(
        d for d in rendered if d["kind"] == "Deployment" and "operator" in d["metadata"]["name"]
    )
    assert operator["spec"]["template"]["spec"]["containers"][0]["image"] == "x:x"
    # the trainer image the script loads is the one the example's CPU trainers use by default
    from mloptimizer.loading import load_search
    from mloptimizer.spec import RELEASE

    example = load_search(ROOT / "examples" / "digits-quick.yaml").spec.workers.trainer_image
    assert f'TRAINER_IMAGE="{example.replace(RELEASE, "${VERSION}")}"' in text
    assert f'VERSION="{RELEASE}"' in text


def test_trainer_policies_are_the_operators_and_it_is_told_what_trainers_reach(
    helm: Helm,
) -> None:
    """The chart makes no trainer policy (the operator makes one per search, owned by it, in
    every namespace); it passes the operator the egress rules that need names."""
    from mloptimizer.operator.builders import build_trainer_policy
    from mloptimizer.operator.builders import egress_admits as reaches
    from mloptimizer.spec import ArchitectureSearchSpec

    for args in ((), ("--set", "operator.watchNamespaces={team-a,team-b}")):
        docs = helm.template(*args)
        names = [p["metadata"]["name"] for p in find(docs, "NetworkPolicy")]
        assert not [n for n in names if n.endswith("-trainers")]
        env = env_of(one(docs, "Deployment", f"{RELEASE}-mloptimizer-operator"))
        (broker,) = json.loads(env["MLOPT_TRAINER_EGRESS"])
        assert broker["ports"] == [{"protocol": "TCP", "port": 5672}]
        (peer,) = broker["to"]
        assert peer["namespaceSelector"] == {
            "matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}
        }
        broker_pod = pod_labels(one(docs, "StatefulSet", f"{RELEASE}-mloptimizer-rabbitmq"))
        assert selects(peer["podSelector"], broker_pod)
        assert json.loads(env["MLOPT_OBJECT_STORE_EGRESS"]) == []

    # downloads opened on request: public HTTP(S), still never the metadata address
    docs = helm.template("--set", "networkPolicy.trainerDownloads=true")
    env = env_of(one(docs, "Deployment", f"{RELEASE}-mloptimizer-operator"))
    rules = json.loads(env["MLOPT_TRAINER_EGRESS"])
    spec = ArchitectureSearchSpec.model_validate({"dataset": {"builtin": "digits"}})
    policy = build_trainer_policy("s", spec, trainer_egress=rules)
    kubernetes_validate.validate(
        {**policy, "metadata": {**policy["metadata"], "namespace": "team-a"}}, "1.34.0", strict=True
    )
    assert reaches(policy, "52.95.1.4", 443)
    for port in (80, 443):
        assert not reaches(policy, "169.254.169.254", port)
        assert not reaches(policy, "10.96.0.1", port)


def test_the_operator_ports_admit_only_the_peers_named_to_probe_or_scrape_them(
    helm: Helm,
) -> None:
    name = f"{RELEASE}-mloptimizer-operator"
    policy = one(helm.template(), "NetworkPolicy", name)
    assert policy["spec"]["ingress"] == []  # no pod reaches 8080 or 9090 by default
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}
    nodes = {"ipBlock": {"cidr": "10.0.0.0/24"}}
    docs = helm.template(
        "--set-json", f"networkPolicy.metricsFrom=[{json.dumps(prometheus)}]",
        "--set-json", f"networkPolicy.probesFrom=[{json.dumps(nodes)}]",
    )  # fmt: skip
    ingress = one(docs, "NetworkPolicy", name)["spec"]["ingress"]
    assert ingress == [
        {"from": [nodes], "ports": [{"protocol": "TCP", "port": 8080}]},
        {"from": [prometheus], "ports": [{"protocol": "TCP", "port": 9090}]},
    ]
