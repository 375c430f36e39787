"""The report of a run folder: ``summary.json``, plots and ``report.md``.

Everything comes from the study (the source of truth) and ``run.json``; the best model's
test scores come from :mod:`mloptimizer.trainer.evaluate`, imported only when the report
is built, since it needs TensorFlow. ``mloptimizer report DIR`` rebuilds all of it.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc

from mloptimizer.app.export import RUN_FILE, data_dirs, export_run
from mloptimizer.dispatch import trial_message
from mloptimizer.space import Architecture
from mloptimizer.spec import ArchitectureSearchSpec, Tradeoff
from mloptimizer.study import (
    Attr,
    TrialRecord,
    best_of,
    pareto_front,
    records,
    size_of,
    storage_url,
)
from mloptimizer.urls import redact

__all__ = ["ReportError", "build_report", "summarize"]


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


def summarize(
    study: optuna.Study, spec: ArchitectureSearchSpec, ended: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The content of ``summary.json``: the best trial and every trial."""
    trials = [r for r in records(study) if r.counted]
    direction, tradeoff = spec.objective.study_direction, spec.objective.tradeoff
    best = best_of(trials, direction, tradeoff)
    front = pareto_front(trials, direction, tradeoff) if tradeoff else []
    return {
        "search": study.study_name,
        "metric": spec.objective.metric,
        "direction": spec.objective.study_direction,
        "ended": ended,
        "counts": {
            state: sum(r.state == state for r in trials)
            for state in ("complete", "pruned", "failed", "running", "waiting")
        }
        | {"infeasible": sum(r.state == "complete" and not r.feasible for r in trials)},
        "cost_usd": sum(r.cost_usd for r in trials),
        "redone_usd": sum(float(r.attrs.get(Attr.REDONE_USD, 0.0)) for r in trials),
        "saved_usd": sum(float(r.attrs.get(Attr.SAVED_USD, 0.0)) for r in trials),
        "best": _trial_json(best, tradeoff) if best else None,
        "tradeoff": tradeoff,
        "front": [r.number for r in front],  # most accurate first
        "trials": [_trial_json(r, tradeoff) for r in trials],
    }


def _trial_json(r: TrialRecord, tradeoff: Tradeoff | None) -> dict[str, Any]:
    return {
        "number": r.number,
        "phase": r.phase,
        "state": r.state,
        "value": r.value,
        "architecture": r.architecture.model_dump(mode="json") if r.architecture else None,
        "summary": r.architecture.summary() if r.architecture else None,
        "params": r.params,
        "refines": r.refines,
        "seconds": r.seconds,
        "epochs": r.attrs.get("epochs_run"),
        "parameter_count": r.attrs.get("parameter_count"),
        "size": size_of(r, tradeoff) if tradeoff else None,
        "infeasible": r.attrs.get(Attr.INFEASIBLE),
        "worker": r.attrs.get("worker_id"),
        "device": r.attrs.get("device"),
        "cost_usd": r.cost_usd,
        "resumed_at": r.attrs.get(Attr.RESUMED_AT),
        "redone_epochs": r.attrs.get(Attr.REDONE_EPOCHS),
        "error": r.error,
    }


# --- plots -----------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_ticks() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def plot_history(summary: dict[str, Any], path: Path) -> None:
    """Each trial's value by number, by phase and state, with the running best."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {
        ("explore", "complete"): ("o", "tab:blue", "explore"),
        ("refine", "complete"): ("D", "tab:orange", "refine"),
        ("explore", "pruned"): ("x", "tab:gray", "pruned"),
        ("refine", "pruned"): ("x", "tab:gray", "pruned"),
    }
    for (phase, state), (marker, color, label) in styles.items():
        points = [
            (t["number"], t["value"])
            for t in summary["trials"]
            if t["phase"] == phase and t["state"] == state and t["value"] is not None
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.scatter(xs, ys, marker=marker, color=color, label=label, zorder=3)
    best_x, best_y, best = [], [], math.nan
    maximize = summary["direction"] == "maximize"
    for t in sorted(summary["trials"], key=lambda t: t["number"]):
        if t["state"] == "complete" and t["value"] is not None:
            v = t["value"]
            best = v if math.isnan(best) else (max(best, v) if maximize else min(best, v))
        if not math.isnan(best):
            best_x.append(t["number"])
            best_y.append(best)
    if best_x:
        ax.step(best_x, best_y, where="post", color="tab:green", label="best so far")
    failed = [t["number"] for t in summary["trials"] if t["state"] == "failed"]
    for number in failed:
        ax.axvline(number, color="tab:red", alpha=0.25, lw=1)
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_xlabel("trial")
    ax.set_ylabel(summary["metric"])
    ax.set_title("Optimisation history" + (" (red: failed trials)" if failed else ""))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# fANOVA fits a random forest to (parameters -> value). With a handful of points each tree
# sees one or two splits and the importances follow whichever trials happened to be drawn:
# a bar chart from 2-5 trials reads as a finding and is noise. Below this many complete
# trials the report says so instead of drawing one.
IMPORTANCE_MIN_TRIALS = 10


def plot_importances(study: optuna.Study, path: Path) -> str | None:
    """Draw the fANOVA importance of the parameters every completed trial shares to ``path``.

    Returns None when drawn, else why not (one sentence for the report); a stale picture
    from an earlier report of the same folder is removed then.
    """
    path.unlink(missing_ok=True)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < IMPORTANCE_MIN_TRIALS:
        return (
            f"Not estimated: {len(complete)} complete trials, and an importance estimate "
            f"needs at least {IMPORTANCE_MIN_TRIALS} (with fewer, fANOVA's forest follows "
            "whichever trials happened to be drawn)."
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            importances = optuna.importance.get_param_importances(
                study,
                evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
                # of the metric, also under a tradeoff (two objectives)
                target=(lambda t: t.values[0]) if len(study.directions) > 1 else None,
            )
        except (RuntimeError, ValueError) as error:
            return f"Not estimated: fANOVA failed ({error})."
    if not importances:
        return "Not estimated: the complete trials share no parameter."
    plt = _pyplot()
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(names) + 1.2))
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (fANOVA)")
    ax.set_title("Parameter importances")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def plot_space(summary: dict[str, Any], path: Path) -> None:
    """The sampled space: each trial's value against its model size, by family."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for family, color in (("cnn", "tab:blue"), ("inception", "tab:purple")):
        points = [
            (t["parameter_count"], t["value"])
            for t in summary["trials"]
            if t["architecture"]
            and t["architecture"]["family"] == family
            and t["value"] is not None
            and t["parameter_count"]
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.scatter(xs, ys, color=color, label=family, alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel(summary["metric"])
    ax.set_title("The space sampled: model size and family")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(evaluation: dict[str, Any], path: Path) -> None:
    """The best model's confusion matrix on the held-out split."""
    plt = _pyplot()
    matrix = evaluation["confusion"]
    names = evaluation["class_names"]
    size = max(4.0, 0.5 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    top = max(max(row) for row in matrix) if matrix else 0
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            color = "white" if count > top / 2 else "black"
            ax.text(j, i, str(count), ha="center", va="center", color=color, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix ({evaluation['split']} split)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the page --------------------------------------------------------------------------


SIZE_LABELS: dict[str, str] = {
    "params": "parameters",
    "mflops": "MFLOPs (multiply-adds, 1 image)",
    "modelKB": "int8 LiteRT size (KB)",
    "costUSD": "cost (USD)",
}


def plot_front(summary: dict[str, Any], path: Path) -> None:
    """Accuracy against size under a tradeoff: the front joined, the rest in blue,
    infeasible trials greyed (those judged before training have no accuracy to draw)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    by_number = {t["number"]: t for t in summary["trials"]}
    shown = [
        t
        for t in summary["trials"]
        if t["value"] is not None and t["size"] is not None and t["worker"] is not None
    ]
    untrained = sum(bool(t["infeasible"]) and t["worker"] is None for t in summary["trials"])
    for label, color, group in (
        ("infeasible (trained)", "lightgrey", [t for t in shown if t["infeasible"]]),
        ("feasible", "tab:blue", [t for t in shown if not t["infeasible"]]),
    ):
        if group:
            ax.scatter([t["size"] for t in group], [t["value"] for t in group], color=color,
                       label=label, alpha=0.8)  # fmt: skip
    front = sorted((by_number[n] for n in summary["front"]), key=lambda t: t["size"])
    if front:
        ax.step([t["size"] for t in front], [t["value"] for t in front], where="post",
                color="tab:red", marker="o", label="Pareto front")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel(SIZE_LABELS[summary["tradeoff"]])
    ax.set_ylabel(summary["metric"])
    against = "dollars" if summary["tradeoff"] == "costUSD" else "size"
    title = f"Accuracy against {against}: the Pareto front"
    if untrained:
        title += f" ({untrained} infeasible judged untrained, not drawn)"
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _front_lines(summary: dict[str, Any]) -> list[str]:
    by_number = {t["number"]: t for t in summary["trials"]}
    size = SIZE_LABELS[summary["tradeoff"]]
    dollars = summary["tradeoff"] == "costUSD"
    of, than = ("for each price", "as cheap") if dollars else ("of each size", "as small")
    lines = [
        "## Pareto front",
        "",
        f"The most accurate model {of} ({len(summary['front'])} trials; no other trial is "
        f"both as accurate and {than}). Grey: over objective.constraints.",
        "",
        "![Pareto front](front.png)",
        "",
        f"| trial | phase | architecture | {summary['metric']} | {size} | parameters |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for number in summary["front"]:
        t = by_number[number]
        lines.append(
            f"| {number} | {t['phase']} | `{t['summary']}` | {t['value']:.4f} | "
            f"{t['size']:,.4g} | {t['parameter_count'] or '?'} |"
        )
    return [*lines, ""]


def _export_lines(artifacts: list[dict[str, Any]], evaluation: dict[str, Any] | None) -> list[str]:
    split = evaluation["split"] if evaluation else "test"
    lines = [
        "## The model for devices",
        "",
        f"`output.formats`, in `export/` (`export/export.json`): each file run by its own "
        f"runtime (LiteRT's interpreter for `.tflite`) on the {split} split, latency the "
        "median of one image at a time on the machine that made the report.",
        "",
        "| format | size KB | accuracy | ms/image | file |",
        "| --- | --- | --- | --- | --- |",
    ]
    for a in artifacts:
        if a["error"]:
            why = a["error"].replace("|", "/").splitlines()[0][:160]
            lines.append(f"| {a['format']} | | | | failed: {why} |")
            continue
        lines.append(
            f"| {a['format']} | {a['bytes'] / 1024:.1f} | {a['accuracy']:.4f} | "
            f"{a['latency_ms']:.3f} | `export/{Path(a['path']).name}` |"
        )
    return [*lines, ""]


def _page(
    summary: dict[str, Any], evaluation: dict[str, Any] | None, importances: str | None
) -> str:
    """The report's text; ``importances`` is None when importances.png was drawn, else why not."""
    best = summary["best"]
    c = summary["counts"]
    lines = [f"# Search {summary['search']}", ""]
    if summary["ended"]:
        lines += [f"Ended: **{summary['ended']['reason']}** — {summary['ended']['message']}", ""]
    lines += [
        f"Trials: {c['complete']} complete"
        + (f" ({c['infeasible']} infeasible)" if c.get("infeasible") else "")
        + f", {c['pruned']} pruned, {c['failed']} failed"
        + (f", {c['running']} running" if c["running"] else "")
        + f". Cost: ${summary['cost_usd']:.4f}"
        + (
            f" (${summary['redone_usd']:.4f} on epochs trained again after a trainer went "
            f"away; ${summary['saved_usd']:.4f} saved by resuming from checkpoints)"
            if summary.get("redone_usd") or summary.get("saved_usd")
            else ""
        )
        + ".",
        "",
    ]
    if best:
        lines += [
            "## Best trial",
            "",
            "| trial | phase | architecture | " + summary["metric"] + " | parameters |",
            "| --- | --- | --- | --- | --- |",
            f"| {best['number']} | {best['phase']} | `{best['summary']}` | {best['value']:.4f} | "
            f"{best['parameter_count'] or '?'} |",
            "",
        ]
    if evaluation:
        lines += [
            f"## Best model on the held-out {evaluation['split']} split "
            f"({evaluation['images']} images)",
            "",
            "| accuracy | precision (macro) | recall (macro) | F1 (macro) |",
            "| --- | --- | --- | --- |",
            f"| {evaluation['accuracy']:.4f} | {evaluation['precision_macro']:.4f} | "
            f"{evaluation['recall_macro']:.4f} | {evaluation['f1_macro']:.4f} |",
            "",
            "| class | precision | recall | F1 | images |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {row['class']} | {row['precision']:.4f} | {row['recall']:.4f} | "
            f"{row['f1']:.4f} | {row['support']} |"
            for row in evaluation["per_class"]
        ]
        how = {
            "retrained": "retrained here (its trainer's weights were gone)",
            "kept by its trainer": "the weights its trainer kept (not trained again)",
        }.get(evaluation.get("model", ""), "as saved by an earlier report")
        lines += [
            "",
            "![confusion matrix](confusion.png)",
            "",
            f"The model: `best.keras`, {how}.",
            "",
        ]
    if summary.get("export"):
        lines += _export_lines(summary["export"], evaluation)
    if summary["tradeoff"]:
        lines += _front_lines(summary)
    lines += ["## Optimisation history", "", "![history](history.png)", ""]
    lines += ["## Parameter importances", ""]
    lines += [importances or "![importances](importances.png)", ""]
    lines += ["## The space sampled", "", "![space](space.png)", ""]
    lines += [
        "## Every trial",
        "",
        f"| trial | phase | state | architecture | {summary['metric']} | seconds | note |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in summary["trials"]:
        value = f"{t['value']:.4f}" if t["value"] is not None else ""
        note = (t["error"] or "").replace("|", "/").splitlines()[0][:120] if t["error"] else ""
        if t["refines"] is not None:
            note = f"retrains trial {t['refines']}"
        lines.append(
            f"| {t['number']} | {t['phase']} | {t['state']} | `{t['summary']}` | {value} | "
            f"{t['seconds']:.1f} | {note} |"
        )
    return "\n".join(lines) + "\n"


def build_report(out: Path, *, storage: str | None = None, evaluate: bool = True) -> Path:
    """Write the report of the run in ``out``; returns the path of ``report.md``."""
    run, url = _load_run(out, storage)
    spec = ArchitectureSearchSpec.model_validate(run["spec"])
    try:
        study = optuna.load_study(study_name=run["search"], storage=storage_url(url))
    except KeyError as error:
        raise ReportError(f"no study {run['search']!r} in {url}") from error
    except sqlalchemy.exc.SQLAlchemyError as error:
        detail = " ".join(str(error.orig if hasattr(error, "orig") else error).split())
        raise ReportError(f"cannot read the study at {redact(url)}: {detail}") from error
    summary = summarize(study, spec, run.get("ended"))
    evaluation = None
    if evaluate and summary["best"]:
        evaluation = _evaluate(summary["best"], spec, run, out)
        summary["test"] = {k: v for k, v in evaluation.items() if k != "confusion"}
        plot_confusion(evaluation, out / "confusion.png")
        summary["export"] = export_run(out)  # output.formats, each run and timed
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_history(summary, out / "history.png")
    importances = plot_importances(study, out / "importances.png")
    plot_space(summary, out / "space.png")
    if summary["tradeoff"]:
        plot_front(summary, out / "front.png")
    page = out / "report.md"
    page.write_text(_page(summary, evaluation, importances))
    return page


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
