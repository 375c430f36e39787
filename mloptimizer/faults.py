"""What a lost service is, for every process, and the one way to wait one out.

A lost connection to PostgreSQL or RabbitMQ is worth waiting out: ``mloptimizer run``, the
operator's daemons, the trainers and the final job retry with backoff and say what they
wait for. Anything else is a bug or bad data and must not be retried in a loop.

The rule (:func:`lost_service`): an error is a lost service when it, or anything along its
cause chain, is a class named in :data:`TRANSIENT` (matched by name, so the core needs
neither pika nor a database driver), or when one of the caller's :data:`Outage` hooks
says so: the operator adds its Kubernetes API (:func:`~mloptimizer.operator.kube.kube_outage`),
the GPU pool its Vast.ai (:func:`~mloptimizer.operator.vastai.vast_outage`). A broker that
answers with a refusal (:data:`REFUSALS`) is not lost, whatever the exception's class. Optuna's
``StorageInternalError`` is deliberately not named: it is a lost service only when a lost
connection caused it (Optuna raises it ``from`` SQLAlchemy's error), not when it wraps a
refused write. :class:`Resume` is the one resume loop.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "BUSY_STATUSES",
    "REFUSALS",
    "TRANSIENT",
    "Outage",
    "Resume",
    "StopFlag",
    "lost_service",
    "transient",
    "waiting_for",
]

log = logging.getLogger(__name__)

TRANSIENT = frozenset(
    {
        # the standard library's
        "ConnectionError",
        "TimeoutError",
        # SQLAlchemy's: the database went away or refused the connection
        "OperationalError",
        "InterfaceError",
        "DisconnectionError",
        # pika's: the broker went away, closed the channel or cancelled our consumer under
        # us (a queue's node lost), or did not confirm a publish
        "AMQPConnectionError",
        "ConnectionClosed",
        "StreamLostError",
        "ChannelWrongStateError",
        "ChannelClosed",
        "ConsumerCancelled",
        "UnroutableError",
        "NackError",
    }
)

# AMQP replies of a broker that is up and refuses (a channel closed with them is not a
# lost broker): 403 ACCESS_REFUSED (the login lacks the right), and 406 PRECONDITION_FAILED
# when a queue is not as declared (someone re-declared or reshaped it: "inequivalent arg").
# Reported, not awaited. A 406 for a consumer timeout is a closed channel, dialled again.
REFUSALS = {403: "", 406: "inequivalent arg"}


def _refused(link: BaseException) -> bool:
    code = getattr(link, "reply_code", None)
    return code in REFUSALS and REFUSALS[code] in str(getattr(link, "reply_text", ""))


# HTTP answers of a service throttling us or in trouble: worth another try later.
BUSY_STATUSES = frozenset({429, 500, 502, 503, 504})

# A process's own services: what is lost (e.g. "the Kubernetes API") when ``error`` (one
# link of a cause chain) says one is away for a while, else None.
Outage = Callable[[BaseException], str | None]


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in seen and len(seen) < 16:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _named(link: BaseException) -> bool:
    return any(cls.__name__ in TRANSIENT for cls in type(link).__mro__)


def _service(chain: list[BaseException]) -> str:
    modules = " ".join(type(link).__module__ for link in chain)
    if "pika" in modules:
        return "the broker"
    if "sqlalchemy" in modules or "optuna" in modules or "psycopg" in modules:
        return "the study's database"
    return "a service"


def lost_service(error: BaseException, *outages: Outage) -> str | None:
    """What ``error`` says is lost for a while ("the broker", "the study's database", or
    what an ``outages`` hook names), or None when it is a bug or bad data."""
    chain = _chain(error)
    if any(_refused(link) for link in chain):
        return None  # the broker is there and says no: waiting will not change its mind
    if any(_named(link) for link in chain):
        return _service(chain)
    for link in chain:
        for outage in outages:
            what = outage(link)
            if what:
                return what
    return None


def transient(error: BaseException, *outages: Outage) -> bool:
    """Whether ``error`` (or what caused it) is a lost or refused service connection."""
    return lost_service(error, *outages) is not None


def waiting_for(error: BaseException, *outages: Outage) -> str:
    """What a transient error waits for: the database, the broker, or a hook's service."""
    return lost_service(error, *outages) or "a service"


class StopFlag(Protocol):
    """A threading.Event, or kopf's ``stopped`` flag of a sync daemon."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> Any: ...


def _seconds(delay: float) -> str:
    return f"{delay:.1f}".removesuffix(".0")


@dataclass
class Resume:
    """The one resume loop: after a lost service, say what is awaited, wait, back off.

    The caller's loop reads ``except Exception as error: if not resume.retry(error): raise``
    and calls :meth:`back` once it works again. The delay doubles from ``first`` to
    ``cap``; with ``give_up_at_cap`` (a dial that a caller's own loop retries) it gives up
    instead of waiting past the cap. ``say`` gets the line "waiting for <what> (<error
    type>); retrying in N s", ``hint`` appended; ``on_wait(what, error)`` runs before
    each wait (the operator's ``Degraded`` condition).
    """

    stop: StopFlag = field(default_factory=threading.Event)
    outages: tuple[Outage, ...] = ()
    first: float = 0.5
    cap: float = 30.0
    give_up_at_cap: bool = False
    jitter: float = 0.0  # each wait drawn within +-jitter of the delay (a fleet of trainers)
    say: Callable[[str], None] = log.warning
    hint: str = ""
    on_wait: Callable[[str, BaseException], None] = lambda _what, _error: None
    delay: float = field(init=False)
    waiting: str | None = field(init=False, default=None)  # what the last wait was for

    def __post_init__(self) -> None:
        self.delay = self.first

    def retry(self, error: BaseException) -> bool:
        """Wait ``error`` out if it is a lost service (True: go round again); False when it
        is not, or when the delay passed the cap of a ``give_up_at_cap`` dial."""
        what = lost_service(error, *self.outages)
        if what is None or (self.give_up_at_cap and self.delay > self.cap):
            return False
        self.waiting = what
        delay = self.delay * random.uniform(1 - self.jitter, 1 + self.jitter)
        self.say(
            f"waiting for {what} ({type(error).__name__}); retrying in {_seconds(delay)} s"
            + self.hint
        )
        self.on_wait(what, error)
        self.stop.wait(delay)
        self.delay = self.delay * 2 if self.give_up_at_cap else min(self.delay * 2, self.cap)
        return True

    def back(self) -> str | None:
        """The service answered: the delay starts over; returns what was awaited, if any."""
        waited, self.waiting, self.delay = self.waiting, None, self.first
        return waited
