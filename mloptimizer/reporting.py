"""The report of a search: ``summary.json``, its plots and ``report.md``, written once.

``mloptimizer run`` (through :mod:`mloptimizer.app.report`) and the cluster's final job
(:mod:`mloptimizer.trainer.deliver`) both write the report with :func:`render_report`, so
the two are the same page: what the study says (:func:`summarize`, from the study, the
source of truth), the fANOVA importances (:func:`param_importances`), the best model's
held-out scores (per-class precision, recall and F1, the confusion matrix) and the model's
files for devices. On the cluster the operator, which alone reads the study, sends the
summary and the importances in the final job's message (:func:`for_message`, bounded);
the trainer adds the scores and the files. matplotlib is imported only to draw.
"""

from __future__ import annotations

import json
import math
import textwrap
import warnings
from pathlib import Path
from typing import Any

import optuna

from mloptimizer.messages import ReportData
from mloptimizer.reportpage import SIZE_LABELS, page
from mloptimizer.spec import ArchitectureSearchSpec, Tradeoff
from mloptimizer.study import Attr, TrialRecord, best_of, pareto_front, records, size_of

__all__ = [
    "IMPORTANCE_MIN_TRIALS",
    "MAX_REPORT_TRIALS",
    "REPORT_BYTES",
    "for_message",
    "importance_inputs",
    "param_importances",
    "render_report",
    "report_data",
    "study_of_inputs",
    "summarize",
]

# Trials a final job's message carries for the report: a broker message is bounded
# (messages.MAX_BODY_BYTES, 256 KiB), a search is not. The best, the front and the latest
# are kept; the page says how many. Complete trials it carries for the importances:
# parameters and a value each. Both halve until the report's part is at most REPORT_BYTES.
MAX_REPORT_TRIALS = 150
MAX_IMPORTANCE_TRIALS = 300
REPORT_BYTES = 160 * 1024


def summarize(
    study: optuna.Study, spec: ArchitectureSearchSpec, ended: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The content of ``summary.json``: the best trial and every trial."""
    trials = [r for r in records(study) if r.counted]
    direction, tradeoff = spec.objective.study_direction, spec.objective.tradeoff
    best = best_of(trials, direction, tradeoff)
    front = pareto_front(trials, direction, tradeoff) if tradeoff else []
    explored = {r.number: r.value for r in trials if r.phase == "explore"}
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
        "trials": [_trial_json(r, tradeoff, explored) for r in trials],
    }


def _trial_json(
    r: TrialRecord, tradeoff: Tradeoff | None, explored: dict[int, float | None] | None = None
) -> dict[str, Any]:
    """A trial for summary.json; a refine trial also carries the value of the trial it
    retrained (``refined_from``), so that what refine added is read off one row."""
    return {
        "number": r.number,
        "phase": r.phase,
        "state": r.state,
        "value": r.value,
        "architecture": r.architecture.model_dump(mode="json") if r.architecture else None,
        "family": r.architecture.family if r.architecture else None,
        "summary": r.architecture.summary() if r.architecture else None,
        "params": r.params,
        "refines": r.refines,
        "refined_from": (explored or {}).get(r.refines) if r.refines is not None else None,
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


def param_importances(study: optuna.Study) -> tuple[dict[str, float] | None, str | None]:
    """The fANOVA importance of the parameters every completed trial shares, or None and
    why not (one sentence for the report)."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < IMPORTANCE_MIN_TRIALS:
        return None, (
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
            return None, f"Not estimated: fANOVA failed ({error})."
    if not importances:
        return None, "Not estimated: the complete trials share no parameter."
    return {name: float(value) for name, value in importances.items()}, None


def plot_importances(importances: dict[str, float], path: Path) -> None:
    """The importances as bars, the most important on top."""
    plt = _pyplot()
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(names) + 1.2))
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (fANOVA)")
    ax.set_title("Parameter importances")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_note(text: str, path: Path) -> None:
    """A picture that says why there is none: a delivery always holds every file."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 1.5))
    ax.axis("off")
    ax.text(0.5, 0.5, textwrap.fill(text, 90), ha="center", va="center", fontsize="small")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_space(summary: dict[str, Any], path: Path) -> None:
    """The sampled space: each trial's value against its model size, by family."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = (("cnn", "tab:blue"), ("inception", "tab:purple"), ("mobilenet", "tab:green"),
              ("custom", "tab:orange"))  # fmt: skip
    for family, color in colors:
        points = [
            (t["parameter_count"], t["value"])
            for t in summary["trials"]
            if t.get("family") == family and t["value"] is not None and t["parameter_count"]
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


def for_message(summary: dict[str, Any], limit: int = 0) -> dict[str, Any]:
    """``summary`` for a final job's message: at most ``limit`` (default
    :data:`MAX_REPORT_TRIALS`) trials (the best, the front, then the latest), each without
    its architecture's JSON (its summary line stays), and how many there were."""
    limit = limit or MAX_REPORT_TRIALS
    trials = summary["trials"]
    keep: list[int] = []
    wanted = [summary["best"]["number"]] if summary["best"] else []
    wanted += list(summary["front"])
    wanted += [t["number"] for t in sorted(trials, key=lambda t: -t["number"])]
    for number in wanted:
        if number not in keep:
            keep.append(number)
        if len(keep) == limit:
            break
    kept = set(keep)
    slim = [{**t, "architecture": None, "params": {}} for t in trials if t["number"] in kept]
    return {**summary, "trials": slim, "trials_total": len(trials)}


def report_data(
    study: optuna.Study, spec: ArchitectureSearchSpec, ended: dict[str, Any] | None
) -> ReportData:
    """The study's part of the report, for the final job's message (the operator's side).

    The importances are left to the final job: fANOVA needs scikit-learn, which the
    trainer image has and the operator's has not. The job gets what they are estimated
    from (:func:`importance_inputs`)."""
    summary = summarize(study, spec, ended)
    keep, complete = MAX_REPORT_TRIALS, MAX_IMPORTANCE_TRIALS
    while True:  # a broker message is bounded: fewer trials until the report fits its share
        data = ReportData(
            summary=for_message(summary, keep), trials=importance_inputs(study, complete)
        )
        if len(data.model_dump_json()) <= REPORT_BYTES or keep <= 1:
            return data
        keep, complete = keep // 2, complete // 2


def importance_inputs(study: optuna.Study, limit: int = MAX_IMPORTANCE_TRIALS) -> dict[str, Any]:
    """The latest ``limit`` complete trials' parameters and first value, with each
    parameter's distribution once: enough to estimate the importances elsewhere."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    complete = complete[-limit:]
    distributions: dict[str, str] = {}
    for t in complete:
        for name, d in t.distributions.items():
            distributions.setdefault(name, optuna.distributions.distribution_to_json(d))
    return {
        "direction": study.directions[0].name.lower(),
        "distributions": distributions,
        "trials": [{"params": t.params, "value": t.values[0]} for t in complete],
    }


def study_of_inputs(inputs: dict[str, Any]) -> optuna.Study:
    """An in-memory study of :func:`importance_inputs`, for :func:`param_importances`."""
    study = optuna.create_study(direction=inputs["direction"])
    known = {
        name: optuna.distributions.json_to_distribution(text)
        for name, text in inputs["distributions"].items()
    }
    for t in inputs["trials"]:
        params = t["params"]
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions={name: known[name] for name in params},
                value=t["value"],
            )
        )
    return study


def render_report(
    out: Path,
    summary: dict[str, Any],
    evaluation: dict[str, Any] | None,
    importances: dict[str, float] | None,
    importances_note: str | None,
    *,
    every_file: bool = False,
) -> Path:
    """Write ``summary.json``, the plots and ``report.md`` into ``out``; returns the page.

    ``evaluation``: the best model's held-out scores (None: not evaluated), with
    ``summary["export"]`` its files for devices (each with ``file``, where it lies beside
    the page). ``every_file``: also draw the pictures that do not apply (importances not
    estimated, no tradeoff) as notes, so that a delivery always holds the same files.
    """
    out.mkdir(parents=True, exist_ok=True)
    summary = {**summary, "importances": importances, "importances_note": importances_note}
    if evaluation is not None:
        summary["test"] = evaluation  # the confusion matrix too: the page can be drawn again
        plot_confusion(evaluation, out / "confusion.png")
    elif every_file:
        plot_note("The best model was not evaluated.", out / "confusion.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_history(summary, out / "history.png")
    (out / "importances.png").unlink(missing_ok=True)  # a stale one from an earlier report
    if importances:
        plot_importances(importances, out / "importances.png")
    elif every_file:
        plot_note(importances_note or "Not estimated.", out / "importances.png")
    plot_space(summary, out / "space.png")
    if summary["tradeoff"]:
        plot_front(summary, out / "front.png")
    elif every_file:
        plot_note("No Pareto front: the search set no objective.tradeoff.", out / "front.png")
    written = out / "report.md"
    written.write_text(page(summary, evaluation, None if importances else importances_note))
    return written
