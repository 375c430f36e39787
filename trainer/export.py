"""The best model in the formats devices load, each measured by running the artifact itself.

A converted model is a different program: int8 quantization can cost accuracy, and an op
LiteRT lacks fails the conversion. So every artifact is scored on the test split by the
runtime that would run it on the device (LiteRT's interpreter for ``.tflite`` files), and
timed there: median latency of one image at a time, on the machine that exported it. A
format that cannot be made is reported with its reason; the others are still written.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from mloptimizer.formats import EXPORT_FORMATS, FORMATS, Converter, Format, Runtime
from mloptimizer.logs import native_quiet
from mloptimizer.trainer.data import Splits
from mloptimizer.trainer.litert import litert
from mloptimizer.trainer.metrics import portable

__all__ = ["CONVERTERS", "RUNTIMES", "Artifact", "export_model"]

_LATENCY_RUNS = 50


@dataclass
class Artifact:
    """One exported file (or folder), what it weighs and how well and fast it runs."""

    format: str
    path: str | None
    bytes: int = 0
    accuracy: float | None = None
    latency_ms: float | None = None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _scaled(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 255.0


def _interpreter(path: Path) -> Any:
    """LiteRT's interpreter (``ai-edge-litert``), TensorFlow's bundled one without it."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - the run extra installs ai-edge-litert
        Interpreter = tf.lite.Interpreter
    with native_quiet():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
        interpreter = Interpreter(model_path=str(path))
        interpreter.allocate_tensors()
    return interpreter


def _litert_predict(path: Path) -> Callable[[np.ndarray], int]:
    """One image (uint8 HWC) -> its predicted class, through the .tflite file itself."""
    interpreter = _interpreter(path)
    (given,) = interpreter.get_input_details()
    (taken,) = interpreter.get_output_details()
    scale, zero = given["quantization"]

    def predict(image: np.ndarray) -> int:
        x = _scaled(image[np.newaxis])
        if given["dtype"] == np.int8:
            x = np.clip(np.round(x / scale + zero), -128, 127).astype(np.int8)
        interpreter.set_tensor(given["index"], x)
        interpreter.invoke()
        # argmax is the same before and after an output's (positive-scale) dequantization
        return int(np.argmax(interpreter.get_tensor(taken["index"])[0]))

    return predict


def _measure(
    predict: Callable[[np.ndarray], int], x: np.ndarray, y: np.ndarray
) -> tuple[float, float]:
    """(accuracy on every image, median ms of one image over the first few)."""
    correct = sum(predict(image) == label for image, label in zip(x, y, strict=True))
    times = []
    for image in x[:_LATENCY_RUNS]:
        began = time.perf_counter()
        predict(image)
        times.append((time.perf_counter() - began) * 1000)
    return correct / max(1, len(y)), statistics.median(times) if times else 0.0


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _keras_predict(model: keras.Model) -> Callable[[np.ndarray], int]:
    def predict(image: np.ndarray) -> int:
        scores = model(_scaled(image[np.newaxis]), training=False)
        return int(np.argmax(np.asarray(scores)[0]))

    return predict


def _saved_predict(path: Path) -> Callable[[np.ndarray], int]:
    loaded = tf.saved_model.load(str(path))  # kept: its functions need it alive

    def predict(image: np.ndarray) -> int:
        scores = loaded.serve(tf.constant(_scaled(image[np.newaxis])))
        return int(np.argmax(np.asarray(scores)[0]))

    return predict


def _keras_save(model: keras.Model, path: Path, splits: Splits, row: Format) -> None:
    portable(model).save(path)


def _saved_model_export(model: keras.Model, path: Path, splits: Splits, row: Format) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        model.export(str(path), verbose=False)


def _litert_write(model: keras.Model, path: Path, splits: Splits, row: Format) -> None:
    assert row.quantization is not None, "a LiteRT format names its quantization"
    path.write_bytes(litert(model, row.quantization, splits.x_train))


# What writes each converter of mloptimizer/formats.py and what runs each runtime there:
# a format is a row of that table, and a converter or runtime is written once, here.
CONVERTERS: dict[Converter, Callable[[keras.Model, Path, Splits, Format], None]] = {
    "keras-save": _keras_save,
    "saved-model-export": _saved_model_export,
    "litert": _litert_write,
}
RUNTIMES: dict[Runtime, Callable[[keras.Model, Path], Callable[[np.ndarray], int]]] = {
    "keras": lambda model, path: _keras_predict(model),
    "tensorflow": lambda model, path: _saved_predict(path),
    "litert": lambda model, path: _litert_predict(path),
}


_ROWS: dict[str, Format] = {name: row for name, row in FORMATS.items()}


def _write(
    kind: str, model: keras.Model, splits: Splits, out: Path
) -> tuple[Path, Callable[[np.ndarray], int]]:
    """Write one format; returns its path and how to run it on one image."""
    row = _ROWS.get(kind)
    if row is None:
        raise ValueError(f"unknown format {kind!r}; known: {', '.join(FORMATS)}")
    path = out / row.written
    CONVERTERS[row.converter](model, path, splits, row)
    return path, RUNTIMES[row.runtime](model, path)


def export_model(
    model: keras.Model, splits: Splits, out: Path, formats: tuple[str, ...] = EXPORT_FORMATS
) -> list[Artifact]:
    """Write ``model`` in each of ``formats`` under ``out``; score and time each one.

    Scored on the test split (the validation split when the spec keeps no test images).
    """
    out.mkdir(parents=True, exist_ok=True)
    x, y = (splits.x_test, splits.y_test) if len(splits.y_test) else (splits.x_val, splits.y_val)
    artifacts = []
    for kind in formats:
        try:
            path, predict = _write(kind, model, splits, out)
            accuracy, latency = _measure(predict, x, y)
            artifacts.append(Artifact(kind, str(path), _size(path), accuracy, latency))
        except Exception as error:  # one format failing must not cost the others
            artifacts.append(Artifact(kind, None, error=f"{type(error).__name__}: {error}"))
    return artifacts
