"""Poison messages against the real dispatch loop over the machine's RabbitMQ.

A stand-in trainer (a thread with its own connection) takes each trial, and before it
reports the first one it floods the search's queues with what an attacker or a broken
trainer could send. Every such message must end in the rejected queue with its reason,
nothing of it may reach the study, and the search must finish as if it had not happened.
A trial that kills every trainer it reaches must come back as FAILED from the dead-letter
queue, not hang the search.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dispatch
import optuna
import pika
import pytest
from services import RABBITMQ_URL, connect_rabbitmq

from mloptimizer.amqp import AmqpTransport
from mloptimizer.broker import (
    DELIVERY_LIMIT,
    PERSISTENT,
    REASON_HEADER,
    REJECTED_BYTES,
    REJECTED_KEPT,
    declare_queues,
)
from mloptimizer.capability import new_token
from mloptimizer.dispatch import Dispatcher
from mloptimizer.messages import QueueNames, ResultMessage, TrialMessage, decode, encode
from mloptimizer.spec import ArchitectureSearchSpec
from mloptimizer.study import open_study, records

optuna.logging.set_verbosity(optuna.logging.WARNING)


def spec(max_trials: int) -> ArchitectureSearchSpec:
    return ArchitectureSearchSpec.model_validate(
        {
            "dataset": {"builtin": "digits"},
            "budget": {"maxTrials": max_trials, "parallelism": 1, "maxFailedTrials": 3},
            "sampler": {"seed": 1},
            "training": {"epochs": 2},
        }
    )


@pytest.fixture
def search(broker: Any) -> Iterator[str]:
    """A study (and queue) name of its own; the queues are deleted afterwards."""
    name = f"poison.{uuid.uuid4().hex[:8]}"
    yield name
    connection = connect_rabbitmq()
    channel = connection.channel()
    for queue in QueueNames(name).all:
        channel.queue_delete(queue)
    connection.close()


def result_of(trial: TrialMessage, **changes: Any) -> ResultMessage:
    """The stand-in trainer's result (value 0.5: the flood edits that text)."""
    return dispatch.result_of(trial, **{"worker_id": "stand-in", "value": 0.5, **changes})


def raw(message: ResultMessage, **override: Any) -> bytes:
    """The JSON of ``message`` with fields set to what the model itself would refuse."""
    data = json.loads(encode(message))
    data.update(override)
    return json.dumps(data).encode()


NOT_HOLDER = "does not carry trial"


def poison(trial: TrialMessage) -> list[tuple[str, bytes, str]]:
    """(queue kind, body, expected reason) of every poison message."""
    good = result_of(trial)
    progress = {
        "version": 3,
        "kind": "progress",
        "search": trial.search,
        "trial_id": trial.trial_id,
        "number": trial.number,
        "attempt": 1,
        "worker_id": "x",
        "metrics": {"val_accuracy": 0.5},
        "token": trial.token,
    }
    guessed = {"token": new_token()}  # the trial's id and number, not its capability
    forged_dead = trial.model_copy(update=guessed)
    return [
        ("results", b"{" + b" " * (300 * 1024) + b"}", "body of 307202 bytes is over"),
        ("results", raw(good, history=[{"loss": 0.1}] * 30_000), "is over the 262144-byte"),
        ("progress", json.dumps({**progress, "epoch": 2**31}).encode(), "progress.epoch"),
        ("progress", json.dumps({**progress, "epoch": 3}).encode(), "epoch 3 of a trial of 2"),
        ("results", raw(good).replace(b'"value": 0.5', b'"value": Infinity'), "finite number"),
        ("results", raw(good).replace(b'"value": 0.5', b'"value": NaN'), "finite number"),
        ("results", raw(good, value="high"), "result.value"),
        ("results", raw(good, trial_id=trial.trial_id + 1000), "no trial with id"),
        ("results", encode(result_of(trial, search="ns.attacker", value=1.0)), "ns.attacker"),
        ("results", encode(trial), "a trial message does not travel on results"),
        ("results", b"\xff\xfe not json", "not JSON"),
        ("progress-to-results", json.dumps({**progress, "epoch": 1}).encode(), "reply_to"),
        # issue 24: a trainer that does not hold the trial, values out of range, a trial
        # dead-lettered by someone other than the broker
        ("results", encode(result_of(trial, value=0.999, **guessed)), NOT_HOLDER),
        ("progress", json.dumps({**progress, "epoch": 1, **guessed}).encode(), NOT_HOLDER),
        ("results", raw(good, value=1e300), "result.value"),
        ("results", raw(good, val_accuracy=1e300), "result.val_accuracy"),
        ("results", encode(result_of(trial, value=1.5)), "1.5 is out of range for val_accuracy"),
        ("results", raw(good, model_kb=-1.0), "result.model_kb"),
        ("dead", encode(trial), "not dead-lettered by the broker from"),
        ("dead-as-broker", encode(forged_dead), NOT_HOLDER),
    ]


class StandInTrainer(threading.Thread):
    """Takes trials; before reporting the first one, sends ``flood`` into the queues."""

    def __init__(self, search: str, flood: Callable[[TrialMessage], list[Any]]) -> None:
        super().__init__(daemon=True)
        self.names = QueueNames(search)
        self.flood = flood
        self.sent: list[tuple[str, bytes, str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        connection = connect_rabbitmq()
        channel = connection.channel()
        declare_queues(channel, self.names)
        channel.basic_qos(prefetch_count=1)
        for method, _, body in channel.consume(self.names.trials, inactivity_timeout=0.2):
            if self.stop.is_set():
                break
            if method is None:
                continue
            trial = decode(body)
            assert isinstance(trial, TrialMessage)
            if not self.sent:
                self.sent = self.flood(trial)
                for kind, bad, _ in self.sent:
                    queue = self.names.results if kind == "results" else self.names.progress
                    properties = PERSISTENT
                    if kind == "progress-to-results":  # asks for the reply in a results queue
                        properties = pika.BasicProperties(reply_to=self.names.results)
                    if kind.startswith("dead"):  # into the dead-letter queue, headers forged
                        queue = self.names.dead_letters
                        forged = {"x-first-death-queue": self.names.trials}
                        headers = forged if kind == "dead-as-broker" else {}
                        properties = pika.BasicProperties(headers=headers)
                    channel.basic_publish("", queue, bad, properties)
                # Report only once all were refused: a result first would make the trial's
                # later progress an honest latecomer (answered "prune"), not a forgery.
                deadline = time.monotonic() + 30
                while self._rejected(channel) < len(self.sent) and time.monotonic() < deadline:
                    connection.sleep(0.05)
            report = result_of(trial, value=0.5 + trial.number / 100)
            channel.basic_publish("", self.names.results, encode(report), PERSISTENT)
            channel.basic_ack(method.delivery_tag)
        connection.close()

    def _rejected(self, channel: Any) -> int:
        declared = channel.queue_declare(self.names.rejected, passive=True)
        return int(declared.method.message_count)


def rejected_reasons(names: QueueNames) -> list[str]:
    connection = connect_rabbitmq()
    channel = connection.channel()
    reasons = []
    while True:
        method, properties, _ = channel.basic_get(names.rejected, auto_ack=True)
        if method is None:
            break
        reasons.append(str((properties.headers or {}).get(REASON_HEADER, "")))
    connection.close()
    return reasons


def test_every_poison_message_is_rejected_with_its_reason_and_the_search_goes_on(
    search: str, tmp_path: Path
) -> None:
    trainer = StandInTrainer(search, poison)
    trainer.start()
    study = open_study(spec(3), search, f"sqlite:///{tmp_path / 'study.db'}")
    transport = AmqpTransport(RABBITMQ_URL, search, prefetch=6)
    dispatcher = Dispatcher(study, spec(3), transport, search=search)
    try:
        outcome = dispatcher.run()
    finally:
        trainer.stop.set()
        trainer.join(10)

    assert outcome.reason == "maxTrials"
    trials = records(study)
    assert [t.state for t in trials] == ["complete"] * 3
    assert [t.value for t in trials] == [0.5, 0.51, 0.52]  # no forged or infinite value
    assert dispatcher.counts.best is not None
    assert dispatcher.counts.best.value == 0.52
    expected = [reason for _, _, reason in trainer.sent]
    assert dispatcher.counts.rejected == len(expected)
    reasons = rejected_reasons(QueueNames(search))
    assert len(reasons) == len(expected), reasons
    for reason in expected:
        assert any(reason in r for r in reasons), (reason, reasons)


def test_a_trial_that_kills_every_trainer_fails_from_the_dead_letter_queue(
    search: str, tmp_path: Path
) -> None:
    names = QueueNames(search)
    killed: list[int] = []

    done = threading.Event()

    def killer() -> None:
        """Takes the trial and dies with it (the connection closes unacked), again and again."""
        while not done.is_set():
            connection = connect_rabbitmq()
            channel = connection.channel()
            declare_queues(channel, names)
            method, _, body = next(channel.consume(names.trials, inactivity_timeout=0.5))
            if method is not None:
                killed.append(decode(body).trial_id)
            connection.close()  # unacked: the broker counts a failed delivery, requeues it

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    study = open_study(spec(1), search, f"sqlite:///{tmp_path / 'study.db'}")
    transport = AmqpTransport(RABBITMQ_URL, search)
    dispatcher = Dispatcher(study, spec(1), transport, search=search)
    try:
        outcome = dispatcher.run(should_stop=lambda: len(killed) > 3 * DELIVERY_LIMIT)
    finally:
        done.set()
        thread.join(10)

    assert killed == [records(study)[0].trial_id] * (DELIVERY_LIMIT + 1)
    assert outcome.reason == "maxTrials"
    (dead,) = records(study)
    assert dead.state == "failed"
    assert (dead.error or "").startswith(
        f"dead-lettered: no trainer finished it in {DELIVERY_LIMIT + 1} deliveries"
    )
    assert dispatcher.counts.failed == 1
    connection = connect_rabbitmq()
    channel = connection.channel()
    for queue in names.all:
        assert channel.queue_declare(queue, passive=True).method.message_count == 0, queue
    connection.close()


def test_dead_letters_survive_in_a_persistent_queue(search: str) -> None:
    names = QueueNames(search)
    connection = connect_rabbitmq()
    channel = connection.channel()
    declare_queues(channel, names)
    from mloptimizer.broker import dead_letter

    dead_letter(channel, names.rejected, b"{}", None, "why")
    method, properties, _ = channel.basic_get(names.rejected, auto_ack=True)
    assert method is not None
    assert properties.delivery_mode == pika.DeliveryMode.Persistent.value
    assert channel.queue_declare(names.rejected, passive=True).method.queue == names.rejected
    connection.close()


def test_a_rejected_queue_declared_by_an_older_version_is_made_again(search: str) -> None:
    names = QueueNames(search)
    connection = connect_rabbitmq()
    channel = connection.channel()
    # as the version before the byte cap declared it, with a message a person kept
    channel.queue_declare(names.rejected, durable=True, arguments={"x-max-length": 1000})
    channel.basic_publish("", names.rejected, b"old")
    declare_queues(channel, names)  # no 406: the queue is made again with the cap
    assert channel.is_open
    declared = channel.queue_declare(
        names.rejected,
        durable=True,
        arguments={"x-max-length": REJECTED_KEPT, "x-max-length-bytes": REJECTED_BYTES},
    )  # the same arguments again: accepted, so they are the queue's now
    assert declared.method.message_count == 0
    connection.close()
