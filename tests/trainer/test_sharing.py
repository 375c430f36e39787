"""Several trainers on one GPU (trainer/sharing.py): the decisions, tested without a GPU,
and the watched processes, as real processes."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mloptimizer.trainer.sharing import (
    CONTEXT_MB,
    LIMIT_ENV,
    SHARE_ENV,
    TrainerProcesses,
    auto_share,
    child_env,
    gpu_memory_mb,
    memory_limit_mb,
    resolve_share,
)


def test_a_shared_gpu_gives_each_trainer_an_equal_hard_limit() -> None:
    assert memory_limit_mb(16_000, 1) is None  # alone: memory grows as needed
    assert memory_limit_mb(16_000, 4) == (16_000 - 4 * CONTEXT_MB) // 4
    assert memory_limit_mb(2_000, 8) == 256  # never below a floor a small model needs


def test_auto_fits_as_many_trainers_as_the_largest_model_leaves_room_for() -> None:
    assert auto_share(24_000, need_mb=5_000) == 24_000 // (5_000 + CONTEXT_MB)  # 4
    assert auto_share(80_000, need_mb=200) == 8  # at most 8
    assert auto_share(8_000, need_mb=20_000) == 1  # at least 1


@pytest.mark.parametrize(
    ("setting", "gpus", "need", "share"),
    [
        ("3", [16_000], None, 3),
        ("3", [], None, 1),  # no GPU: one trainer
        ("auto", [24_000, 16_000], 5_000.0, auto_share(16_000, 5_000)),  # the smallest GPU
        ("auto", [], 5_000.0, 1),
    ],
)
def test_the_setting_resolves_on_the_gpus_found(
    setting: str, gpus: list[int], need: float | None, share: int
) -> None:
    assert resolve_share(setting, gpus, need) == share


@pytest.mark.parametrize("setting", ["9", "0", "two", "-1"])
def test_a_bad_setting_is_refused_naming_the_range(setting: str) -> None:
    with pytest.raises(ValueError, match="1 to 8 or auto"):
        resolve_share(setting, [16_000], None)
    with pytest.raises(ValueError, match="--trainer-memory-mb"):
        resolve_share("auto", [16_000], None)


def test_gpu_memory_is_read_from_nvidia_smi_and_its_absence_is_no_gpu() -> None:
    def answering(stdout: str, code: int = 0) -> Any:
        return lambda command, **kw: subprocess.CompletedProcess(command, code, stdout, "")

    assert gpu_memory_mb(answering("16384\n 8192 \n")) == [16384, 8192]
    assert gpu_memory_mb(answering("", code=9)) == []

    def missing(command: list[str], **kw: Any) -> Any:
        raise FileNotFoundError(command[0])

    assert gpu_memory_mb(missing) == []


def test_each_process_gets_its_gpu_limit_share_name_and_threads() -> None:
    pod = "pod@vast-0123456789"
    envs = [child_env({"PATH": "/bin"}, i, 2, [16_000, 8_000], pod, 8) for i in range(4)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "0", "1"]
    assert [e["MLOPT_WORKER_ID"] for e in envs] == [f"{pod}/{i}" for i in range(4)]
    assert {e[SHARE_ENV] for e in envs} == {"4"}  # four processes split the pod's price
    assert [e[LIMIT_ENV] for e in envs[:2]] == [
        str(memory_limit_mb(16_000, 2)),
        str(memory_limit_mb(8_000, 2)),
    ]
    assert {e["MLOPT_INTRA_OP_THREADS"] for e in envs} == {"2"}
    assert {e["MLOPT_TRAINERS_PER_GPU"] for e in envs} == {"1"}  # none starts its own
    assert all(e["PATH"] == "/bin" for e in envs)


def script(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_crashed_trainer_process_is_started_again_and_the_others_are_left(
    tmp_path: Path,
) -> None:
    # each process exits 3 the first time (no mark yet), 0 once its mark exists
    crash_once = script(
        "import os, pathlib, sys; mark = pathlib.Path(os.environ['MARK']); "
        "sys.exit(0 if mark.exists() else (mark.touch() or 3))"
    )
    (tmp_path / "b").touch()  # the second one is fine from the start
    group = TrainerProcesses(
        crash_once, [{"MARK": str(tmp_path / "a")}, {"MARK": str(tmp_path / "b")}]
    )
    assert group.wait() == 0
    assert group.started == 3  # two, and the first once more


def test_stop_hands_every_process_sigterm_and_none_is_started_again() -> None:
    waits_for_sigterm = script(
        "import signal, sys, time; "
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
        "print('ready', flush=True); time.sleep(120); sys.exit(4)"
    )
    popen: Any = functools.partial(subprocess.Popen, stdout=subprocess.PIPE)
    group = TrainerProcesses(waits_for_sigterm, [{}, {}], popen=popen)
    for process in group.processes:
        assert process.stdout is not None
        assert process.stdout.readline() == b"ready\n"  # its handler is in place
    group.stop()
    assert group.wait() == 0
    assert group.started == 2
    for process in group.processes:
        assert process.stdout is not None
        process.stdout.close()
