"""Generate the ArchitectureSearch CRD from the spec and status models.

``crds/architecturesearch.yaml`` is this module's output, committed; a test fails
when the two differ (regenerate with ``mloptimizer crd > crds/architecturesearch.yaml``).
The output is a structural OpenAPI v3 schema: every field typed and described,
defaults and bounds from the models' fields, CEL rules from their ``rules``.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from mloptimizer.rules import SpecModel
from mloptimizer.spec import API_VERSION, GROUP, KIND, PLURAL, VERSION, ArchitectureSearchSpec
from mloptimizer.status import ArchitectureSearchStatus

__all__ = ["SHORT_NAME", "build_crd", "crd_yaml", "model_schema"]

SINGULAR = "architecturesearch"
SHORT_NAME = "archsearch"

_SCALARS: dict[type, str] = {bool: "boolean", int: "integer", float: "number", str: "string"}

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {
        "name": "Phase",
        "type": "string",
        "jsonPath": ".status.phase",
        "description": "Pending, Running, Refining, Succeeded or Failed.",
    },
    {
        "name": "Trials",
        "type": "string",
        "jsonPath": ".status.progress",
        "description": "Explored trials finished / maxTrials (+ refine trials finished / topK).",
    },
    {
        "name": "Best",
        "type": "number",
        "jsonPath": ".status.best.value",
        "description": "Best objective value so far.",
    },
    {
        "name": "Workers",
        "type": "integer",
        "jsonPath": ".status.workers.ready",
        "description": "Trainer replicas ready.",
    },
    {
        "name": "Cost",
        "type": "number",
        "jsonPath": ".status.cost.usd",
        "description": "US dollars spent so far.",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _constraints(schema: dict[str, Any], metadata: list[Any]) -> None:
    """Copy pydantic/annotated-types constraints onto an OpenAPI schema in place."""
    kind = schema.get("type")
    for item in metadata:
        if isinstance(item, FieldInfo):
            _constraints(schema, item.metadata)
            if isinstance(item.json_schema_extra, dict):
                schema.update(item.json_schema_extra)
        elif isinstance(item, at.Ge):
            schema["minimum"] = item.ge
        elif isinstance(item, at.Le):
            schema["maximum"] = item.le
        elif isinstance(item, at.Gt):
            schema["minimum"] = item.gt
            schema["exclusiveMinimum"] = True
        elif isinstance(item, at.Lt):
            schema["maximum"] = item.lt
            schema["exclusiveMaximum"] = True
        elif isinstance(item, (at.MinLen, at.MaxLen)):
            bound = "min" if isinstance(item, at.MinLen) else "max"
            value = item.min_length if isinstance(item, at.MinLen) else item.max_length
            noun = {"array": "Items", "object": "Properties"}.get(str(kind), "Length")
            schema[f"{bound}{noun}"] = value
        elif getattr(item, "pattern", None):
            schema["pattern"] = item.pattern


def _type_schema(annotation: Any, metadata: list[Any]) -> dict[str, Any]:
    """OpenAPI schema of one annotation (Optional unwrapped: absence is optional-ness)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        inner, *extra = get_args(annotation)
        return _type_schema(inner, [*extra, *metadata])
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        if len(options) == 1:
            return _type_schema(options[0], metadata)
        if {get_origin(a) or a for a in options} == {str, int}:
            schema: dict[str, Any] = {
                "x-kubernetes-int-or-string": True,
                "anyOf": [{"type": "integer"}, {"type": "string"}],
            }
            _constraints(schema, metadata)
            return schema
        raise TypeError(f"no structural schema for {annotation!r}")
    if origin is Literal:
        values = list(get_args(annotation))
        schema = {"type": _SCALARS[type(values[0])], "enum": values}
    elif origin is list:
        (item,) = get_args(annotation)
        schema = {"type": "array", "items": _type_schema(item, [])}
    elif origin is dict:
        _, value = get_args(annotation)
        if value is Any:
            schema = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        else:
            schema = {"type": "object", "additionalProperties": _type_schema(value, [])}
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        schema = model_schema(annotation)
    elif annotation in _SCALARS:
        schema = {"type": _SCALARS[annotation]}
    else:
        raise TypeError(f"no structural schema for {annotation!r}")
    _constraints(schema, metadata)
    return schema


def _default(field: FieldInfo) -> Any:
    """The field's default as it appears in YAML, or PydanticUndefined when there is none."""
    # A nested model's default is written out in full: a real API server checks each default
    # against the schema and its CEL rules when the CRD is created (a rule reading
    # ``self.maxTrials`` fails on ``{}``), and `kubectl explain` shows it.
    factory = field.default_factory
    value = factory() if factory is not None else field.default  # type: ignore[call-arg]
    if value is None:
        return PydanticUndefined
    if isinstance(value, BaseModel):
        return value.model_dump(by_alias=True, exclude_none=True)
    return value


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """Structural OpenAPI v3 schema of a spec model, with its CEL rules."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        schema = _type_schema(field.annotation, list(field.metadata))
        if isinstance(field.json_schema_extra, dict):
            schema.update(field.json_schema_extra)
        if not field.description:
            raise ValueError(f"{model.__name__}.{name} has no description")
        schema.pop("description", None)  # the field's own words beat its type's docstring
        schema = {"description": field.description, **schema}
        default = _default(field)
        if default is not PydanticUndefined:
            schema["default"] = default
        if field.is_required():
            required.append(key)
        properties[key] = schema
    doc = (model.__doc__ or "").strip().split("\n\n")[0]
    result: dict[str, Any] = {"type": "object", "description": " ".join(doc.split())}
    result["properties"] = properties
    if required:
        result["required"] = required
    rules = getattr(model, "rules", ()) if issubclass(model, SpecModel) else ()
    if rules:
        result["x-kubernetes-validations"] = [
            {"rule": r.cel, "message": r.message}
            | ({"fieldPath": f".{r.field}"} if r.field else {})
            for r in rules
        ]
    return result


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition manifest for ArchitectureSearch."""
    spec_schema = model_schema(ArchitectureSearchSpec)
    status_schema = model_schema(ArchitectureSearchStatus)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": [SHORT_NAME],
                "categories": ["mloptimizer"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A neural-architecture search: an Optuna TPE study "
                            "whose trials train Keras CNNs on trainer pods.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string", "description": f"{API_VERSION}"},
                                "kind": {"type": "string", "description": KIND},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    """The CRD as the YAML text committed in ``crds/architecturesearch.yaml``."""
    header = (
        "# Generated by `mloptimizer crd` from mloptimizer/spec/ and mloptimizer/status.py.\n"
        "# Do not edit by hand: change the models and regenerate.\n"
    )
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=100)
