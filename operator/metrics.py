"""Prometheus metrics of the operator: trials by state, trial duration, best value, queue
depth, dispatch latency and GPU pools' spend, labelled by search (``<namespace>.<name>``)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server

from mloptimizer.dispatch import Dispatcher
from mloptimizer.study import TrialRecord

__all__ = ["Metrics"]


class Metrics:
    """The operator's metrics; one instance per process, fed by every search's reporter."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.trials = Gauge(
            "mloptimizer_trials",
            "Trials of a search by state.",
            ["search", "state"],
            registry=self.registry,
        )
        self.best = Gauge(
            "mloptimizer_best_value",
            "Best objective value of a search.",
            ["search"],
            registry=self.registry,
        )
        self.cost = Gauge(
            "mloptimizer_cost_usd",
            "US dollars a search has cost.",
            ["search"],
            registry=self.registry,
        )
        self.rejected = Gauge(
            "mloptimizer_messages_rejected",
            "Messages a search's dispatcher refused (malformed, forged, or failing to "
            "handle), kept in its rejected queue.",
            ["search"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "mloptimizer_queue_depth",
            "Trials waiting in the broker for a trainer.",
            ["search"],
            registry=self.registry,
        )
        self.trial_seconds = Histogram(
            "mloptimizer_trial_duration_seconds",
            "Training time of finished trials.",
            ["search", "state"],
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, float("inf")),
            registry=self.registry,
        )
        self.dispatch_seconds = Histogram(
            "mloptimizer_dispatch_latency_seconds",
            "Time to ask the sampler and publish one trial.",
            ["search"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, float("inf")),
            registry=self.registry,
        )

        self.pool_spent = Gauge(
            "mloptimizer_pool_spent_usd",
            "US dollars a search's rented GPU machines have cost (price x rented time).",
            ["search"],
            registry=self.registry,
        )
        self.pool_burn = Gauge(
            "mloptimizer_pool_burn_rate_usd_per_hour",
            "US dollars an hour a search's rented machines bill now.",
            ["search"],
            registry=self.registry,
        )
        self.pool_machines = Gauge(
            "mloptimizer_pool_machines",
            "A search's rented machines by state.",
            ["search", "state"],
            registry=self.registry,
        )

    def pool(self, search: str, spent_usd: float, burn_rate: float, states: list[str]) -> None:
        """A GPU pool's money and machines after a pass."""
        self.pool_spent.labels(search).set(spent_usd)
        self.pool_burn.labels(search).set(burn_rate)
        for state in ("Provisioning", "Ready", "Draining"):
            self.pool_machines.labels(search, state).set(states.count(state))

    def serve(self, port: int) -> tuple[Any, Any]:
        """Expose /metrics on ``port`` (0: any free port); returns (server, thread)."""
        return start_http_server(port, registry=self.registry)

    def finished(self, search: str, trial: TrialRecord) -> None:
        self.trial_seconds.labels(search, trial.state).observe(trial.seconds)

    def dispatched(self, search: str, seconds: float) -> None:
        self.dispatch_seconds.labels(search).observe(seconds)

    def update(self, search: str, dispatcher: Dispatcher, queued: int | None) -> None:
        c = dispatcher.counts
        for state, count in (
            ("complete", c.complete),
            ("pruned", c.pruned),
            ("failed", c.failed),
            ("infeasible", c.infeasible),
            ("too_large", c.too_large),
            ("running", dispatcher.running),
        ):
            self.trials.labels(search, state).set(count)
        if c.best is not None and c.best.value is not None:
            self.best.labels(search).set(c.best.value)
        self.cost.labels(search).set(c.cost_usd)
        self.rejected.labels(search).set(c.rejected)
        if queued is not None:
            self.queue_depth.labels(search).set(queued)
