"""The text of ``report.md``: a pure function of the summary, the best model's held-out
scores and why importances were not drawn (:mod:`mloptimizer.reporting` draws the plots
and writes the files)."""

from __future__ import annotations

from typing import Any

__all__ = ["SIZE_LABELS", "page"]

SIZE_LABELS: dict[str, str] = {
    "params": "parameters",
    "mflops": "MFLOPs (multiply-adds, 1 image)",
    "modelKB": "int8 LiteRT size (KB)",
    "costUSD": "cost (USD)",
}


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


def _refine_lines(summary: dict[str, Any]) -> list[str]:
    """What the refine phase added: each retraining's value against the explored one's."""
    rows = [
        t
        for t in summary["trials"]
        if t["refines"] is not None and t["value"] is not None and t.get("refined_from") is not None
    ]
    if not rows:
        return []
    sign = 1.0 if summary["direction"] == "maximize" else -1.0
    gains = [sign * (t["value"] - t["refined_from"]) for t in rows]
    lines = [
        "## What refine added",
        "",
        f"| refine trial | retrains | explored {summary['metric']} | refined | gain | epochs |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {t['number']} | {t['refines']} | {t['refined_from']:.4f} | {t['value']:.4f} | "
        f"{gain:+.4f} | {t['epochs'] if t['epochs'] is not None else '?'} |"
        for t, gain in zip(rows, gains, strict=True)
    ]
    ordered = sorted(gains)
    median = ordered[(len(ordered) - 1) // 2]
    lines += ["", f"Median gain over the explored value: {median:+.4f} (lower median).", ""]
    return lines


def _export_lines(artifacts: list[dict[str, Any]], evaluation: dict[str, Any] | None) -> list[str]:
    split = evaluation["split"] if evaluation else "test"
    lines = [
        "## The model for devices",
        "",
        f"`output.formats`: each file run by its own runtime (LiteRT's interpreter for "
        f"`.tflite`) on the {split} split, latency the median of one image at a time on the "
        "machine that made it.",
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
            f"{a['latency_ms']:.3f} | `{a['file']}` |"
        )
    return [*lines, ""]


def page(
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
            "kept": "the weights its trainer kept (not trained again)",
        }.get(evaluation.get("model", ""), "as saved by an earlier report")
        lines += [
            "",
            "![confusion matrix](confusion.png)",
            "",
            f"The model: `{evaluation.get('model_file', 'best.keras')}`, {how}.",
            "",
        ]
    lines += _refine_lines(summary)
    if summary.get("export"):
        lines += _export_lines(summary["export"], evaluation)
    if summary["tradeoff"]:
        lines += _front_lines(summary)
    lines += ["## Optimisation history", "", "![history](history.png)", ""]
    lines += ["## Parameter importances", ""]
    lines += [importances or "![importances](importances.png)", ""]
    lines += ["## The space sampled", "", "![space](space.png)", ""]
    shown, total = len(summary["trials"]), summary.get("trials_total", len(summary["trials"]))
    lines += [
        "## Every trial",
        "",
        *(
            [f"{shown} of {total} trials: the best, the front and the latest.", ""]
            if total > shown
            else []
        ),
        f"| trial | phase | state | architecture | {summary['metric']} | seconds | note |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in summary["trials"]:
        value = f"{t['value']:.4f}" if t["value"] is not None else ""
        note = (t["error"] or "").replace("|", "/").splitlines()[0][:120] if t["error"] else ""
        if t["refines"] is not None:
            note = f"retrains trial {t['refines']}"
            if t.get("refined_from") is not None and t["value"] is not None:
                note += f" ({t['refined_from']:.4f} → {t['value']:.4f})"
        lines.append(
            f"| {t['number']} | {t['phase']} | {t['state']} | `{t['summary']}` | {value} | "
            f"{t['seconds']:.1f} | {note} |"
        )
    return "\n".join(lines) + "\n"
