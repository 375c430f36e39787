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

Nothing here knows kopf: :func:`~mloptimizer.operator.daemon.run_search` calls
:func:`deliver_best`, which drives :func:`run_final_job` with a :class:`FinalJobChannel`
and a :class:`Destination` and says how it went in the search's status.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from mloptimizer.amqp import Consumer, SearchChannel
from mloptimizer.broker import dead_lettered, death_reason
from mloptimizer.capability import holds, new_token
from mloptimizer.faults import Resume, StopFlag
from mloptimizer.messages import (
    ARTIFACT_FILES,
    REPORT_FILES,
    DeliveredMessage,
    DeliverMessage,
    MessageError,
    Queue,
    Receiver,
    Refuse,
    ReportData,
    ResultMessage,
    ToFolder,
    ToUrls,
    TrialMessage,
    decode,
)
from mloptimizer.operator.claimverify import Checked
from mloptimizer.operator.kube import kube_outage
from mloptimizer.operator.objectstore import Bucket
from mloptimizer.operator.progress import set_condition

__all__ = [
    "ROUNDS",
    "Dead",
    "Destination",
    "FinalJobChannel",
    "FinalOutcome",
    "JobKube",
    "Where",
    "artifacts_status",
    "deliver_best",
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
    # a claim's delivery checked by a Job the operator runs (claimverify.verify_claim);
    # None: nothing can read the claim, what the trainer says stays unverified
    check_claim: Callable[[DeliveredMessage], Checked] | None = None

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

    @property
    def verifiable(self) -> bool:
        """Whether the operator reads what was written on receipt (a bucket: yes; a claim
        is mounted on trainers only: a verify Job reads it once the job is done)."""
        return self.bucket is not None

    def verify(self, delivered: DeliveredMessage) -> str | None:
        """Why ``delivered`` is not what the storage holds, or None when it is (or when
        the operator cannot look: see :attr:`verifiable`). On a bucket each file's size
        (HEAD) and SHA-256 (read back by the operator) must be what the trainer says."""
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
            if artifact.sha256 is None:
                return f"{file}: the trainer gave no sha256"
            digest = self.bucket.sha256(self.key(file), found)
            if digest != artifact.sha256:
                return f"{file}: the bucket's sha256 is {digest}, not the trainer's"
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


class FinalJobChannel(SearchChannel[Received]):
    """The operator's side of the queues for the final job: results and dead letters.

    ``max_backoff`` 0: one dial; :func:`deliver_best` waits out a broker away.
    """

    def __init__(
        self, url: str, search: str, prefix: str = "mlopt", *, max_backoff: float = 0.0
    ) -> None:
        super().__init__(url, search, prefix=prefix, max_backoff=max_backoff, prefetch=16)

    def _consumers(self) -> dict[str, Consumer]:
        return {
            self.names.results: functools.partial(self._on, "results"),
            self.names.dead_letters: functools.partial(self._on, "dead"),
        }

    def _refuse(self, channel: Any, method: Any, properties: Any, body: bytes, why: str) -> None:
        self._reject(channel, method, properties, body, why)
        self._received.append(why)

    def _on(self, queue: Queue, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        try:
            if queue == "dead" and (forged := dead_lettered(properties.headers, self.names)):
                raise MessageError(forged)
            message = decode(body)
        except MessageError as error:
            self._refuse(channel, method, properties, body, f"in the {queue} queue: {error.reason}")
            return
        handler = RECEIVER.route(message, queue)
        if isinstance(handler, Refuse):
            self._refuse(channel, method, properties, body, handler.reason)
            return
        handler(self, message, properties)
        channel.basic_ack(method.delivery_tag)

    def _delivered(self, message: DeliveredMessage, properties: Any) -> None:
        self._received.append(message)

    def _late(self, message: ResultMessage | TrialMessage, properties: Any) -> None:
        log.info("a late %s of trial %d after the search ended: dropped", message.kind,
                 message.number)  # fmt: skip

    def _round_dead(self, message: DeliverMessage, properties: Any) -> None:
        self._received.append(Dead(message, death_reason(properties.headers)))

    def send(self, message: DeliverMessage) -> None:
        self._publish(message)


# What the final job does with each kind that can arrive on the queues it reads
# (messages.ROUTES): the search's own messages may still come after it ended.
RECEIVER: Final[Receiver[Callable[[FinalJobChannel, Any, Any], None]]] = Receiver(
    party="final job",
    reads=("results", "dead"),
    handlers={
        "delivered": FinalJobChannel._delivered,
        "deliver": FinalJobChannel._round_dead,  # a round the trials queue gave up on
        "result": FinalJobChannel._late,
        "trial": FinalJobChannel._late,  # a dead trial after the search has nothing to fail
    },
)


@dataclass
class FinalOutcome:
    """How the final job ended: what was delivered, or why nothing was."""

    delivered: DeliveredMessage | None
    error: str | None = None
    rounds: int = 0
    stopped: bool = False


def refusal(
    got: DeliveredMessage, sent: DeliverMessage, tokens: Mapping[int, str] | None = None
) -> str | None:
    """Why ``got`` cannot answer the final job ``sent`` (its latest round), or None.
    ``tokens``: each round's token as sent (default: the latest round's only); an answer
    must carry its round's, which only the trainer that took that round learnt."""
    if got.search != sent.search:
        return f"it claims search {got.search!r}, not {sent.search!r}"
    if (got.trial_id, got.number) != (sent.trial_id, sent.number):
        return f"it answers trial {got.number}, the final job is trial {sent.number}"
    if got.round > sent.round:
        return f"round {got.round} was never sent"
    token = (tokens or {sent.round: sent.token}).get(got.round)
    if token is None or not holds(got.token, token):
        return f"it does not carry round {got.round}'s token: only its holder can answer it"
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
    tokens: dict[int, str] = {}
    for number in range(1, rounds + 1):
        sent = job(number)
        tokens[number] = sent.token
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
                    if got.message.round == number and holds(got.message.token, sent.token):
                        why = f"dead-lettered: {got.reason}"
                    continue
                refused = refusal(got, sent, tokens)
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


def artifacts_status(
    delivered: DeliveredMessage, destination: Destination, verified: bool | None = None
) -> list[dict[str, Any]]:
    """``status.artifacts``: one entry per format (a file, or why it was not made), then the
    report files. URIs are the operator's own, never the trainer's word. ``verified``: what
    a claim's verify Job found (default: whether the destination is checked on receipt)."""
    entries: list[dict[str, Any]] = []
    for artifact in delivered.artifacts:
        if artifact.error:
            entries.append({"format": artifact.format, "error": artifact.error})
            continue
        entry: dict[str, Any] = {
            "format": artifact.format,
            "uri": destination.uri(ARTIFACT_FILES[artifact.format]),
            "bytes": artifact.bytes,
            # checked by the operator (a bucket, a claim's verify Job), or the trainer's word
            "verified": destination.verifiable if verified is None else verified,
        }
        if artifact.sha256 is not None:
            entry["sha256"] = artifact.sha256
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


# Where a search's best model goes (None: nowhere); may raise when a Secret is unusable.
Where = Callable[[], Destination | None]


class JobKube(Protocol):
    """The Kubernetes side of a final job (the search daemon's ``Kube`` is one)."""

    def patch_status(self, patch: dict[str, Any]) -> None: ...

    def scale(self, replicas: int) -> None: ...

    def event(self, type_: str, reason: str, message: str) -> None: ...


def deliver_best(
    best: TrialMessage,
    formats: list[str],
    where: Where,
    kube: JobKube,
    stop: StopFlag,
    *,
    channel: Callable[[], FinalJobChannel],
    conditions: list[dict[str, Any]],
    silence: float,
    max_backoff: float = 30.0,
    token_of: Callable[[int], str] | None = None,
    report: ReportData | None = None,
) -> None:
    """The final job: ``best`` delivered to the search's output, with ``report`` (the
    study's part of report.md, :func:`~mloptimizer.reporting.report_data`); the
    ``Delivered`` condition (set among ``conditions``) and ``status.artifacts`` say how it
    went. ``channel`` opens
    the search's queues; a lost broker is waited for; a stop leaves the condition Unknown,
    so that the next operator resumes it. ``token_of(round)``: each round's capability
    (the same after a restart; None: a random one each)."""
    files = [ARTIFACT_FILES[f] for f in formats] + list(REPORT_FILES)

    def say(
        status: Literal["True", "False", "Unknown"], reason: str, detail: str, **extra: Any
    ) -> None:
        conditions[:] = set_condition(conditions, "Delivered", status, reason, detail)
        kube.patch_status({"conditions": conditions, **extra})

    try:
        destination = where()
    except Exception as error:  # a Secret gone or refused: nothing to retry by waiting
        say("False", "DestinationUnusable", f"spec.output: {error}"[:4000])
        kube.event("Warning", "DeliveryFailed", f"spec.output: {error}"[:1024])
        return
    if destination is None:  # the output was edited away meanwhile
        say("False", "NoDestination", "spec.output names no pvc or s3")
        return

    def job(round_: int) -> DeliverMessage:
        return DeliverMessage(
            search=best.search,
            trial_id=best.trial_id,
            number=best.number,
            round=round_,
            best=best,
            formats=formats,
            to=destination.to(files, expires=silence + 600),
            token=token_of(round_) if token_of is not None else new_token(),
            report=report,
        )

    def on_round(round_: int, why: str | None) -> None:
        kube.scale(1)  # one trainer for the job (it takes the message whichever it is)
        text = (
            f"round {round_} of {ROUNDS}: a trainer reuses or retrains trial {best.number}, "
            f"exports {', '.join(formats)} and writes them to {destination.uri('')}"
        )
        if why:
            text += f"; round {round_ - 1} failed: {why}"
            kube.event("Warning", "DeliveryRetried", f"final job: {why}"[:1024])
        say("Unknown", "Delivering", text[:4000], message=text[:4000])

    resume = Resume(
        stop, (kube_outage,), cap=max_backoff, say=lambda line: log.warning("final job: %s", line)
    )
    while not stop.is_set():
        try:
            opened = channel()
            try:
                outcome = run_final_job(
                    opened, job, destination, silence=silence, stop=stop.is_set,
                    on_round=on_round,
                )  # fmt: skip
            finally:
                opened.close()
        except Exception as error:
            if not resume.retry(error):
                raise
            continue
        if outcome.stopped:
            return  # the next operator resumes it (Delivered stays Unknown)
        kube.scale(0)  # before a verify Job: a ReadWriteOnce claim is free again
        checked = None
        if outcome.delivered is not None and destination.check_claim is not None:
            say(
                "Unknown", "Verifying",
                f"trial {best.number} delivered to {destination.uri('')}; a Job of the "
                "operator's reads the claim to check sizes and sha256",
            )  # fmt: skip
            checked = destination.check_claim(outcome.delivered)
            if stop.is_set() and not checked.verified and not checked.mismatch:
                return  # the next operator resumes it (Delivered stays Unknown)
        _said(outcome, best, destination, say, kube, checked)
        return


def _said(
    outcome: FinalOutcome,
    best: TrialMessage,
    destination: Destination,
    say: Callable[..., None],
    kube: JobKube,
    checked: Checked | None = None,
) -> None:
    """The end of a final job in the status and the Events (``checked``: what a claim's
    verify Job found)."""
    delivered = outcome.delivered
    if delivered is None:
        text = f"the final job failed {outcome.rounds} times; last: {outcome.error}"
        say("False", "DeliveryFailed", text[:4000], message=text[:4000])
        kube.event("Warning", "DeliveryFailed", text[:1024])
        return
    made = [a.format for a in delivered.artifacts if not a.error]
    failed = [f"{a.format} ({a.error})" for a in delivered.artifacts if a.error]
    text = (
        f"trial {best.number} ({delivered.model} weights) delivered to "
        f"{destination.uri('')}: {', '.join(made) or 'no format'}"
        + (f"; not made: {'; '.join(failed)}" if failed else "")
    )
    if destination.verifiable:
        verified = True
    elif checked is None:
        verified = False
        text += (
            "; unverified: sizes and sha256 are the trainer's word (the operator does not "
            "mount the claim, and no verify image is set: --verify-image)"
        )
    else:
        verified = checked.verified
        text += f"; {checked.detail}" if verified else f"; unverified: {checked.detail}"
    artifacts = artifacts_status(delivered, destination, verified)
    if checked is not None and checked.mismatch:
        say("False", "VerificationFailed", text[:4000], artifacts=artifacts, message=text[:4000])
        kube.event("Warning", "VerificationFailed", text[:1024])
        return
    say("True", "Delivered", text[:4000], artifacts=artifacts, message=text[:4000])
    kube.event("Normal", "Delivered", text[:1024])
