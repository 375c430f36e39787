"""The trainer worker against the machine's RabbitMQ, training real models on digits."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from dispatch import Dispatcher, digits_trial
from services import RABBITMQ_URL, Broker, TrainerProcess, close_connection


@pytest.fixture
def search(broker: Broker) -> str:
    return f"test.{broker.prefix}"


@pytest.fixture
def dispatcher(search: str) -> Iterator[Dispatcher]:
    found = Dispatcher(RABBITMQ_URL, search)
    yield found
    found.close()


@pytest.fixture
def trainers(search: str, tmp_path: Path) -> Iterator[list[TrainerProcess]]:
    started: list[TrainerProcess] = []
    yield started
    for trainer in started:
        trainer.stop()


def start(
    trainers: list[TrainerProcess], search: str, tmp_path: Path, name: str, *extra: str
) -> TrainerProcess:
    trainer = TrainerProcess(RABBITMQ_URL, search, tmp_path, name, *extra)
    trainers.append(trainer)
    return trainer


def test_one_trial_in_one_result_out(
    dispatcher: Dispatcher, trainers: list[TrainerProcess], search: str, tmp_path: Path
) -> None:
    start(trainers, search, tmp_path, "w1")
    dispatcher.send(digits_trial(search, 1, epochs=2))
    dispatcher.wait_for(lambda: len(dispatcher.results) == 1)
    result = dispatcher.results[0]
    assert result.state == "complete", result.error
    assert result.trial_id == 1
    assert result.attempt == 1
    assert result.worker_id == "w1"
    assert result.val_accuracy is not None
    assert result.val_accuracy > 0.8
    assert result.value == result.val_accuracy
    assert result.epochs_run == 2
    assert result.parameter_count > 0
    assert result.images_per_second > 0
    assert result.device == "CPU"
    assert result.dataset_load_seconds > 0
    assert [p.epoch for p in dispatcher.progress] == [1, 2]
    assert dispatcher.queued_trials() == 0


def test_second_trial_reuses_the_cached_dataset(
    dispatcher: Dispatcher, trainers: list[TrainerProcess], search: str, tmp_path: Path
) -> None:
    start(trainers, search, tmp_path, "w1")
    dispatcher.send(digits_trial(search, 1, epochs=1))
    dispatcher.send(digits_trial(search, 2, epochs=1))
    dispatcher.wait_for(lambda: len(dispatcher.results) == 2)
    first, second = sorted(dispatcher.results, key=lambda r: r.trial_id)
    assert first.dataset_load_seconds > 0
    assert second.dataset_load_seconds == 0.0


def test_prune_reply_stops_after_that_epoch(
    dispatcher: Dispatcher, trainers: list[TrainerProcess], search: str, tmp_path: Path
) -> None:
    dispatcher.decide = lambda p: "prune" if p.epoch == 2 else "continue"
    start(trainers, search, tmp_path, "w1")
    dispatcher.send(digits_trial(search, 7, epochs=6))
    dispatcher.wait_for(lambda: len(dispatcher.results) == 1)
    result = dispatcher.results[0]
    assert result.state == "pruned"
    assert result.epochs_run == 2
    assert len(result.history) == 2
    assert [p.epoch for p in dispatcher.progress] == [1, 2]


def test_heartbeats_flow_while_a_long_trial_trains(
    dispatcher: Dispatcher, trainers: list[TrainerProcess], search: str, tmp_path: Path
) -> None:
    # Nobody answers progress: each epoch waits its 2.5 s timeout, so the trial lasts more
    # than three 2 s heartbeats however fast the machine trains.
    dispatcher.decide = lambda p: None
    trainer = start(trainers, search, tmp_path, "w1", "--heartbeat", "2")
    dispatcher.send(digits_trial(search, 3, epochs=3, progress_timeout_seconds=2.5))
    dispatcher.wait_for(lambda: len(dispatcher.results) == 1)
    result = dispatcher.results[0]
    assert result.state == "complete"
    assert result.epochs_run == 3
    log = trainer.log()
    assert log.count("serving") == 1, log  # one connection throughout
    assert "reconnecting" not in log


def test_kill_9_mid_trial_redelivers_to_another_worker(
    dispatcher: Dispatcher, trainers: list[TrainerProcess], search: str, tmp_path: Path
) -> None:
    # the two trainers share a checkpoint folder, as the trainers of a search share its claim
    shared = ("--checkpoint-dir", str(tmp_path / "checkpoints"))
    first = start(trainers, search, tmp_path, "w1", *shared)
    dispatcher.send(digits_trial(search, 4, epochs=5))
    dispatcher.wait_for(lambda: len(dispatcher.progress) >= 2)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    told = max(p.epoch for p in dispatcher.progress)
    start(trainers, search, tmp_path, "w2", *shared)
    dispatcher.wait_for(lambda: len(dispatcher.results) == 1)
    result = dispatcher.results[0]
    assert result.worker_id == "w2"
    assert result.attempt == 2
    assert result.state == "complete"
    assert dispatcher.queued_trials() == 0  # acked: nothing left to deliver again
    # the second trainer went on from the last epoch kept: every epoch told was kept first,
    # and at most one more was kept but not yet told when the first one died
    assert told <= result.resumed_at <= told + 1
    assert result.epochs_run == len(result.history) == 5
    epochs = sorted({p.epoch for p in dispatcher.progress})
    assert epochs == [1, 2, 3, 4, 5]  # no gap in what the dispatcher was told
    # the second trainer told the checkpoint's epoch again, marked as such
    replays = [(p.attempt, p.epoch) for p in dispatcher.progress if p.replay]
    assert replays == [(2, result.resumed_at)]
    assert f"trial 4 resumed at epoch {result.resumed_at}" in trainers[-1].log()


def test_a_lost_broker_connection_costs_at_most_the_epoch_in_progress(
    dispatcher: Dispatcher, trainers: list[TrainerProcess], search: str, tmp_path: Path
) -> None:
    # Nobody answers progress: each epoch waits its 2 s timeout, so the trial is mid-way
    # when its connection drops, however fast the machine trains.
    dispatcher.decide = lambda p: None
    # a name no other test's trainer has: the broker closes every connection of that name
    name = f"cut-{search.rsplit('.', 1)[-1]}"
    trainer = start(trainers, search, tmp_path, name, "--checkpoint-dir", str(tmp_path / "ck"))
    dispatcher.send(digits_trial(search, 12, epochs=5, progress_timeout_seconds=2.0))
    dispatcher.wait_for(lambda: len(dispatcher.progress) >= 2)
    close_connection(f"trainer {name}")  # what a broker restart does to every trainer
    dispatcher.wait_for(lambda: len(dispatcher.results) == 1)
    result = dispatcher.results[0]
    log = trainer.log()
    # It stopped rather than train on beside the trial's next holder (which is itself once
    # it is back), and went on from the last epoch kept.
    assert "trial 12 stopped: the broker gives it out again" in log, log
    assert result.state == "complete", result.error
    assert result.attempt == 2
    told_first = [p.epoch for p in dispatcher.progress if p.attempt == 1]
    assert result.resumed_at >= max(told_first)
    # none missing, none trained twice: only the epoch in progress was lost
    assert sorted({p.epoch for p in dispatcher.progress}) == [1, 2, 3, 4, 5]
    trained = [p.epoch for p in dispatcher.progress if not p.replay]
    assert len(trained) == len(set(trained)), trained
    assert dispatcher.queued_trials() == 0


def test_malformed_and_wrong_version_go_to_dead_letters(
    dispatcher: Dispatcher, trainers: list[TrainerProcess], search: str, tmp_path: Path
) -> None:
    trainer = start(trainers, search, tmp_path, "w1")
    dispatcher.send_raw(b"{not json")
    future = json.loads(digits_trial(search, 5).model_dump_json()) | {"version": 99}
    dispatcher.send_raw(json.dumps(future).encode())
    dispatcher.send(digits_trial("another.search", 7, epochs=1))
    dispatcher.send(digits_trial(search, 6, epochs=1))
    dispatcher.wait_for(lambda: len(dispatcher.results) == 1)  # the worker stayed up
    assert dispatcher.results[0].trial_id == 6
    dead = dispatcher.dead_letters()
    assert next(body for body, _ in dead) == b"{not json"
    # Rejected by the trainer and dead-lettered by the broker (the trainer's login may not
    # publish there): the reasons are in the trainer's log.
    assert [reason for _, reason in dead] == ["rejected"] * 3
    log = trainer.log()
    assert "refusing a message (dead-lettered by the broker): not JSON" in log
    assert "unsupported schema version 99" in log
    assert f"a trial of search 'another.search' in the queue of {search!r}" in log


def test_sigterm_mid_trial_requeues_and_exits_0(
    dispatcher: Dispatcher, trainers: list[TrainerProcess], search: str, tmp_path: Path
) -> None:
    trainer = start(trainers, search, tmp_path, "w1", "--grace-period", "10")
    dispatcher.send(digits_trial(search, 8, epochs=20))
    dispatcher.wait_for(lambda: len(dispatcher.progress) >= 1)
    trainer.process.send_signal(signal.SIGTERM)
    assert trainer.process.wait(timeout=30) == 0
    assert dispatcher.results == []
    assert dispatcher.queued_trials() == 1
    # The stopping worker cancelled its consumer before it gave the trial back: the next
    # worker gets it as the second delivery, not after a burst of nacked redeliveries.
    start(trainers, search, tmp_path, "w2")
    dispatcher.wait_for(lambda: len(dispatcher.results) == 1)
    assert dispatcher.results[0].attempt == 2
    assert "requeued trial 8 on shutdown" in trainer.log()


def test_failed_trial_is_reported_not_retried(
    dispatcher: Dispatcher, trainers: list[TrainerProcess], search: str, tmp_path: Path
) -> None:
    start(trainers, search, tmp_path, "w1")
    trial = digits_trial(search, 9, epochs=1)
    too_deep = trial.architecture.model_copy(
        update={"conv_blocks": trial.architecture.conv_blocks * 4}
    )  # 4 poolings on 8x8 images
    dispatcher.send(trial.model_copy(update={"architecture": too_deep}))
    dispatcher.send(digits_trial(search, 10, epochs=1))
    dispatcher.wait_for(lambda: len(dispatcher.results) == 2)
    failed, ok = sorted(dispatcher.results, key=lambda r: r.trial_id)
    assert failed.state == "failed"
    assert failed.error is not None
    assert failed.error.startswith("bad architecture")
    assert ok.state == "complete"
    assert dispatcher.queued_trials() == 0


@pytest.fixture
def short_consumer_timeout() -> Iterator[None]:
    """RabbitMQ closes channels holding a delivery unacked for 3 s (checked every 0.5 s).

    Applies to channels opened afterwards; the broker's settings are restored after.
    """

    def set_env(key: str, value: str) -> None:
        subprocess.run(
            ["rabbitmqctl", "eval", f"application:set_env(rabbit, {key}, {value})."],
            check=True,
            capture_output=True,
        )

    set_env("consumer_timeout", "3000")
    set_env("channel_tick_interval", "500")
    yield
    set_env("consumer_timeout", "1800000")
    set_env("channel_tick_interval", "60000")


@pytest.mark.alone("sets RabbitMQ's consumer timeout to 3 s for every channel opened meanwhile")
@pytest.mark.usefixtures("short_consumer_timeout")
def test_consumer_timeout_mid_trial_reports_once_and_reconnects(
    dispatcher: Dispatcher, trainers: list[TrainerProcess], search: str, tmp_path: Path
) -> None:
    dispatcher.decide = lambda p: None  # each epoch waits 2 s: the trial outlives 3 s
    trainer = start(trainers, search, tmp_path, "w1")
    dispatcher.send(digits_trial(search, 11, epochs=3, progress_timeout_seconds=2.0))
    dispatcher.wait_for(lambda: len(dispatcher.results) == 1)
    dispatcher.wait_for(lambda: "redelivered after its result was sent" in trainer.log())
    log = trainer.log()
    assert "reconnecting" in log
    assert dispatcher.results[0].state == "complete"
    assert dispatcher.queued_trials() == 0
    assert len(dispatcher.results) == 1


def test_a_worker_whose_memory_grows_restarts_in_place_and_loses_nothing(
    dispatcher: Dispatcher, trainers: list[TrainerProcess], search: str, tmp_path: Path
) -> None:
    # 1 MB of growth: every model Keras builds keeps more than that, so the worker restarts
    # in place after each trial past the first; --max-trials counts across restarts.
    trainer = start(
        trainers, search, tmp_path, "w1", "--recycle-memory-mb", "1", "--max-trials", "4"
    )
    for trial_id in range(1, 5):
        dispatcher.send(digits_trial(search, trial_id, epochs=1))
    dispatcher.wait_for(lambda: len(dispatcher.results) == 4, timeout=180)
    assert trainer.process.wait(timeout=60) == 0  # the fourth trial ends it, not a fifth
    results = sorted(dispatcher.results, key=lambda r: r.trial_id)
    assert [r.state for r in results] == ["complete"] * 4
    assert [r.attempt for r in results] == [1, 1, 1, 1]  # no trial was redelivered
    assert {r.worker_id for r in results} == {"w1"}
    # a fresh process image loads the dataset again (from the disk cache), where a
    # long-lived worker loads it once
    restarts = trainer.log().count("restarting in place")
    assert restarts == 1  # after trial 2; after trial 4 it leaves (--max-trials) instead
    assert [r.dataset_load_seconds > 0 for r in results] == [True, False, True, False]
    assert dispatcher.queued_trials() == 0


def test_recycling_is_off_with_zero(
    dispatcher: Dispatcher, trainers: list[TrainerProcess], search: str, tmp_path: Path
) -> None:
    trainer = start(
        trainers, search, tmp_path, "w1", "--recycle-memory-mb", "0", "--max-trials", "2"
    )
    for trial_id in (1, 2):
        dispatcher.send(digits_trial(search, trial_id, epochs=1))
    dispatcher.wait_for(lambda: len(dispatcher.results) == 2, timeout=120)
    assert trainer.process.wait(timeout=60) == 0
    assert "restarting in place" not in trainer.log()
    assert sum(r.dataset_load_seconds > 0 for r in dispatcher.results) == 1
