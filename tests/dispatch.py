"""A test stand-in for the dispatcher: a real RabbitMQ client that sends trials, answers
progress and collects results, plus a helper to run real `mloptimizer trainer` processes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import pika

from mloptimizer.broker import declare_queues
from mloptimizer.messages import (
    ProgressMessage,
    ProgressReply,
    QueueNames,
    ResultMessage,
    TrialMessage,
    decode,
    encode,
)
from mloptimizer.space import Architecture
from mloptimizer.spec import ArchitectureSearchSpec, Dataset

Decide = Callable[[ProgressMessage], Literal["continue", "prune"] | None]  # None: do not answer


def small_cnn() -> Architecture:
    return Architecture.model_validate(
        {
            "family": "cnn",
            "conv_blocks": [{"filters": 32, "kernel_size": 3}],
            "classifier": "mlp",
            "dense_units": 64,
            "dropout": 0.1,
            "learning_rate": 0.003,
        }
    )


def digits_trial(search: str, trial_id: int, epochs: int = 2, **extra: Any) -> TrialMessage:
    return TrialMessage(
        search=search,
        trial_id=trial_id,
        number=trial_id,
        architecture=small_cnn(),
        dataset=Dataset(builtin="digits"),
        epochs=epochs,
        batch_size=32,
        mixed_precision="off",
        seed=trial_id,
        **extra,
    )


class Dispatcher:
    """Plays the operator's side of the contract over the machine's RabbitMQ."""

    def __init__(self, url: str, search: str, decide: Decide = lambda _: "continue") -> None:
        self.names = QueueNames(search)
        self.decide = decide
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        declare_queues(self.channel, self.names)
        self.results: list[ResultMessage] = []
        self.progress: list[ProgressMessage] = []
        self.channel.basic_consume(self.names.results, self._on_result, auto_ack=True)
        self.channel.basic_consume(self.names.progress, self._on_progress, auto_ack=True)

    def _on_result(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        message = decode(body)
        assert isinstance(message, ResultMessage)
        self.results.append(message)

    def _on_progress(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        message = decode(body)
        assert isinstance(message, ProgressMessage)
        self.progress.append(message)
        decision = self.decide(message)
        if decision is not None:
            reply = ProgressReply(trial_id=message.trial_id, decision=decision)
            channel.basic_publish(
                "",
                props.reply_to,
                encode(reply),
                pika.BasicProperties(correlation_id=props.correlation_id),
            )

    def send(self, trial: TrialMessage) -> None:
        self.send_raw(encode(trial))

    def send_raw(self, body: bytes) -> None:
        self.channel.basic_publish(
            "", self.names.trials, body, pika.BasicProperties(delivery_mode=2)
        )

    def wait_for(self, condition: Callable[[], bool], timeout: float = 120.0) -> None:
        """Serve the broker until ``condition()`` holds; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "timed out waiting for the trainer"
            self.connection.process_data_events(time_limit=0.2)

    def dead_letters(self) -> list[tuple[bytes, str]]:
        found: list[tuple[bytes, str]] = []
        while True:
            method, props, body = self.channel.basic_get(self.names.dead_letters, auto_ack=True)
            if method is None:
                return found
            reason = (props.headers or {}).get("x-first-death-reason", b"")
            found.append((body, reason.decode() if isinstance(reason, bytes) else str(reason)))

    def queued_trials(self) -> int:
        declared = self.channel.queue_declare(self.names.trials, passive=True)
        count: int = declared.method.message_count
        return count

    def close(self) -> None:
        for queue in self.names.all:
            self.channel.queue_delete(queue)
        self.connection.close()


def progress_of(trial: TrialMessage, **changes: Any) -> ProgressMessage:
    """A trainer's first progress report of ``trial``, with ``changes``."""
    fields: dict[str, Any] = {
        "search": trial.search,
        "trial_id": trial.trial_id,
        "number": trial.number,
        "attempt": 1,
        "worker_id": "w",
        "epoch": 1,
        "metrics": {"val_accuracy": 0.5},
        "token": trial.token,
    }
    return ProgressMessage(**{**fields, **changes})


def result_of(trial: TrialMessage, **changes: Any) -> ResultMessage:
    """A trainer's complete result of ``trial``, with ``changes``."""
    fields: dict[str, Any] = {
        "search": trial.search,
        "trial_id": trial.trial_id,
        "number": trial.number,
        "phase": trial.phase,
        "attempt": 1,
        "worker_id": "w",
        "state": "complete",
        "value": 0.9,
        "epochs_run": trial.epochs,
        "token": trial.token,
    }
    return ResultMessage(**{**fields, **changes})


def make_spec(**overrides: Any) -> ArchitectureSearchSpec:
    """A small digits search, with each of ``overrides`` merged over its section."""
    spec: dict[str, Any] = {
        "dataset": {"builtin": "digits"},
        "budget": {"maxTrials": 6, "parallelism": 2},
        "sampler": {"seed": 3, "nStartupTrials": 2},
        "pruner": {"type": "none"},
        "training": {"epochs": 3},
        "searchSpace": {"architectures": ["cnn"]},
    }
    for key, value in overrides.items():
        spec[key] = {**spec.get(key, {}), **value}
    return ArchitectureSearchSpec.model_validate(spec)
