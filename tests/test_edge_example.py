"""examples/edge-96x96.yaml end to end: `mloptimizer run` on a real, imbalanced 96x96 RGB
image folder (augmentation, mobilenet, macro F1, balanced class weights) under the
example's device limits, then `mloptimizer export` of the int8 model a device loads."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageFilter
from sklearn.datasets import load_sample_images
from test_run import EXE, run, study_of

from mloptimizer.study import Attr, best_of, records

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "edge-96x96.yaml"
PER_CLASS = 80
RARE = 20  # the third class: a quarter of the others


def photo_crops(folder: Path, per_class: int, seed: int = 0, rare: int = 0) -> None:
    """One class per scikit-learn sample photo (china.jpg, flower.jpg): random square crops
    of 96 to 192 pixels, saved as JPEG for the trainer to decode and resize to 96x96.

    Why these: they ship with scikit-learn (offline, no download), they are real RGB
    photographs rather than upscaled 8x8 digits, and crops of a scene's textures are the
    kind of task the example is for (patches of road surface); the two photos differ
    enough for a small CNN to learn them in a few epochs. ``rare`` adds a third class,
    "blurred": that many crops of either photo, blurred out of focus, so that the classes
    are imbalanced as a user's photos are.
    """
    photos = load_sample_images()
    rng = np.random.default_rng(seed)
    for image, source in zip(photos.images, photos.filenames, strict=True):
        target = folder / Path(source).stem
        target.mkdir(parents=True)
        height, width = image.shape[:2]
        for i in range(per_class):
            side = int(rng.integers(96, 193))
            top = int(rng.integers(0, height - side + 1))
            left = int(rng.integers(0, width - side + 1))
            crop = image[top : top + side, left : left + side]
            Image.fromarray(crop).save(target / f"{i:03d}.jpg", quality=90)
    if rare:
        target = folder / "blurred"
        target.mkdir()
        for i in range(rare):
            image = photos.images[i % 2]
            side = 160
            top = int(rng.integers(0, image.shape[0] - side + 1))
            left = int(rng.integers(0, image.shape[1] - side + 1))
            crop = Image.fromarray(image[top : top + side, left : left + side])
            crop.filter(ImageFilter.GaussianBlur(6)).save(target / f"{i:03d}.jpg", quality=90)


def test_edge_example_finds_a_model_within_its_device_limits(tmp_path: Path) -> None:
    document = yaml.safe_load(EXAMPLE.read_text())
    spec = document["spec"]
    # The example's folder, relative path and all: it resolves next to the search file.
    photo_crops(tmp_path / spec["dataset"]["imageFolder"]["path"], PER_CLASS, rare=RARE)
    # A smaller budget; the dataset, constraints, sampler and space stay the example's.
    # Trials over maxMFLOPs are told infeasible unsent, so they cost no training.
    spec["budget"] = {"maxTrials": 8, "parallelism": 2}
    spec["training"].update(epochs=3, refine={"topK": 1, "epochs": 5})
    path = tmp_path / EXAMPLE.name
    path.write_text(yaml.safe_dump(document))
    elsewhere, out = tmp_path / "elsewhere", tmp_path / "out"
    elsewhere.mkdir()

    done = run(str(path), "--out", str(out), cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    assert "search ended (maxTrials)" in done.stdout

    limits = spec["objective"]["constraints"]
    trials = records(study_of(out))
    best = best_of(trials, "maximize")
    assert best is not None
    assert best.feasible
    assert best.attrs[Attr.MODEL_KB] <= limits["maxModelKB"]
    assert best.attrs[Attr.MFLOPS] <= limits["maxMFLOPs"]
    # a trial is infeasible exactly when a measure is over its limit (unsent ones have no
    # int8 size: they were judged on their multiply-adds alone)
    for trial in trials:
        if trial.state in ("complete", "pruned"):
            over = trial.attrs[Attr.MFLOPS] > limits["maxMFLOPs"]
            over |= (trial.attrs.get(Attr.MODEL_KB) or 0.0) > limits["maxModelKB"]
            assert over == (not trial.feasible), trial
    assert any(not t.feasible for t in trials), "maxMFLOPs should bite in this space"
    # the example's own choices reached the trials: both families, searched augmentation
    families = {t.architecture.family for t in trials if t.architecture is not None}
    assert "mobilenet" in families
    for t in trials:
        assert t.architecture is not None
        augment = t.architecture.augmentation
        assert augment is not None
        assert augment.horizontal_flip  # fixed by training.augmentation
        assert 0.0 <= augment.rotation <= 0.1  # searched

    summary = json.loads((out / "summary.json").read_text())
    assert summary["best"]["number"] == best.number
    test = summary["test"]
    assert test["images"] == round((2 * PER_CLASS + RARE) * 0.1)
    per_class = {c["class"]: c for c in test["per_class"]}
    assert list(per_class) == ["blurred", "china", "flower"]
    assert per_class["blurred"]["support"] == round(RARE * 0.1)  # the rare class, visible
    assert test["accuracy"] > 0.5
    report = (out / "report.md").read_text()
    assert "val_f1_macro" in report
    assert "blurred" in report
    assert (out / "report.md").exists()
    assert (out / "best.keras").exists()

    # the file a device loads: best.keras as int8 LiteRT, within maxModelKB
    export = subprocess.run(
        [EXE, "export", str(out), "--format", "tflite-int8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert export.returncode == 0, export.stderr
    [artifact] = json.loads((out / "export" / "export.json").read_text())
    assert artifact["error"] is None
    assert 0 < artifact["bytes"] <= limits["maxModelKB"] * 1024
