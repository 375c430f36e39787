"""Jobs run to their end, as a Job controller and a kubelet would, for the operator's verify
Jobs (``mloptimizer.operator.claimverify``).

There is no Job controller here. :class:`JobController` does what one does for a Job with
one pod: it sees a new Job in a namespace, makes its pod in the API (owned by the Job, with
the template's labels), has it run by a runner, writes the pod's status with the container's
exit code and termination message, and marks the Job succeeded or failed. The runner is the
kubelet's part: :func:`process_runner` runs the container's command as a process on this
machine with the claims as folders (beside trainers that run as processes), and
``tests/pods.py``'s :meth:`Kubelet.run_to_end` runs the pod as real containers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from cluster import Cluster

Body = dict[str, Any]
# (the Job, its pod's name) -> the container's exit code and termination message
Runner = Callable[[Body, str], Awaitable[tuple[int, str]]]


def process_runner(claims: Mapping[str, Path]) -> Runner:
    """Run a Job's one container as a process: its command (``python`` is this
    interpreter), each claim mounted at its mountPath given as the folder ``claims`` maps its
    name to, and the termination message read from a file put where the pod's would be."""

    async def run(job: Body, pod: str) -> tuple[int, str]:
        spec = job["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        folders = {
            v["name"]: claims[v["persistentVolumeClaim"]["claimName"]]
            for v in spec.get("volumes", [])
            if "persistentVolumeClaim" in v
        }
        mounts = {m["mountPath"]: str(folders[m["name"]]) for m in container["volumeMounts"]}
        command = [sys.executable if c == "python" else c for c in container["command"]]
        args = [mounts.get(a, a) for a in container.get("args", [])]
        with tempfile.TemporaryDirectory() as scratch:
            message = Path(scratch) / "termination-log"
            process = await asyncio.create_subprocess_exec(
                *command, *args, "--message-file", str(message), cwd=scratch,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            code = await asyncio.wait_for(process.wait(), timeout=120)
            return code, message.read_text() if message.exists() else ""

    return run


class JobController:
    """Runs every Job created in ``namespace`` once, to its end (see the module)::

    async with JobController(cluster, "default", process_runner({...})) as jobs:
        ...
        assert jobs.ran == [...]
    """

    def __init__(self, cluster: Cluster, namespace: str, runner: Runner) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.runner = runner
        self.ran: list[str] = []  # Job names, in the order they started
        self._task: asyncio.Task[None] | None = None
        self._runs: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> JobController:
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in [self._task, *self._runs]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _watch(self) -> None:
        while True:  # a controller's resync: each Job seen once
            for job in await self.cluster.list("jobs", self.namespace):
                name = job["metadata"]["name"]
                if name not in self.ran and not (job.get("status") or {}).get("conditions"):
                    self.ran.append(name)
                    self._runs.append(asyncio.create_task(self._run(job)))
            await asyncio.sleep(0.2)

    async def _run(self, job: Body) -> None:
        meta = job["metadata"]
        pod = f"{meta['name'][:56]}-{os.urandom(3).hex()}"
        template = job["spec"]["template"]
        owner = {"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                 "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}  # fmt: skip
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod,
                "labels": dict(template["metadata"].get("labels") or {}),
                "ownerReferences": [owner],
            },
            "spec": template["spec"],
        }
        await self.cluster.create("pods", body, self.namespace)
        try:
            code, message = await self.runner(job, pod)
        except Exception as error:  # the runner's own failure: the pod failed
            code, message = 128, f"runner: {error}"[:4096]
        (container,) = template["spec"]["containers"]
        state = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                 "message": message[:4096]}  # fmt: skip
        status = {
            "phase": "Succeeded" if code == 0 else "Failed",
            "containerStatuses": [{
                "name": container["name"], "image": container["image"],
                "imageID": container["image"], "ready": False, "restartCount": 0,
                "state": {"terminated": state},
            }],
        }  # fmt: skip
        await self.cluster.patch("pods", self.namespace, pod, {"status": status},
                                 subresource="status")  # fmt: skip
        end = "Complete" if code == 0 else "Failed"
        job_status = {
            ("succeeded" if code == 0 else "failed"): 1,
            "conditions": [{"type": end, "status": "True"}],
        }
        await self.cluster.patch("jobs", self.namespace, meta["name"], {"status": job_status},
                                 subresource="status")  # fmt: skip
