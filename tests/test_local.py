"""Local trainer processes: a trainer killed mid-trial is replaced and the trial retried."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from mloptimizer.local import LocalTransport, default_threads
from mloptimizer.messages import ProgressMessage, ResultMessage, TrialMessage
from mloptimizer.space import Architecture
from mloptimizer.spec import Dataset


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
    transport = LocalTransport(1, cache_dir=tmp_path, threads=default_threads(1))
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
