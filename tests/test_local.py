"""Local trainer processes: a trainer killed mid-trial is replaced and the trial retried,
from its last epoch when the run keeps checkpoints."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from dispatch import make_spec

from mloptimizer.app.runner import local_trainer
from mloptimizer.dispatch import Dispatcher
from mloptimizer.local import LocalTransport, default_threads
from mloptimizer.messages import DELIVERY_LIMIT, ProgressMessage, ResultMessage, TrialMessage
from mloptimizer.space import Architecture
from mloptimizer.spec import Dataset
from mloptimizer.study import open_study, records


def digits_trial(epochs: int) -> TrialMessage:
    architecture = Architecture.model_validate(
        {
            "family": "cnn",
            "conv_blocks": [{"filters": 32, "kernel_size": 3}],
            "classifier": "mlp",
            "dense_units": 64,
            "dropout": 0.1,
            "learning_rate": 0.003,
        }
    )
    return TrialMessage(
        search="ns.local",
        trial_id=7,
        number=7,
        architecture=architecture,
        dataset=Dataset(builtin="digits"),
        epochs=epochs,
        batch_size=32,
        mixed_precision="off",
        seed=7,
        progress_timeout_seconds=0.5,
    )


def test_a_killed_local_trainer_is_replaced_and_its_trial_retried(tmp_path: Path) -> None:
    transport = LocalTransport(
        1, serve=local_trainer, cache_dir=tmp_path, threads=default_threads(1)
    )
    try:
        transport.send(digits_trial(epochs=4))
        killed = False
        results: list[ResultMessage] = []
        deadline = time.monotonic() + 240
        while not results:
            assert time.monotonic() < deadline, "no result"
            for inbound in transport.receive(timeout=0.5):
                message = inbound.message
                if isinstance(message, ProgressMessage) and not killed:
                    assert message.attempt == 1
                    pid = transport._trainers[0].process.pid
                    assert pid is not None
                    os.kill(pid, signal.SIGKILL)
                    killed = True
                elif isinstance(message, ProgressMessage):
                    inbound.reply("continue")
                elif isinstance(message, ResultMessage):
                    results.append(message)
        assert killed
        assert len(results) == 1
        assert results[0].attempt == 2
        assert results[0].state == "complete"
        assert results[0].worker_id == "local-1"
    finally:
        transport.close()
    assert all(not t.process.is_alive() for t in transport._trainers)


def test_a_killed_local_trainers_trial_goes_on_from_its_last_epoch(tmp_path: Path) -> None:
    """With the run folder's checkpoints (as `mloptimizer run` sets them), the retry of a
    trial whose process was killed after its first epoch trains only the epochs left."""
    transport = LocalTransport(
        1, serve=local_trainer, cache_dir=tmp_path, threads=default_threads(1),
        checkpoints_dir=tmp_path / "checkpoints",
    )  # fmt: skip
    try:
        transport.send(digits_trial(epochs=4))
        epochs: dict[int, list[int]] = {1: [], 2: []}  # by attempt
        replays: list[tuple[int, int, bool]] = []
        results: list[ResultMessage] = []
        deadline = time.monotonic() + 240
        while not results:
            assert time.monotonic() < deadline, "no result"
            for inbound in transport.receive(timeout=0.5):
                message = inbound.message
                if isinstance(message, ProgressMessage):
                    epochs[message.attempt].append(message.epoch)
                    replays.append((message.attempt, message.epoch, message.replay))
                    if message.attempt == 1:  # killed as it tells its first epoch
                        pid = transport._trainers[0].process.pid
                        assert pid is not None
                        os.kill(pid, signal.SIGKILL)
                    else:
                        inbound.reply("continue")
                elif isinstance(message, ResultMessage):
                    results.append(message)
        (result,) = results
        assert result.attempt == 2
        assert result.state == "complete"
        assert result.resumed_at == 1  # epoch 1 was kept before it was told
        assert result.epochs_run == 4
        assert len(result.history) == 4
        assert epochs == {1: [1], 2: [1, 2, 3, 4]}  # epoch 1 told again, none skipped
        # the repeat says it is one (trained by attempt 1: not a dollar of attempt 2's)
        assert [r for r in replays if r[2]] == [(2, 1, True)]
        assert not (tmp_path / "checkpoints" / "trial-7").exists()  # ended: discarded
    finally:
        transport.close()


def test_a_local_trainer_restarts_to_shed_memory_without_losing_or_retrying(
    tmp_path: Path,
) -> None:
    # 1 MB: every model Keras builds keeps more, so the process restarts after trial 2
    transport = LocalTransport(
        1,
        serve=local_trainer,
        cache_dir=tmp_path,
        threads=default_threads(1),
        recycle_memory_mb=1,
    )
    try:
        first_pid = transport._trainers[0].process.pid
        for number in (1, 2, 3):
            transport.send(
                digits_trial(epochs=1).model_copy(update={"trial_id": number, "number": number})
            )
        results: list[ResultMessage] = []
        deadline = time.monotonic() + 240
        while len(results) < 3:
            assert time.monotonic() < deadline, f"{len(results)} results"
            for inbound in transport.receive(timeout=0.5):
                if isinstance(inbound.message, ProgressMessage):
                    inbound.reply("continue")
                elif isinstance(inbound.message, ResultMessage):
                    results.append(inbound.message)
        assert [r.trial_id for r in results] == [1, 2, 3]
        assert [r.attempt for r in results] == [1, 1, 1]  # no trial given to a leaving one
        assert [r.state for r in results] == ["complete"] * 3
        # trial 1 loads the dataset, trial 2 reuses it, trial 3 runs in a fresh process
        assert [r.dataset_load_seconds > 0 for r in results] == [True, False, True]
        assert transport._trainers[0].process.pid != first_pid
    finally:
        transport.close()


def dying_trainer(worker_id: str, tasks: Any, *rest: Any) -> None:
    """A local trainer that dies with every trial it takes, as one out of memory would."""
    if tasks.get() is not None:
        os._exit(3)


def test_a_trial_that_kills_every_local_trainer_fails_with_the_reason(tmp_path: Path) -> None:
    """Local trainers do as the broker does: after DELIVERY_LIMIT + 1 deaths the trial is
    given up, the dispatcher fails it with why, and it counts toward maxFailedTrials."""
    spec = make_spec(budget={"maxTrials": 1, "parallelism": 1, "maxFailedTrials": 5})
    study = open_study(spec, "ns.local", f"sqlite:///{tmp_path / 'study.db'}")
    transport = LocalTransport(1, serve=dying_trainer, cache_dir=tmp_path)
    try:
        dispatcher = Dispatcher(study, spec, transport, search="ns.local")
        outcome = dispatcher.run()
    finally:
        transport.close()
    assert outcome.reason == "maxTrials"
    (dead,) = records(study)
    assert dead.state == "failed"
    assert (dead.error or "").startswith(
        f"dead-lettered: no trainer finished it in {DELIVERY_LIMIT + 1} deliveries "
        "(the last exited with code 3"
    )
    assert dispatcher.counts.failed == 1  # it never got past epoch 0: a poison, not preempted
