"""``mloptimizer operator``: run the kopf operator with the handlers of ``handlers.py``."""

from __future__ import annotations

import asyncio
import logging
import threading

import kopf

from mloptimizer.logs import configure_logging
from mloptimizer.operator import handlers
from mloptimizer.operator.config import OperatorConfig
from mloptimizer.operator.metrics import Metrics

__all__ = ["run_operator", "shared_memo"]


def shared_memo(config: OperatorConfig, metrics: Metrics | None = None) -> kopf.Memo:
    """kopf's memo holding what every handler shares."""
    return kopf.Memo(shared=handlers.Shared(config=config, metrics=metrics))


async def operate(
    config: OperatorConfig,
    *,
    stop_flag: asyncio.Event | None = None,
    ready_flag: threading.Event | None = None,
    metrics: Metrics | None = None,
) -> None:
    """The operator's main coroutine (tests run it in a thread with its own loop)."""
    await kopf.operator(
        registry=kopf.get_default_registry(),
        memo=shared_memo(config, metrics),
        namespaces=list(config.namespaces),
        clusterwide=not config.namespaces,
        standalone=config.peering is None,
        peering_name=config.peering,
        liveness_endpoint=f"http://0.0.0.0:{config.liveness_port}/healthz"
        if config.liveness_port
        else None,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


def run_operator(config: OperatorConfig) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    configure_logging()
    logging.getLogger("optuna").setLevel(logging.WARNING)
    metrics = Metrics()
    if config.metrics_port:
        metrics.serve(config.metrics_port)
    asyncio.run(operate(config, metrics=metrics))
    return 0
