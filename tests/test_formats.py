"""The export-format table is the one place formats are declared: the spec, the delivery
messages, the trainer's export and the CLI's help all read it."""

from __future__ import annotations

from typing import get_args

import pytest
from pydantic import ValidationError

from mloptimizer import messages
from mloptimizer.app.cli import build_parser
from mloptimizer.formats import (
    DEFAULT_FORMATS,
    EXPORT_FORMATS,
    FORMATS,
    REPORT_FILES,
    ExportFormat,
    delivered_files,
    formats_help,
)
from mloptimizer.spec import ArchitectureSearchSpec, Output
from mloptimizer.trainer.export import CONVERTERS, RUNTIMES


def test_the_literal_and_the_table_name_the_same_formats() -> None:
    assert get_args(ExportFormat) == tuple(FORMATS) == EXPORT_FORMATS
    assert set(DEFAULT_FORMATS) <= set(FORMATS)


def test_every_row_has_a_converter_and_a_runtime_in_the_trainer() -> None:
    for name, row in FORMATS.items():
        assert row.converter in CONVERTERS, name
        assert row.runtime in RUNTIMES, name
        assert (row.quantization is not None) == (row.converter == "litert"), name


def test_delivered_files_come_from_the_table() -> None:
    assert {name: row.file for name, row in FORMATS.items()} == messages.ARTIFACT_FILES
    assert len(delivered_files()) == len(FORMATS) + len(REPORT_FILES)  # no two share a file


def test_a_delivery_naming_a_file_outside_the_table_is_refused() -> None:
    url = "https://store.example/put?sig=1"
    to = messages.ToUrls(urls={"model-int8.tflite": url, "report.md": url})
    assert set(to.urls) == {"model-int8.tflite", "report.md"}
    with pytest.raises(ValidationError, match="not a file a delivery holds"):
        messages.ToUrls(urls={"../../etc/passwd": url})


def test_the_spec_the_crd_and_the_cli_help_list_every_format(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert ArchitectureSearchSpec.model_validate(
        {"dataset": {"builtin": "digits"}}
    ).output.formats == list(DEFAULT_FORMATS)
    description = Output.model_fields["formats"].description or ""
    assert formats_help() in description
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "--help"])
    helps = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name in FORMATS:
        assert name in description, name
        assert name in helps, name
    with pytest.raises(ValidationError, match="onnx"):
        Output.model_validate({"formats": ["onnx"]})
