"""Watching a trainer process's memory between trials.

Keras and TensorFlow keep about 8 MB for every model built in a process
(keras-team/keras#17458) and trials slow down with it (``bench/trainer_memory.py``). A
long-lived trainer therefore restarts itself between trials once its resident memory has
grown past a limit; this module only decides when.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["DEFAULT_RECYCLE_MB", "MemoryWatch", "recycle_limit_from_env", "resident_mb"]

DEFAULT_RECYCLE_MB = 1024.0
RECYCLE_ENV = "MLOPT_RECYCLE_MEMORY_MB"


def recycle_limit_from_env() -> float:
    """The growth limit in MB from ``MLOPT_RECYCLE_MEMORY_MB`` (0: never restart)."""
    return float(os.environ.get(RECYCLE_ENV, DEFAULT_RECYCLE_MB))


def resident_mb() -> float | None:
    """This process's resident memory in MB (Linux); None where it cannot be read."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


@dataclass
class MemoryWatch:
    """Growth of resident memory since the first trial, against ``limit_mb``.

    Args:
        limit_mb: growth that calls for a restart; None or 0 never does.
    """

    limit_mb: float | None
    baseline_mb: float | None = None

    def after_trial(self) -> float | None:
        """Call after each trial: the growth in MB when it passed the limit, else None.

        The first call sets the baseline (TensorFlow and the dataset are loaded by then).
        """
        now = resident_mb()
        if not self.limit_mb or now is None:
            return None
        if self.baseline_mb is None:
            self.baseline_mb = now
            return None
        growth = now - self.baseline_mb
        return growth if growth > self.limit_mb else None
