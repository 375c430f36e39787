"""The final job: the best model of a search delivered to its output.

End to end: kopf with our handlers against the real API server (status.artifacts and the
Delivered condition round-trip through it), the machine's PostgreSQL and RabbitMQ, real
`mloptimizer trainer` processes training real Keras models, and two destinations: a folder
standing for the output PVC (the trainer gets it as its pod would: ``--output-dir`` where
the claim is mounted, ``--keep-models`` in it) and an S3 server that checks every
request's signature (``s3server.py``). Then `mloptimizer fetch` brings the files back.

The retry rules of :func:`run_final_job` are tested on their own with a scripted channel.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from cluster import Cluster, run_operator
from jobs import JobController, process_runner
from s3server import ACCESS_KEY, SECRET_KEY, s3_server
from services import TrainerProcess
from test_operator import condition, finished, name, operator_config, search, start_trainer

from mloptimizer.capability import new_token
from mloptimizer.messages import (
    REPORT_FILES,
    ArtifactReport,
    DeliveredMessage,
    DeliverMessage,
    ToFolder,
    TrialMessage,
)
from mloptimizer.operator.claimverify import Checked
from mloptimizer.operator.delivery import (
    Dead,
    Destination,
    FinalJobChannel,
    deliver_best,
    run_final_job,
)
from mloptimizer.operator.main import shared_memo
from mloptimizer.operator.secretrefs import FOR_OPERATOR, USABLE_LABEL
from mloptimizer.space import Architecture
from mloptimizer.spec import Dataset

__all__ = ["name"]  # the fixture, shared with test_operator


def delivered(obj: Any) -> bool:
    if not finished(obj):
        return False
    found = [c for c in obj["status"].get("conditions", []) if c["type"] == "Delivered"]
    return bool(found) and found[0]["status"] != "Unknown"


async def mloptimizer(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """The CLI as a user runs it, without blocking the loop that serves the cluster."""
    exe = Path(sys.executable).parent / "mloptimizer"
    process = await asyncio.create_subprocess_exec(
        str(exe), *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def open_claim(cluster: Cluster, name: str) -> str:
    """A PersistentVolumeClaim of the search's own, opened to searches by its label (as an
    admin does: an unlabelled claim is refused); returns its name."""
    claim = f"{name}-models"
    labels = {USABLE_LABEL: FOR_OPERATOR}
    await cluster.create(
        "persistentvolumeclaims", {"metadata": {"name": claim, "labels": labels}}, "default"
    )
    return claim


async def test_a_search_with_output_pvc_delivers_its_kept_model_and_fetch_brings_it(
    cluster: Cluster, postgres_dsn: str, name: str, tmp_path: Path
) -> None:
    claim = tmp_path / "claim"  # the PVC's content, as its trainers see it under /output
    models = await open_claim(cluster, name)
    body = search(name, output={"formats": ["keras", "tflite-int8"], "pvc": {"claimName": models}})
    trainer: TrainerProcess | None = None
    # the operator's verify Job reads the claim: its command run as a process on the folder
    config = dataclasses.replace(operator_config(postgres_dsn), verify_image="operator:test")
    try:
        async with (
            run_operator(cluster, memo=shared_memo(config)),
            JobController(cluster, "default", process_runner({models: claim})) as jobs,
        ):
            await cluster.create("archsearch", body)
            deployment = await cluster.wait_for(
                "deployments", "default", f"{name}-trainer", timeout=30
            )
            assert deployment is not None
            pod = deployment["spec"]["template"]["spec"]
            volume = next(v for v in pod["volumes"] if v["name"] == "output")
            assert volume["persistentVolumeClaim"] == {"claimName": models}
            env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
            assert env["MLOPT_OUTPUT_DIR"] == "/output"
            assert env["MLOPT_KEEP_MODELS"] == f"/output/default/{name}/models"
            assert env["MLOPT_CHECKPOINT_DIR"] == f"/output/default/{name}/checkpoints"
            on_host = {
                k: v.replace("/output", str(claim))
                for k, v in env.items()
                if v and v.startswith("/output")
            }
            trainer = await start_trainer(
                cluster,
                "default",
                name,
                tmp_path,
                "t1",
                "--output-dir",
                on_host["MLOPT_OUTPUT_DIR"],
                "--keep-models",
                on_host["MLOPT_KEEP_MODELS"],
            )
            done = await cluster.wait_for("archsearch", "default", name, delivered, timeout=300)
    finally:
        if trainer is not None:
            trainer.stop()
    assert done is not None
    status = done["status"]
    assert status["phase"] == "Succeeded"
    ok = condition(done, "Delivered")
    assert ok["status"] == "True", (ok, trainer.log() if trainer else "")
    assert "kept weights" in ok["message"]  # the trainer's own weights: no second training
    folder = claim / "default" / name
    artifacts = {a["format"]: a for a in status["artifacts"] if a["format"] != "report"}
    assert set(artifacts) == {"keras", "tflite-int8"}
    for fmt, file in (("keras", "model.keras"), ("tflite-int8", "model-int8.tflite")):
        entry = artifacts[fmt]
        assert entry["uri"] == f"pvc://{models}/default/{name}/{file}"
        assert (folder / file).stat().st_size == entry["bytes"]
        assert entry["sha256"] == hashlib.sha256((folder / file).read_bytes()).hexdigest()
        assert entry["verified"] is True  # read back by the operator's verify Job
        assert 0.5 < entry["testAccuracy"] <= 1.0
        assert entry["latencyMs"] > 0
    (job,) = jobs.ran
    assert job.startswith(f"{name}-verify-")
    assert f"sizes and sha256 checked by Job {job}" in ok["message"]
    assert "unverified" not in ok["message"]
    reports = [a["uri"] for a in status["artifacts"] if a["format"] == "report"]
    assert reports == [f"pvc://{models}/default/{name}/{file}" for file in REPORT_FILES]
    # the very report a local run writes: the study's part sent by the operator
    page = (folder / "report.md").read_text()
    for heading in (
        "## Best trial",
        "## Best model on the held-out",
        "| class | precision",
        "## Optimisation history",
        "## Parameter importances",
        "## Every trial",
    ):
        assert heading in page, heading  # fmt: skip
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["search"] == f"default.{name}"
    assert summary["trials_total"] == len(summary["trials"]) >= 2

    out = tmp_path / "fetched"
    kube = ["--kubeconfig", str(cluster.kubeconfig)]
    code, _, err = await mloptimizer("fetch", f"default/{name}", "--to", str(out), *kube)
    assert code == 2
    assert f"PersistentVolumeClaim {models!r}" in err
    assert "--from-dir" in err
    code, printed, err = await mloptimizer(
        "fetch", f"default/{name}", "--to", str(out), "--from-dir", str(claim), *kube
    )
    assert code == 0, err
    assert (out / "model-int8.tflite").read_bytes() == (folder / "model-int8.tflite").read_bytes()
    assert (out / "report.md").exists()
    assert "tflite-int8" in printed


async def test_a_search_with_output_s3_uploads_through_presigned_urls(
    cluster: Cluster, postgres_dsn: str, name: str, tmp_path: Path
) -> None:
    await cluster.create(
        "secrets",
        {
            "metadata": {"name": f"{name}-bucket", "labels": {USABLE_LABEL: "true"}},
            "data": {
                "accessKeyId": base64.b64encode(ACCESS_KEY.encode()).decode(),
                "secretAccessKey": base64.b64encode(SECRET_KEY.encode()).decode(),
            },
        },
        "default",
    )
    trainer: TrainerProcess | None = None
    with s3_server("models") as (endpoint, store):
        body = search(
            name,
            output={
                "formats": ["tflite-int8"],
                "s3": {
                    "endpoint": endpoint,
                    "bucket": "models",
                    "prefix": "team/edge",
                    "secretRef": {"name": f"{name}-bucket"},
                },
            },
        )
        try:
            async with run_operator(cluster, memo=shared_memo(operator_config(postgres_dsn))):
                await cluster.create("archsearch", body)
                trainer = await start_trainer(cluster, "default", name, tmp_path, "t1")
                done = await cluster.wait_for("archsearch", "default", name, delivered, timeout=300)
        finally:
            if trainer is not None:
                trainer.stop()
        assert done is not None
        ok = condition(done, "Delivered")
        assert ok["status"] == "True", (ok, trainer.log() if trainer else "")
        # every request carried a valid signature; the 404s are each trial's first look
        # for a checkpoint to go on from
        absent = [r for r in store.refused if r.endswith(": NoSuchKey")]
        assert [r for r in store.refused if r not in absent] == []
        assert all(r.startswith("GET /models/team/edge/checkpoints/") for r in absent)
        assert sorted(k for k in store.puts if "/checkpoints/" not in k) == sorted(
            f"team/edge/{file}" for file in ("model-int8.tflite", *REPORT_FILES)
        )  # written by the trainer, with pre-signed URLs only
        # every epoch was kept in the bucket (trainers share no folder), through each
        # trial's own URLs, and the operator removed them as each trial ended
        kept = [k for k in store.puts if "/checkpoints/" in k]
        assert kept, store.puts
        assert all(k.startswith("team/edge/checkpoints/trial-") for k in kept), kept
        assert not [k for k in store.buckets["models"] if "/checkpoints/" in k]
        log = trainer.log() if trainer else ""
        assert SECRET_KEY not in log
        (entry,) = [a for a in done["status"]["artifacts"] if a["format"] == "tflite-int8"]
        assert entry["uri"] == "s3://models/team/edge/model-int8.tflite"
        stored = store.buckets["models"]["team/edge/model-int8.tflite"]
        assert entry["bytes"] == len(stored)
        assert entry["sha256"] == hashlib.sha256(stored).hexdigest()
        assert entry["verified"] is True  # read back by the operator

        out = tmp_path / "fetched"
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        code, _, err = await mloptimizer(
            "fetch",
            f"default/{name}",
            "--to",
            str(out),
            "--kubeconfig",
            str(cluster.kubeconfig),
            env=env,
        )
        assert code == 0, err
        assert (out / "model-int8.tflite").read_bytes() == store.buckets["models"][
            "team/edge/model-int8.tflite"
        ]


async def bucket_secret(cluster: Cluster, name: str, secret_key: str) -> None:
    await cluster.create(
        "secrets",
        {
            "metadata": {"name": name, "labels": {USABLE_LABEL: "true"}},
            "data": {
                "accessKeyId": base64.b64encode(ACCESS_KEY.encode()).decode(),
                "secretAccessKey": base64.b64encode(secret_key.encode()).decode(),
            },
        },
        "default",
    )


async def test_a_final_job_failing_every_round_is_a_condition_not_a_lost_search(
    cluster: Cluster, postgres_dsn: str, name: str, tmp_path: Path
) -> None:
    await bucket_secret(cluster, f"{name}-bucket", "a-key-the-store-does-not-know")
    trainer: TrainerProcess | None = None
    with s3_server("models") as (endpoint, store):
        body = search(
            name,
            budget={"maxTrials": 2, "parallelism": 1},
            sampler={"seed": 1, "nStartupTrials": 1},
            output={
                "formats": ["keras"],
                "s3": {"endpoint": endpoint, "bucket": "models",
                       "secretRef": {"name": f"{name}-bucket"}},
            },
        )  # fmt: skip
        try:
            async with run_operator(cluster, memo=shared_memo(operator_config(postgres_dsn))):
                await cluster.create("archsearch", body)
                trainer = await start_trainer(cluster, "default", name, tmp_path, "t1")
                done = await cluster.wait_for("archsearch", "default", name, delivered, timeout=300)
                deployment = await cluster.get("deployments", "default", f"{name}-trainer")
                # the condition is written before its event is posted (kopf posts events in
                # the background): the operator stays up until the event is in
                async with asyncio.timeout(30):
                    while "DeliveryFailed" not in await event_reasons(cluster, name):
                        await asyncio.sleep(0.1)
        finally:
            if trainer is not None:
                trainer.stop()
        assert done is not None
        assert done["status"]["phase"] == "Succeeded"  # the search itself went well
        failed = condition(done, "Delivered")
        assert failed["status"] == "False"
        assert failed["reason"] == "DeliveryFailed"
        assert "failed 3 times" in failed["message"]
        assert "HTTP 403" in failed["message"]
        assert not done["status"].get("artifacts")
        assert store.puts == []  # the store refused every forged-looking URL
        # every round's PUT refused (a PUT cut by a lost connection is retried: >= 3)
        assert len(store.refused) >= 3
        assert all("signature does not match" in why for why in store.refused)
        assert deployment is not None
        assert deployment["spec"]["replicas"] == 0  # no trainer left up for it
    reasons = await event_reasons(cluster, name)
    assert reasons.count("DeliveryRetried") == 2
    assert "DeliveryFailed" in reasons


async def event_reasons(cluster: Cluster, name: str) -> list[str]:
    """The reasons of the events posted about the search ``name``, in order."""
    return [e["reason"] for e in await cluster.list("events", "default")
            if e["involvedObject"]["name"] == name]  # fmt: skip


async def test_an_operator_restarted_mid_job_resumes_it(
    cluster: Cluster, postgres_dsn: str, name: str, tmp_path: Path
) -> None:
    claim = tmp_path / "claim"
    models = await open_claim(cluster, name)
    body = search(name, output={"formats": ["keras"], "pvc": {"claimName": models}})
    volume = ("--output-dir", str(claim), "--keep-models", str(claim / "default" / name / "models"))
    first: TrainerProcess | None = None
    second: TrainerProcess | None = None
    try:
        async with run_operator(cluster, memo=shared_memo(operator_config(postgres_dsn))):
            await cluster.create("archsearch", body)
            # this trainer leaves after the search's 4 trials: nobody takes the final job
            first = await start_trainer(
                cluster, "default", name, tmp_path, "first", "--max-trials", "4", *volume
            )
            pending = await cluster.wait_for(
                "archsearch", "default", name,
                lambda o: finished(o) and condition(o, "Delivered")["status"] == "Unknown",
                timeout=300,
            )  # fmt: skip
            assert pending is not None
        assert first.process.wait(timeout=60) == 0
        assert "final job" not in first.log()
        async with run_operator(cluster, memo=shared_memo(operator_config(postgres_dsn))):
            second = await start_trainer(cluster, "default", name, tmp_path, "second", *volume)
            done = await cluster.wait_for("archsearch", "default", name, delivered, timeout=300)
    finally:
        for trainer in (first, second):
            if trainer is not None:
                trainer.stop()
    assert done is not None
    ok = condition(done, "Delivered")
    assert ok["status"] == "True", ok
    assert "kept weights" in ok["message"]  # the first trainer's, from the claim
    assert (claim / "default" / name / "model.keras").exists()
    # an operator without a verify image cannot read the claim, and says so
    assert "unverified: sizes and sha256 are the trainer's word" in ok["message"]
    assert "--verify-image" in ok["message"]
    assert all(a["verified"] is False for a in done["status"]["artifacts"] if "bytes" in a
               and a["format"] != "report")  # fmt: skip
    assert "final job" in second.log() if second else False


# --- the retry rules, with a scripted channel ----------------------------------------------


class Script:
    """A FinalJobChannel stand-in: answers each send with what the test scripted."""

    def __init__(self, answers: list[list[Any]]) -> None:
        self.answers = answers
        self.sent: list[DeliverMessage] = []
        self._pending: list[Any] = []

    def send(self, message: DeliverMessage) -> None:
        self.sent.append(message)
        self._pending = list(self.answers.pop(0)) if self.answers else []

    def receive(self, timeout: float) -> list[Any]:
        out, self._pending = self._pending, []
        return [a(self.sent[-1]) if callable(a) else a for a in out]

    def close(self) -> None:
        pass


def job(round_: int) -> DeliverMessage:
    best = TrialMessage(
        search="ns.s",
        trial_id=7,
        number=7,
        dataset=Dataset(builtin="digits"),
        epochs=2,
        batch_size=32,
        seed=7,
        architecture=Architecture.model_validate(
            {
                "family": "cnn",
                "conv_blocks": [{"filters": 16, "kernel_size": 3}],
                "classifier": "gap",
                "dropout": 0.0,
                "learning_rate": 0.003,
            }
        ),
    )
    return DeliverMessage(
        search="ns.s",
        trial_id=7,
        number=7,
        round=round_,
        best=best,
        formats=["keras"],
        to=ToFolder(path="ns/s"),
    )


def answer(state: str = "complete", **fields: Any) -> Any:
    def make(sent: DeliverMessage) -> DeliveredMessage:
        values: dict[str, Any] = {
            "search": sent.search,
            "trial_id": sent.trial_id,
            "number": sent.number,
            "round": sent.round,
            "token": sent.token,
            "attempt": 1,
            "worker_id": "t",
            "state": state,
            "artifacts": [ArtifactReport(format="keras", bytes=10, accuracy=0.9)]
            if state == "complete"
            else [],
        }
        values.update(fields)
        return DeliveredMessage(**values)

    return make


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0  # every look at the clock is a second later
        return self.now


def run(script: Script, rounds: int = 3) -> Any:
    return run_final_job(
        script,  # type: ignore[arg-type]
        job,
        Destination("ns/s", claim="models"),
        silence=5.0,
        stop=lambda: False,
        rounds=rounds,
        clock=Clock(),
    )


def test_a_failed_a_dead_lettered_and_a_silent_round_are_each_sent_again() -> None:
    script = Script(
        [
            [answer("failed", error="disk full")],
            [lambda sent: Dead(sent, "delivery limit")],
            [],  # silence
            [answer()],
        ]
    )
    outcome = run(script, rounds=4)
    assert outcome.delivered is not None
    assert outcome.rounds == 4
    assert [m.round for m in script.sent] == [1, 2, 3, 4]


def test_after_every_round_failed_the_last_reason_is_kept() -> None:
    script = Script(
        [
            [answer("failed", error="a")],
            [answer("failed", error="b")],
            [answer("failed", error="c")],
        ]
    )
    outcome = run(script)
    assert outcome.delivered is None
    assert outcome.error == "c"
    assert outcome.rounds == 3


@pytest.mark.parametrize(
    ("forged", "why"),
    [
        (answer(search="ns.other"), "another search"),
        (answer(trial_id=8, number=8), "another trial"),
        (answer(round=9), "a round never sent"),
        (answer(artifacts=[ArtifactReport(format="savedmodel", bytes=1)]), "a format not asked"),
        (answer("failed", round=1), None),  # a stale failure of an earlier round
        (answer(token=new_token()), "a trainer that did not take round 2"),
        (answer(round=1), "round 1's answer with round 2's token"),
    ],
)
def test_a_report_that_cannot_answer_the_job_is_not_believed(forged: Any, why: str | None) -> None:
    script = Script([[], [forged], [answer()]])  # round 2 gets only the forged report
    outcome = run(script)
    assert outcome.delivered is not None
    assert outcome.rounds == 3  # the forged one did not end round 2 as delivered
    assert outcome.delivered.round == 3


def test_the_real_channel_carries_the_job_and_its_answer() -> None:
    import uuid

    import pika
    from services import RABBITMQ_URL as rabbitmq_url

    from mloptimizer.broker import declare_queues
    from mloptimizer.messages import QueueNames, decode, encode

    search_name = f"ns.final-{uuid.uuid4().hex[:6]}"
    channel = FinalJobChannel(rabbitmq_url, search_name)
    try:
        sent = job(1).model_copy(update={"search": search_name})
        channel.send(sent)
        connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
        names = QueueNames(search_name)
        side = connection.channel()
        declare_queues(side, names)
        method, _, body = side.basic_get(names.trials, auto_ack=True)
        assert method is not None
        assert decode(body) == sent
        reply = answer()(sent)
        side.basic_publish("", names.results, encode(reply))
        side.basic_publish("", names.results, b"{not json")
        got: list[Any] = []
        for _ in range(20):
            got += channel.receive(0.2)
            if len(got) == 2:
                break
        assert reply in got
        assert any(isinstance(g, str) and "not JSON" in g for g in got)  # kept aside, rejected
        method, _, _ = side.basic_get(names.rejected, auto_ack=True)
        assert method is not None
        for queue in names.all:
            side.queue_delete(queue)
        connection.close()
    finally:
        channel.close()


def test_what_a_trainer_says_it_put_in_a_bucket_is_read_back(tmp_path: Path) -> None:
    from mloptimizer.operator.objectstore import Bucket
    from mloptimizer.trainer.deliver import put_file

    with s3_server("models") as (endpoint, _):
        bucket = Bucket(endpoint, "models", "us-east-1", ACCESS_KEY, SECRET_KEY)
        destination = Destination("ns/s", bucket=bucket)
        files = {"model.keras": b"weights" * 100} | {f: b"report" for f in REPORT_FILES}
        to = destination.to(list(files), expires=600)
        assert not isinstance(to, ToFolder)
        for file, data in files.items():  # as a trainer does: one pre-signed PUT each
            (tmp_path / file).write_bytes(data)
            put_file(to.urls[file], tmp_path / file)
        honest = hashlib.sha256(files["model.keras"]).hexdigest()

        def said(**artifact: Any) -> DeliveredMessage:
            report = {"format": "keras", "bytes": len(files["model.keras"]), **artifact}
            made: DeliveredMessage = answer(artifacts=[ArtifactReport(**report)])(job(1))
            return made

        assert destination.verify(said(sha256=honest)) is None
        forged = destination.verify(said(sha256="0" * 64))
        assert forged == f"model.keras: the bucket's sha256 is {honest}, not the trainer's"
        assert destination.verify(said()) == "model.keras: the trainer gave no sha256"
        assert destination.verify(said(bytes=123456789, sha256=honest)) == (
            "model.keras: the trainer says 123456789 bytes, the bucket has 700"
        )


class JobRecorder:
    """The search's Kubernetes side for :func:`deliver_best`: what it was told."""

    def __init__(self) -> None:
        self.status: dict[str, Any] = {}
        self.events: list[tuple[str, str, str]] = []

    def patch_status(self, patch: dict[str, Any]) -> None:
        self.status.update(patch)

    def scale(self, replicas: int) -> None:
        self.status["replicas"] = replicas

    def event(self, type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))


@pytest.mark.parametrize(
    ("checked", "state", "reason", "verified"),
    [
        (Checked(True, "sizes and sha256 checked by Job s-verify-1"), "True", "Delivered", True),
        (Checked(False, "the verify Job s-verify-1 failed: DeadlineExceeded"), "True",
         "Delivered", False),
        (Checked(False, "checked by Job s-verify-1: model.keras: the trainer says 10 bytes, "
                 "the claim has 3", mismatch=True), "False", "VerificationFailed", False),
    ],
)  # fmt: skip
def test_what_a_claims_verify_job_finds_is_the_delivered_condition(
    checked: Checked, state: str, reason: str, verified: bool
) -> None:
    """A claim's delivery is verified only by the operator's Job: found as said, the
    artifacts are verified; other bytes than the trainer said fail the delivery; a Job that
    could not look leaves it delivered but unverified, with why."""
    seen: list[DeliveredMessage] = []

    def check(delivered: DeliveredMessage) -> Checked:
        seen.append(delivered)
        return checked

    kube = JobRecorder()
    deliver_best(
        job(1).best,
        ["keras"],
        lambda: Destination("ns/s", claim="models", check_claim=check),
        kube,
        threading.Event(),
        channel=lambda: Script([[answer(artifacts=[ArtifactReport(
            format="keras", bytes=10, sha256="a" * 64)])]]),  # type: ignore[arg-type,return-value]
        conditions=[],
        silence=5.0,
    )  # fmt: skip
    assert len(seen) == 1  # checked once, after the job, with the trainer's answer
    assert seen[0].artifacts[0].sha256 == "a" * 64
    (delivered_condition,) = [c for c in kube.status["conditions"] if c["type"] == "Delivered"]
    assert (delivered_condition["status"], delivered_condition["reason"]) == (state, reason)
    assert checked.detail in delivered_condition["message"]
    (keras,) = [a for a in kube.status["artifacts"] if a["format"] == "keras"]
    assert keras["verified"] is verified
    assert kube.status["replicas"] == 0  # the trainer is let go before the Job mounts the claim
    assert kube.events[-1][1] == reason
