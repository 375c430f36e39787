"""What the Kubernetes API server does with a spec, done in Python for tests.

Structural defaulting, then the CRD's ``openAPIV3Schema`` as JSON Schema (draft 4, the
dialect OpenAPI v3.0 follows), then every ``x-kubernetes-validations`` rule evaluated
with cel-python. This reads the committed CRD file, never the models, so comparing
its verdicts with the model's checks the two halves against each other.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml
from celpy.adapter import json_to_cel

CRD_PATH = Path(__file__).resolve().parent.parent / "crds" / "architecturesearch.yaml"


@cache
def crd() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())
    return loaded


def spec_schema() -> dict[str, Any]:
    version = crd()["spec"]["versions"][0]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return schema


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Fill ``default``s the way the API server does: depth first, only where a parent exists."""
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(sub, value[key])
    elif isinstance(value, list) and "items" in schema:
        value = [apply_defaults(schema["items"], v) for v in value]
    return value


def _strict_schema(schema: Any) -> Any:
    """The schema as kubectl's strict field validation applies it: unknown fields are errors."""
    if isinstance(schema, list):
        return [_strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict_schema(v) for k, v in schema.items() if k != "default"}
    if "properties" in schema and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    if schema.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


def _to_cel(schema: dict[str, Any], value: Any) -> Any:
    """JSON to CEL values, typed by the schema: a `number` is a double even when written 1."""
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, dict) and "properties" in schema:
        return {k: _to_cel(schema["properties"].get(k, {}), v) for k, v in value.items()}
    if isinstance(value, list) and "items" in schema:
        return [_to_cel(schema["items"], v) for v in value]
    return value


def _cel_errors(schema: dict[str, Any], value: Any, path: str) -> list[str]:
    errors: list[str] = []
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors += _cel_errors(sub, value[key], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += _cel_errors(schema["items"], item, f"{path}[{i}]")
    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations", []):
        program = env.program(env.compile(rule["rule"]))
        result = program.evaluate({"self": json_to_cel(_to_cel(schema, value))})
        if isinstance(result, Exception) or not bool(result):
            errors.append(f"{path}{rule.get('fieldPath', '')}: {rule['message']}")
    return errors


def validate_spec(spec: dict[str, Any]) -> list[str]:
    """The API server's errors for a spec (empty when it would be accepted).

    Each error starts with the field path, as ``spec.budget.parallelism: ...``.
    """
    schema = spec_schema()
    defaulted = apply_defaults(schema, copy.deepcopy(spec))
    validator = jsonschema.Draft4Validator(_strict_schema(schema))
    errors = [
        "spec"
        + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path)
        + f": {e.message}"
        for e in validator.iter_errors(defaulted)
    ]
    if errors:  # the API server skips CEL on objects that fail the schema
        return errors
    return _cel_errors(schema, defaulted, "spec")
