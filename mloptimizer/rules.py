"""Cross-field rules written once, checked twice: as CEL in the CRD and in Python by the model.

Each :class:`Rule` pairs a CEL expression (what the Kubernetes API server evaluates,
``self`` bound to the object the rule sits on) with a Python predicate over the
model instance (what ``mloptimizer validate`` and ``mloptimizer run`` evaluate).
The CRD generator copies the CEL into ``x-kubernetes-validations``; the model's
validator runs the predicates. A test evaluates both on a corpus of specs with
``cel-python`` and checks they agree, so the two halves cannot drift silently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

__all__ = ["Rule", "SpecModel"]


@dataclass(frozen=True)
class Rule:
    """One cross-field check.

    Attributes:
        cel: The CEL expression, ``self`` being the object that owns the rule.
        check: The same check in Python, over the model instance.
        message: What is wrong and how to fix it, shown by both sides.
        field: camelCase name of the field the error points at (``fieldPath``).
    """

    cel: str
    check: Callable[[Any], bool]
    message: str
    field: str | None = None


class SpecModel(BaseModel):
    """Base of every spec object: camelCase keys, strict types, unknown keys refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        strict=True,
        extra="forbid",
        frozen=True,
    )

    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> SpecModel:
        for rule in type(self).rules:
            if not rule.check(self):
                raise PydanticCustomError("rule", rule.message, {"field": rule.field or ""})
        return self
