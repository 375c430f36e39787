"""``mloptimizer export RUN_DIR``: the run's best model in the formats devices load.

The model is the report's ``best.keras`` (the best trial, trained once); each artifact is
written to ``RUN_DIR/export/`` and scored by running it, and ``export.json`` lists them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mloptimizer.spec import ArchitectureSearchSpec

__all__ = ["RUN_FILE", "ExportError", "data_dirs", "export_run"]

RUN_FILE = "run.json"  # in a run folder: what mloptimizer run ran, to rebuild from


def data_dirs(out: Path, run: dict[str, Any]) -> tuple[Path, Path | None]:
    """The dataset cache and the image-folder base of the run in ``out``: the cache is
    named relative to the folder (it may have moved), images next to the search file."""
    cache_dir = out / (run.get("cache_dir") or "cache")
    return cache_dir, Path(run["source"]).parent if run.get("source") else None


class ExportError(RuntimeError):
    """The folder holds no run or no model to export."""


def export_run(out: Path, formats: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Export ``out/best.keras`` in ``formats`` (None: the spec's ``output.formats``);
    returns each artifact's figures."""
    from mloptimizer.trainer.custom import add_builder_path, import_builder
    from mloptimizer.trainer.data import DatasetCache  # TensorFlow: only here
    from mloptimizer.trainer.export import export_model

    run_file, model_path = out / RUN_FILE, out / "best.keras"
    if not run_file.exists():
        raise ExportError(f"{run_file} not found: is {out} the --out folder of mloptimizer run?")
    if not model_path.exists():
        raise ExportError(
            f"{model_path} not found: build the report first (mloptimizer report {out}), "
            "which trains and saves the best model"
        )
    import keras

    run = json.loads(run_file.read_text())
    spec = ArchitectureSearchSpec.model_validate(run["spec"])
    cache_dir, base_dir = data_dirs(out, run)
    splits, _ = DatasetCache(cache_dir, base_dir).get(spec.dataset)
    custom = spec.search_space.custom
    if custom is not None:  # its module registers the Keras classes the model may use
        if base_dir is not None:
            add_builder_path(base_dir)
        import_builder(custom.builder)
    model = keras.models.load_model(model_path)
    chosen = formats if formats is not None else tuple(spec.output.formats)
    artifacts = [a.as_json() for a in export_model(model, splits, out / "export", chosen)]
    (out / "export" / "export.json").write_text(json.dumps(artifacts, indent=2))
    return artifacts
