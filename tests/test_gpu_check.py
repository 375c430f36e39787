"""bench/gpu_check.py's logic, here where no GPU is: what it runs, how it reads what the
measuring processes print, and that without a GPU it says so and exits 0."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_plan_starts_from_float32_eager_and_shares_one_two_and_four(
    gpu_check: ModuleType,
) -> None:
    single, shared = gpu_check.plan()
    assert [(c.mixed, c.xla) for c in single] == [
        (False, False),
        (False, True),
        (True, False),
        (True, True),
    ]
    assert [c.share for c in shared] == [1, 2, 4]
    assert single[0].label == "float32, XLA off"


def test_placement_lines_are_counted_by_device(gpu_check: ModuleType) -> None:
    log = "\n".join(
        [
            "Executing op Conv2D in device /job:localhost/replica:0/task:0/device:GPU:0",
            "Executing op MatMul in device /job:localhost/replica:0/task:0/device:GPU:0",
            "Executing op ReadVariableOp in device /job:localhost/replica:0/task:0/device:CPU:0",
            "an unrelated line",
        ]
    )
    assert gpu_check.device_counts(log) == {"GPU:0": 2, "CPU:0": 1}
    assert gpu_check.device_counts("") == {}


def test_the_tables_give_ratios_to_the_first_row(gpu_check: ModuleType) -> None:
    single, shared = gpu_check.plan()
    rows = gpu_check.ratios_table(
        [
            (single[0], {"images_per_second": 1000.0, "value": 0.98}),
            (single[3], {"images_per_second": 2500.0, "value": 0.97}),
        ]
    )
    assert rows[1].split()[-2:] == ["1.00", "0.9800"]
    assert "2500" in rows[2]
    assert rows[2].split()[-2:] == ["2.50", "0.9700"]
    one: dict[str, Any] = {"images_per_second": 1000.0, "peak_mb": 900.0}
    each: dict[str, Any] = {"images_per_second": 700.0, "peak_mb": 850.0}
    lines = gpu_check.sharing_table([(shared[0], [one]), (shared[1], [each, each])])
    assert lines[2].split()[:3] == ["2", "1400", "1.40"]
    assert lines[2].endswith("850, 850")


def test_a_measuring_process_is_read_by_its_result_line(gpu_check: ModuleType) -> None:
    printed = subprocess.Popen(
        [sys.executable, "-c", "print('noise'); print('RESULT {\"images_per_second\": 5.0}')"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert gpu_check.result_of(printed)[0] == {"images_per_second": 5.0}
    silent = subprocess.Popen(
        [sys.executable, "-c", "import sys; print('boom', file=sys.stderr)"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with pytest.raises(RuntimeError, match="boom"):
        gpu_check.result_of(silent)


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={"PATH": str(tmp_path)},  # no nvidia-smi on it: as on a machine without a GPU
    )
    assert done.returncode == 0, done.stderr
    assert "gpu check: no NVIDIA GPU here" in done.stdout
