"""Device decisions from GPU descriptions (no GPU needed), GPU detection through a faked
TensorFlow, the thread settings in a fresh process, and the dtype policy around sessions."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Literal

import pytest

from mloptimizer.trainer.device import (
    GpuInfo,
    apply_precision,
    choose_precision,
    detect_gpus,
    device_name,
    fresh_session,
    use_xla,
)

AMPERE = GpuInfo("NVIDIA GeForce RTX 3090", (8, 6))
TURING = GpuInfo("Tesla T4", (7, 5))
PASCAL = GpuInfo("Tesla P100", (6, 0))
GTX_1080 = GpuInfo("NVIDIA GeForce GTX 1080", (6, 1))
UNKNOWN = GpuInfo("/physical_device:GPU:0", None)


@pytest.mark.parametrize(
    ("setting", "gpus", "expected"),
    [
        ("auto", [], "float32"),
        ("auto", [AMPERE], "mixed_float16"),
        ("auto", [TURING, AMPERE], "mixed_float16"),
        ("auto", [GTX_1080], "float32"),
        ("auto", [TURING, PASCAL], "float32"),
        ("auto", [UNKNOWN], "float32"),
        ("on", [], "mixed_float16"),
        ("on", [GTX_1080], "mixed_float16"),
        ("off", [AMPERE], "float32"),
        ("off", [], "float32"),
    ],
)
def test_choose_precision(
    setting: Literal["auto", "on", "off"], gpus: list[GpuInfo], expected: str
) -> None:
    assert choose_precision(setting, gpus) == expected


@pytest.mark.parametrize(
    ("gpus", "expected"),
    [
        ([], "CPU"),
        ([AMPERE], "GPU: NVIDIA GeForce RTX 3090"),
        ([AMPERE, AMPERE, AMPERE], "GPU: NVIDIA GeForce RTX 3090 x3"),
    ],
)
def test_device_name(gpus: list[GpuInfo], expected: str) -> None:
    assert device_name(gpus) == expected


def test_xla_only_on_gpus() -> None:
    assert use_xla([]) is False
    assert use_xla([PASCAL]) is True


def test_detect_gpus_reads_names_and_capabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    devices = ["/physical_device:GPU:0", "/physical_device:GPU:1"]
    details: dict[str, dict[str, Any]] = {
        devices[0]: {"device_name": "NVIDIA A100-SXM4-40GB", "compute_capability": (8, 0)},
        devices[1]: {},  # TensorFlow may know nothing about a device
    }

    class Device:
        def __init__(self, name: str) -> None:
            self.name = name

    def list_physical_devices(kind: str) -> list[Device]:
        assert kind == "GPU"
        return [Device(name) for name in devices]

    monkeypatch.setattr("tensorflow.config.list_physical_devices", list_physical_devices)
    monkeypatch.setattr(
        "tensorflow.config.experimental.get_device_details", lambda d: details[d.name]
    )
    assert detect_gpus() == [
        GpuInfo("NVIDIA A100-SXM4-40GB", (8, 0)),
        GpuInfo("/physical_device:GPU:1", None),
    ]


def test_threads_are_set_before_the_first_op_and_refused_after(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        from mloptimizer.trainer.device import configure_threads
        import tensorflow as tf

        configure_threads(1, 2)
        tf.constant(1.0) + 1.0
        print(tf.config.threading.get_intra_op_parallelism_threads(),
              tf.config.threading.get_inter_op_parallelism_threads())
        configure_threads(None, None)  # nothing asked: nothing refused
        try:
            configure_threads(2, None)
        except RuntimeError as error:
            print(error)
        """
    )
    # Run from tmp_path: the repository's folders would shadow the installed package.
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    counts, refusal = done.stdout.splitlines()
    assert counts == "1 2"
    assert refusal.startswith("configure_threads must run before the first TensorFlow op")


def test_fresh_session_sets_the_policy_that_clear_session_resets() -> None:
    # Keras ships no type information; reached through importlib it is typed Any for mypy.
    keras = importlib.import_module("keras")
    try:
        apply_precision("mixed_float16")
        assert keras.mixed_precision.global_policy().name == "mixed_float16"
        keras.backend.clear_session()
        assert keras.mixed_precision.global_policy().name == "float32"

        fresh_session("mixed_float16")
        assert keras.mixed_precision.global_policy().name == "mixed_float16"
        keras.backend.clear_session()
        fresh_session("float32")
        assert keras.mixed_precision.global_policy().name == "float32"
    finally:
        fresh_session("float32")
