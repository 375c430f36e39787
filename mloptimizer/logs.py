"""How the long-running processes log: one line per record on stdout, where a container's
runtime (``kubectl logs``) collects it.

The format, for the operator and the trainer alike::

    2026-12-04 18:12:07,539 INFO mloptimizer.trainer.worker: worker t1 serving ... on CPU

(time, level, logger, message). Libraries that narrate every connection step (pika, kopf's
HTTP client) are kept to warnings.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["LOG_FORMAT", "configure_logging"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_QUIET = ("pika", "aiohttp.access", "urllib3", "kubernetes.client.rest")


def configure_logging(level: int = logging.INFO) -> None:
    """Log ``level`` and above to stdout in :data:`LOG_FORMAT`; chatty libraries at warnings."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stdout, force=True)
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
