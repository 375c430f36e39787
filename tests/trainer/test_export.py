"""`mloptimizer export` on a real trained model: real conversions, each artifact run by
LiteRT's interpreter (or TensorFlow) on the real digits test split."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from dispatch import digits_trial

from mloptimizer.app.cli import main
from mloptimizer.formats import EXPORT_FORMATS, FORMATS
from mloptimizer.messages import Decision
from mloptimizer.spec import ArchitectureSearchSpec
from mloptimizer.trainer.data import DatasetCache
from mloptimizer.trainer.training import train_trial


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as `mloptimizer run` leaves it: run.json and the report's best.keras."""
    out = tmp_path_factory.mktemp("run")
    spec = ArchitectureSearchSpec.model_validate({"dataset": {"builtin": "digits"}})
    (out / "run.json").write_text(
        json.dumps({"spec": spec.model_dump(mode="json", by_alias=True), "cache_dir": "cache"})
    )
    splits, _ = DatasetCache(out / "cache").get(spec.dataset)
    kept: dict[str, object] = {}

    def go_on(epoch: int, metrics: dict[str, float]) -> Decision:
        return "continue"

    outcome = train_trial(
        digits_trial("ns.export", 1, epochs=8),
        splits,
        on_epoch=go_on,
        stop=threading.Event(),
        keep_model=kept,
    )
    assert outcome.state == "complete", outcome.error
    kept["model"].save(out / "best.keras")  # type: ignore[attr-defined]
    return out


def test_each_format_is_written_measured_by_running_it_and_a_bad_one_named(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    formats = [*EXPORT_FORMATS, "onnx"]  # every row of the table, and one it lacks
    code = main(["export", str(run_dir), *(a for f in formats for a in ("--format", f))])
    assert code == 1  # one format failed; the others are still written
    printed = capsys.readouterr().out
    assert "onnx" in printed
    found = {a["format"]: a for a in json.loads((run_dir / "export" / "export.json").read_text())}
    assert list(found) == formats
    assert (
        "unknown format 'onnx'; known: keras, savedmodel, tflite-float32" in found["onnx"]["error"]
    )
    for name in formats[:-1]:
        artifact = found[name]
        assert artifact["error"] is None, artifact["error"]
        assert Path(artifact["path"]).name == FORMATS[name].written  # type: ignore[index]
        assert Path(artifact["path"]).exists()
        assert artifact["latency_ms"] > 0
    keras_accuracy = found["keras"]["accuracy"]
    assert keras_accuracy > 0.8  # a trained model, scored on the held-out digits
    assert found["tflite-float32"]["accuracy"] == pytest.approx(keras_accuracy, abs=0.01)
    assert found["savedmodel"]["accuracy"] == pytest.approx(keras_accuracy, abs=0.01)
    assert found["tflite-float16"]["accuracy"] == pytest.approx(keras_accuracy, abs=0.01)
    assert found["tflite-float16"]["bytes"] < 0.6 * found["tflite-float32"]["bytes"]
    # int8: a quarter of the float file, and (nearly) the same answers
    assert found["tflite-int8"]["bytes"] < 0.4 * found["tflite-float32"]["bytes"]
    assert found["tflite-int8"]["accuracy"] == pytest.approx(keras_accuracy, abs=0.03)


def test_a_folder_without_a_model_says_how_to_make_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "run.json").write_text("{}")
    assert main(["export", str(tmp_path)]) == 2
    assert "build the report first (mloptimizer report" in capsys.readouterr().err
