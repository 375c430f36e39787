"""The export formats, declared once: the file each is, what makes it, what runs it.

Every place that knows formats reads this table: the spec (``output.formats`` and its CRD
description), the final job's messages (the file each format is delivered as), the trainer's
export (which converter writes it, which runtime scores it) and the CLI's help. A new format
is a row here, a converter or runtime the trainer lacks in ``trainer/export.py`` (a test
checks each row has both), and a regenerated CRD (``mloptimizer crd``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, get_args

__all__ = [
    "DEFAULT_FORMATS",
    "EXPORT_FORMATS",
    "FORMATS",
    "REPORT_FILES",
    "Converter",
    "ExportFormat",
    "Format",
    "Runtime",
    "delivered_files",
    "formats_help",
]

ExportFormat = Literal["keras", "savedmodel", "tflite-float32", "tflite-float16", "tflite-int8"]
Converter = Literal["keras-save", "saved-model-export", "litert"]
Runtime = Literal["keras", "tensorflow", "litert"]


@dataclass(frozen=True)
class Format:
    """One export format.

    ``written`` is what the trainer's export writes (a file, or a folder for a SavedModel);
    ``file`` is what a destination receives (a folder travels as one ``.tar.gz``).
    ``quantization`` is the LiteRT kind for ``litert`` conversions, else None.
    """

    written: str
    file: str
    converter: Converter
    runtime: Runtime
    about: str
    quantization: Literal["float32", "float16", "int8"] | None = None


FORMATS: Final[dict[ExportFormat, Format]] = {
    "keras": Format("model.keras", "model.keras", "keras-save", "keras", "Keras's own file"),
    "savedmodel": Format(
        "savedmodel", "savedmodel.tar.gz", "saved-model-export", "tensorflow", "a TF SavedModel"
    ),
    "tflite-float32": Format(
        "model-float32.tflite",
        "model-float32.tflite",
        "litert",
        "litert",
        "LiteRT, float32 weights",
        "float32",
    ),
    "tflite-float16": Format(
        "model-float16.tflite",
        "model-float16.tflite",
        "litert",
        "litert",
        "LiteRT, float16 weights",
        "float16",
    ),
    "tflite-int8": Format(
        "model-int8.tflite",
        "model-int8.tflite",
        "litert",
        "litert",
        "LiteRT, full-integer int8, calibrated on training images",
        "int8",
    ),
}
EXPORT_FORMATS: Final[tuple[ExportFormat, ...]] = get_args(ExportFormat)
DEFAULT_FORMATS: Final[tuple[ExportFormat, ...]] = ("keras", "tflite-int8")

# The files that describe a delivery, beside the models: a destination holds exactly these
# and one file per format asked.
# The report delivered with the model: the page, its data and its pictures
# (mloptimizer.reporting writes each one, a note in place of a picture that does not apply).
REPORT_FILES: Final = (
    "report.md",
    "artifacts.json",
    "summary.json",
    "confusion.png",
    "history.png",
    "importances.png",
    "space.png",
    "front.png",
)


def delivered_files() -> frozenset[str]:
    """Every file name a destination may hold."""
    return frozenset(f.file for f in FORMATS.values()) | frozenset(REPORT_FILES)


def formats_help() -> str:
    """The formats as one sentence, for a CRD description or ``--help``."""
    return "; ".join(f"{name} ({row.about})" for name, row in FORMATS.items())
