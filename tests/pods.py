"""Pods as real containers: podman runs the pod templates the chart and the operator write.

There is no kubelet, scheduler or Deployment controller on this machine, but there is a real
container runtime: ``podman kube play`` implements a pod spec (images, entrypoint and args,
env, ``securityContext`` with runAsUser and a read-only root filesystem, dropped
capabilities, resources, emptyDir and claim volumes, the grace period, restartPolicy) with
real containers. :class:`Kubelet` does, for one node, only what a kubelet and a Deployment
controller add around that:

* it follows a Deployment through the API and keeps ``spec.replicas`` pods of its template
  running (a new template replaces them, fewer replicas stop the newest first), and writes
  the Deployment's ``status`` as the controller would;
* it resolves what podman 4.3 cannot read from the API: ``secretKeyRef``/``envFrom`` values
  from the Secrets in the API, ``fieldRef`` (pod name, namespace, node name), and
  ``$(VAR)`` references in env, command and args, as a kubelet does;
* it mounts a ServiceAccount token where a kubelet would (unless
  ``automountServiceAccountToken: false``), with ``KUBERNETES_SERVICE_HOST``/``PORT``
  naming the API's HTTPS endpoint; and every pod shares the host's network, since no CNI
  runs here (the broker, the database and the API listen on 127.0.0.1), so containerPorts
  only name ports, as they do for a pod on the host's network.

:func:`pod_manifest` is that translation, pure. :func:`containers_unavailable` tells why
containers cannot run on a machine (then their tests skip with that reason), and
:func:`built_images` builds the images once per session with ``scripts/images``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from cluster import Cluster

REPO = Path(__file__).resolve().parent.parent
BASE_IMAGE = "docker.io/library/debian:bookworm-slim"
REGISTRY = "ghcr.io/mloptimizer"
NODE = "podman"  # the one node's name, for spec.nodeName
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

Body = dict[str, Any]


class ContainersUnavailable(RuntimeError):
    """Containers cannot be built or run here; the reason is the message."""


# --- podman -----------------------------------------------------------------------------


async def podman(
    *args: str, timeout: float = 120.0, check: bool = True, merged: bool = False
) -> str:
    """Run podman without blocking the loop that serves the API; its stdout (and stderr,
    interleaved, with ``merged``: a container's whole output from ``podman logs``).

    With ``check``, a non-zero exit raises AssertionError with podman's output.
    """
    errors = asyncio.subprocess.STDOUT if merged else asyncio.subprocess.PIPE
    process = await asyncio.create_subprocess_exec(
        "podman", *args, stdout=asyncio.subprocess.PIPE, stderr=errors
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    if check and process.returncode != 0:
        detail = (err or out).decode()
        raise AssertionError(f"podman {' '.join(args)} exited {process.returncode}:\n{detail}")
    return out.decode()


@cache
def containers_unavailable() -> str | None:
    """Why containers cannot run here (None when they can): no podman, or none starts."""
    if shutil.which("podman") is None:
        return "podman is not installed (scripts/test installs it with apt-get, as root)"
    try:
        info = subprocess.run(
            ["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return "podman info did not answer within 60 s"
    if info.returncode != 0:
        return f"podman does not work here: {info.stderr.strip()[-300:]}"
    return None


@dataclass(frozen=True)
class Images:
    """The images ``scripts/images`` built, by name."""

    operator: str
    trainer: str
    seconds: float  # how long the build took (cached layers make it short)


def built_images(version: str = "0.1.0") -> Images:
    """Build (or reuse the cached layers of) the operator and CPU trainer images."""
    import time

    reason = containers_unavailable()
    if reason:
        raise ContainersUnavailable(reason)
    started = time.monotonic()
    done = subprocess.run(
        [str(REPO / "scripts" / "images"), "--version", version],
        capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).splitlines()[-15:])
        raise AssertionError(f"scripts/images failed (exit {done.returncode}):\n{tail}")
    return Images(
        operator=f"{REGISTRY}/operator:{version}",
        trainer=f"{REGISTRY}/trainer:{version}",
        seconds=time.monotonic() - started,
    )


# --- a pod from a template --------------------------------------------------------------

_REFERENCE = re.compile(r"\$\((\w+)\)|\$\$")


def expand(text: str, env: Mapping[str, str]) -> str:
    """``$(VAR)`` replaced by its value when defined, ``$$`` by ``$``: a kubelet's rule."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return _REFERENCE.sub(one, text)


def secret_value(secrets: Mapping[str, Body], name: str, key: str) -> str:
    secret = secrets.get(name)
    if secret is None:
        raise LookupError(f"Secret {name!r} does not exist: the pod cannot start")
    data = secret.get("data") or {}
    if key not in data:
        raise LookupError(f"Secret {name!r} has no key {key!r}: the pod cannot start")
    return base64.b64decode(data[key]).decode()


def _field(path: str, pod: Body) -> str:
    fields: dict[str, str] = {
        "metadata.name": pod["metadata"]["name"],
        "metadata.namespace": pod["metadata"]["namespace"],
        "spec.nodeName": NODE,
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
        "status.podIP": "127.0.0.1",
        "status.hostIP": "127.0.0.1",
    }
    if path not in fields:
        raise LookupError(f"fieldRef {path} is not known to this kubelet")
    return fields[path]


def _resolve_container(container: Body, pod: Body, secrets: Mapping[str, Body],
                       extra_env: Mapping[str, str]) -> None:  # fmt: skip
    env: dict[str, str] = {}
    for source in container.pop("envFrom", []) or []:
        prefix = source.get("prefix", "")
        if "secretRef" in source:
            secret = secrets.get(source["secretRef"]["name"]) or {}
            for key in secret.get("data") or {}:
                env[prefix + key] = secret_value(secrets, source["secretRef"]["name"], key)
    for var in container.get("env", []) or []:
        if "value" in var:
            env[var["name"]] = expand(str(var["value"]), env)
        elif "secretKeyRef" in (var.get("valueFrom") or {}):
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secret_value(secrets, ref["name"], ref["key"])
        elif "fieldRef" in (var.get("valueFrom") or {}):
            env[var["name"]] = _field(var["valueFrom"]["fieldRef"]["fieldPath"], pod)
        else:
            raise LookupError(f"env {var['name']}: {var.get('valueFrom')} is not supported here")
    env.update(extra_env)
    container["env"] = [{"name": k, "value": v} for k, v in env.items()]
    for key in ("command", "args"):
        if key in container:
            container[key] = [expand(str(arg), env) for arg in container[key]]


def pod_manifest(
    template: Body,
    *,
    name: str,
    namespace: str,
    secrets: Mapping[str, Body],
    token_dir: Path | None = None,
    api: tuple[str, int] | None = None,
) -> Body:
    """The Pod a kubelet would run for ``template`` (a Deployment's pod template), as podman
    takes it: values resolved (see the module's docstring), the host's network, and the
    ServiceAccount token from ``token_dir`` with the API at ``api`` (host, port)."""
    spec = copy.deepcopy(template["spec"])
    pod: Body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": dict((template.get("metadata") or {}).get("labels") or {}),
        },
        "spec": spec,
    }
    spec["hostNetwork"] = True  # no CNI: every pod on the host's loopback, as the services are
    spec["nodeName"] = NODE
    extra: dict[str, str] = {}
    if spec.get("automountServiceAccountToken", True) and token_dir is not None:
        assert api is not None, "a ServiceAccount token needs the API's address"
        spec.setdefault("volumes", []).append(
            {"name": "kube-api-access", "hostPath": {"path": str(token_dir), "type": "Directory"}}
        )
        for container in spec["containers"]:
            container.setdefault("volumeMounts", []).append(
                {"name": "kube-api-access", "mountPath": TOKEN_DIR, "readOnly": True}
            )
        extra = {"KUBERNETES_SERVICE_HOST": api[0], "KUBERNETES_SERVICE_PORT": str(api[1])}
    for container in spec["containers"]:
        _resolve_container(container, pod, secrets, extra)
        # On the host's network a containerPort only names the port; podman would map it.
        container.pop("ports", None)
    return pod


def template_hash(template: Body) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


# --- the kubelet ------------------------------------------------------------------------


@dataclass
class _Workload:
    namespace: str
    name: str
    pods: list[str] = field(default_factory=list)  # running, oldest first (not terminating)
    started: list[str] = field(default_factory=list)  # every pod started, in order
    template: str = ""
    task: asyncio.Task[None] | None = None
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    error: BaseException | None = None


class Kubelet:
    """Keeps the pods of the Deployments it follows running as podman containers.

    Use::

        async with Kubelet(cluster, tmp_path) as kubelet:
            kubelet.follow("default", "x-trainer")
            await kubelet.wait_pods("default", "x-trainer", 2)

    On exit every pod it started is stopped and removed. The logs of each container are
    kept under ``workdir`` once its pod is gone (:meth:`logs` reads them either way).
    """

    def __init__(self, cluster: Cluster, workdir: Path) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._workloads: dict[tuple[str, str], _Workload] = {}
        self._stopping: dict[str, asyncio.Task[dict[str, int]]] = {}  # pod -> its stop
        self._token_dir: Path | None = None
        self._api: tuple[str, int] | None = None
        proxy = cluster.proxy
        if proxy is not None and proxy.tls_url:
            host, _, port = proxy.tls_url.removeprefix("https://").partition(":")
            self._api = (host, int(port))
            self._token_dir = workdir / "serviceaccount"
            self._token_dir.mkdir(exist_ok=True)
            shutil.copy(proxy.ca_path, self._token_dir / "ca.crt")
            (self._token_dir / "token").write_text("kubelet-test-token")
            self._token_dir.chmod(0o755)
            for file in self._token_dir.iterdir():
                file.chmod(0o644)

    async def __aenter__(self) -> Kubelet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for workload in self._workloads.values():
            if workload.task is not None:
                workload.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await workload.task
        for workload in self._workloads.values():
            for pod in list(workload.pods):
                self._stop_pod(workload, pod, grace=0)
        await asyncio.gather(*self._stopping.values(), return_exceptions=True)

    def follow(self, namespace: str, name: str) -> None:
        """Run the Deployment's pods from now on, following its every change."""
        key = (namespace, name)
        if key in self._workloads:
            return
        workload = _Workload(namespace, name)
        self._workloads[key] = workload
        workload.task = asyncio.create_task(self._follow(workload))

    def pods(self, namespace: str, name: str) -> list[str]:
        """The pods of the Deployment running now, oldest first."""
        return list(self._workloads[(namespace, name)].pods)

    def started(self, namespace: str, name: str) -> list[str]:
        """Every pod of the Deployment started so far, in order."""
        return list(self._workloads[(namespace, name)].started)

    async def wait_pods(self, namespace: str, name: str, count: int, timeout: float = 60) -> None:
        """Await until exactly ``count`` pods of the Deployment run."""
        workload = self._workloads[(namespace, name)]
        async with asyncio.timeout(timeout), workload.changed:
            await workload.changed.wait_for(
                lambda: workload.error is not None or len(workload.pods) == count
            )
        if workload.error is not None:
            raise workload.error

    async def logs(self, pod: str, container: str) -> str:
        """A container's output (stdout and stderr), while it runs or after its pod is gone."""
        kept = self.workdir / f"{pod}-{container}.log"
        if kept.exists():
            return kept.read_text(errors="replace")
        return await podman("logs", f"{pod}-{container}", check=False, merged=True)

    async def wait_log(self, pod: str, container: str, text: str, timeout: float = 120) -> str:
        """Await ``text`` in a running container's output; the output up to it."""
        process = await asyncio.create_subprocess_exec(
            "podman", "logs", "--follow", f"{pod}-{container}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        assert process.stdout is not None
        seen: list[str] = []
        try:
            async with asyncio.timeout(timeout):
                async for raw in process.stdout:
                    seen.append(raw.decode(errors="replace"))
                    if text in seen[-1]:
                        return "".join(seen)
        except TimeoutError:
            raise TimeoutError(
                f"{text!r} not in {pod}-{container}'s output within {timeout}s:\n"
                + "".join(seen[-30:])
            ) from None
        finally:
            if process.returncode is None:
                process.kill()
            await process.wait()
        raise AssertionError(f"{pod}-{container} ended before {text!r}:\n" + "".join(seen[-30:]))

    # --- reconciling ---

    async def _follow(self, workload: _Workload) -> None:
        try:
            changes = self.cluster.follow("deployments", workload.namespace, workload.name)
            async with contextlib.aclosing(changes):
                async for deployment in changes:
                    await self._reconcile(workload, deployment)
        except asyncio.CancelledError:
            raise
        except BaseException as error:
            workload.error = error
            async with workload.changed:
                workload.changed.notify_all()
            raise

    async def _reconcile(self, workload: _Workload, deployment: Body | None) -> None:
        alive = deployment is not None and not deployment["metadata"].get("deletionTimestamp")
        wanted = int(deployment["spec"].get("replicas", 1)) if alive and deployment else 0
        template = deployment["spec"]["template"] if alive and deployment else None
        digest = template_hash(template) if template is not None else ""
        if digest != workload.template:  # a new template: its pods replace the old ones
            for pod in list(workload.pods):
                self._stop_pod(workload, pod)
            workload.template = digest
        while len(workload.pods) > wanted:  # the newest go first
            self._stop_pod(workload, workload.pods[-1])
        while len(workload.pods) < wanted and template is not None:
            await self._start_pod(workload, template)
        if alive and deployment is not None:
            await self._write_status(workload, deployment)

    async def _start_pod(self, workload: _Workload, template: Body) -> None:
        name = f"{workload.name}-{workload.template[:5]}-{len(workload.started)}"
        workload.started.append(name)
        secrets = {
            s["metadata"]["name"]: s for s in await self.cluster.list("secrets", workload.namespace)
        }
        pod = pod_manifest(
            template, name=name, namespace=workload.namespace, secrets=secrets,
            token_dir=self._token_dir, api=self._api,
        )  # fmt: skip
        manifest = self.workdir / f"{name}.yaml"
        manifest.write_text(yaml.safe_dump(pod, sort_keys=False))
        (self.workdir / f"{name}.log").unlink(missing_ok=True)
        await podman("kube", "play", "--replace", "--quiet", str(manifest))
        workload.pods.append(name)
        async with workload.changed:
            workload.changed.notify_all()

    def _stop_pod(self, workload: _Workload, pod: str, grace: int | None = None) -> None:
        """Stop a pod as a kubelet does, in the background: it leaves the running pods at
        once, gets SIGTERM, and SIGKILL after its grace period."""
        workload.pods.remove(pod)
        self._stopping[pod] = asyncio.create_task(self._stop(pod, grace))

        async def notify() -> None:
            async with workload.changed:
                workload.changed.notify_all()

        self._stopping[pod].add_done_callback(lambda _: asyncio.ensure_future(notify()))

    async def _stop(self, pod: str, grace: int | None) -> dict[str, int]:
        manifest = yaml.safe_load((self.workdir / f"{pod}.yaml").read_text())
        if grace is None:
            grace = int(manifest["spec"].get("terminationGracePeriodSeconds", 30))
        await podman("pod", "stop", "--time", str(grace), pod, timeout=grace + 60, check=False)
        codes: dict[str, int] = {}
        for container in manifest["spec"]["containers"]:
            full = f"{pod}-{container['name']}"
            logged = await podman("logs", full, check=False, merged=True)
            (self.workdir / f"{full}.log").write_text(logged)
            code = await podman("inspect", "--format", "{{.State.ExitCode}}", full, check=False)
            codes[container["name"]] = int(code.strip() or -1)
        await podman("pod", "rm", "--force", pod, check=False)
        return codes

    async def run_to_end(self, job: Body, pod: str) -> tuple[int, str]:
        """Run a Job's pod once, as real containers, to its end (a ``tests/jobs.py`` runner):
        its one container's exit code and termination message. As a kubelet does, a file on
        this machine is mounted where the container's ``terminationMessagePath`` says, and
        read once the container has exited."""
        namespace = job["metadata"].get("namespace") or "default"
        secrets = {s["metadata"]["name"]: s for s in await self.cluster.list("secrets", namespace)}
        manifest = pod_manifest(
            job["spec"]["template"], name=pod, namespace=namespace, secrets=secrets,
            token_dir=self._token_dir, api=self._api,
        )  # fmt: skip
        (container,) = manifest["spec"]["containers"]
        message = self.workdir / f"{pod}.termination-log"
        message.write_text("")
        message.chmod(0o666)  # the container's user writes it, as on a node
        manifest["spec"].setdefault("volumes", []).append(
            {"name": "termination-log", "hostPath": {"path": str(message), "type": "File"}}
        )
        container.setdefault("volumeMounts", []).append({
            "name": "termination-log",
            "mountPath": container.get("terminationMessagePath", "/dev/termination-log"),
        })  # fmt: skip
        file = self.workdir / f"{pod}.yaml"
        file.write_text(yaml.safe_dump(manifest, sort_keys=False))
        await podman("kube", "play", "--replace", "--quiet", str(file))
        full = f"{pod}-{container['name']}"
        try:
            deadline = float(job["spec"].get("activeDeadlineSeconds", 600))
            code = int((await podman("wait", full, timeout=deadline)).strip())
            logged = await podman("logs", full, check=False, merged=True)
            (self.workdir / f"{full}.log").write_text(logged)
        finally:
            await podman("pod", "rm", "--force", pod, check=False)
        return code, message.read_text()

    async def stopped(self, pod: str) -> dict[str, int]:
        """Await the end of a pod being stopped; its containers' exit codes by name."""
        return await self._stopping[pod]

    async def _write_status(self, workload: _Workload, deployment: Body) -> None:
        count = len(workload.pods)
        status = {
            "observedGeneration": deployment["metadata"].get("generation", 1),
            "replicas": count,
            "updatedReplicas": count,
            "readyReplicas": count,
            "availableReplicas": count,
        }
        if deployment.get("status") == {**(deployment.get("status") or {}), **status}:
            return
        with contextlib.suppress(Exception):  # deleted meanwhile
            await self.cluster.patch(
                "deployments", workload.namespace, workload.name, {"status": status},
                subresource="status",
            )  # fmt: skip
