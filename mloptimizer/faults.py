"""Which errors are the world's (a service away for a while) and which are ours.

A lost connection to PostgreSQL or RabbitMQ is worth waiting out: the dispatcher's
callers retry with backoff and say what they wait for. Anything else is a bug or bad data
and must not be retried in a loop. The classes are matched by name along the exception's
cause chain (Optuna wraps SQLAlchemy's errors), so the core needs neither pika nor a
database driver to tell them apart.
"""

from __future__ import annotations

__all__ = ["TRANSIENT", "transient", "waiting_for"]

TRANSIENT = frozenset(
    {
        # the standard library's
        "ConnectionError",
        "TimeoutError",
        # SQLAlchemy's: the database went away or refused the connection
        "OperationalError",
        "InterfaceError",
        "DisconnectionError",
        # pika's: the broker went away or closed the channel under us
        "AMQPConnectionError",
        "ConnectionClosed",
        "StreamLostError",
        "ChannelWrongStateError",
        "ChannelClosed",
        "UnroutableError",
        "NackError",
    }
)


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in seen and len(seen) < 16:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def transient(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a lost or refused service connection."""
    return any(cls.__name__ in TRANSIENT for link in _chain(error) for cls in type(link).__mro__)


def waiting_for(error: BaseException) -> str:
    """What a transient error waits for: the database or the broker."""
    modules = " ".join(type(link).__module__ for link in _chain(error))
    if "pika" in modules:
        return "the broker"
    if "sqlalchemy" in modules or "optuna" in modules or "psycopg" in modules:
        return "the study's database"
    return "a service"
