"""The operator's settings: flags, with environment variables for a pod's Secrets."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["OperatorConfig", "add_arguments", "config_from_args"]


@dataclass(frozen=True)
class OperatorConfig:
    """What every search handled by this operator shares."""

    database_url: str
    broker_url: str
    namespaces: tuple[str, ...] = ()  # empty: every namespace
    queue_prefix: str = "mlopt"
    status_interval: float = 1.0
    liveness_port: int = 8080
    metrics_port: int | None = 9090
    peering: str | None = None  # kopf peering name; None: standalone
    trial_silence_timeout: float = 3600.0
    vastai_url: str = "https://console.vast.ai"
    vastai_api_key: str | None = field(default=None, repr=False)  # for the orphan sweep
    pool_interval: float = 15.0
    orphan_sweep_interval: float = 600.0
    broker_admin_url: str | None = field(default=None, repr=False)
    extra: dict[str, str] = field(default_factory=dict)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``mloptimizer operator``."""
    env = os.environ.get
    parser.add_argument(
        "--database-url",
        default=env("MLOPT_DATABASE_URL"),
        help="PostgreSQL URL of the studies, postgresql://user:pass@host/db (env "
        "MLOPT_DATABASE_URL; a search may name its own with spec.storage.secretRef)",
    )
    parser.add_argument(
        "--broker-url",
        default=env("MLOPT_BROKER_URL"),
        help="AMQP URL of RabbitMQ (env MLOPT_BROKER_URL; a search may name its own with "
        "spec.broker.secretRef)",
    )
    parser.add_argument(
        "--namespace",
        action="append",
        default=None,
        help="watch this namespace (repeatable; env MLOPT_NAMESPACES, comma-separated; "
        "default: all namespaces)",
    )
    parser.add_argument(
        "--queue-prefix",
        default=env("MLOPT_QUEUE_PREFIX", "mlopt"),
        help="RabbitMQ queue name prefix (env MLOPT_QUEUE_PREFIX, default mlopt)",
    )
    parser.add_argument(
        "--status-interval",
        type=float,
        default=float(env("MLOPT_STATUS_INTERVAL", "1.0")),
        help="least seconds between two status patches of one search (default 1)",
    )
    parser.add_argument(
        "--liveness-port",
        type=int,
        default=int(env("MLOPT_LIVENESS_PORT", "8080")),
        help="port of kopf's liveness endpoint /healthz (default 8080)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(env("MLOPT_METRICS_PORT", "9090")),
        help="port of the Prometheus metrics; 0 turns them off (default 9090)",
    )
    parser.add_argument(
        "--trial-silence-timeout",
        type=float,
        default=float(env("MLOPT_TRIAL_SILENCE_TIMEOUT", "3600")),
        help="seconds without progress after which a trial being trained is failed and "
        "retried (twice at most); keep it above your longest epoch (default 3600)",
    )
    parser.add_argument(
        "--vastai-url",
        default=env("MLOPT_VASTAI_URL", "https://console.vast.ai"),
        help="root of the Vast.ai API (env MLOPT_VASTAI_URL)",
    )
    parser.add_argument(
        "--pool-interval",
        type=float,
        default=float(env("MLOPT_POOL_INTERVAL", "15")),
        help="seconds between two passes of a GPU pool over Vast.ai (default 15)",
    )
    parser.add_argument(
        "--orphan-sweep-interval",
        type=float,
        default=float(env("MLOPT_ORPHAN_SWEEP_INTERVAL", "600")),
        help="seconds between two sweeps destroying Vast.ai instances whose search is gone, "
        "with every API key the operator has seen and MLOPT_VASTAI_API_KEY; 0 turns the "
        "sweep off (default 600)",
    )
    parser.add_argument(
        "--broker-admin-url",
        default=env("MLOPT_BROKER_ADMIN_URL"),
        help="RabbitMQ management API, http://user:pass@host:15672, where Direct-mode pools "
        "create a broker user per search (env MLOPT_BROKER_ADMIN_URL; default: the broker "
        "URL's host and credentials on port 15672)",
    )
    parser.add_argument(
        "--peering",
        default=env("MLOPT_PEERING"),
        help="kopf peering name: with several replicas only the highest-priority one "
        "handles searches (default: standalone)",
    )


def config_from_args(args: argparse.Namespace) -> OperatorConfig:
    """The config, or ValueError naming the missing setting."""
    missing = [
        flag
        for flag, value in (
            ("--database-url", args.database_url),
            ("--broker-url", args.broker_url),
        )
        if not value
    ]
    if missing:
        raise ValueError(
            f"{' and '.join(missing)} required (or MLOPT_DATABASE_URL / MLOPT_BROKER_URL)"
        )
    namespaces: Sequence[str] = args.namespace or [
        n.strip() for n in os.environ.get("MLOPT_NAMESPACES", "").split(",") if n.strip()
    ]
    return OperatorConfig(
        database_url=args.database_url,
        broker_url=args.broker_url,
        namespaces=tuple(namespaces),
        queue_prefix=args.queue_prefix,
        status_interval=args.status_interval,
        liveness_port=args.liveness_port,
        metrics_port=args.metrics_port or None,
        peering=args.peering,
        trial_silence_timeout=args.trial_silence_timeout,
        vastai_url=args.vastai_url,
        vastai_api_key=os.environ.get("MLOPT_VASTAI_API_KEY") or None,
        pool_interval=args.pool_interval,
        orphan_sweep_interval=args.orphan_sweep_interval,
        broker_admin_url=args.broker_admin_url,
    )
