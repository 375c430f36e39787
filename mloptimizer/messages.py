"""The message contract between the dispatcher (operator or local runner) and the trainers.

Versioned JSON, validated on receipt, never pickle. Six messages travel, each declared once
in :data:`ROUTES` with its model, the queue it travels on, who sends it and who reads it:

* ``trial`` (dispatcher -> trainers, queue ``<prefix>.trials``): what to train.
* ``progress`` (trainer -> dispatcher, queue ``<prefix>.progress``): one per epoch, sent
  with ``reply_to``; the dispatcher answers ``progress-reply`` (continue or prune).
* ``result`` (trainer -> dispatcher, queue ``<prefix>.results``): how the trial ended.
* ``deliver`` (operator's final job -> trainers, the trials queue): train (or reuse) the
  best model, export it, score each artifact, write them where the operator says.
* ``delivered`` (trainer -> final job, the results queue): what the final job wrote.

What the trials queue gives up on (the broker's delivery limit, a trainer's refusal) arrives
again on ``<prefix>.dead``. Every receiver names the queues it reads and has a handler, or a
refusal with its reason, for each kind that can arrive there (:func:`arriving`); a test holds
each receiver's table against ROUTES. A new message type is a model here, a row of ROUTES,
and a handler in its reader's table.

A trial can be delivered more than once (a trainer died before acking), so every
progress and result message carries the trial's identity and the delivery ``attempt``:
the dispatcher tells the study once per ``trial_id`` and drops the rest.

A trial is a capability (:mod:`mloptimizer.capability`): each ``trial`` and ``deliver``
carries a ``token`` only the trainer holding it learns, and each ``progress``, ``result``
and ``delivered`` must carry it back, or it is refused. Numbers are checked against their
range (an accuracy in [0, 1], a loss or a size finite and >= 0, times bounded), and text a
trainer chooses is cut and made printable before it can reach a condition, an Event or a
log line.

Every message is bounded before and while it is parsed (:data:`MAX_BODY_BYTES`, field
lengths, finite numbers only), so that no sender, mistaken or hostile, can make the side
that reads it run out of memory, overflow a database column or write ``inf`` as a best.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from mloptimizer.capability import TOKEN_PATTERN, new_token
from mloptimizer.formats import FORMATS, REPORT_FILES, ExportFormat, delivered_files
from mloptimizer.space import Architecture
from mloptimizer.spec import Constraints, Dataset, Metric

__all__ = [
    "ARTIFACT_FILES",
    "BUILDER_UNAVAILABLE",
    "CHECKPOINTS_DIR",
    "DELIVERY_LIMIT",
    "MAX_ARTIFACTS",
    "MAX_BODY_BYTES",
    "MAX_EPOCHS",
    "MAX_TEXT",
    "REPORT_FILES",
    "ROUTES",
    "SCHEMA_VERSION",
    "ArtifactReport",
    "CheckpointUrls",
    "Decision",
    "DeliverMessage",
    "DeliveredMessage",
    "Kind",
    "Message",
    "MessageError",
    "Party",
    "ProgressMessage",
    "ProgressReply",
    "Queue",
    "QueueNames",
    "ReportData",
    "ResultMessage",
    "Route",
    "ToFolder",
    "ToUrls",
    "TrialMessage",
    "arriving",
    "decode",
    "encode",
    "finite",
    "finite_metrics",
    "in_range",
    "printable",
]

SCHEMA_VERSION: Final = 3  # 2: capability tokens; 3: resumed trials (resumed_at, checkpoint)

# A body larger than this is refused before it is parsed: a result of 10,000 epochs of
# history with a few metrics each fits well under it.
MAX_BODY_BYTES: Final = 256 * 1024
MAX_EPOCHS: Final = 10_000  # training.epochs and refine.epochs allow no more
MAX_TEXT: Final = 4096  # an error text
# Failed deliveries of one trial before it is given up (dead-lettered; RabbitMQ's
# x-delivery-limit): a trial that kills every trainer it reaches must not crash-loop them.
DELIVERY_LIMIT: Final = 5
_MAX_METRICS: Final = 16
# No figure a trainer reports is larger than this (a loss of a diverging model above it
# is left out by the trainer, as a NaN is): a best or an end message shows no 300 digits.
MAX_MAGNITUDE: Final = 1e12


def printable(text: str) -> str:
    """``text`` with every control or invisible character made a space: what a trainer
    writes cannot forge a line of a log or break a condition or an Event."""
    return "".join(c if c.isprintable() else " " for c in text)


# How a trainer's error begins when it cannot import searchSpace.custom.builder: the
# dispatcher then fails the whole search (no trial of it can be built), not just the trial.
BUILDER_UNAVAILABLE: Final = "builder unavailable: "


def in_range(name: str, value: float) -> bool:
    """Whether metric ``name`` may take ``value``: accuracies and F1 in [0, 1], losses >= 0,
    anything finite and within :data:`MAX_MAGNITUDE`."""
    if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        return False
    if "accuracy" in name or "f1" in name:
        return 0.0 <= value <= 1.0
    return value >= 0.0 if "loss" in name else True


def _metrics_in_range(metrics: dict[str, float]) -> dict[str, float]:
    for name, value in metrics.items():
        if not in_range(name, value):
            raise ValueError(f"{name} {value:.6g} is out of range")
    return metrics


Text = Annotated[str, Field(max_length=MAX_TEXT), AfterValidator(printable)]
Label = Annotated[
    str, Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.:@/()+-]*$")
]
Metrics = Annotated[
    dict[Annotated[str, Field(max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")], float],
    Field(max_length=_MAX_METRICS),
    AfterValidator(_metrics_in_range),
]
Token = Annotated[str, Field(pattern=TOKEN_PATTERN, description="The trial's capability.")]
_Figure = Annotated[float, Field(ge=0.0, le=MAX_MAGNITUDE)]

# The dispatcher's answer to a trial's progress: train on, or stop here (pruned).
Decision = Literal["continue", "prune"]


_STRICT = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
_INT32 = 2**31 - 1  # Optuna's PostgreSQL columns (trial ids, numbers, steps) are 32-bit


class _Message(BaseModel):
    model_config = _STRICT

    version: Literal[3] = Field(default=SCHEMA_VERSION, description="Contract version.")
    search: str = Field(
        min_length=1, max_length=320, description="The study name, <namespace>.<name>."
    )
    trial_id: int = Field(ge=0, le=_INT32, description="Optuna's trial id, unique in the storage.")
    number: int = Field(ge=0, le=_INT32, description="Trial number within the study.")


_URL = Annotated[str, Field(min_length=8, max_length=8192, pattern=r"^https?://")]
CheckpointObject = Literal["meta.json", "state-0.npz", "state-1.npz"]
CHECKPOINTS_DIR: Final = "checkpoints"  # under a run folder, a claim's folder, a key prefix


class CheckpointUrls(BaseModel):
    """Where a trial's checkpoints go when its trainers share no folder: pre-signed URLs
    to PUT and GET each of its three objects (the trainer holds no storage credential)."""

    model_config = _STRICT

    put: dict[CheckpointObject, _URL] = Field(min_length=3, max_length=3)
    get: dict[CheckpointObject, _URL] = Field(min_length=3, max_length=3)


class TrialMessage(_Message):
    """One trial to train."""

    kind: Literal["trial"] = "trial"
    phase: Literal["explore", "refine"] = "explore"
    architecture: Architecture
    dataset: Dataset
    epochs: int = Field(ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(ge=1, le=65_536)
    mixed_precision: Literal["auto", "on", "off"] = "auto"
    metric: Metric = "val_accuracy"
    constraints: Constraints | None = Field(
        default=None,
        description="objective.constraints: a custom model over one, once built, is not "
        "trained (built-in families are judged before they are sent).",
    )
    class_weights: Literal["balanced"] | None = Field(
        default=None, description="balanced: weigh each class's loss by 1 / its share."
    )
    seed: int = Field(ge=0, le=_INT32, description="Seeds weights and shuffling of this trial.")
    schedule: Literal["constant", "cosine"] = Field(
        default="constant", description="The learning rate's schedule (refine.schedule)."
    )
    patience: int = Field(
        default=0, ge=0, le=MAX_EPOCHS, description="Early stop after (0: none; refine.patience)."
    )
    progress_timeout_seconds: float = Field(
        default=5.0, ge=0.0, le=600.0, description="How long a trainer waits for a prune decision."
    )
    measure_model_kb: bool = Field(
        default=False, description="Convert the trained model to int8 LiteRT and report its size."
    )
    checkpoint: CheckpointUrls | None = Field(
        default=None,
        description="Where to keep and find this trial's checkpoints (None: the trainer's "
        "own --checkpoint-dir, if any).",
    )
    token: Token = Field(
        default_factory=new_token,
        description="Only the holder of this message learns it; its reports carry it back.",
    )


class ProgressMessage(_Message):
    """The metrics of one finished epoch; the trainer waits briefly for a reply."""

    kind: Literal["progress"] = "progress"
    attempt: int = Field(ge=1, le=1000)
    worker_id: Label
    epoch: int = Field(
        ge=1, le=MAX_EPOCHS, description="Epochs finished so far (the pruner's step)."
    )
    metrics: Metrics
    replay: bool = Field(
        default=False,
        description="The epoch a resumed trainer's checkpoint holds, told again: trained "
        "by an earlier attempt, not by this one.",
    )
    token: Token


class ProgressReply(BaseModel):
    """The dispatcher's answer to a progress message."""

    model_config = _STRICT

    kind: Literal["progress-reply"] = "progress-reply"
    version: Literal[3] = SCHEMA_VERSION
    trial_id: int = Field(ge=0, le=_INT32)
    decision: Decision


class ResultMessage(_Message):
    """How a trial ended, with everything the report and the cost accounting need."""

    kind: Literal["result"] = "result"
    phase: Literal["explore", "refine"] = "explore"
    attempt: int = Field(ge=1, le=1000, description="Delivery attempt that produced this result.")
    worker_id: Label
    state: Literal["complete", "pruned", "failed"]
    value: float | None = Field(
        default=None,
        ge=-MAX_MAGNITUDE,
        le=MAX_MAGNITUDE,
        description="Objective value (last epoch); checked against the metric's range.",
    )
    val_loss: _Figure | None = None
    val_accuracy: float | None = Field(default=None, ge=0.0, le=1.0)
    epochs_run: int = Field(default=0, ge=0, le=MAX_EPOCHS)
    resumed_at: int = Field(
        default=0,
        ge=0,
        le=MAX_EPOCHS,
        description="Epochs restored from the trial's checkpoint (0: trained from the start).",
    )
    train_seconds: float = Field(default=0.0, ge=0.0, le=1e8)
    gpu_share: int = Field(
        default=1, ge=1, le=64, description="Trainers sharing this one's GPU: they split its price."
    )
    images_per_second: _Figure = 0.0
    parameter_count: int = Field(default=0, ge=0, le=2**53)
    mflops: _Figure | None = Field(
        default=None, description="Millions of multiply-adds per image (forward pass)."
    )
    model_kb: _Figure | None = Field(
        default=None, description="Size of the int8 LiteRT model, when asked."
    )
    device: Label = "CPU"
    dataset_load_seconds: float = Field(default=0.0, ge=0.0, le=1e8, description="0 when cached.")
    history: list[Metrics] = Field(default_factory=list, max_length=MAX_EPOCHS)
    error: Text | None = Field(default=None, description="Why the trial failed.")
    token: Token


# --- the final job ---------------------------------------------------------------------

# The file each export format is delivered as (mloptimizer/formats.py) and the files that
# describe them: the destination holds exactly these.
ARTIFACT_FILES: Final[dict[str, str]] = {name: row.file for name, row in FORMATS.items()}
MAX_ARTIFACTS: Final = len(ARTIFACT_FILES) + len(REPORT_FILES)


def _known_file(name: str) -> str:
    if name not in delivered_files():
        raise ValueError(f"{name!r} is not a file a delivery holds")
    return name


FileName = Annotated[str, Field(max_length=64), AfterValidator(_known_file)]


class ToFolder(BaseModel):
    """Write into the trainer's output volume (the search's PVC), under ``path``."""

    model_config = _STRICT

    kind: Literal["folder"] = "folder"
    path: str = Field(
        max_length=1024,
        pattern=r"^([A-Za-z0-9_][A-Za-z0-9_.-]*/)*[A-Za-z0-9_][A-Za-z0-9_.-]*$",
        description="Relative to the output mount; the trainer refuses ``..``.",
    )


class ToUrls(BaseModel):
    """PUT each file to its pre-signed URL: the trainer holds no storage credential."""

    model_config = _STRICT

    kind: Literal["urls"] = "urls"
    urls: dict[FileName, _URL] = Field(max_length=MAX_ARTIFACTS)


class ReportData(BaseModel):
    """What the report of a search needs from its study, which only the operator reads:
    :func:`mloptimizer.reporting.summarize`'s summary (trimmed by ``for_message``) and the
    parameters' importances, or what to estimate them from."""

    model_config = _STRICT

    summary: dict[str, Any] = Field(description="reporting.for_message's summary.")
    importances: dict[str, float] | None = Field(default=None, max_length=256)
    importances_note: Text | None = None
    trials: dict[str, Any] | None = Field(
        default=None,
        description="reporting.importance_inputs: what the final job estimates the "
        "importances from (the operator's image has no scikit-learn).",
    )


class DeliverMessage(_Message):
    """The search's final job: its best trial (ids are the best trial's), made deliverable."""

    kind: Literal["deliver"] = "deliver"
    round: int = Field(
        ge=1, le=1000, description="Which send of the final job (a retry sends it again)."
    )
    best: TrialMessage = Field(description="The best trial as it was trained.")
    formats: list[ExportFormat] = Field(min_length=1, max_length=len(ARTIFACT_FILES))
    to: ToFolder | ToUrls = Field(discriminator="kind")
    token: Token = Field(
        default_factory=new_token,
        description="This round's capability: only its holder can answer it.",
    )
    report: ReportData | None = Field(
        default=None,
        description="The study's part of report.md; the final job adds the model's scores.",
    )


class ArtifactReport(BaseModel):
    """One format as delivered: its file, size, and how the artifact itself scored."""

    model_config = _STRICT

    format: ExportFormat
    bytes: int = Field(default=0, ge=0, le=2**53)
    accuracy: float | None = Field(default=None, ge=0.0, le=1.0)
    latency_ms: float | None = Field(default=None, ge=0.0, le=1e7)
    sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="The file's SHA-256 (hex): a bucket's copy is read back and compared.",
    )
    error: Text | None = Field(default=None, description="Why this format was not delivered.")


class DeliveredMessage(_Message):
    """What the final job wrote, or why it could not."""

    kind: Literal["delivered"] = "delivered"
    round: int = Field(ge=1, le=1000)
    attempt: int = Field(ge=1, le=1000)
    worker_id: Label
    state: Literal["complete", "failed"]
    artifacts: list[ArtifactReport] = Field(default_factory=list, max_length=len(ARTIFACT_FILES))
    test_accuracy: float | None = Field(default=None, ge=0.0, le=1.0)
    model: Literal["kept", "retrained"] | None = Field(
        default=None, description="Whether the trial's own weights were reused."
    )
    error: Text | None = None
    token: Token


Message = Annotated[
    TrialMessage
    | ProgressMessage
    | ProgressReply
    | ResultMessage
    | DeliverMessage
    | DeliveredMessage,
    Field(discriminator="kind"),
]
_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)

Kind = Literal["trial", "progress", "progress-reply", "result", "deliver", "delivered"]
# ``reply_to``: the private queue a progress message names; ``dead``: the dead-letter queue.
Queue = Literal["trials", "progress", "results", "reply_to", "dead"]
Party = Literal["dispatcher", "trainer", "final job"]


@dataclass(frozen=True)
class Route:
    """Where one kind of message travels: its model, queue, sender and reader."""

    model: type[BaseModel]
    queue: Queue
    sender: Party
    reader: Party


ROUTES: Final[dict[Kind, Route]] = {
    "trial": Route(TrialMessage, "trials", "dispatcher", "trainer"),
    "progress": Route(ProgressMessage, "progress", "trainer", "dispatcher"),
    "progress-reply": Route(ProgressReply, "reply_to", "dispatcher", "trainer"),
    "result": Route(ResultMessage, "results", "trainer", "dispatcher"),
    "deliver": Route(DeliverMessage, "trials", "final job", "trainer"),
    "delivered": Route(DeliveredMessage, "results", "trainer", "final job"),
}


def arriving(queues: tuple[Queue, ...] | frozenset[Queue]) -> frozenset[Kind]:
    """The kinds that can arrive on ``queues`` (the dead-letter queue gets the trials')."""
    return frozenset(kind for kind in ROUTES if _travels_on(kind, queues))


def _travels_on(kind: Kind, queues: tuple[Queue, ...] | frozenset[Queue]) -> bool:
    queue = ROUTES[kind].queue
    return queue in queues or (queue == "trials" and "dead" in queues)


@dataclass(frozen=True)
class Refuse:
    """A receiver's answer to a kind that can arrive where it reads but is not for it."""

    reason: str


H = TypeVar("H")


@dataclass(frozen=True)
class Receiver(Generic[H]):
    """One receiver's table: for each kind that can arrive on the queues it reads, its
    handler or its refusal. Checked when built, so a receiver that lacks a kind fails at
    import (and in tests/test_messages.py), not at the first such message."""

    party: Party
    reads: tuple[Queue, ...]
    handlers: Mapping[Kind, H | Refuse]

    def __post_init__(self) -> None:
        missing = arriving(self.reads) - set(self.handlers)
        if missing:
            raise TypeError(
                f"the {self.party} reads {', '.join(self.reads)} but has no handler or refusal "
                f"for {', '.join(sorted(missing))}"
            )

    def route(self, message: Message, queue: Queue | None = None) -> H | Refuse:
        """The handler for ``message`` as it arrived on ``queue`` (None: a channel that
        carries all the receiver reads), or why it is refused. A kind that does not travel
        there is refused whatever the table says: a sender may not pick its queue."""
        kind = message.kind
        where = self.reads if queue is None else (queue,)
        if not _travels_on(kind, where):
            return Refuse(f"a {kind} message does not travel on {' or '.join(where)}")
        return self.handlers[kind]


class MessageError(ValueError):
    """A message that cannot be accepted; ``reason`` goes to the dead-letter queue."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def finite(value: float | None) -> float | None:
    """``value`` if it is a finite number within :data:`MAX_MAGNITUDE`, else None (messages
    carry no inf, NaN or 300-digit figure)."""
    if value is None or not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        return None
    return value


def finite_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The entries of ``metrics`` a message may carry (a diverging epoch's NaN loss is left
    out, and so is anything out of its range)."""
    kept = list(metrics.items())[:_MAX_METRICS]
    return {k: v for k, v in kept if re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", k) and in_range(k, v)}


def encode(message: BaseModel) -> bytes:
    """UTF-8 JSON bytes of a message."""
    return message.model_dump_json().encode()


def decode(body: bytes) -> Message:
    """Parse and validate a message body.

    Raises:
        MessageError: too large, not JSON, an unknown kind or version, or invalid fields.
    """
    if len(body) > MAX_BODY_BYTES:
        raise MessageError(f"body of {len(body)} bytes is over the {MAX_BODY_BYTES}-byte limit")
    try:
        data: Any = json.loads(body)
    except (ValueError, RecursionError) as error:  # incl. bad UTF-8, 5000-digit ints
        raise MessageError(f"not JSON: {str(error)[:200]}") from error
    if not isinstance(data, dict):
        raise MessageError("not a JSON object")
    if data.get("version") != SCHEMA_VERSION:
        raise MessageError(
            f"unsupported schema version {repr(data.get('version'))[:20]}; this side speaks "
            f"{SCHEMA_VERSION}: upgrade the older of trainer and operator"
        )
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        kind = str(data.get("kind", "message"))[:32]
        raise MessageError(f"invalid {kind}: {where[:200]}: {first['msg']}") from error


_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class QueueNames:
    """The RabbitMQ queues of one search; the search's name keeps searches apart."""

    search: str
    prefix: str = "mlopt"

    @property
    def base(self) -> str:
        return f"{self.prefix}.{_SAFE.sub('-', self.search)}"

    @property
    def trials(self) -> str:
        return f"{self.base}.trials"

    @property
    def progress(self) -> str:
        return f"{self.base}.progress"

    @property
    def results(self) -> str:
        return f"{self.base}.results"

    @property
    def dead_letters(self) -> str:
        """Trials the trials queue gave up on (or a trainer refused): the dispatcher fails them."""
        return f"{self.base}.dead"

    @property
    def rejected(self) -> str:
        """Progress and results the dispatcher refused, with the reason, kept for a person."""
        return f"{self.base}.rejected"

    @property
    def inbox(self) -> str:
        """The exchange trainers publish progress and results to (routing key: the queue's
        name): the one thing their broker login may write to, so that they can reach
        neither the dead-letter nor the rejected queue."""
        return f"{self.base}.in"

    @property
    def all(self) -> tuple[str, ...]:
        """Every queue of the search, as deleted with it."""
        return (self.trials, self.progress, self.results, self.dead_letters, self.rejected)
