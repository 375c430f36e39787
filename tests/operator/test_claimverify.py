"""A claim's delivery is checked by something the operator controls: the verify Job.

The program the Job runs (``mloptimizer.operator.claimcheck``) reads real files, as an
attacker holding a trainer would have left them: a lie about a size or a sha256, a
symbolic link to elsewhere, a folder escaping the claim. :func:`verify_claim` is driven
with a Job API that runs that same program as a process on the folder, and
:meth:`ApiKube.job_end` reads Jobs and pods from the emulator, where a pod the Job does not
own cannot speak for it. The Job itself runs as a real container in
``tests/test_containers.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from mloptimizer.messages import REPORT_FILES, ArtifactReport, DeliveredMessage
from mloptimizer.operator.builders import TRAINER_UID
from mloptimizer.operator.claimcheck import check, main
from mloptimizer.operator.claimverify import (
    CLAIM_DIR,
    JOB_LABEL,
    VERIFY_UID,
    JobEnd,
    build_verify_job,
    verify_claim,
    verify_job_name,
)

FOLDER = "team/search"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def claim_with(root: Path, files: dict[str, bytes]) -> Path:
    folder = root / FOLDER
    folder.mkdir(parents=True)
    for file, data in files.items():
        (folder / file).write_bytes(data)
    return folder


MODEL = b"model bytes " * 1000
REPORTS = {file: b"report" for file in REPORT_FILES}


def delivered(*, bytes_: int = len(MODEL), digest: str = sha(MODEL)) -> DeliveredMessage:
    return DeliveredMessage(
        search="default.s",
        trial_id=1,
        number=0,
        round=1,
        attempt=1,
        worker_id="w-1",
        state="complete",
        model="kept",
        artifacts=[ArtifactReport(format="keras", bytes=bytes_, sha256=digest, accuracy=0.9)],
        token="t" * 24,
    )


# --- what the Job runs ------------------------------------------------------------------


def test_the_check_reports_each_files_size_and_sha256(tmp_path: Path) -> None:
    claim_with(tmp_path, {"model.keras": MODEL, "report.md": b"# r"})
    found = check(tmp_path, FOLDER, ["model.keras", "report.md", "model.tflite"])
    assert found["files"] == {
        "model.keras": {"bytes": len(MODEL), "sha256": sha(MODEL)},
        "report.md": {"bytes": 3, "sha256": sha(b"# r")},
        "model.tflite": {"error": "missing"},
    }


def test_the_check_never_follows_a_link_nor_leaves_the_claim(tmp_path: Path) -> None:
    claim = tmp_path / "claim"
    folder = claim_with(claim, {})
    outside = tmp_path / "secret"
    outside.write_bytes(b"not the claim's")
    (folder / "model.keras").symlink_to(outside)  # a trainer's link to elsewhere
    (folder / "report.md").mkdir()
    os.mkfifo(folder / "artifacts.json")  # would hang a plain open()
    found = check(claim, FOLDER, ["model.keras", "report.md", "artifacts.json", "../x"])
    assert found["files"]["model.keras"]["error"].startswith("unreadable")
    assert found["files"]["report.md"] == {"error": "not a regular file"}
    assert found["files"]["artifacts.json"] == {"error": "not a regular file"}
    assert found["files"]["../x"] == {"error": "not a file name"}
    # a folder that resolves elsewhere (a link on the way, or ..) is refused whole
    (claim / "team" / "linked").symlink_to(tmp_path)
    assert "not a folder inside the claim" in check(claim, "team/linked", ["secret"])["error"]
    assert "not a folder inside the claim" in check(claim, "../", ["secret"])["error"]
    assert "no such folder" in check(claim, "team/none", ["x"])["error"]


def test_the_program_writes_its_termination_message(tmp_path: Path) -> None:
    claim_with(tmp_path / "claim", {"model.keras": MODEL})
    message = tmp_path / "termination-log"
    code = main(["--root", str(tmp_path / "claim"), "--message-file", str(message),
                 FOLDER, "model.keras"])  # fmt: skip
    assert code == 0
    answer = json.loads(message.read_text())
    assert answer == {"v": 1, "files": {"model.keras": {"bytes": len(MODEL), "sha256": sha(MODEL)}}}
    assert len(message.read_bytes()) < 4096  # Kubernetes' limit for a termination message
    assert main(["--root", str(tmp_path), "--message-file", str(message), "none", "x"]) == 1


# --- the Job -----------------------------------------------------------------------------


def test_the_verify_job_reads_the_claim_and_nothing_else() -> None:
    name = verify_job_name("s", FOLDER, delivered())
    job = build_verify_job("s", name, claim="models", folder=FOLDER,
                           files=["model.keras", "report.md"], image="op:1")  # fmt: skip
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "op:1"
    assert container["args"] == ["--root", CLAIM_DIR, FOLDER, "model.keras", "report.md"]
    assert pod["volumes"] == [
        {"name": "claim", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}
    ]
    assert container["volumeMounts"] == [
        {"name": "claim", "mountPath": CLAIM_DIR, "readOnly": True}
    ]
    assert pod["automountServiceAccountToken"] is False  # no credential in the pod
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    # not the trainers' user (it could write what they write), but it reads their group
    assert pod["securityContext"]["runAsUser"] == VERIFY_UID != TRAINER_UID
    assert pod["securityContext"]["supplementalGroups"] == [TRAINER_UID]
    assert pod["restartPolicy"] == "Never"
    assert job["spec"]["activeDeadlineSeconds"] > 0
    assert job["spec"]["template"]["metadata"]["labels"][JOB_LABEL] == name


def test_the_job_name_follows_the_bytes_claimed_and_fits_a_label() -> None:
    one = verify_job_name("s", FOLDER, delivered())
    assert one == verify_job_name("s", FOLDER, delivered())  # a restart finds it again
    assert one != verify_job_name("s", FOLDER, delivered(digest=sha(b"other")))
    assert one != verify_job_name("s", "other/folder", delivered())
    long = verify_job_name("x" * 253, FOLDER, delivered())
    assert len(long) <= 63
    assert long != verify_job_name("x" * 252 + "y", FOLDER, delivered())


class ProcessJobs:
    """A Job API that runs the Job's program as a process on ``root`` (the claim's files)."""

    def __init__(self, root: Path, *, fail: str | None = None, never: bool = False) -> None:
        self.root = root
        self.fail = fail
        self.never = never
        self.created: list[dict[str, Any]] = []
        self.ends: dict[str, JobEnd] = {}

    def create_job(self, body: dict[str, Any]) -> None:
        self.created.append(body)
        name = body["metadata"]["name"]
        if self.never:
            return
        if self.fail is not None:
            self.ends[name] = JobEnd(False, self.fail)
            return
        (container,) = body["spec"]["template"]["spec"]["containers"]
        args = [str(self.root) if a == CLAIM_DIR else a for a in container["args"]]
        ran = subprocess.run(
            [sys.executable, "-m", "mloptimizer.operator.claimcheck", *args,
             "--message-file", "/nonexistent/termination-log"],
            capture_output=True, text=True, timeout=60, cwd=self.root,
        )  # fmt: skip
        self.ends[name] = JobEnd(ran.returncode == 0, ran.stdout.strip() or ran.stderr[-500:])

    def job_end(self, name: str) -> JobEnd | None:
        return self.ends.get(name)


def test_a_claim_that_holds_what_the_trainer_said_is_verified(tmp_path: Path) -> None:
    claim_with(tmp_path, {"model.keras": MODEL, **REPORTS})
    jobs = ProcessJobs(tmp_path)
    checked = verify_claim("s", delivered(), claim="models", folder=FOLDER, image="op:1",
                           api=jobs, stop=threading.Event())  # fmt: skip
    assert checked.verified, checked.detail
    assert not checked.mismatch
    assert "checked by Job s-verify-" in checked.detail


@pytest.mark.parametrize(
    ("said", "why"),
    [
        ({"bytes_": 123456789}, "the trainer says 123456789 bytes, the claim has"),
        ({"digest": sha(b"what the trainer claims")}, "the claim's sha256 is"),
    ],
)
def test_a_trainers_lie_about_a_claim_is_found(tmp_path: Path, said: dict[str, Any],
                                               why: str) -> None:  # fmt: skip
    claim_with(tmp_path, {"model.keras": MODEL, **REPORTS})
    checked = verify_claim("s", delivered(**said), claim="models", folder=FOLDER, image="op:1",
                           api=ProcessJobs(tmp_path), stop=threading.Event())  # fmt: skip
    assert checked.mismatch
    assert not checked.verified
    assert why in checked.detail


def test_a_file_never_written_or_a_missing_report_is_found(tmp_path: Path) -> None:
    claim_with(tmp_path, dict(REPORTS))  # the model the trainer claims is not there
    checked = verify_claim("s", delivered(), claim="models", folder=FOLDER, image="op:1",
                           api=ProcessJobs(tmp_path), stop=threading.Event())  # fmt: skip
    assert checked.mismatch
    assert "model.keras: the trainer says" in checked.detail
    assert "(missing)" in checked.detail
    other = tmp_path / "other"
    claim_with(other, {"model.keras": MODEL})
    checked = verify_claim("s", delivered(), claim="models", folder=FOLDER, image="op:1",
                           api=ProcessJobs(other), stop=threading.Event())  # fmt: skip
    assert checked.mismatch
    assert "report.md is not in the claim" in checked.detail


def test_a_job_that_fails_or_never_ends_leaves_the_delivery_unverified(tmp_path: Path) -> None:
    failed = verify_claim("s", delivered(), claim="models", folder=FOLDER, image="op:1",
                          api=ProcessJobs(tmp_path, fail="DeadlineExceeded"),
                          stop=threading.Event())  # fmt: skip
    assert (failed.verified, failed.mismatch) == (False, False)
    assert "failed: DeadlineExceeded" in failed.detail
    pending = verify_claim("s", delivered(), claim="models", folder=FOLDER, image="op:1",
                           api=ProcessJobs(tmp_path, never=True), stop=threading.Event(),
                           timeout=0.2, poll=0.05)  # fmt: skip
    assert (pending.verified, pending.mismatch) == (False, False)
    assert "did not end within" in pending.detail
    stop = threading.Event()
    stop.set()
    stopped = verify_claim("s", delivered(), claim="models", folder=FOLDER, image="op:1",
                           api=ProcessJobs(tmp_path, never=True), stop=stop)  # fmt: skip
    assert "left running" in stopped.detail


# --- the answer read back through the API --------------------------------------------------


def _pod(name: str, job: dict[str, Any], owner_uid: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {JOB_LABEL: job["metadata"]["name"]},
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "controller": True,
                    "name": job["metadata"]["name"],
                    "uid": owner_uid,
                }
            ],
        },
        "spec": {"containers": [{"name": "verify", "image": "op:1"}]},
    }


def _ended(message: str) -> dict[str, Any]:
    return {"status": {
        "phase": "Succeeded",
        "containerStatuses": [{
            "name": "verify", "image": "op:1", "imageID": "op@sha256:0", "ready": False,
            "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "reason": "Completed", "message": message}},
        }],
    }}  # fmt: skip


async def test_only_a_pod_the_job_owns_speaks_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Job's answer is read from its own pod: a pod someone else made with the Job's
    label, saying every file is fine, is not believed; a Job the search does not own is
    never this search's answer."""
    from k8s import kubernetes_configuration, start_emulator

    from mloptimizer.operator.kube import ApiKube

    meta = {"name": "s", "namespace": "default", "uid": "search-uid"}
    search = {"apiVersion": "mloptimizer.io/v1alpha1", "kind": "ArchitectureSearch",
              "metadata": meta}  # fmt: skip
    name = verify_job_name("s", FOLDER, delivered())
    body = build_verify_job("s", name, claim="models", folder=FOLDER, files=["model.keras"],
                            image="op:1")  # fmt: skip
    async with start_emulator() as emulator:
        monkeypatch.setattr(
            kubernetes.client.Configuration, "_default", kubernetes_configuration(emulator)
        )
        kube = ApiKube(search, "default", "s")
        await asyncio.to_thread(kube.create_job, body)
        await asyncio.to_thread(kube.create_job, body)  # idempotent for its own
        job = emulator.fetch_object("jobs", "default", name)
        assert job is not None
        assert job["metadata"]["ownerReferences"][0]["uid"] == "search-uid"
        assert await asyncio.to_thread(kube.job_end, name) is None  # running
        emulator.patch_object("jobs", "default", name, {"status": {"succeeded": 1}},
                              subresource="status")  # fmt: skip
        forged = json.dumps({"v": 1, "files": {"model.keras": {"bytes": 1, "sha256": "0"}}})
        emulator.create_object("pods", _pod("forged", job, "another-uid"),
                               namespace="default")  # fmt: skip
        emulator.patch_object("pods", "default", "forged", _ended(forged),
                              subresource="status")  # fmt: skip
        end = await asyncio.to_thread(kube.job_end, name)
        assert end == JobEnd(False, "its pod is gone (no termination message)")
        honest = json.dumps({"v": 1, "files": {}})
        emulator.create_object("pods", _pod("own", job, job["metadata"]["uid"]),
                               namespace="default")  # fmt: skip
        emulator.patch_object("pods", "default", "own", _ended(honest), subresource="status")
        assert await asyncio.to_thread(kube.job_end, name) == JobEnd(True, honest)
        # a Job of that name that is not the search's
        other = ApiKube({**search, "metadata": {**meta, "uid": "x"}},
                        "default", "s")  # fmt: skip
        end = await asyncio.to_thread(other.job_end, name)
        assert end is not None
        assert not end.succeeded
        assert "not this search's" in end.message
