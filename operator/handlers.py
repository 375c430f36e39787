"""kopf glue: each handler passes what kopf hands it to one plain function.

The functions live in :mod:`~mloptimizer.operator.lifecycle` (create, update, the search's
daemon, deletion) and :mod:`~mloptimizer.operator.poolwiring` (its GPU pool, the orphan
sweep) and know nothing of kopf's decorators; kopf's settings are :func:`configure`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf
import kubernetes

from mloptimizer.operator import lifecycle, poolwiring
from mloptimizer.operator.config import OperatorConfig
from mloptimizer.operator.lifecycle import FINISHED, Shared
from mloptimizer.spec import GROUP, PLURAL, VERSION

__all__ = ["FINISHED", "Shared", "configure"]


def configure(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    """kopf settings: state in annotations (the status schema is ours), quiet events."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="mloptimizer.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="mloptimizer.io", key="last-handled-configuration"
    )
    settings.persistence.finalizer = "mloptimizer.io/finalizer"
    settings.posting.level = logging.WARNING
    settings.peering.standalone = config.peering is None
    if config.peering:
        settings.peering.name = config.peering
    settings.watching.server_timeout = 300
    # The dispatch loop checks its stop flag every 0.2 s: wait for that, not for polling.
    settings.background.instant_exit_timeout = 0.5


def _shared(memo: Any) -> Shared:
    shared: Shared = memo.shared
    return shared


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    configure(settings, _shared(memo).config)
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        # KUBECONFIG as set now, not as it was when the kubernetes package was imported
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=os.environ.get("KUBECONFIG")
        )
    poolwiring.start_sweeper(_shared(memo))


@kopf.on.cleanup()
async def cleanup(memo: Any, **_: Any) -> None:
    await poolwiring.stop_sweeper(_shared(memo))


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
def on_create(*, body: Any, status: Any, memo: Any, patch: kopf.Patch, **_: Any) -> None:
    patch.status.update(lifecycle.start_search(body, status, _shared(memo)))


@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def on_update(*, body: Any, status: Any, memo: Any, **_: Any) -> None:
    lifecycle.update_search(body, status, _shared(memo))


# Graceful first: the loop sees `stopped` within a fraction of a second and returns.
@kopf.daemon(
    GROUP,
    VERSION,
    PLURAL,
    cancellation_backoff=30.0,
    cancellation_timeout=30.0,
    cancellation_polling=1.0,
)
def search_daemon(
    *, stopped: kopf.DaemonStopped, body: Any, status: Any, memo: Any, **_: Any
) -> None:
    lifecycle.serve_search(body, status, _shared(memo), stopped)


# Not filtered with `when=`: kopf would stop the daemon on an edit removing gpuPool, which
# the dispatcher refuses, and leave the machines running.
@kopf.daemon(GROUP, VERSION, PLURAL, id="gpu-pool", cancellation_timeout=30.0)
async def pool_daemon(*, stopped: kopf.DaemonStopped, body: Any, memo: Any, **_: Any) -> None:
    await poolwiring.serve_pool(body, _shared(memo), stopped)


@kopf.on.delete(GROUP, VERSION, PLURAL)
def on_delete(*, body: Any, memo: Any, **_: Any) -> None:
    lifecycle.delete_search(body, _shared(memo))
