"""A device-constrained search against an unconstrained one, same trials: who finds the
better model that fits?

The question a user with a device asks: is ``objective.constraints`` worth more than
searching freely and then picking the best model that happens to fit? In one run, per
sampler seed, two real ``mloptimizer run`` searches of ``--trials`` trials each, on the
same data, space, seed and epochs:

* **constrained**: ``maxModelKB: --max-kb`` (TPE learns from the infeasible trials);
* **unconstrained, then picked**: the same search without the limit (every trained model
  is still converted and measured, under a limit no model reaches), after which the most
  accurate model of at most ``--max-kb`` KB is picked.

Printed: each seed's best val_accuracy under the limit for both (0 when none fits), the
medians, how many of each search's trials fit, the wall-clock of each, and two ratio lines:
the constrained search's median best minus the unconstrained one's (target: above 0), and
its wall-clock over the unconstrained one's. No pruner and no refine phase: both
searches spend exactly ``--trials`` trainings.

Run: ``python bench/constrained_search.py`` (MNIST-5k, 3 seeds x 2 searches x 10 trials,
about 6 minutes on 2 CPU cores); ``--help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import yaml

from mloptimizer.study import Attr, records

EXE = str(Path(sys.executable).with_name("mloptimizer"))
NO_LIMIT_KB = 10.0**7  # measured, never binding


def search(name: str, seed: int, trials: int, max_kb: float, args: argparse.Namespace) -> Any:
    """The search file of one side: the space is wide enough that many models do not fit
    (an mlp head on a large feature map), and small enough to train in seconds."""
    return {
        "apiVersion": "mloptimizer.io/v1alpha1",
        "kind": "ArchitectureSearch",
        "metadata": {"name": name},
        "spec": {
            "dataset": {"builtin": args.dataset},
            "objective": {"constraints": {"maxModelKB": max_kb}},
            "budget": {"maxTrials": trials, "parallelism": 2},
            "sampler": {"type": "tpe", "seed": seed, "nStartupTrials": args.startup_trials},
            "pruner": {"type": "none"},
            "training": {"epochs": args.epochs, "batchSize": 64, "mixedPrecision": "off"},
            "searchSpace": {
                "architectures": ["cnn"],
                "cnn": {
                    "blocks": {"min": 1, "max": 3},
                    "filters": {"min": 8, "max": 64, "step": 8},
                    "kernelSizes": [3, 5],
                },
                "classifier": {
                    "types": ["gap", "mlp"],
                    "units": {"min": 32, "max": 256, "step": 32},
                },
            },
        },
    }


def run_side(folder: Path, document: Any) -> tuple[list[dict[str, Any]], float]:
    """Run one search with ``mloptimizer run``; its trained trials (value, KB) and the
    wall-clock seconds it took."""
    path = folder / f"{document['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(document))
    out = folder / document["metadata"]["name"]
    started = time.perf_counter()
    done = subprocess.run(
        [EXE, "run", str(path), "--out", str(out), "--no-report"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{path.name}: mloptimizer run failed:\n{done.stderr[-3000:]}")
    run = json.loads((out / "run.json").read_text())
    study = optuna.load_study(study_name=run["search"], storage=f"sqlite:///{out / 'study.db'}")
    trained = [
        {"value": t.value, "kb": t.attrs.get(Attr.MODEL_KB)}
        for t in records(study)
        if t.state == "complete" and Attr.WORKER in t.attrs
    ]
    seconds = time.perf_counter() - started
    print(
        f"  {document['metadata']['name']}: {len(trained)} trained in {seconds:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    return trained, seconds


def best_under(trials: list[dict[str, Any]], max_kb: float) -> float:
    fits = [t["value"] for t in trials if t["kb"] is not None and t["kb"] <= max_kb]
    return max(fits, default=0.0)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="mnist_5k", help="builtin dataset [mnist_5k]")
    parser.add_argument("--trials", type=int, default=10, help="trials per search [10]")
    parser.add_argument("--seeds", type=int, default=3, help="sampler seeds [3]")
    parser.add_argument("--startup-trials", type=int, default=4, help="TPE start-up [4]")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per trial [3]")
    parser.add_argument("--max-kb", type=float, default=64.0, help="the device limit [64]")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(1, args.seeds + 1):
            print(f"seed {seed}", file=sys.stderr, flush=True)
            folder = Path(tmp) / f"seed{seed}"
            folder.mkdir()
            limited, limited_s = run_side(
                folder, search(f"constrained-{seed}", seed, args.trials, args.max_kb, args)
            )
            free, free_s = run_side(
                folder, search(f"unconstrained-{seed}", seed, args.trials, NO_LIMIT_KB, args)
            )
            rows.append(
                (
                    seed,
                    best_under(limited, args.max_kb),
                    best_under(free, args.max_kb),
                    sum(t["kb"] is not None and t["kb"] <= args.max_kb for t in limited),
                    sum(t["kb"] is not None and t["kb"] <= args.max_kb for t in free),
                    len(limited),
                    len(free),
                    limited_s,
                    free_s,
                )
            )
    print(f"best val_accuracy of a model <= {args.max_kb:g} KB (int8), {args.trials} trials")
    print("seed | constrained | unconstrained, then picked | fit (c) | fit (u) | seconds (c/u)")
    for seed, c, u, fit_c, fit_u, n_c, n_u, s_c, s_u in rows:
        print(
            f"{seed} | {c:.4f} | {u:.4f} | {fit_c}/{n_c} trained | {fit_u}/{n_u} trained | "
            f"{s_c:.0f}/{s_u:.0f}"
        )
    median_c = statistics.median(r[1] for r in rows)
    median_u = statistics.median(r[2] for r in rows)
    wins = sum(r[1] > r[2] for r in rows)
    print(f"median | {median_c:.4f} | {median_u:.4f}")
    verdict = "met" if median_c > median_u else "not met"
    time_ratio = statistics.median(r[7] / r[8] for r in rows)
    print(
        f"ratio constrained / unconstrained wall-clock for the same {args.trials} trials: "
        f"{time_ratio:.2f} (median over seeds; trials over the limit by their weights alone "
        "are judged untrained)"
    )
    print(
        f"ratio constrained - unconstrained median best under {args.max_kb:g} KB: "
        f"{median_c - median_u:+.4f} (constrained ahead on {wins}/{len(rows)} seeds); "
        f"target: above: {verdict}"
    )


if __name__ == "__main__":
    main()
