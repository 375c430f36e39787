"""The Prometheus metrics the operator exposes."""

from __future__ import annotations

import urllib.request
from types import SimpleNamespace

from prometheus_client import generate_latest

from mloptimizer.dispatch import Counts
from mloptimizer.operator.metrics import Metrics
from mloptimizer.study import TrialRecord


def record(seconds: float) -> TrialRecord:
    return TrialRecord(
        number=1,
        trial_id=1,
        phase="explore",
        state="complete",
        value=0.9,
        architecture=None,
        params={},
        interrupted=False,
        refines=None,
        error=None,
        seconds=seconds,
        cost_usd=0.0,
        attrs={},
    )


def test_metrics_by_search_and_state() -> None:
    metrics = Metrics()
    best = record(12.0)
    counts = Counts(complete=3, pruned=1, failed=2, cost_usd=1.25, best=best)
    dispatcher = SimpleNamespace(counts=counts, running=4)
    metrics.update("ns.s", dispatcher, queued=7)  # type: ignore[arg-type]
    metrics.finished("ns.s", best)
    metrics.dispatched("ns.s", 0.004)
    text = generate_latest(metrics.registry).decode()
    assert 'mloptimizer_trials{search="ns.s",state="complete"} 3.0' in text
    assert 'mloptimizer_trials{search="ns.s",state="running"} 4.0' in text
    assert 'mloptimizer_best_value{search="ns.s"} 0.9' in text
    assert 'mloptimizer_cost_usd{search="ns.s"} 1.25' in text
    assert 'mloptimizer_queue_depth{search="ns.s"} 7.0' in text
    assert 'mloptimizer_trial_duration_seconds_count{search="ns.s",state="complete"} 1.0' in text
    assert 'mloptimizer_dispatch_latency_seconds_bucket{le="0.005",search="ns.s"} 1.0' in text


def test_pool_metrics() -> None:
    metrics = Metrics()
    metrics.pool("ns.s", 2.5, 0.49, ["Ready", "Ready", "Provisioning", "Destroyed"])
    text = generate_latest(metrics.registry).decode()
    assert 'mloptimizer_pool_spent_usd{search="ns.s"} 2.5' in text
    assert 'mloptimizer_pool_burn_rate_usd_per_hour{search="ns.s"} 0.49' in text
    assert 'mloptimizer_pool_machines{search="ns.s",state="Ready"} 2.0' in text
    assert 'mloptimizer_pool_machines{search="ns.s",state="Provisioning"} 1.0' in text
    assert 'mloptimizer_pool_machines{search="ns.s",state="Draining"} 0.0' in text


def test_metrics_are_served_over_http() -> None:
    metrics = Metrics()
    metrics.update("a.b", SimpleNamespace(counts=Counts(complete=1), running=0), queued=None)  # type: ignore[arg-type]
    server, thread = metrics.serve(0)
    try:
        port = server.server_port
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    finally:
        server.shutdown()
        thread.join()
    assert b'mloptimizer_trials{search="a.b",state="complete"} 1.0' in body
