"""The report of a run folder: ``summary.json``, plots and ``report.md``.

Everything comes from the study (the source of truth) and ``run.json``; the best model's
test scores come from :mod:`mloptimizer.trainer.evaluate`, imported only when the report
is built, since it needs TensorFlow. The page itself is :mod:`mloptimizer.reporting`'s,
the same the cluster's final job delivers. ``mloptimizer report DIR`` rebuilds all of it,
for a run folder or for a folder a search delivered its model to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc

from mloptimizer.app.export import RUN_FILE, data_dirs, export_run
from mloptimizer.dispatch import trial_message
from mloptimizer.reporting import param_importances, render_report, summarize
from mloptimizer.space import Architecture
from mloptimizer.spec import ArchitectureSearchSpec
from mloptimizer.study import Attr, storage_url
from mloptimizer.urls import redact

__all__ = ["ReportError", "build_report"]


class ReportError(RuntimeError):
    """The folder holds no run, or its study cannot be reached."""


def _load_run(out: Path, storage: str | None) -> tuple[dict[str, Any], str]:
    run_file = out / RUN_FILE
    if not run_file.exists():
        raise ReportError(f"{run_file} not found: is {out} the --out folder of mloptimizer run?")
    run = json.loads(run_file.read_text())
    url = storage or run["storage"]
    if "***" in url:
        raise ReportError(
            f"the run used --storage {url}; pass the same URL again: "
            f"mloptimizer report {out} --storage URL"
        )
    if "://" not in url:  # the folder's own study file, named relative to it
        study_file = out / url
        if not study_file.is_file():
            raise ReportError(
                f"{study_file} is missing: the study of this run was in that file; copy it "
                f"back, or pass the study's URL with --storage"
            )
        url = f"sqlite:///{study_file.resolve()}"
    return run, url


def build_report(out: Path, *, storage: str | None = None, evaluate: bool = True) -> Path:
    """Write the report of the run in ``out``; returns the path of ``report.md``.

    A folder a search in a cluster delivered to (``summary.json`` and ``artifacts.json``,
    no ``run.json``) is drawn again from its own files, with the study's part read afresh
    when ``storage`` names the study's database.
    """
    if not (out / RUN_FILE).exists() and (out / "summary.json").exists():
        return _rebuild_delivered(out, storage)
    run, url = _load_run(out, storage)
    spec = ArchitectureSearchSpec.model_validate(run["spec"])
    study = _study(run["search"], url)
    summary = summarize(study, spec, run.get("ended"))
    evaluation = None
    if evaluate and summary["best"]:
        evaluation = _evaluate(summary["best"], spec, run, out)
        artifacts = export_run(out)  # output.formats, each run and timed
        for artifact in artifacts:
            artifact["file"] = f"export/{Path(artifact['path']).name}" if artifact["path"] else None
        summary["export"] = artifacts
    importances, note = param_importances(study)
    return render_report(out, summary, evaluation, importances, note)


def _evaluate(
    best: dict[str, Any], spec: ArchitectureSearchSpec, run: dict[str, Any], out: Path
) -> dict[str, Any]:
    from mloptimizer.trainer.evaluate import evaluate_best  # TensorFlow: only here

    trial = trial_message(
        spec,
        search=run["search"],
        number=best["number"],
        trial_id=0,
        phase=best["phase"],
        architecture=Architecture.model_validate(best["architecture"]),
    )
    cache_dir, base_dir = data_dirs(out, run)
    return evaluate_best(trial, out, cache_dir=cache_dir, base_dir=base_dir)


def _rebuild_delivered(out: Path, storage: str | None) -> Path:
    """The report of a delivered folder, from its summary.json (the model's scores and
    files) and, with ``storage``, the study as it is now."""
    summary = json.loads((out / "summary.json").read_text())
    importances, note = summary.get("importances"), summary.get("importances_note")
    if storage is not None:
        study = _study(summary["search"], storage)
        spec = ArchitectureSearchSpec.model_validate(study.user_attrs[Attr.SPEC])
        fresh = summarize(study, spec, summary.get("ended"))
        summary = {**fresh, "export": summary.get("export"), "test": summary.get("test")}
        importances, note = param_importances(study)
    return render_report(out, summary, summary.get("test"), importances, note, every_file=True)


def _study(name: str, url: str) -> optuna.Study:
    try:
        return optuna.load_study(study_name=name, storage=storage_url(url))
    except KeyError as error:
        raise ReportError(f"no study {name!r} in {redact(url)}") from error
    except sqlalchemy.exc.SQLAlchemyError as error:
        detail = " ".join(str(error.orig if hasattr(error, "orig") else error).split())
        raise ReportError(f"cannot read the study at {redact(url)}: {detail}") from error
