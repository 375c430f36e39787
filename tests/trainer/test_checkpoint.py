"""A trial stopped mid-way goes on from its last epoch and ends as if never stopped.

Real Keras training on real (small) data, a real folder. The "kill" is the worker's own
stop (SIGTERM's path), set while an epoch is reported, so the trainer is stopped in the
next epoch as a killed one is; the second trainer is a fresh Keras session with another
global seed, as a new process would be.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import keras
import pytest
from dispatch import digits_trial
from s3server import ACCESS_KEY, REGION, SECRET_KEY, s3_server

from mloptimizer.messages import CheckpointUrls, Decision, TrialMessage
from mloptimizer.operator.objectstore import Bucket, TrialCheckpoints
from mloptimizer.spec import Dataset
from mloptimizer.trainer.checkpoint import MAX_META_BYTES, Checkpoints, seed_states
from mloptimizer.trainer.data import DatasetCache, Splits
from mloptimizer.trainer.model import build_model
from mloptimizer.trainer.training import Outcome, TrialInterrupted, train_trial

EPOCHS = 4


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> Splits:
    """Real digits (sklearn's, on disk): not learnt perfectly in four epochs, so any
    difference between a resumed and a whole run would show."""
    loaded, _ = DatasetCache(tmp_path_factory.mktemp("cache")).get(Dataset(builtin="digits"))
    return loaded


TOKEN = "holder-of-trial-3-token"  # what a redelivery carries again


def build(splits: Splits) -> Any:
    return build_model(trial().architecture, splits.input_shape, splits.num_classes)


def trial(**changes: Any) -> TrialMessage:
    return digits_trial("ns.ck", trial_id=3, epochs=EPOCHS, token=TOKEN).model_copy(update=changes)


def run(
    message: TrialMessage,
    splits: Splits,
    checkpoints: Checkpoints | None,
    *,
    stop_after: int | None = None,
) -> tuple[Outcome | None, list[tuple[int, float]]]:
    """Train ``message``; with ``stop_after``, stop the trainer once that epoch is reported.
    Returns the outcome (None: interrupted) and every epoch reported, with its val_loss."""
    reported: list[tuple[int, float]] = []
    stop = threading.Event()

    def on_epoch(epoch: int, metrics: dict[str, float]) -> Decision:
        reported.append((epoch, metrics["val_loss"]))
        if epoch == stop_after:
            stop.set()
        return "continue"

    try:
        outcome = train_trial(message, splits, on_epoch=on_epoch, stop=stop,
                              checkpoints=checkpoints)  # fmt: skip
    except TrialInterrupted:
        return None, reported
    return outcome, reported


def test_a_trial_resumed_at_epoch_k_ends_as_an_uninterrupted_one(
    splits: Splits, tmp_path: Path
) -> None:
    whole, whole_reports = run(trial(), splits, None)
    assert whole is not None
    checkpoints = Checkpoints(tmp_path / "checkpoints")
    stopped, first_reports = run(trial(), splits, checkpoints, stop_after=2)
    assert stopped is None  # interrupted in epoch 3
    assert [e for e, _ in first_reports] == [1, 2]
    keras.utils.set_random_seed(987)  # another process's state: the checkpoint must carry it
    resumed, second_reports = run(trial(), splits, checkpoints)
    assert resumed is not None
    assert resumed.state == "complete"
    assert resumed.resumed_at == 2
    # the second trainer tells the checkpoint's epoch again (the first may have died before
    # telling it; the dispatcher keeps the first report), then trains only what follows
    assert [e for e, _ in second_reports] == [2, 3, 4]
    assert second_reports[0] == first_reports[-1]
    second_reports = second_reports[1:]
    assert resumed.epochs_run == EPOCHS
    # the same numbers as a run never stopped (weights, optimizer, dropout RNG, data order)
    resumed_losses = [loss for _, loss in first_reports + second_reports]
    assert resumed_losses == pytest.approx([loss for _, loss in whole_reports], abs=1e-5)
    assert resumed.history == [pytest.approx(h, abs=1e-5) for h in whole.history]
    assert resumed.value == pytest.approx(whole.value, abs=1e-5)


def test_the_last_epoch_is_kept_whole_beside_the_one_before(splits: Splits, tmp_path: Path) -> None:
    checkpoints = Checkpoints(tmp_path)
    run(trial(), splits, checkpoints, stop_after=3)
    folder = tmp_path / "trial-3"
    # two files by the epoch's parity: meta.json names one, and a trainer dying while the
    # other is written leaves it whole
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "state-0.npz", "state-1.npz"]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["epoch"] == 3
    assert meta["model"] == "state-1.npz"
    assert len(meta["history"]) == 3
    fresh = build(splits)
    assert all(state[1] == 0 for state in seed_states(fresh))  # a new model's dropout RNG
    loaded = checkpoints.load(trial(), lambda: build(splits))
    assert loaded is not None
    assert loaded.epoch == 3
    # dropout's generator moved on with the epochs trained, and came back with them
    assert seed_states(loaded.model)
    assert all(state[1] > 0 for state in seed_states(loaded.model))
    assert int(loaded.model.optimizer.iterations.numpy()) > 0  # the optimizer's own state


def test_a_checkpoint_a_holder_did_not_write_or_of_another_trial_is_ignored(
    splits: Splits, tmp_path: Path
) -> None:
    checkpoints = Checkpoints(tmp_path)
    run(trial(), splits, checkpoints, stop_after=2)
    meta_file = tmp_path / "trial-3" / "meta.json"
    honest = meta_file.read_text()
    assert checkpoints.load(trial(), lambda: build(splits)) is not None
    # another trainer of the search, without this trial's token, rewrites the epoch count
    forged = json.loads(honest)
    forged["epoch"], forged["history"] = 4, forged["history"] * 2
    meta_file.write_text(json.dumps(forged))
    assert checkpoints.load(trial(), lambda: build(splits)) is None
    meta_file.write_text(honest)
    # the same trial id with another token (a retry is a new trial), or other settings
    for other in (trial(token="x" * 24), trial(seed=99), trial(epochs=6)):
        assert checkpoints.load(other, lambda: build(splits)) is None
    # a meta.json too large to be one (planted to exhaust the next holder's memory)
    meta_file.write_bytes(b" " * (MAX_META_BYTES + 1))
    assert checkpoints.load(trial(), lambda: build(splits)) is None
    meta_file.write_text(honest)
    # the model file swapped under a valid meta.json
    (tmp_path / "trial-3" / "state-0.npz").write_bytes(b"not a model")
    assert checkpoints.load(trial(), lambda: build(splits)) is None
    # then the trial starts over, from epoch 1
    outcome, reported = run(trial(), splits, checkpoints)
    assert outcome is not None
    assert outcome.resumed_at == 0
    assert [e for e, _ in reported] == [1, 2, 3, 4]


def test_a_trial_that_ended_leaves_no_checkpoint(tmp_path: Path) -> None:
    """The session discards a trial's checkpoints once it has ended."""
    from mloptimizer.trainer.session import TrialSession

    checkpoints = Checkpoints(tmp_path / "checkpoints")
    session = TrialSession("w", DatasetCache(tmp_path / "cache"), checkpoints=checkpoints,
                           gpus=[])  # fmt: skip
    result = session.run(trial(epochs=2), 1, lambda progress: "continue", threading.Event())
    assert result.state == "complete"
    assert not (tmp_path / "checkpoints" / "trial-3").exists()


def test_a_resumed_trial_the_dispatcher_prunes_at_its_checkpoint_trains_no_further(
    splits: Splits, tmp_path: Path
) -> None:
    checkpoints = Checkpoints(tmp_path)
    run(trial(), splits, checkpoints, stop_after=2)
    asked: list[int] = []

    def prune(epoch: int, metrics: dict[str, float]) -> Decision:
        asked.append(epoch)
        return "prune"

    outcome = train_trial(trial(), splits, on_epoch=prune, stop=threading.Event(),
                          checkpoints=checkpoints)  # fmt: skip
    assert asked == [2]  # the checkpoint's epoch, told again; nothing trained after it
    assert outcome.state == "pruned"
    assert outcome.epochs_run == 2
    assert outcome.resumed_at == 2


def test_a_trial_resumes_through_the_bucket_urls_its_message_carries(
    splits: Splits, tmp_path: Path
) -> None:
    """A search delivering to S3: trainers share no folder and hold no storage key; the
    operator signs a PUT and a GET for each checkpoint object of each trial."""
    whole, whole_reports = run(trial(), splits, None)
    assert whole is not None
    with s3_server("models") as (endpoint, state):
        bucket = Bucket(endpoint, "models", REGION, ACCESS_KEY, SECRET_KEY)
        keeper = TrialCheckpoints(bucket, "ns/ck/checkpoints")
        message = trial(checkpoint=keeper.urls(3))
        no_folder = Checkpoints()  # a rented host: nothing shared but the URLs
        assert no_folder.kept(message)
        assert not no_folder.kept(trial())
        stopped, first_reports = run(message, splits, no_folder, stop_after=2)
        assert stopped is None
        objects = state.buckets["models"]
        assert sorted(objects) == [
            "ns/ck/checkpoints/trial-3/meta.json",
            "ns/ck/checkpoints/trial-3/state-0.npz",
            "ns/ck/checkpoints/trial-3/state-1.npz",
        ]
        keras.utils.set_random_seed(987)
        resumed, second_reports = run(message, splits, Checkpoints())
        assert resumed is not None
        assert resumed.resumed_at == 2
        losses = [loss for _, loss in first_reports + second_reports[1:]]
        assert losses == pytest.approx([loss for _, loss in whole_reports], abs=1e-5)
        assert resumed.value == pytest.approx(whole.value, abs=1e-5)
        # each URL does one thing to one object: a GET URL cannot write, and another
        # trial's URLs do not reach this one's objects
        forged = CheckpointUrls(put=message.checkpoint.get, get=message.checkpoint.get)  # type: ignore[union-attr]
        Checkpoints().save(trial(checkpoint=forged), 1, [{"val_loss": 0.0}], build(splits))
        assert state.refused
        assert "signature does not match" in state.refused[-1]
        other = keeper.urls(4)
        assert all("trial-4/" in url for url in [*other.put.values(), *other.get.values()])
        # the trial ended: the operator removes its objects, off the dispatch loop
        keeper.discard(3)
        assert keeper.close()
        assert objects == {}
