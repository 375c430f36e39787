"""The final job on a trainer, with real Keras models on real digits: real conversions, each
artifact run by its own runtime, written to a folder (the output PVC) or PUT to pre-signed
URLs that an S3 server checks (SigV4, independently implemented in ``s3server.py``)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from dispatch import digits_trial
from pydantic import ValidationError
from s3server import ACCESS_KEY, REGION, SECRET_KEY, s3_server

from mloptimizer.messages import (
    ARTIFACT_FILES,
    REPORT_FILES,
    Decision,
    DeliverMessage,
    ToFolder,
    ToUrls,
    TrialMessage,
    encode,
)
from mloptimizer.operator.objectstore import Bucket
from mloptimizer.spec import Dataset
from mloptimizer.trainer.data import DatasetCache
from mloptimizer.trainer.deliver import final_job
from mloptimizer.trainer.export import Artifact, export_model
from mloptimizer.trainer.kept import KeptModels, identity
from mloptimizer.trainer.training import train_trial

SEARCH = "ns.edge"


def deliver(best: TrialMessage, to: ToFolder | ToUrls, formats: list[Any]) -> DeliverMessage:
    return DeliverMessage(
        search=SEARCH,
        trial_id=best.trial_id,
        number=best.number,
        round=1,
        best=best,
        formats=formats,
        to=to,
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> DatasetCache:
    return DatasetCache(tmp_path_factory.mktemp("cache"))


def test_to_the_output_volume_reusing_the_weights_its_trainer_kept(
    tmp_path: Path, cache: DatasetCache
) -> None:
    best = digits_trial(SEARCH, 3, epochs=4)
    splits, _ = cache.get(Dataset(builtin="digits"))
    holder: dict[str, Any] = {}

    def go_on(epoch: int, metrics: dict[str, float]) -> Decision:
        return "continue"

    outcome = train_trial(best, splits, on_epoch=go_on, stop=threading.Event(), keep_model=holder)
    assert outcome.state == "complete"
    root = tmp_path / "claim"
    KeptModels(root / "ns" / "edge" / "models").offer(best, outcome.value, holder["model"])

    told = final_job(
        deliver(best, ToFolder(path="ns/edge"), ["keras", "tflite-int8"]),
        2,
        worker_id="t1",
        cache=cache,
        output_dir=root,
        gpus=[],
        stop=threading.Event(),
    )
    assert told.state == "complete", told.error
    assert (told.model, told.attempt, told.round) == ("kept", 2, 1)  # no second training
    folder = root / "ns" / "edge"
    by_format = {a.format: a for a in told.artifacts}
    assert set(by_format) == {"keras", "tflite-int8"}
    for name, artifact in by_format.items():
        assert artifact.error is None
        assert (folder / ARTIFACT_FILES[name]).stat().st_size == artifact.bytes
        assert artifact.accuracy is not None
        assert artifact.accuracy > 0.6
    # the kept weights are the trial's: the Keras file scores what the trial scored
    assert by_format["keras"].accuracy == told.test_accuracy
    # int8 costs little accuracy, and is several times smaller than the float Keras file
    assert abs(by_format["tflite-int8"].accuracy - by_format["keras"].accuracy) < 0.05  # type: ignore[operator]
    assert by_format["tflite-int8"].bytes < by_format["keras"].bytes / 3
    listed = json.loads((folder / "artifacts.json").read_text())
    assert listed["trial"] == 3
    assert listed["model"] == "kept"
    report = (folder / "report.md").read_text()
    assert "| 3 | explore |" in report  # the best trial (the only one the message named)
    assert "| class | precision | recall | F1 | images |" in report
    assert "`model-int8.tflite`" in report
    assert "The model: `model.keras`, the weights its trainer kept" in report
    for file in REPORT_FILES:  # every picture, a note where one does not apply
        assert (folder / file).stat().st_size > 0, file
    assert not list(folder.glob(".*partial"))


def test_a_destination_outside_the_volume_is_refused_before_any_work(
    tmp_path: Path, cache: DatasetCache
) -> None:
    best = digits_trial(SEARCH, 1)
    for escape in ("../../etc", "/etc", "ns/../.."):  # refused by the message contract
        with pytest.raises(ValidationError):
            ToFolder(path=escape)
    # and a folder that leads out of the volume (a symlink put there) by the trainer
    claim = tmp_path / "claim"
    (claim / "ns").mkdir(parents=True)
    (claim / "ns" / "out").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    told = final_job(
        deliver(best, ToFolder(path="ns/out"), ["keras"]),
        1,
        worker_id="t1",
        cache=cache,
        output_dir=tmp_path / "claim",
        gpus=[],
        stop=threading.Event(),
    )
    assert told.state == "failed"
    assert "leaves the output volume" in (told.error or "")
    no_volume = final_job(
        deliver(best, ToFolder(path="ns/edge"), ["keras"]),
        1,
        worker_id="t1",
        cache=cache,
        output_dir=None,
        gpus=[],
        stop=threading.Event(),
    )
    assert no_volume.state == "failed"
    assert "no output volume" in (no_volume.error or "")


def test_to_s3_through_presigned_urls_only_retrained_and_a_failed_format_named(
    cache: DatasetCache,
) -> None:
    best = digits_trial(SEARCH, 5, epochs=2)
    formats = ["keras", "tflite-float16", "savedmodel"]

    def export_and_fail_savedmodel(*args: Any) -> list[Artifact]:
        made = export_model(*args)
        return [
            a
            if a.format != "savedmodel"
            else Artifact("savedmodel", None, error="ConverterError: no op")
            for a in made
        ]

    with s3_server("models") as (endpoint, state):
        bucket = Bucket(endpoint, "models", REGION, ACCESS_KEY, SECRET_KEY)
        files = [ARTIFACT_FILES[f] for f in formats] + list(REPORT_FILES)
        urls = {f: bucket.upload_url(f"ns/edge/{f}", 600) for f in files}
        message = deliver(best, ToUrls(urls=urls), formats)
        assert SECRET_KEY.encode() not in encode(message)  # no credential reaches a trainer
        told = final_job(
            message,
            1,
            worker_id="t1",
            cache=cache,
            output_dir=None,
            gpus=[],
            stop=threading.Event(),
            export=export_and_fail_savedmodel,
        )
        assert told.state == "complete", told.error
        assert told.model == "retrained"  # nothing kept: trained again, same epochs and seed
        assert state.refused == []
        stored = state.buckets["models"]
        by_format = {a.format: a for a in told.artifacts}
        assert by_format["savedmodel"].error == "ConverterError: no op"
        assert "ns/edge/savedmodel.tar.gz" not in stored
        for name in ("keras", "tflite-float16"):
            assert len(stored[f"ns/edge/{ARTIFACT_FILES[name]}"]) == by_format[name].bytes
        assert bucket.size("ns/edge/report.md") == len(stored["ns/edge/report.md"])
        page = stored["ns/edge/report.md"]
        assert b"| savedmodel | | | | failed: ConverterError: no op |" in page

        # a URL signed with another key is refused by the store: the job fails, saying so
        forged = Bucket(endpoint, "models", REGION, ACCESS_KEY, "not-the-key")
        bad = {f: forged.upload_url(f"ns/edge/{f}", 600) for f in files}
        failed = final_job(
            deliver(best, ToUrls(urls=bad), formats),
            1,
            worker_id="t1",
            cache=cache,
            output_dir=None,
            gpus=[],
            stop=threading.Event(),
            export=export_and_fail_savedmodel,
        )
        assert failed.state == "failed"
        assert "HTTP 403" in (failed.error or "")
        assert "signature does not match" in (failed.error or "")


def test_an_unreadable_kept_model_is_trained_again(tmp_path: Path, cache: DatasetCache) -> None:
    best = digits_trial(SEARCH, 4, epochs=1)
    models = tmp_path / "claim" / "ns" / "edge" / "models"
    models.mkdir(parents=True)
    (models / "trial-4.keras").write_bytes(b"truncated by a full disk")
    (models / "trial-4.json").write_text(json.dumps({"identity": identity(best), "value": 0.9}))
    told = final_job(
        deliver(best, ToFolder(path="ns/edge"), ["keras"]),
        1,
        worker_id="t1",
        cache=cache,
        output_dir=tmp_path / "claim",
        gpus=[],
        stop=threading.Event(),
    )
    assert told.state == "complete", told.error
    assert told.model == "retrained"
