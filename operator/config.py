"""The operator's settings: flags, with environment variables for a pod's Secrets."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mloptimizer.flags import env_flag

__all__ = ["OperatorConfig", "add_arguments", "config_from_args"]


@dataclass(frozen=True)
class OperatorConfig:
    """What every search handled by this operator shares."""

    database_url: str = field(repr=False)  # carries a password
    broker_url: str = field(repr=False)  # carries a password
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
    gpu_pools: bool = False  # let searches rent GPUs (the chart's vastai.enabled)
    allowed_images: tuple[str, ...] = ()  # trainer image prefixes; empty: any image
    # NetworkPolicy egress rules added to every search's trainer policy (the broker by
    # name, dataset downloads), and to S3 searches' (the object store by name)
    trainer_egress: tuple[dict[str, Any], ...] = ()
    object_store_egress: tuple[dict[str, Any], ...] = ()
    # the operator's own image, run as a read-only Job that checks a claim's delivery; None:
    # what trainers say of output.pvc files stays unverified
    verify_image: str | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``mloptimizer operator``; each has an ``MLOPT_*`` variable."""
    env_flag(
        parser, "--database-url", env="MLOPT_DATABASE_URL", shown="required",
        help="PostgreSQL URL of the studies, postgresql://user:pass@host/db (a search may "
        "name its own with spec.storage.secretRef)",
    )  # fmt: skip
    env_flag(
        parser, "--broker-url", env="MLOPT_BROKER_URL", shown="required",
        help="AMQP URL of RabbitMQ (a search may name its own with spec.broker.secretRef)",
    )  # fmt: skip
    env_flag(
        parser, "--namespace", env="MLOPT_NAMESPACES", shown="all namespaces",
        type=_namespaces, action=_Extend, metavar="NAMESPACE",
        help="watch this namespace; repeatable, or comma-separated in the variable",
    )  # fmt: skip
    env_flag(
        parser, "--queue-prefix", env="MLOPT_QUEUE_PREFIX", default="mlopt",
        help="RabbitMQ queue name prefix: queues are <prefix>.<namespace>.<name>.*",
    )  # fmt: skip
    env_flag(
        parser, "--status-interval", env="MLOPT_STATUS_INTERVAL", default=1.0, type=float,
        help="least seconds between two status patches of one search",
    )  # fmt: skip
    env_flag(
        parser, "--liveness-port", env="MLOPT_LIVENESS_PORT", default=8080, type=int,
        help="port of kopf's liveness endpoint /healthz",
    )  # fmt: skip
    env_flag(
        parser, "--metrics-port", env="MLOPT_METRICS_PORT", default=9090, type=int,
        help="port of the Prometheus metrics; 0 turns them off",
    )  # fmt: skip
    env_flag(
        parser, "--trial-silence-timeout", env="MLOPT_TRIAL_SILENCE_TIMEOUT", default=3600.0,
        type=float,
        help="seconds without progress after which a trial being trained is failed and "
        "retried (twice at most); keep it above your longest epoch",
    )  # fmt: skip
    env_flag(
        parser, "--gpu-pools", env="MLOPT_GPU_POOLS", default=False, type=_switch,
        shown="off", metavar="on|off",
        help="let searches rent GPU machines on Vast.ai (spec.workers.gpuPool); off, a search "
        "with a gpuPool fails at once and nothing is rented (the chart sets it from "
        "vastai.enabled, which also grants the Node and Pod rights pools need)",
    )  # fmt: skip
    env_flag(
        parser, "--allowed-image", env="MLOPT_ALLOWED_IMAGES", shown="any image",
        type=_namespaces, action=_Extend, metavar="PREFIX", dest="allowed_images",
        help="a prefix trainer images (spec.workers.image) must start with, such as "
        "registry.example.com/ml/; repeatable, or comma-separated in the variable; a search "
        "with another image fails (ImageNotAllowed)",
    )  # fmt: skip
    env_flag(
        parser, "--trainer-egress", env="MLOPT_TRAINER_EGRESS", default=(), type=_rules,
        shown="none", metavar="JSON",
        help="NetworkPolicy egress rules (a JSON list) added to every search's trainer "
        "policy, which otherwise opens DNS and the broker's IP only: the broker by Service "
        "or name, dataset downloads",
    )  # fmt: skip
    env_flag(
        parser, "--object-store-egress", env="MLOPT_OBJECT_STORE_EGRESS", default=(),
        type=_rules, shown="none", metavar="JSON",
        help="NetworkPolicy egress rules (a JSON list) to the object store, added to the "
        "trainer policy of searches with spec.output.s3 (without them: the endpoint's IP, "
        "or public addresses on its port)",
    )  # fmt: skip
    env_flag(
        parser, "--verify-image", env="MLOPT_VERIFY_IMAGE", shown="none",
        help="image of the Job that reads a search's output.pvc after its final job, "
        "read-only, and checks each file's size and sha256 against the trainer's word: "
        "the operator's own image (the chart sets it); without it those artifacts stay "
        "verified: false",
    )  # fmt: skip
    env_flag(
        parser, "--vastai-url", env="MLOPT_VASTAI_URL", default="https://console.vast.ai",
        help="root of the Vast.ai API",
    )  # fmt: skip
    env_flag(
        parser, "--pool-interval", env="MLOPT_POOL_INTERVAL", default=15.0, type=float,
        help="seconds between two passes of a GPU pool over Vast.ai",
    )  # fmt: skip
    env_flag(
        parser, "--orphan-sweep-interval", env="MLOPT_ORPHAN_SWEEP_INTERVAL", default=600.0,
        type=float,
        help="seconds between two sweeps deleting the broker logins (vhost and user) and "
        "destroying the Vast.ai instances (with every API key the operator has seen and "
        "MLOPT_VASTAI_API_KEY) of searches that are gone; 0 turns the sweep off",
    )  # fmt: skip
    env_flag(
        parser, "--broker-admin-url", env="MLOPT_BROKER_ADMIN_URL",
        shown="the broker URL's host and credentials on port 15672",
        help="RabbitMQ management API, http://user:pass@host:15672, where the operator makes "
        "each search's broker vhost and user",
    )  # fmt: skip
    env_flag(
        parser, "--peering", env="MLOPT_PEERING", shown="standalone",
        help="kopf peering name: with several replicas only the highest-priority one "
        "handles searches",
    )  # fmt: skip
    parser.epilog = (
        "MLOPT_VASTAI_API_KEY (environment only, never a flag): an extra Vast.ai API key "
        "the orphan sweep uses besides the keys of the searches' Secrets."
    )


def _switch(text: str) -> bool:
    words = {"on": True, "true": True, "1": True, "yes": True,
             "off": False, "false": False, "0": False, "no": False}  # fmt: skip
    if text.strip().lower() not in words:
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return words[text.strip().lower()]


def _rules(text: str) -> tuple[dict[str, Any], ...]:
    """A JSON list of NetworkPolicy egress rules (objects)."""
    if isinstance(text, tuple):
        return text
    try:
        rules = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from error
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise argparse.ArgumentTypeError("expected a JSON list of egress rules (objects)")
    return tuple(rules)


def _namespaces(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


class _Extend(argparse.Action):
    """``--namespace a --namespace b,c`` -> [a, b, c]; the flags replace the variable's."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
        option_string: str | None = None,
    ) -> None:  # fmt: skip
        marker = f"_{self.dest}_given"
        given = getattr(namespace, marker, False)
        current = list(getattr(namespace, self.dest) or []) if given else []
        setattr(namespace, self.dest, current + list(values))
        setattr(namespace, marker, True)


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
    namespaces: Sequence[str] = args.namespace or ()
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
        gpu_pools=bool(args.gpu_pools),
        allowed_images=tuple(args.allowed_images or ()),
        trainer_egress=tuple(args.trainer_egress or ()),
        object_store_egress=tuple(args.object_store_egress or ()),
        verify_image=args.verify_image or None,
    )
