"""Inside one search a trainer speaks only for the trials it holds (issue 24).

An attacker holds the search's own trainer identity, as the owner of a rented GPU does,
and trial ids and numbers are consecutive: it sends a result of 0.999 and a progress report
for every trial it can guess, through the one exchange its login may write to. Against the
machine's RabbitMQ, a real Dispatcher and its AmqpTransport (the operator's login), each
forgery is refused and counted, and the study holds only what the honest trainer, the one
that received each trial, reported.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pika
import pytest
from dispatch import progress_of, result_of, small_cnn
from services import search_identity

from mloptimizer.amqp import AmqpTransport
from mloptimizer.broker import PERSISTENT, to_dispatcher
from mloptimizer.capability import new_token
from mloptimizer.dispatch import Dispatcher
from mloptimizer.messages import QueueNames, TrialMessage, decode, encode
from mloptimizer.spec import ArchitectureSearchSpec
from mloptimizer.study import open_study

pytestmark = pytest.mark.services

TRIALS = 3
GUESSES = range(TRIALS + 2)  # every id and number the attacker can guess, and then some


@pytest.fixture
async def identity() -> AsyncIterator[tuple[str, str, str]]:
    """(search, the trainers' URL, the operator's URL) of a search's own broker identity."""
    async with search_identity("capability") as made:
        yield made.names.search, made.trainer_url, made.operator_url


def forgeries(search: str, offset: int) -> list[bytes]:
    """A result of 0.999 and a first epoch of 0.0 for every trial the attacker guesses, with
    the right search, id and number (ids run ``offset`` ahead of numbers, as in the trial the
    attacker saw): everything but the trial's token."""
    bodies = []
    for guess in GUESSES:
        claim = TrialMessage.model_validate(
            {**HONEST_TRIAL, "search": search, "trial_id": guess + offset, "number": guess}
        )
        bodies.append(encode(result_of(claim, value=0.999, token=new_token())))
        bodies.append(encode(progress_of(claim, metrics={"val_accuracy": 0.0})))
    return bodies


HONEST_TRIAL: dict[str, Any] = {
    "architecture": small_cnn(),
    "dataset": {"builtin": "digits"},
    "epochs": 1,
    "batch_size": 32,
    "seed": 0,
}


class Trainers(threading.Thread):
    """The honest trainer takes each trial; before reporting the first, the attacker (a
    second connection with the same identity) sends its forgeries."""

    def __init__(self, search: str, trainer_url: str, operator_url: str) -> None:
        super().__init__(daemon=True)
        self.names = QueueNames(search)
        self.url = trainer_url
        self.operator_url = operator_url  # the test's own look at the rejected queue
        self.forged = 0
        self.honest: dict[int, float] = {}
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._serve()
        except BaseException as error:  # the test fails with it instead of waiting
            self.error = error
            raise

    def _serve(self) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1)
        for method, _, body in channel.consume(self.names.trials, inactivity_timeout=0.2):
            if self.stop.is_set():
                break
            if method is None:
                continue
            trial = decode(body)
            assert isinstance(trial, TrialMessage)
            if not self.forged:
                self.forged = self._attack(trial.trial_id - trial.number)
                # Report only once every forgery was judged: after the result, a forged
                # epoch of this trial would be a latecomer (answered "prune"), not refused.
                self._await_rejected(self.forged)
            value = 0.6 + trial.number / 100
            epoch = progress_of(trial, metrics={"val_accuracy": value})
            to_dispatcher(channel, self.names, self.names.progress, encode(epoch), PERSISTENT)
            result = encode(result_of(trial, value=value, epochs_run=1))
            to_dispatcher(channel, self.names, self.names.results, result, PERSISTENT)
            self.honest[trial.trial_id] = value
            channel.basic_ack(method.delivery_tag)
        connection.close()

    def _await_rejected(self, count: int) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(self.operator_url))
        channel = connection.channel()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            kept = channel.queue_declare(self.names.rejected, passive=True).method.message_count
            if kept >= count:
                break
            connection.sleep(0.05)
        connection.close()

    def _attack(self, offset: int) -> int:
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        channel = connection.channel()
        bodies = forgeries(self.names.search, offset)
        for body in bodies:
            kind = b'"kind":"result"' in body
            queue = self.names.results if kind else self.names.progress
            to_dispatcher(channel, self.names, queue, body, PERSISTENT)
        connection.close()
        return len(bodies)


def test_a_trainer_cannot_speak_for_a_trial_it_does_not_hold(
    identity: tuple[str, str, str], tmp_path: Path
) -> None:
    search, trainer_url, operator_url = identity
    spec = ArchitectureSearchSpec.model_validate(
        {
            "dataset": {"builtin": "digits"},
            "budget": {"maxTrials": TRIALS, "parallelism": 1, "maxFailedTrials": 1},
            "sampler": {"type": "random", "seed": 1},
            "training": {"epochs": 1},
        }
    )
    study = open_study(spec, search, f"sqlite:///{tmp_path / 'study.db'}")
    # the operator's side declares the queues; the trainers' login may not
    dispatcher = Dispatcher(study, spec, AmqpTransport(operator_url, search), search=search)
    trainers = Trainers(search, trainer_url, operator_url)
    trainers.start()
    try:
        outcome = dispatcher.run(should_stop=lambda: not trainers.is_alive())
    finally:
        trainers.stop.set()
        trainers.join(10)

    assert trainers.error is None
    assert outcome.reason == "maxTrials"
    assert trainers.forged == 2 * len(GUESSES)
    stored = study.get_trials()
    # only what the holder of each trial said: no 0.999, no epoch of 0.0
    assert {t._trial_id: t.value for t in stored} == trainers.honest
    # the honest epoch, where it came before the result (the two queues are not ordered
    # between them): never the forged 0.0
    assert all(set(t.intermediate_values.values()) <= {t.value} for t in stored)
    assert dispatcher.counts.rejected == trainers.forged  # each refused and counted
