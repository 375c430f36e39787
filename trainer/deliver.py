"""The search's final job on a trainer: the best model, exported, scored, and delivered.

When a search in a cluster ends, the operator sends one ``deliver`` message through the
broker. The trainer that takes it gets the best trial's model — the weights its trainer
kept in the search's output volume when there is one (:mod:`~mloptimizer.trainer.kept`),
else the trial trained again with its own epochs and seed — exports it in the formats asked
(:func:`~mloptimizer.trainer.export.export_model`: each artifact run on the test split),
writes the search's report beside them — the very ``report.md``, ``summary.json`` and
plots ``mloptimizer run`` writes (:func:`~mloptimizer.reporting.render_report`, with the
study's part sent by the operator), scored on the test split here — and ``artifacts.json``,
and puts every file where the
message says: into its output volume, or to pre-signed URLs the operator made (the trainer
holds no storage credential; a URL allows one PUT of one key, for a while).

A format that cannot be converted is reported with its reason and the others are
delivered; a file that cannot be written fails the job, which the operator sends again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from mloptimizer.messages import (
    ARTIFACT_FILES,
    MAX_TEXT,
    REPORT_FILES,
    ArtifactReport,
    DeliveredMessage,
    DeliverMessage,
    ReportData,
    ToFolder,
    ToUrls,
    finite,
)
from mloptimizer.reporting import param_importances, render_report, study_of_inputs
from mloptimizer.trainer.checkpoint import file_sha256
from mloptimizer.trainer.custom import import_builder
from mloptimizer.trainer.data import DatasetCache
from mloptimizer.trainer.device import GpuInfo
from mloptimizer.trainer.kept import MODELS_DIR, kept_model
from mloptimizer.trainer.training import TrialInterrupted, retrain

__all__ = ["DeliveryError", "final_job", "inside", "put_file"]

log = logging.getLogger("mloptimizer.trainer")

_PUT_TIMEOUT = 300.0
_PUT_TRIES = 3


class DeliveryError(Exception):
    """A file could not be written where the message said."""


def inside(root: Path, relative: str) -> Path:
    """``root/relative``, refused when it would leave ``root`` (``..``, an absolute path or a
    symlink out): the message names a folder, never where on the host to write."""
    target = (root / relative).resolve()
    base = root.resolve()
    if target != base and base not in target.parents:
        raise DeliveryError(f"destination {relative!r} leaves the output volume")
    return target


def put_file(url: str, path: Path, *, timeout: float = _PUT_TIMEOUT) -> None:
    """PUT ``path`` to a pre-signed ``url``; retried on a lost connection or a 5xx."""
    size = path.stat().st_size
    for attempt in range(1, _PUT_TRIES + 1):
        with path.open("rb") as body:
            request = urllib.request.Request(
                url, data=body, method="PUT", headers={"Content-Length": str(size)}
            )
            try:
                with urllib.request.urlopen(request, timeout=timeout) as answer:
                    answer.read()
                return
            except urllib.error.HTTPError as error:
                detail = error.read(500).decode("utf-8", "replace")
                if error.code < 500 or attempt == _PUT_TRIES:
                    raise DeliveryError(f"PUT {path.name}: HTTP {error.code} {detail}") from error
            except (urllib.error.URLError, OSError) as error:
                if attempt == _PUT_TRIES:
                    raise DeliveryError(f"PUT {path.name}: {error}") from error
        time.sleep(2.0 * attempt)


def _write_folder(files: dict[str, Path], root: Path | None, to: ToFolder) -> None:
    if root is None:
        raise DeliveryError(
            "this trainer has no output volume (--output-dir / MLOPT_OUTPUT_DIR): the "
            "search's output.pvc is mounted on its own trainers only"
        )
    folder = inside(root, to.path)
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        partial = folder / f".{name}.partial"
        shutil.copyfile(source, partial)
        os.replace(partial, folder / name)  # never a half-written file under the real name


def _write_urls(files: dict[str, Path], to: ToUrls) -> None:
    missing = sorted(set(files) - set(to.urls))
    if missing:
        raise DeliveryError(f"no upload URL for {', '.join(missing)}")
    for name, source in files.items():
        put_file(to.urls[name], source)


def _archive(folder: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as tar:
        tar.add(folder, arcname="savedmodel")
    return out


def _study_part(message: DeliverMessage) -> ReportData:
    """The study's part of the report: the operator's, or (from an operator that sent
    none) the best trial alone."""
    if message.report is not None:
        return message.report
    best = message.best
    row: dict[str, Any] = {
        "number": best.number, "phase": best.phase, "state": "complete", "value": None,
        "architecture": None, "family": best.architecture.family,
        "summary": best.architecture.summary(), "params": {}, "refines": None, "seconds": 0.0,
        "epochs": best.epochs, "parameter_count": None, "size": None, "infeasible": None,
        "worker": None, "device": None, "cost_usd": 0.0, "resumed_at": None,
        "redone_epochs": None, "error": None,
    }  # fmt: skip
    summary = {
        "search": message.search, "metric": best.metric,
        "direction": "minimize" if best.metric.endswith("loss") else "maximize",
        "ended": None, "counts": {"complete": 1, "pruned": 0, "failed": 0, "running": 0},
        "cost_usd": 0.0, "best": None, "tradeoff": None, "front": [], "trials": [row],
    }  # fmt: skip
    return ReportData(summary=summary, importances_note="Not estimated: no study was sent.")


def _write_report(
    out: Path, message: DeliverMessage, model: Any, splits: Any, rows: list[ArtifactReport],
    source: str,
) -> None:  # fmt: skip
    """The same report.md (and summary.json, and plots) as ``mloptimizer run`` writes."""
    from mloptimizer.trainer.evaluate import evaluate_model

    part = _study_part(message)
    evaluation = evaluate_model(model, splits)
    evaluation.update(trial=message.best.number, model=source, model_file=ARTIFACT_FILES["keras"])
    summary = dict(part.summary)
    summary["export"] = [
        {
            "format": r.format,
            "file": ARTIFACT_FILES[r.format],
            "bytes": r.bytes,
            "accuracy": r.accuracy,
            "latency_ms": r.latency_ms,
            "error": r.error,
        }
        for r in rows
    ]
    importances, note = part.importances, part.importances_note
    if importances is None and part.trials is not None:
        importances, note = param_importances(study_of_inputs(part.trials))
    render_report(out, summary, evaluation, importances, note, every_file=True)


def _model(
    message: DeliverMessage,
    splits: Any,
    models: Path | None,
    gpus: list[GpuInfo],
    stop: threading.Event,
) -> tuple[Any, Literal["kept", "retrained"]]:
    import keras

    best = message.best
    if best.architecture.custom_builder is not None:
        import_builder(best.architecture.custom_builder)  # registers its Keras classes
    if models is not None and (path := kept_model(models, best)) is not None:
        try:
            model = keras.models.load_model(path)
        except Exception as error:  # a truncated file: the weights are gone, train again
            log.warning("final job: the kept model of trial %d is unreadable (%s)", best.number,
                        error)  # fmt: skip
        else:
            log.info("final job: reusing the kept weights of trial %d", best.number)
            return model, "kept"
    log.info("final job: retraining trial %d (%d epochs)", best.number, best.epochs)
    model, _ = retrain(
        best,
        splits,
        stop=stop,
        gpus=gpus,
        on_epoch=lambda epoch, _: log.info("final job epoch %d/%d", epoch, best.epochs),
    )
    return model, "retrained"


def final_job(
    message: DeliverMessage,
    attempt: int,
    *,
    worker_id: str,
    cache: DatasetCache,
    output_dir: Path | None,
    gpus: list[GpuInfo],
    stop: threading.Event,
    export: Callable[..., list[Any]] | None = None,
) -> DeliveredMessage:
    """Do the final job; returns what to tell the operator (never raises but
    :class:`~mloptimizer.trainer.training.TrialInterrupted` on ``stop``)."""
    from mloptimizer.trainer.export import export_model

    def told(**fields: Any) -> DeliveredMessage:
        return DeliveredMessage(
            search=message.search,
            trial_id=message.trial_id,
            number=message.number,
            round=message.round,
            token=message.token,
            attempt=attempt,
            worker_id=worker_id,
            **fields,
        )

    models = None
    if isinstance(message.to, ToFolder) and output_dir is not None:
        try:
            models = inside(output_dir, message.to.path) / MODELS_DIR
        except DeliveryError as error:
            return told(state="failed", error=str(error))
    try:
        splits, _ = cache.get(message.best.dataset)
        model, source = _model(message, splits, models, gpus, stop)
        with tempfile.TemporaryDirectory(prefix="mlopt-deliver-") as work:
            out = Path(work)
            made = (export or export_model)(model, splits, out / "export", tuple(message.formats))
            files: dict[str, Path] = {}
            rows = []
            for artifact in made:
                if artifact.error or artifact.path is None:
                    rows.append(
                        ArtifactReport(format=artifact.format, error=str(artifact.error)[:MAX_TEXT])
                    )
                    continue
                path = Path(artifact.path)
                if path.is_dir():
                    path = _archive(path, out / ARTIFACT_FILES[artifact.format])
                files[ARTIFACT_FILES[artifact.format]] = path
                rows.append(
                    ArtifactReport(
                        format=artifact.format,
                        bytes=path.stat().st_size,
                        sha256=file_sha256(path),
                        accuracy=finite(artifact.accuracy),
                        latency_ms=finite(artifact.latency_ms),
                    )
                )
            keras_row = next((r for r in rows if r.format == "keras" and not r.error), None)
            test_accuracy = keras_row.accuracy if keras_row else None
            _write_report(out, message, model, splits, rows, source)
            (out / "artifacts.json").write_text(
                json.dumps(
                    {
                        "search": message.search,
                        "trial": message.best.number,
                        "architecture": message.best.architecture.model_dump(mode="json"),
                        "model": source,
                        "artifacts": [r.model_dump(mode="json") for r in rows],
                    },
                    indent=2,
                )
            )
            for name in REPORT_FILES:
                files[name] = out / name
            if isinstance(message.to, ToFolder):
                _write_folder(files, output_dir, message.to)
            else:
                _write_urls(files, message.to)
    except TrialInterrupted:
        raise  # stopping: the job goes back to the queue
    except DeliveryError as error:
        log.error("final job failed: %s", error)
        return told(state="failed", error=str(error)[:MAX_TEXT])
    except Exception as error:  # a bug or a full disk: told, and the operator retries
        log.exception("final job failed")
        return told(state="failed", error=f"{type(error).__name__}: {error}"[:MAX_TEXT])
    log.info("final job delivered %d files (%s model)", len(files), source)
    return told(state="complete", artifacts=rows, test_accuracy=test_accuracy, model=source)
