"""examples/custom-model.yaml end to end: `mloptimizer run` imports the user's builder
from beside the search file, samples its declared parameters with TPE, measures each
built model against maxParams, and exports the best like any other."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import yaml
from test_run import EXE, run, study_of

from mloptimizer.study import Attr, best_of, records

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_the_custom_model_example_searches_the_users_own_builder(tmp_path: Path) -> None:
    document = yaml.safe_load((EXAMPLES / "custom-model.yaml").read_text())
    spec = document["spec"]
    spec["budget"] = {"maxTrials": 5, "parallelism": 2}
    spec["training"].update(epochs=3, refine={"topK": 1, "epochs": 4})
    # tight enough that the widest models are over it, measured by the trainer
    spec["objective"]["constraints"]["maxParams"] = 30_000
    folder = tmp_path / "search"
    folder.mkdir()
    (folder / "custom-model.yaml").write_text(yaml.safe_dump(document))
    shutil.copy(EXAMPLES / "custom_model.py", folder / "custom_model.py")
    elsewhere, out = tmp_path / "elsewhere", tmp_path / "out"
    elsewhere.mkdir()

    done = run(str(folder / "custom-model.yaml"), "--out", str(out), cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    assert "search ended (maxTrials)" in done.stdout

    trials = records(study_of(out))
    explored = [t for t in trials if t.phase == "explore"]
    assert len(explored) == 5
    for t in explored:
        assert t.architecture is not None
        assert t.architecture.family == "custom"
        params = t.architecture.custom_params or {}
        assert {"width", "blocks", "activation", "residual"} <= set(params)
        assert ("dropout" in params) == (params["residual"] == "yes")
        assert t.attrs[Attr.PARAMETERS] > 0  # measured on the built model
        assert t.feasible == (t.attrs[Attr.PARAMETERS] <= 30_000)
    best = best_of(trials, "maximize")
    assert best is not None
    assert best.feasible
    assert best.value is not None
    assert best.value > 0.5
    assert (out / "report.md").exists()

    export = subprocess.run(
        [EXE, "export", str(out), "--format", "tflite-int8"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=elsewhere,
    )
    assert export.returncode == 0, export.stderr
    [artifact] = json.loads((out / "export" / "export.json").read_text())
    assert artifact["error"] is None
    assert artifact["accuracy"] > 0.5


def test_a_search_whose_builder_is_missing_fails_with_the_reason(tmp_path: Path) -> None:
    document = yaml.safe_load((EXAMPLES / "custom-model.yaml").read_text())
    document["spec"]["budget"] = {"maxTrials": 4, "parallelism": 1}
    path = tmp_path / "custom-model.yaml"  # custom_model.py is not beside it
    path.write_text(yaml.safe_dump(document))
    done = run(str(path), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "search ended (builderUnavailable)" in done.stdout
    assert "cannot import custom_model" in done.stdout
