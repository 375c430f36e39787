"""What every section of the spec shares: the API's identity, the release, the field types.

Durations, quantities and names carry the CRD's patterns and bounds;
:func:`parse_duration` reads a duration as the pattern allows it.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field

from mloptimizer.rules import SpecModel

__all__ = [
    "API_VERSION",
    "DURATION_PATTERN",
    "GROUP",
    "KIND",
    "PLURAL",
    "QUANTITY_PATTERN",
    "RELEASE",
    "VERSION",
    "Duration",
    "Name",
    "Quantity",
    "SecretKeyRef",
    "parse_duration",
]

GROUP = "mloptimizer.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ArchitectureSearch"
PLURAL = "architecturesearches"  # the resource's name in API paths

RELEASE = "0.1.0"  # the project's version (pyproject.toml), and the tag of its images

DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(s|m|h|d))+$"
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$"
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(s|m|h|d)")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

Duration = Annotated[
    str,
    Field(pattern=DURATION_PATTERN, max_length=32),
]
Quantity = Annotated[str, Field(pattern=QUANTITY_PATTERN, max_length=32)]
Name = Annotated[str, Field(min_length=1, max_length=253)]


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``90s``, ``1h30m`` or ``2d`` (the CRD's pattern)."""
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(f"{text!r} is not a duration like 30m, 1h30m or 2d")
    return sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(text))


class SecretKeyRef(SpecModel):
    """A key in a Secret in the search's namespace."""

    name: Name = Field(
        description="Name of the Secret, in the search's namespace. The operator uses it only "
        "when an admin opened it to searches for that use, with the label "
        "mloptimizer.io/usable-by-searches: true for what the operator alone reads "
        "(storage, S3 keys, Vast.ai key, join token), trainers for what reaches trainer "
        "pods (broker.secretRef); otherwise the search fails (SecretNotUsable)."
    )
    key: Annotated[str, Field(min_length=1, max_length=253)] = Field(
        description="Key inside the Secret whose value is used."
    )
