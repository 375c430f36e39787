"""A claim's delivery checked by the operator: a short read-only Job with its own image.

A final job to ``output.pvc`` is written by a trainer: the search author's image, perhaps on
a rented host. The operator mounts no claim, so until something it controls has read the
files, their sizes and sha256 are only the trainer's word. :func:`verify_claim` starts one
Job (:func:`build_verify_job`: the operator's image, the claim mounted read-only, no
ServiceAccount token, no write anywhere) that runs :mod:`mloptimizer.operator.claimcheck`,
awaits its end, reads its pod's termination message and compares it with ``delivered``
(:func:`compare`). Only a pod the Job owns (its uid) is believed: trainers hold no
Kubernetes credential, so they cannot make one.

The Job's name carries a hash of what it checks (folder and every file's claimed sha256):
an operator restarted mid-check finds the same Job and its answer, and a delivery of
other bytes gets a new Job. Jobs are owned by the search and removed an hour after they end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from mloptimizer.faults import StopFlag
from mloptimizer.messages import ARTIFACT_FILES, REPORT_FILES, DeliveredMessage
from mloptimizer.operator.builders import TRAINER_UID, child_name, label_value, name_hash

__all__ = [
    "CLAIM_DIR",
    "JOB_DEADLINE_SECONDS",
    "JOB_LABEL",
    "VERIFY_UID",
    "Checked",
    "JobApi",
    "JobEnd",
    "build_verify_job",
    "compare",
    "verify_claim",
    "verify_job_name",
]

CLAIM_DIR: Final = "/claim"
VERIFY_UID: Final = 10001  # the operator image's own user, not the trainers'
JOB_DEADLINE_SECONDS: Final = 600  # reading a few model files takes seconds
JOB_LABEL: Final = "mloptimizer.io/verify-job"


def verify_job_name(search: str, folder: str, delivered: DeliveredMessage) -> str:
    """The Job that checks ``delivered``: one name per search and bytes claimed."""
    claimed = sorted(f"{a.format}={a.sha256}" for a in delivered.artifacts if not a.error)
    return child_name(search, f"verify-{name_hash('|'.join([folder, *claimed]))}")


def build_verify_job(
    search: str, name: str, *, claim: str, folder: str, files: Sequence[str], image: str
) -> dict[str, Any]:
    """The Job that reads ``files`` in ``folder`` of claim ``claim`` and reports each one's
    size and sha256 as its termination message. Read-only everywhere, no credentials, small."""
    labels = {
        "app.kubernetes.io/name": "mloptimizer-verify",
        "app.kubernetes.io/instance": label_value(search),
        "app.kubernetes.io/managed-by": "mloptimizer",
        "mloptimizer.io/search": label_value(search),
    }
    container = {
        "name": "verify",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "mloptimizer.operator.claimcheck"],
        "args": ["--root", CLAIM_DIR, folder, *files],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "resources": {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"cpu": "500m", "memory": "128Mi"},
        },
        "volumeMounts": [{"name": "claim", "mountPath": CLAIM_DIR, "readOnly": True}],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": VERIFY_UID,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "backoffLimit": 1,
            "activeDeadlineSeconds": JOB_DEADLINE_SECONDS,
            "ttlSecondsAfterFinished": 3600,
            "template": {
                "metadata": {"labels": {**labels, JOB_LABEL: name}},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "containers": [container],
                    "volumes": [
                        {
                            "name": "claim",
                            "persistentVolumeClaim": {"claimName": claim, "readOnly": True},
                        }
                    ],
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": VERIFY_UID,
                        "runAsGroup": VERIFY_UID,
                        # the trainers write with fsGroup TRAINER_UID: read as that group
                        "supplementalGroups": [TRAINER_UID],
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                },
            },
        },
    }


@dataclass(frozen=True)
class JobEnd:
    """How a Job ended: its pod's termination message, or why it has none."""

    succeeded: bool
    message: str


class JobApi(Protocol):
    """The Kubernetes side of a verify Job (:class:`~mloptimizer.operator.kube.ApiKube`)."""

    def create_job(self, body: dict[str, Any]) -> None:
        """Create the Job, owned by the search (idempotent for its own)."""

    def job_end(self, name: str) -> JobEnd | None:
        """How the Job ended, or None while it runs."""


@dataclass(frozen=True)
class Checked:
    """What a check found: ``verified``, or ``mismatch`` (the files are not what the
    trainer said), or neither (the check could not run: ``detail`` says why)."""

    verified: bool
    detail: str
    mismatch: bool = False


def _found(message: str) -> dict[str, Any] | str:
    """The Job's answer as files -> {bytes, sha256} or {error}; or why it is not one."""
    try:
        answer = json.loads(message)
    except ValueError:
        return f"its answer is not JSON: {message[:200]!r}"
    if not isinstance(answer, dict):
        return "its answer is not an object"
    if "error" in answer:
        return str(answer["error"])[:500]
    files = answer.get("files")
    if not isinstance(files, dict):
        return "its answer has no files"
    return files


def compare(delivered: DeliveredMessage, files: dict[str, Any]) -> str | None:
    """Why ``files`` (the Job's findings) are not what ``delivered`` says, or None."""
    for artifact in delivered.artifacts:
        if artifact.error:
            continue
        file = ARTIFACT_FILES[artifact.format]
        seen = files.get(file)
        if not isinstance(seen, dict) or "error" in seen:
            why = seen.get("error") if isinstance(seen, dict) else "not checked"
            return f"{file}: the trainer says {artifact.bytes} bytes, the claim has none ({why})"
        if seen.get("bytes") != artifact.bytes:
            has = seen.get("bytes")
            return f"{file}: the trainer says {artifact.bytes} bytes, the claim has {has}"
        if seen.get("sha256") != artifact.sha256:
            return f"{file}: the claim's sha256 is {seen.get('sha256')}, not the trainer's"
    for file in REPORT_FILES:
        seen = files.get(file)
        if not isinstance(seen, dict) or "error" in seen:
            return f"{file} is not in the claim"
    return None


def verify_claim(
    search: str,
    delivered: DeliveredMessage,
    *,
    claim: str,
    folder: str,
    image: str,
    api: JobApi,
    stop: StopFlag,
    timeout: float = JOB_DEADLINE_SECONDS + 120,
    poll: float = 2.0,
) -> Checked:
    """Check ``delivered`` against the claim with a verify Job; see the module's docstring.
    A stop, a Job that fails or one that does not end within ``timeout`` leaves the
    delivery unverified, with the reason."""
    files = [ARTIFACT_FILES[a.format] for a in delivered.artifacts if not a.error]
    files += list(REPORT_FILES)
    name = verify_job_name(search, folder, delivered)
    api.create_job(
        build_verify_job(search, name, claim=claim, folder=folder, files=files, image=image)
    )
    deadline = time.monotonic() + timeout
    while (end := api.job_end(name)) is None:
        if stop.is_set():
            return Checked(False, f"the verify Job {name} was left running (operator stopping)")
        if time.monotonic() > deadline:
            return Checked(False, f"the verify Job {name} did not end within {timeout:.0f} s")
        stop.wait(poll)
    if not end.succeeded:
        return Checked(False, f"the verify Job {name} failed: {end.message}"[:1000])
    found = _found(end.message)
    if isinstance(found, str):
        return Checked(False, f"the verify Job {name} could not check the claim: {found}")
    mismatch = compare(delivered, found)
    if mismatch is not None:
        return Checked(False, f"checked by Job {name}: {mismatch}", mismatch=True)
    return Checked(True, f"sizes and sha256 checked by Job {name}")
