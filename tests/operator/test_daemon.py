"""run_search over the machine's PostgreSQL and RabbitMQ with real trainer processes; the
Kubernetes side is a recorder (the kopf glue around it is tested with the emulator)."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pika
import pytest
from services import RABBITMQ_URL, TcpForwarder, TrainerProcess

from mloptimizer.dispatch import Outcome
from mloptimizer.messages import QueueNames
from mloptimizer.operator.daemon import SearchConfig, run_search
from mloptimizer.spec import ArchitectureSearchSpec
from mloptimizer.study import Attr, open_study, records, storage_url

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class RecordingKube:
    patches: list[dict[str, Any]] = field(default_factory=list)
    replicas: list[int] = field(default_factory=list)
    events: list[tuple[str, str, str]] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    marked: list[tuple[dict[str, int], int]] = field(default_factory=list)  # (busy, replicas)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def patch_status(self, patch: dict[str, Any]) -> None:
        with self.changed:
            self.patches.append(patch)
            self.status.update(patch)
            self.changed.notify_all()

    def scale(self, replicas: int) -> None:
        self.replicas.append(replicas)

    def event(self, type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))

    def ready_replicas(self) -> int:
        return self.replicas[-1] if self.replicas else 0  # pods start at once here

    def mark_busy(self, busy: dict[str, int]) -> None:
        self.marked.append((dict(busy), self.replicas[-1] if self.replicas else 0))

    def wait_for(self, condition: Any, timeout: float = 180) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: condition(self.status), timeout=timeout)


def spec(**budget: Any) -> ArchitectureSearchSpec:
    return ArchitectureSearchSpec.model_validate(
        {
            "dataset": {"builtin": "digits"},
            "budget": {"maxTrials": 5, "parallelism": 2, **budget},
            "sampler": {"seed": 5, "nStartupTrials": 2},
            "pruner": {"type": "none"},
            "training": {"epochs": 2, "batchSize": 32, "mixedPrecision": "off"},
            "searchSpace": {
                "architectures": ["cnn"],
                "cnn": {"blocks": {"min": 1, "max": 1}, "filters": {"min": 16, "max": 32}},
                "classifier": {"types": ["mlp"], "units": {"min": 32, "max": 64, "step": 32}},
            },
            "workers": {"minReplicas": 0, "maxReplicas": 3, "pricePerHour": 0.36},
        }
    )


@pytest.fixture
def config(postgres_dsn: str) -> Iterator[SearchConfig]:
    found = SearchConfig(
        namespace="team-a",
        name=f"search-{uuid.uuid4().hex[:6]}",
        storage_url=postgres_dsn,
        broker_url=RABBITMQ_URL,
        status_interval=1.0,
    )
    yield found
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    channel = connection.channel()
    for queue in QueueNames(found.study).all:
        channel.queue_delete(queue)
    connection.close()


@pytest.fixture
def trainers(config: SearchConfig, tmp_path: Path) -> Iterator[list[TrainerProcess]]:
    started = [TrainerProcess(RABBITMQ_URL, config.study, tmp_path, f"t{i}") for i in (1, 2)]
    yield started
    for trainer in started:
        trainer.stop()


def test_a_search_runs_to_succeeded_with_status_replicas_and_events(
    config: SearchConfig, trainers: list[TrainerProcess]
) -> None:
    kube = RecordingKube()
    outcome = run_search(config, spec(), kube, stop=threading.Event(), generation=1)
    assert isinstance(outcome, Outcome)
    assert outcome.reason == "maxTrials"

    study = optuna.load_study(study_name=config.study, storage=storage_url(config.storage_url))
    trials = records(study)
    assert len(trials) == 5
    final = kube.status
    assert final["phase"] == "Succeeded"
    assert final["trials"]["complete"] == sum(t.state == "complete" for t in trials) == 5
    assert final["best"]["number"] == study.best_trial.number
    assert final["best"]["value"] == pytest.approx(study.best_value, abs=1e-6)
    assert final["progress"] == "5/5"
    assert final["observedGeneration"] == 1
    assert final["studyName"] == config.study
    assert final["completionTime"]
    assert final["cost"]["usd"] == pytest.approx(sum(t.cost_usd for t in trials), abs=1e-4)
    assert final["cost"]["usd"] > 0
    complete = {c["type"]: c for c in final["conditions"]}
    assert complete["Complete"]["status"] == "True"
    assert complete["Complete"]["reason"] == "MaxTrialsReached"

    assert max(kube.replicas) == 2  # one per trial in flight, parallelism 2
    assert max(p.get("workers", {}).get("ready", 0) for p in kube.patches) >= 1
    assert kube.replicas[-1] == 0
    reasons = [reason for _, reason, _ in kube.events]
    assert reasons[0] == "Started"
    assert "NewBest" in reasons
    assert reasons[-1] == "Finished"
    # coalesced: far fewer patches than the ~30 progress and result messages
    assert len(kube.patches) < 20


def test_a_restarted_operator_resumes_without_telling_a_trial_twice(
    config: SearchConfig, trainers: list[TrainerProcess]
) -> None:
    kube = RecordingKube()
    stop = threading.Event()
    results: list[Outcome | None] = []
    first = threading.Thread(
        target=lambda: results.append(run_search(config, spec(), kube, stop=stop))
    )
    first.start()
    kube.wait_for(lambda s: s.get("trials", {}).get("complete", 0) >= 2)
    stop.set()  # the operator pod goes away mid-search
    first.join(timeout=60)
    assert results == [None]

    second = RecordingKube()
    outcome = run_search(config, spec(), second, stop=threading.Event())
    assert outcome is not None
    assert outcome.reason == "maxTrials"
    assert ("Normal", "Resumed") in [(t, r) for t, r, _ in second.events]
    study = optuna.load_study(study_name=config.study, storage=storage_url(config.storage_url))
    trials = records(study)
    assert len([t for t in trials if t.counted]) == 5
    assert all(t.state == "complete" for t in trials)
    assert second.status["trials"]["complete"] == 5


def test_an_unreachable_broker_shows_degraded_and_recovers_when_stopped(
    config: SearchConfig,
) -> None:
    config.broker_url = "amqp://guest:guest@127.0.0.1:1/%2F"  # nothing listens there
    config.max_backoff = 0.2
    kube = RecordingKube()
    stop = threading.Event()
    thread = threading.Thread(target=run_search, args=(config, spec(), kube), kwargs={"stop": stop})
    thread.start()
    kube.wait_for(
        lambda s: any(
            c["type"] == "Degraded" and c["status"] == "True" for c in s.get("conditions", [])
        ),
        timeout=60,
    )
    stop.set()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert "retrying" in kube.status["message"]


def degraded(reason: str) -> Any:
    def check(status: dict[str, Any]) -> bool:
        return any(
            c["type"] == "Degraded" and c.get("reason") == reason
            for c in status.get("conditions", [])
        )

    return check


def test_a_broker_that_comes_back_clears_degraded_and_the_search_completes(
    config: SearchConfig, trainers: list[TrainerProcess]
) -> None:
    forwarder = TcpForwarder(5672)  # the operator's way to the broker: closed for now
    config.broker_url = f"amqp://guest:guest@127.0.0.1:{forwarder.port}/%2F"
    config.max_backoff = 0.5
    kube = RecordingKube()
    outcomes: list[Outcome | None] = []
    thread = threading.Thread(
        target=lambda: outcomes.append(run_search(config, spec(), kube, stop=threading.Event()))
    )
    thread.start()
    try:
        kube.wait_for(degraded("ConnectionLost"), timeout=60)
        assert "retrying" in kube.status["message"]
        forwarder.open()  # the broker is back
        kube.wait_for(degraded("Connected"), timeout=60)
        thread.join(timeout=300)
    finally:
        forwarder.close()
    assert outcomes
    assert outcomes[0] is not None
    assert outcomes[0].reason == "maxTrials"
    degraded_now = next(c for c in kube.status["conditions"] if c["type"] == "Degraded")
    assert degraded_now["status"] == "False"
    assert kube.status["phase"] == "Succeeded"


def test_a_broker_away_for_over_two_minutes_mid_search_loses_nothing(
    config: SearchConfig, tmp_path: Path
) -> None:
    """The Guarantees row's "away for minutes", with the default backoff (to 30 s): the
    operator's and the trainers' way to the broker is cut mid-search for 130 s."""
    forwarder = TcpForwarder(5672)
    url = f"amqp://guest:guest@127.0.0.1:{forwarder.port}/%2F"
    config.broker_url = url
    forwarder.open()
    keep = ("--checkpoint-dir", str(tmp_path / "checkpoints"))
    started = [TrainerProcess(url, config.study, tmp_path, f"t{i}", *keep) for i in (1, 2)]
    kube = RecordingKube()
    outcomes: list[Outcome | None] = []
    search = spec(maxTrials=6)
    thread = threading.Thread(
        target=lambda: outcomes.append(run_search(config, search, kube, stop=threading.Event()))
    )
    thread.start()
    try:
        kube.wait_for(lambda s: s.get("trials", {}).get("complete", 0) >= 1, timeout=180)
        forwarder.close()  # RabbitMQ away for everyone: connections cut, none accepted
        kube.wait_for(degraded("ConnectionLost"), timeout=60)
        threading.Event().wait(130)  # the outage itself: its length is what is tested
        forwarder.open()
        kube.wait_for(degraded("Connected"), timeout=90)  # within a 30 s backoff of it
        thread.join(timeout=300)
    finally:
        forwarder.close()
        for trainer in started:
            trainer.stop()
    assert outcomes
    assert outcomes[0] is not None
    assert outcomes[0].reason == "maxTrials", [t.log()[-2000:] for t in started]
    assert kube.status["phase"] == "Succeeded"
    study = optuna.load_study(study_name=config.study, storage=storage_url(config.storage_url))
    trials = records(study)
    counted = [t for t in trials if t.counted]
    assert len(counted) == 6  # nothing lost
    assert all(t.state == "complete" for t in counted)
    # a trial whose publish the broker never confirmed as it went is replaced, untrained
    assert all(t.interrupted and not t.attrs.get(Attr.WORKER) for t in trials if not t.counted)
    assert sum(int(t.attrs.get(Attr.REDONE_EPOCHS, 0)) for t in trials) <= 2  # a trainer each
    logs = "".join(t.log() for t in started)
    assert "waiting for the broker" in logs or "reconnecting" in logs


def test_a_bug_while_handling_results_fails_those_trials_not_the_operator(
    config: SearchConfig, trainers: list[TrainerProcess], caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []

    def broken_price(worker: str) -> float:
        calls.append(worker)
        raise ValueError("a bug in the price lookup")

    kube = RecordingKube()
    with caplog.at_level(logging.ERROR, logger="mloptimizer.dispatch"):
        outcome = run_search(
            config, spec(maxFailedTrials=2), kube, stop=threading.Event(), price_of=broken_price
        )
    # Each result that could not be handled is rejected (never redelivered into a crash
    # loop) and its trial failed; the failures end the search as the budget says.
    assert outcome is not None
    assert outcome.reason == "maxFailedTrials"
    assert kube.status["phase"] == "Failed"
    assert len(calls) == 2
    study = open_study(spec(maxFailedTrials=2), config.study, storage_url(config.storage_url))
    failed = [r for r in records(study) if r.state == "failed" and not r.interrupted]
    assert len(failed) == 2
    assert all("handling it failed: ValueError: a bug in the price lookup" in (r.error or "")
               for r in failed)  # fmt: skip
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2
    assert all(e.exc_info is not None for e in errors)  # with their tracebacks


class BrokenScaleKube(RecordingKube):
    def scale(self, replicas: int) -> None:
        raise ValueError("a bug in scaling")


def test_a_bug_outside_message_handling_is_logged_once_and_shown_instead_of_retried(
    config: SearchConfig, caplog: pytest.LogCaptureFixture
) -> None:
    kube = BrokenScaleKube()
    with caplog.at_level(logging.ERROR, logger="mloptimizer.operator.daemon"):
        outcome = run_search(config, spec(), kube, stop=threading.Event())
    assert outcome is None  # the daemon stopped: no endless retry
    assert degraded("InternalError")(kube.status)
    assert "ValueError: a bug in scaling" in kube.status["message"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None  # with its traceback


def test_a_study_left_by_another_search_of_that_name_fails_the_search(
    config: SearchConfig,
) -> None:
    other = spec().model_copy(update={"dataset": spec().dataset.model_copy(update={"seed": 9})})
    open_study(other, config.study, config.storage_url, owner="uid-of-the-old-search")
    config.uid = "uid-of-the-new-search"
    kube = RecordingKube()
    outcome = run_search(config, spec(), kube, stop=threading.Event())
    assert outcome is None
    assert kube.status["phase"] == "Failed"
    assert "spec.dataset cannot change" in kube.status["message"]
    complete = next(c for c in kube.status["conditions"] if c["type"] == "Complete")
    assert complete["reason"] == "StudyMismatch"
    assert ("Warning", "StudyMismatch") in [(t, r) for t, r, _ in kube.events]


def test_an_edit_made_while_no_operator_ran_is_refused_and_the_search_goes_on(
    config: SearchConfig,
) -> None:
    open_study(spec(), config.study, config.storage_url, owner="uid-1")
    edited = spec().model_copy(update={"dataset": spec().dataset.model_copy(update={"seed": 9})})
    config.uid = "uid-1"
    kube = RecordingKube()
    stop = threading.Event()
    thread = threading.Thread(
        target=run_search,
        args=(config, edited, kube),
        kwargs={"stop": stop, "latest_spec": lambda: edited},
    )
    thread.start()
    try:
        kube.wait_for(degraded("SpecChangeRefused"), timeout=60)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert kube.status["phase"] == "Running"
    refused = next(c for c in kube.status["conditions"] if c["type"] == "Degraded")
    assert "spec.dataset cannot change" in refused["message"]
