"""The final job of a search: its best model delivered to ``spec.output``, retried like a
trial, its end a condition.

When a search ends with a best trial and names a destination (``output.pvc`` or
``output.s3``), the operator sends one ``deliver`` message through the search's own
trials queue and keeps one trainer up for it. The trainer that takes it reuses the best
trial's kept weights or trains it again, exports and scores every format, writes the files,
and answers ``delivered``. A trainer that dies mid-job loses nothing (RabbitMQ redelivers
the message, up to its delivery limit); a job that reports failure, dead-letters, or stays
silent past the trial silence timeout is sent again, :data:`ROUNDS` times in all, each time
with fresh upload URLs. What comes back is checked like a trial's result: it must name this
search, its best trial and a round sent; its formats must be ones asked; and on S3 every
file it claims is looked up (HEAD) and must have the size it claims.

Nothing here knows kopf: :func:`~mloptimizer.operator.daemon.run_search` drives
:func:`run_final_job` with a :class:`FinalJobChannel` and a :class:`Destination`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions

from mloptimizer.broker import PERSISTENT, dead_letter, death_reason, declare_queues
from mloptimizer.messages import (
    ARTIFACT_FILES,
    REPORT_FILES,
    DeliveredMessage,
    DeliverMessage,
    MessageError,
    ProgressMessage,
    QueueNames,
    ResultMessage,
    ToFolder,
    ToUrls,
    decode,
    encode,
)
from mloptimizer.operator.objectstore import Bucket

__all__ = [
    "ROUNDS",
    "Dead",
    "Destination",
    "FinalJobChannel",
    "FinalOutcome",
    "artifacts_status",
    "run_final_job",
]

log = logging.getLogger(__name__)

ROUNDS = 3  # sends of the final job before it is given up (each one redelivered on a crash)


@dataclass
class Destination:
    """Where a search's model goes: a folder in a claim, or a key prefix in a bucket."""

    folder: str
    claim: str | None = None
    bucket: Bucket | None = None

    def uri(self, file: str) -> str:
        if self.bucket is not None:
            return f"s3://{self.bucket.bucket}/{self.folder}/{file}"
        return f"pvc://{self.claim}/{self.folder}/{file}"

    def key(self, file: str) -> str:
        return f"{self.folder}/{file}"

    def to(self, files: list[str], expires: float) -> ToFolder | ToUrls:
        """What the trainer is told: the folder, or one pre-signed PUT URL per file."""
        if self.bucket is None:
            return ToFolder(path=self.folder)
        return ToUrls(urls={f: self.bucket.upload_url(self.key(f), expires) for f in files})

    def size(self, file: str) -> int | None:
        """The size of a delivered file as the storage has it; None where the operator cannot
        look (a claim is mounted on trainers only)."""
        return self.bucket.size(self.key(file)) if self.bucket is not None else None

    def verify(self, delivered: DeliveredMessage) -> str | None:
        """Why ``delivered`` is not what the storage holds, or None when it is."""
        if self.bucket is None:
            return None
        for artifact in delivered.artifacts:
            if artifact.error:
                continue
            file = ARTIFACT_FILES[artifact.format]
            found = self.bucket.size(self.key(file))
            if found != artifact.bytes:
                return (
                    f"{file}: the trainer says {artifact.bytes} bytes, the bucket has "
                    f"{'none' if found is None else found}"
                )
        for file in REPORT_FILES:
            if self.bucket.size(self.key(file)) is None:
                return f"{file} is not in the bucket"
        return None


@dataclass(frozen=True)
class Dead:
    """A final job the broker gave up on (its delivery limit) or a trainer refused."""

    message: DeliverMessage
    reason: str


Received = DeliveredMessage | Dead | str  # str: why a message was refused


class FinalJobChannel:
    """The operator's side of the queues for the final job (one blocking pika channel)."""

    def __init__(self, url: str, search: str, prefix: str = "mlopt") -> None:
        self.names = QueueNames(search, prefix)
        self._connection = pika.BlockingConnection(pika.URLParameters(url))
        channel = self._connection.channel()
        channel.confirm_delivery()
        declare_queues(channel, self.names)
        channel.basic_qos(prefetch_count=16)
        channel.basic_consume(self.names.results, self._on_result)
        channel.basic_consume(self.names.dead_letters, self._on_dead)
        self._channel = channel
        self._received: list[Received] = []

    def _reject(self, method: Any, properties: Any, body: bytes, why: str) -> None:
        dead_letter(self._channel, self.names.rejected, body, properties.headers, why)
        self._channel.basic_ack(method.delivery_tag)
        self._received.append(why)

    def _on_result(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        try:
            message = decode(body)
        except MessageError as error:
            self._reject(method, properties, body, error.reason)
            return
        if isinstance(message, DeliveredMessage):
            self._received.append(message)
        elif isinstance(message, ResultMessage | ProgressMessage):
            log.info("a late %s of trial %d after the search ended: dropped", message.kind,
                     message.number)  # fmt: skip
        else:
            self._reject(method, properties, body, f"a {message.kind} in the results queue")
            return
        channel.basic_ack(method.delivery_tag)

    def _on_dead(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        try:
            message = decode(body)
        except MessageError as error:
            self._reject(method, properties, body, f"in the dead-letter queue: {error.reason}")
            return
        if isinstance(message, DeliverMessage):
            self._received.append(Dead(message, death_reason(properties.headers)))
        # a dead trial after the search ended has nothing left to fail
        channel.basic_ack(method.delivery_tag)

    def send(self, message: DeliverMessage) -> None:
        self._channel.basic_publish("", self.names.trials, encode(message), PERSISTENT)

    def receive(self, timeout: float) -> list[Received]:
        self._connection.process_data_events(time_limit=timeout)
        received, self._received = self._received, []
        return received

    def close(self) -> None:
        if self._connection.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError):
                self._connection.close()


@dataclass
class FinalOutcome:
    """How the final job ended: what was delivered, or why nothing was."""

    delivered: DeliveredMessage | None
    error: str | None = None
    rounds: int = 0
    stopped: bool = False


def refusal(got: DeliveredMessage, sent: DeliverMessage) -> str | None:
    """Why ``got`` cannot answer the final job ``sent`` (its latest round), or None."""
    if got.search != sent.search:
        return f"it claims search {got.search!r}, not {sent.search!r}"
    if (got.trial_id, got.number) != (sent.trial_id, sent.number):
        return f"it answers trial {got.number}, the final job is trial {sent.number}"
    if got.round > sent.round:
        return f"round {got.round} was never sent"
    asked = set(sent.formats)
    formats = [a.format for a in got.artifacts]
    if len(set(formats)) != len(formats) or not set(formats) <= asked:
        return f"formats {formats} are not those asked ({sorted(asked)})"
    return None


def run_final_job(
    channel: FinalJobChannel,
    job: Callable[[int], DeliverMessage],
    destination: Destination,
    *,
    silence: float,
    stop: Callable[[], bool],
    on_round: Callable[[int, str | None], None] = lambda _round, _why: None,
    rounds: int = ROUNDS,
    clock: Callable[[], float] = time.monotonic,
) -> FinalOutcome:
    """Send the final job until a trainer delivers it or ``rounds`` sends failed.

    ``job(round)`` builds the message of a round (fresh URLs each time); ``on_round`` is
    told each send, with why the one before failed.
    """
    why: str | None = None
    for number in range(1, rounds + 1):
        sent = job(number)
        channel.send(sent)
        on_round(number, why)
        deadline = clock() + silence
        why = None
        while why is None:
            if stop():
                return FinalOutcome(None, "stopped", number, stopped=True)
            if clock() > deadline:
                why = f"no answer in {silence:.0f} s"
                break
            for got in channel.receive(0.5):
                if isinstance(got, str):
                    log.warning("final job: refused a message: %s", got)
                    continue
                if isinstance(got, Dead):
                    if got.message.round == number:
                        why = f"dead-lettered: {got.reason}"
                    continue
                refused = refusal(got, sent)
                if refused is not None:
                    log.warning("final job: refused a report: %s", refused)
                    continue
                if got.state == "failed":
                    if got.round == number:
                        why = got.error or "failed"
                    continue
                mismatch = destination.verify(got)
                if mismatch is not None:
                    why = f"checked on receipt: {mismatch}"
                    continue
                return FinalOutcome(got, None, number)
    return FinalOutcome(None, why, rounds)


def artifacts_status(delivered: DeliveredMessage, destination: Destination) -> list[dict[str, Any]]:
    """``status.artifacts``: one entry per format (a file, or why it was not made), then the
    report files. URIs are the operator's own, never the trainer's word."""
    entries: list[dict[str, Any]] = []
    for artifact in delivered.artifacts:
        if artifact.error:
            entries.append({"format": artifact.format, "error": artifact.error})
            continue
        entry: dict[str, Any] = {
            "format": artifact.format,
            "uri": destination.uri(ARTIFACT_FILES[artifact.format]),
            "bytes": artifact.bytes,
        }
        if artifact.accuracy is not None:
            entry["testAccuracy"] = round(artifact.accuracy, 6)
        if artifact.latency_ms is not None:
            entry["latencyMs"] = round(artifact.latency_ms, 4)
        entries.append(entry)
    for file in REPORT_FILES:
        entry = {"format": "report", "uri": destination.uri(file)}
        size = destination.size(file)
        if size is not None:
            entry["bytes"] = size
        entries.append(entry)
    return entries
