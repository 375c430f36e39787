"""The message contract between the dispatcher (operator or local runner) and the trainers.

Versioned JSON, validated on receipt, never pickle. Four messages travel:

* ``trial`` (dispatcher -> trainers, queue ``<prefix>.trials``): what to train.
* ``progress`` (trainer -> dispatcher, queue ``<prefix>.progress``): one per epoch, sent
  with ``reply_to``; the dispatcher answers ``progress-reply`` (continue or prune).
* ``result`` (trainer -> dispatcher, queue ``<prefix>.results``): how the trial ended.

A trial can be delivered more than once (a trainer died before acking), so every
progress and result message carries the trial's identity and the delivery ``attempt``:
the dispatcher tells the study once per ``trial_id`` and drops the rest.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from mloptimizer.space import Architecture
from mloptimizer.spec import Dataset

__all__ = [
    "SCHEMA_VERSION",
    "Decision",
    "Message",
    "MessageError",
    "ProgressMessage",
    "ProgressReply",
    "QueueNames",
    "ResultMessage",
    "TrialMessage",
    "decode",
    "encode",
]

SCHEMA_VERSION: Final = 1

# The dispatcher's answer to a trial's progress: train on, or stop here (pruned).
Decision = Literal["continue", "prune"]


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = Field(default=SCHEMA_VERSION, description="Contract version.")
    search: str = Field(min_length=1, description="The study name, <namespace>.<name>.")
    trial_id: int = Field(ge=0, description="Optuna's trial id, unique in the storage.")
    number: int = Field(ge=0, description="Trial number within the study.")


class TrialMessage(_Message):
    """One trial to train."""

    kind: Literal["trial"] = "trial"
    phase: Literal["explore", "refine"] = "explore"
    architecture: Architecture
    dataset: Dataset
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    mixed_precision: Literal["auto", "on", "off"] = "auto"
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    seed: int = Field(ge=0, description="Seeds weights and shuffling of this trial.")
    progress_timeout_seconds: float = Field(
        default=5.0, ge=0.0, description="How long a trainer waits for a prune decision."
    )


class ProgressMessage(_Message):
    """The metrics of one finished epoch; the trainer waits briefly for a reply."""

    kind: Literal["progress"] = "progress"
    attempt: int = Field(ge=1)
    worker_id: str
    epoch: int = Field(ge=1, description="Epochs finished so far (the pruner's step).")
    metrics: dict[str, float]


class ProgressReply(BaseModel):
    """The dispatcher's answer to a progress message."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["progress-reply"] = "progress-reply"
    version: Literal[1] = SCHEMA_VERSION
    trial_id: int = Field(ge=0)
    decision: Decision


class ResultMessage(_Message):
    """How a trial ended, with everything the report and the cost accounting need."""

    kind: Literal["result"] = "result"
    phase: Literal["explore", "refine"] = "explore"
    attempt: int = Field(ge=1, description="Delivery attempt that produced this result.")
    worker_id: str
    state: Literal["complete", "pruned", "failed"]
    value: float | None = Field(default=None, description="Objective value (last epoch).")
    val_loss: float | None = None
    val_accuracy: float | None = None
    epochs_run: int = Field(default=0, ge=0)
    train_seconds: float = Field(default=0.0, ge=0.0)
    images_per_second: float = Field(default=0.0, ge=0.0)
    parameter_count: int = Field(default=0, ge=0)
    device: str = "CPU"
    dataset_load_seconds: float = Field(default=0.0, ge=0.0, description="0 when cached.")
    history: list[dict[str, float]] = Field(default_factory=list)
    error: str | None = Field(default=None, description="Why the trial failed.")


Message = Annotated[
    TrialMessage | ProgressMessage | ProgressReply | ResultMessage,
    Field(discriminator="kind"),
]
_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)


class MessageError(ValueError):
    """A message that cannot be accepted; ``reason`` goes to the dead-letter queue."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode(message: BaseModel) -> bytes:
    """UTF-8 JSON bytes of a message."""
    return message.model_dump_json().encode()


def decode(body: bytes) -> Message:
    """Parse and validate a message body.

    Raises:
        MessageError: not JSON, an unknown kind or version, or invalid fields.
    """
    try:
        data: Any = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MessageError(f"not JSON: {error}") from error
    if not isinstance(data, dict):
        raise MessageError("not a JSON object")
    if data.get("version") != SCHEMA_VERSION:
        raise MessageError(
            f"unsupported schema version {data.get('version')!r}; this side speaks "
            f"{SCHEMA_VERSION}: upgrade the older of trainer and operator"
        )
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise MessageError(
            f"invalid {data.get('kind', 'message')}: {where}: {first['msg']}"
        ) from error


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
        return f"{self.base}.dead"
