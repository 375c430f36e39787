"""`mloptimizer run` end to end: real training on digits, the study, the report, resume,
and the same run over the machine's RabbitMQ and PostgreSQL with external trainers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pika
import pytest
import yaml
from services import RABBITMQ_URL, TrainerProcess

from mloptimizer.messages import QueueNames
from mloptimizer.reporting import IMPORTANCE_MIN_TRIALS
from mloptimizer.study import Attr, records, storage_url

EXAMPLE = Path(__file__).parent.parent / "examples" / "digits-quick.yaml"
EXE = str(Path(sys.executable).with_name("mloptimizer"))
PNG = b"\x89PNG\r\n\x1a\n"

optuna.logging.set_verbosity(optuna.logging.WARNING)


def search_file(tmp_path: Path, name: str = "digits-quick", **spec: Any) -> Path:
    """The digits example on a reduced budget, with ``spec`` merged over its spec."""
    document = yaml.safe_load(EXAMPLE.read_text())
    document["metadata"]["name"] = name
    document["spec"]["budget"] = {"maxTrials": 4, "parallelism": 2}
    document["spec"]["training"]["epochs"] = 3
    document["spec"]["training"].pop("refine", None)  # tests that want it say so
    for key, value in spec.items():
        merged = key != "dataset"  # a dataset is replaced whole: builtin or imageFolder
        document["spec"][key] = {**document["spec"].get(key, {}), **value} if merged else value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def run(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EXE, "run", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def study_of(out: Path) -> optuna.Study:
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["storage"] == "study.db"  # relative: the folder may move
    storage = f"sqlite:///{(out / run_info['storage']).resolve()}"
    return optuna.load_study(study_name=run_info["search"], storage=storage)


def test_digits_example_end_to_end_writes_a_consistent_report(tmp_path: Path) -> None:
    path = search_file(tmp_path, training={"refine": {"topK": 1, "epochs": 5}})
    out = tmp_path / "out"
    done = run(str(path), "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "search ended (maxTrials)" in done.stdout
    assert "report: " in done.stdout

    study = study_of(out)
    summary = json.loads((out / "summary.json").read_text())
    trials = records(study)
    assert [t.phase for t in trials] == ["explore"] * 4 + ["refine"]
    assert len(summary["trials"]) == 5
    assert summary["best"]["number"] == study.best_trial.number
    assert summary["best"]["value"] == pytest.approx(study.best_value)
    assert summary["counts"]["complete"] == sum(t.state == "complete" for t in trials)
    refine = trials[-1]
    explore_best = max(
        (t for t in trials[:4] if t.state == "complete"), key=lambda t: t.value or 0.0
    )
    assert refine.refines == explore_best.number
    assert refine.params == explore_best.params
    page = (out / "report.md").read_text()
    assert "## What refine added" in page  # the retraining against its explored value
    assert f"| {refine.number} | {explore_best.number} | {explore_best.value:.4f} |" in page

    # 4 explore + 1 refine trials: too few for an importance estimate, said instead of drawn
    assert not (out / "importances.png").exists()
    for plot in ("history.png", "space.png", "confusion.png"):
        data = (out / plot).read_bytes()
        assert data.startswith(PNG), plot
        assert len(data) > 5_000, plot
    test = summary["test"]
    assert test["split"] == "test"
    assert test["images"] == 180  # 10% of digits' 1,797
    for key in ("accuracy", "precision_macro", "recall_macro", "f1_macro"):
        assert 0.0 <= test[key] <= 1.0
    assert len(test["per_class"]) == 10
    assert test["trial"] == summary["best"]["number"]
    assert (out / "best.keras").stat().st_size > 10_000
    # the best trial is not trained twice: the report took the model its trainer kept
    assert test["model"] == "kept by its trainer"
    best_number = summary["best"]["number"]
    kept = out / "models" / f"trial-{best_number}.keras"
    assert kept.read_bytes() == (out / "best.keras").read_bytes()
    # each trainer keeps its best so far only, not every trial's model
    assert len(list((out / "models").glob("trial-*.keras"))) <= 2
    page = (out / "report.md").read_text()
    for needed in ("history.png", "space.png", "confusion.png", "F1 (macro)"):
        assert needed in page
    assert f"trials, and an importance estimate needs at least {IMPORTANCE_MIN_TRIALS}" in page
    # LiteRT's and the converter's C++ lines stay off the console (no --verbose)
    for native in ("XNNPACK", "fully_quantize", "absl::", "TF_CPP"):
        assert native not in done.stderr + done.stdout, native
    assert "the weights its trainer kept (not trained again)" in page
    # output.formats (default keras and tflite-int8): exported, each run and listed
    exported = {a["format"]: a for a in summary["export"]}
    assert set(exported) == {"keras", "tflite-int8"}
    for artifact in exported.values():
        assert artifact["error"] is None
        assert Path(artifact["path"]).exists()
        assert abs(artifact["accuracy"] - test["accuracy"]) <= 0.05
    assert exported["tflite-int8"]["bytes"] < exported["keras"]["bytes"]
    assert "## The model for devices" in page
    assert "`export/model-int8.tflite`" in page
    assert "export: " in done.stdout

    # the same command again: nothing left to do, nothing repeated, the report rebuilt
    model_time = (out / "best.keras").stat().st_mtime
    again = run(str(path), "--out", str(out), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert len(records(study_of(out))) == 5
    assert (out / "best.keras").stat().st_mtime == model_time  # reused, not retrained

    # `mloptimizer report` rebuilds it from the folder alone
    (out / "report.md").unlink()
    (out / "history.png").unlink()
    rebuilt = subprocess.run([EXE, "report", str(out)], capture_output=True, text=True, timeout=300)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert (out / "report.md").exists()
    assert (out / "history.png").read_bytes().startswith(PNG)


def test_sigint_mid_run_then_rerun_resumes_without_repeating_a_trial(tmp_path: Path) -> None:
    path = search_file(tmp_path, budget={"maxTrials": 5, "parallelism": 2}, training={"epochs": 6})
    out = tmp_path / "out"
    process = subprocess.Popen(
        [EXE, "run", str(path), "--out", str(out), "--no-report"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no trial finished in time"
        if (out / "run.json").exists():
            states = [t.state for t in records(study_of(out))]
            if states.count("complete") + states.count("pruned") >= 1 and "running" in states:
                break
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "run the same command again to resume" in stdout

    before = records(study_of(out))
    finished = {t.number: t.params for t in before if t.state in ("complete", "pruned")}
    interrupted = [t for t in before if t.interrupted]
    assert interrupted
    assert not [t for t in before if t.state == "running"]

    again = run(str(path), "--out", str(out), "--no-report", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    after = records(study_of(out))
    counted = [t for t in after if t.counted]
    assert len(counted) == 5  # the trial count adds up
    retried = [t for t in after if Attr.RETRY_OF in t.attrs]
    assert sorted(t.attrs[Attr.RETRY_OF] for t in retried) == sorted(t.number for t in interrupted)
    assert all(t.attrs[Attr.RETRY_OF] not in finished for t in retried)
    for t in after:  # finished trials were left alone
        if t.number in finished:
            assert t.state in ("complete", "pruned")


def test_failing_trials_end_the_run_at_max_failed_trials(tmp_path: Path) -> None:
    # the image folder is not there (a volume not mounted): every trial fails to load it
    path = search_file(
        tmp_path,
        dataset={"imageFolder": {"path": "not-mounted", "imageSize": [8, 8]}},
        budget={"maxTrials": 6, "parallelism": 1, "maxFailedTrials": 2},
    )
    out = tmp_path / "out"
    done = run(str(path), "--out", str(out), "--workers", "1", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "search ended (maxFailedTrials): 2 trials failed" in done.stdout
    assert done.stdout.count("failed: dataset: ") == 2
    assert "not-mounted" in done.stdout
    trials = records(study_of(out))
    assert [t.state for t in trials] == ["failed", "failed"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["failed"] == 2
    assert summary["best"] is None


def test_a_space_that_cannot_fit_the_images_is_refused_before_any_trial(tmp_path: Path) -> None:
    path = search_file(
        tmp_path,
        searchSpace={"architectures": ["cnn"], "cnn": {"blocks": {"min": 4, "max": 4}}},
    )
    out = tmp_path / "out"
    done = run(str(path), "--out", str(out), cwd=tmp_path)
    assert done.returncode == 2
    assert "spec.searchSpace.cnn.blocks.min: 4 blocks need images of at least 16x16" in done.stderr
    assert "lower cnn.blocks.min (and max) to 3" in done.stderr
    assert not out.exists()


def test_target_ends_the_run_early(tmp_path: Path) -> None:
    path = search_file(
        tmp_path, objective={"target": 0.3}, budget={"maxTrials": 8, "parallelism": 1}
    )
    out = tmp_path / "out"
    done = run(str(path), "--out", str(out), "--workers", "1", "--no-report", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "search ended (target)" in done.stdout
    trials = records(study_of(out))
    assert len([t for t in trials if t.counted]) < 8
    assert max(t.value or 0 for t in trials) >= 0.3


@pytest.fixture
def search_name() -> Iterator[str]:
    name = f"run-{uuid.uuid4().hex[:8]}"
    yield name
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    channel = connection.channel()
    for queue in QueueNames(f"default.{name}").all:
        channel.queue_delete(queue)
    connection.close()


def test_run_over_rabbitmq_and_postgresql_with_two_external_trainers(
    tmp_path: Path, postgres_dsn: str, search_name: str
) -> None:
    path = search_file(tmp_path, name=search_name, training={"refine": {"topK": 1, "epochs": 4}})
    trainers = [
        TrainerProcess(RABBITMQ_URL, f"default.{search_name}", tmp_path, f"ext-{i}") for i in (1, 2)
    ]
    try:
        out = tmp_path / "out"
        done = run(
            str(path),
            "--out",
            str(out),
            "--storage",
            postgres_dsn,
            "--broker",
            RABBITMQ_URL,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr + "\n".join(t.log() for t in trainers)
    finally:
        for trainer in trainers:
            trainer.stop()
    study = optuna.load_study(
        study_name=f"default.{search_name}", storage=storage_url(postgres_dsn)
    )
    trials = records(study)
    assert len(trials) == 5
    assert all(t.state in ("complete", "pruned") for t in trials)
    workers = {t.attrs[Attr.WORKER] for t in trials}
    assert workers <= {"ext-1", "ext-2"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best"]["value"] == pytest.approx(study.best_value)
    assert "***" not in json.dumps(summary)

    # `mloptimizer report --storage` reads the study the dispatcher wrote
    (out / "report.md").unlink()
    (out / "summary.json").unlink()
    rebuilt = subprocess.run(
        [EXE, "report", str(out), "--storage", postgres_dsn],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rebuilt.returncode == 0, rebuilt.stderr
    again = json.loads((out / "summary.json").read_text())
    assert again["best"]["number"] == study.best_trial.number
    assert [t["number"] for t in again["trials"]] == [t.number for t in trials]
    assert (out / "report.md").exists()


def test_a_tradeoff_run_trains_real_models_and_reports_optunas_pareto_front(
    tmp_path: Path,
) -> None:
    path = search_file(
        tmp_path, name="digits-front", objective={"tradeoff": "params"}, pruner={"type": "none"}
    )
    out = tmp_path / "out"
    done = run(str(path), "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    study = study_of(out)
    assert len(study.directions) == 2
    summary = json.loads((out / "summary.json").read_text())
    front = {t.number for t in study.best_trials}
    assert front
    assert set(summary["front"]) == front
    assert summary["best"]["number"] == summary["front"][0]  # the front's most accurate
    assert summary["test"]["trial"] == summary["best"]["number"]
    for trial in summary["trials"]:  # the size told is the model Keras built
        assert trial["size"] == trial["parameter_count"]
    assert (out / "front.png").read_bytes().startswith(PNG)
    assert "## Pareto front" in (out / "report.md").read_text()
