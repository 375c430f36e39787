"""How the long-running processes log: one line per record on stdout, where a container's
runtime (``kubectl logs``) collects it.

The format, for the operator and the trainer alike::

    2026-12-04 18:12:07,539 INFO mloptimizer.trainer.worker: worker t1 serving ... on CPU

(time, level, logger, message). Libraries that narrate every connection step (pika, kopf's
HTTP client) are kept to warnings.

Native libraries write to file descriptor 2 themselves, below Python's logging: TensorFlow's
converter ("fully_quantize: 0, inference_type: 6 ...") and LiteRT ("INFO: Created TensorFlow
Lite XNNPACK delegate for CPU."). Code that calls them wraps the call in
:func:`native_quiet`, which silences that descriptor unless the user asked for
``--verbose`` (:data:`VERBOSE_ENV`, inherited by the processes a run starts).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator

__all__ = ["LOG_FORMAT", "VERBOSE_ENV", "configure_logging", "native_quiet", "set_verbose"]

VERBOSE_ENV = "MLOPT_VERBOSE"

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_QUIET = ("pika", "aiohttp.access", "urllib3", "kubernetes.client.rest")


def configure_logging(level: int = logging.INFO) -> None:
    """Log ``level`` and above to stdout in :data:`LOG_FORMAT`; chatty libraries at warnings."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stdout, force=True)
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)


def set_verbose() -> None:
    """Let native libraries speak, in this process and the ones it starts (``--verbose``)."""
    os.environ[VERBOSE_ENV] = "1"
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"  # read when TensorFlow loads


_quiet_lock = threading.Lock()
_quiet_depth = 0
_saved_fd: int | None = None


@contextlib.contextmanager
def native_quiet() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null while the block runs, unless verbose.

    The descriptor is the process's: Python's own writes to stderr in that window are lost
    too, so wrap only the native call. Nested and concurrent blocks share one redirection.
    Errors still reach the caller as exceptions, with the library's message.
    """
    global _quiet_depth, _saved_fd
    if os.environ.get(VERBOSE_ENV) == "1":
        yield
        return
    with _quiet_lock:
        if _quiet_depth == 0:
            sys.stderr.flush()
            _saved_fd = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _saved_fd is not None:
                sys.stderr.flush()
                os.dup2(_saved_fd, 2)
                os.close(_saved_fd)
                _saved_fd = None
