"""Deadlines of the trials in flight: silence, first progress, and retries.

Every trial ends: one whose trainer went silent after progress (``stale_after``), or that
a trainer took and never reported on (the first-progress deadline), is retried with the
same parameters at most ``max_retries`` times, then failed. :class:`Deadlines` says which
trials are overdue and whether one has a retry left; the loop does the writes. A new
timeout goes here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mloptimizer.dispatch.ledger import InFlight
from mloptimizer.study import Attr

__all__ = ["Deadlines"]

#: Seconds between two asks of the transport whether trials still wait in its queue.
QUEUE_CHECK_SECONDS = 5.0


@dataclass
class Deadlines:
    """The timeouts of trials in flight, and the first-epoch pace they are judged by."""

    # A trial whose trainer sent progress and then nothing for ``stale_after`` seconds
    # (a hung trainer; a dead one loses its connection and the broker redelivers) is
    # failed and enqueued again, at most ``max_retries`` times.
    stale_after: float | None
    # A trial a trainer took (the queue no longer holds it) must send its first
    # progress within the grace, or three times the slowest first epoch seen so far.
    first_progress_grace: float
    max_retries: int
    slowest_first_epoch: float = 0.0
    queue_checked: float = 0.0  # when the transport's queue was last asked

    @property
    def first_progress(self) -> float:
        """Seconds a taken trial may go without its first progress message."""
        return max(self.first_progress_grace, 3.0 * self.slowest_first_epoch)

    def heard(self, flight: InFlight, now: float) -> None:
        """Note progress of ``flight`` at ``now`` (its first sets the first-epoch pace)."""
        if not flight.heard:
            began = flight.taken_at if flight.taken_at is not None else flight.sent_at
            self.slowest_first_epoch = max(self.slowest_first_epoch, now - began)
        flight.last_heard = now
        flight.heard = True

    def stale(self, in_flight: dict[int, InFlight], now: float) -> list[tuple[int, str]]:
        """Trials silent for ``stale_after`` since their last progress, and why."""
        if self.stale_after is None:
            return []
        why = f"no progress for {self.stale_after:.0f} s (its trainer hung or was lost)"
        return [
            (trial_id, why)
            for trial_id, flight in in_flight.items()
            if flight.heard and now - flight.last_heard >= self.stale_after
        ]

    def unheard(
        self,
        in_flight: dict[int, InFlight],
        now: float,
        durable: bool,
        queued: Callable[[], int | None],
    ) -> list[tuple[int, str]]:
        """Trials a trainer took and never reported on (hung before its first epoch).

        A trial still in the queue is waiting for a trainer, which may take any time; so
        the clock starts when ``queued()`` (asked every few seconds, and only of a
        ``durable`` transport) says the trials queue is empty.
        """
        unheard = [f for f in in_flight.values() if not f.heard]
        if not unheard or not durable or now - self.queue_checked < QUEUE_CHECK_SECONDS:
            return []
        self.queue_checked = now
        if any(f.taken_at is None for f in unheard):
            if queued() != 0:
                return []
            for flight in unheard:
                flight.taken_at = flight.taken_at if flight.taken_at is not None else now
        deadline = self.first_progress
        why = f"no first progress {deadline:.0f} s after a trainer took it"
        overdue = []
        for flight in unheard:
            assert flight.taken_at is not None
            if now - flight.taken_at >= deadline:
                overdue.append((flight.message.trial_id, why))
        return overdue

    @staticmethod
    def retries(flight: InFlight) -> int:
        """How many times ``flight``'s trial was retried already."""
        return int(flight.record.attrs.get(Attr.RETRIES, 0))

    def may_retry(self, flight: InFlight) -> bool:
        """Whether ``flight``'s trial has a retry left."""
        return self.retries(flight) < self.max_retries
