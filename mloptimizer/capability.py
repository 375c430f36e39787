"""A trial is a capability: only the trainer that received it can speak for it.

Every trainer of a search holds the same broker login, and in Direct mode that login sits on
a stranger's machine. Trial ids and numbers are consecutive, so a name alone proves
nothing: each trial message (and each round of the final job) carries a token that only the
trainer holding that message learns, and every progress report, result and ``delivered``
answer must carry it back. Trainers cannot read each other's messages (they may consume the
trials queue one message at a time and their own reply queue, nothing else), so a token is
never seen by a trainer that was not given its trial.

A trial's token is derived from a per-study key the dispatcher keeps in the study (trusted
storage, never sent), so a restarted dispatcher adopting trials in flight knows their
tokens without a write per trial. A retried trial is a new trial with a new id, hence a new
token: the old holder is shut out; a final job's rounds derive theirs the same way
(:func:`round_token`). The broker redelivering a message keeps its token (the
same message).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Final

__all__ = [
    "KEY_ATTR",
    "TOKEN_PATTERN",
    "holds",
    "new_key",
    "new_token",
    "round_token",
    "trial_token",
]

KEY_ATTR: Final = "mloptimizer:capability_key"  # the study system attribute holding the key
TOKEN_PATTERN: Final = r"^[A-Za-z0-9_-]{22,64}$"
_TOKEN_BYTES: Final = 18  # 144 bits: not guessable, short on the wire (24 characters)


def new_key() -> str:
    """A fresh per-study key (hex), kept in the study."""
    return secrets.token_hex(32)


def new_token() -> str:
    """A fresh random token: for a trial message nobody answers to the dispatcher (a
    retrain, the best trial inside a final job's message)."""
    return secrets.token_urlsafe(_TOKEN_BYTES)


def _derive(key: str, what: str) -> str:
    digest = hmac.new(bytes.fromhex(key), what.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:_TOKEN_BYTES]).decode()


def trial_token(key: str, trial_id: int) -> str:
    """The token of trial ``trial_id`` under the study's ``key``."""
    return _derive(key, f"trial:{trial_id}")


def round_token(key: str, trial_id: int, round_: int) -> str:
    """The token of round ``round_`` of the final job of trial ``trial_id``: the same after
    an operator restart, so that a round sent before it can still be answered."""
    return _derive(key, f"deliver:{trial_id}:{round_}")


def holds(claimed: str, token: str) -> bool:
    """Whether ``claimed`` is ``token`` (compared in constant time)."""
    return hmac.compare_digest(claimed.encode(), token.encode())
