"""What may change while a search runs: one rule for every place that asks.

A study's trials only compare with each other while the data, the objective, the sampler
and the space stay the same, and its study and queues stay where they are. The rest — the
budget, training, the pruner, the workers — may change at any time. The operator asks
:func:`refusal` when a running search is edited, the dispatch loop applies what it allows
(:meth:`~mloptimizer.dispatch.Dispatcher.update_spec`), and ``mloptimizer run`` asks it when
a study is resumed from an edited file.

A GPU pool (``workers.gpuPool``) is a worker setting, but its machines are rented under its
mode and Secrets: it may change its bounds and caps, not appear, disappear, or change mode,
Secrets or endpoint under a running search (its machines would be orphaned or unusable).
"""

from __future__ import annotations

from typing import Any

from mloptimizer.spec import ArchitectureSearchSpec

__all__ = ["FIXED", "LIVE", "refusal"]

# Top-level spec fields, by camelCase name. A test requires every field in one of them.
FIXED: dict[str, str] = {
    "dataset": "its trials would not compare",
    "objective": "its trials would not compare",
    "sampler": "its trials would not compare",
    "searchSpace": "its trials would not compare",
    "storage": "its study lives there",
    "broker": "its trials are queued there",
}
LIVE: dict[str, str] = {
    "budget": "maxTrials, parallelism, timeout, cost and failure caps: at once",
    "training": "epochs, batch size, precision, refine: for trials dispatched from then on",
    "pruner": "rebuilt at once; hyperband's max_resource follows training.epochs",
    "workers": "replica bounds, resources, placement, price, a pool's bounds and caps: at once",
    "output": "export formats: for the export at the end",
}


def _part(spec: ArchitectureSearchSpec, field: str) -> Any:
    return spec.model_dump(mode="json", by_alias=True, include={_snake(field)})


def _snake(camel: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)


def _pool_shape(spec: ArchitectureSearchSpec) -> tuple[Any, ...] | None:
    pool = spec.workers.gpu_pool
    if pool is None:
        return None
    return (pool.mode, pool.api_key_secret_ref, pool.join_secret_ref, pool.broker_endpoint)


def refusal(running: ArchitectureSearchSpec, new: ArchitectureSearchSpec) -> str | None:
    """Why ``new`` may not replace ``running`` under a study that has trials, or None."""
    changed = [name for name in FIXED if _part(running, name) != _part(new, name)]
    if changed:
        reasons = sorted({FIXED[name] for name in changed})
        fields = ", ".join(f"spec.{name}" for name in changed)
        return f"{fields} cannot change while the study runs ({'; '.join(reasons)})"
    if _pool_shape(running) != _pool_shape(new):
        return (
            "spec.workers.gpuPool cannot be added, removed or change mode or Secrets while "
            "the search runs (its machines would be orphaned or unusable)"
        )
    return None
