"""Read a search file (a whole ArchitectureSearch resource or just its spec) into the model.

Every problem is reported at once where possible, each as a :class:`SpecIssue`
with the field path (``spec.budget.parallelism``), what is wrong, and the fix. A file
that is not a search at all (binary, not UTF-8, not YAML, over 1 MiB) gets one error
saying so; duplicate keys and unknown top-level keys are errors (YAML would keep the last
duplicate, and Kubernetes would drop an unknown key, silently).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from mloptimizer.spec import API_VERSION, KIND, ArchitectureSearchSpec

__all__ = ["SearchFile", "SpecError", "SpecIssue", "load_search", "parse_search"]


@dataclass(frozen=True)
class SpecIssue:
    """One problem in a search file."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class SpecError(Exception):
    """A search file that cannot be used; ``issues`` lists every problem found."""

    def __init__(self, source: str, issues: list[SpecIssue]) -> None:
        self.source = source
        self.issues = issues
        lines = "\n".join(f"  {issue}" for issue in issues)
        super().__init__(f"{source}: {len(issues)} error(s)\n{lines}")


@dataclass(frozen=True)
class SearchFile:
    """A validated search: its name and namespace (when given) and the spec with defaults."""

    name: str
    namespace: str
    spec: ArchitectureSearchSpec
    source: str


MAX_FILE_BYTES = 1024 * 1024
_TOP_LEVEL = ("apiVersion", "kind", "metadata", "spec", "status")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, list | dict):
                continue  # unhashable: the safe loader itself refuses it below
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (line {mark.line + 1}): YAML keeps only the last "
                    "one; remove one of them",
                    mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# (field, pattern, longest, what a valid value is)
_METADATA_RULES = (
    ("name", _DNS_SUBDOMAIN, 253,
     "a DNS-1123 subdomain, as Kubernetes requires: lowercase letters, digits, '-' and '.', "
     "starting and ending with a letter or digit, at most 253 characters (for example "
     "cnn-search)"),
    ("namespace", _DNS_LABEL, 63,
     "a DNS-1123 label: lowercase letters, digits and '-', at most 63 characters"),
)  # fmt: skip


def _metadata_issues(metadata: Any) -> list[SpecIssue]:
    """``metadata.name`` and ``namespace`` must be what Kubernetes accepts (and safe paths)."""
    if not isinstance(metadata, dict):
        return [SpecIssue("metadata", "must be a mapping with name: (and namespace:)")]
    issues: list[SpecIssue] = []
    for field, pattern, longest, valid in _METADATA_RULES:
        value = metadata.get(field)
        if value is not None and (
            not isinstance(value, str) or len(value) > longest or not pattern.match(value)
        ):
            issues.append(SpecIssue(f"metadata.{field}", f"{value!r} is not {valid}"))
    return issues


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The spec model class found by walking ``loc`` from the spec root."""
    model: type[BaseModel] = ArchitectureSearchSpec
    for part in loc:
        if isinstance(part, int):
            continue
        by_alias = {f.alias or n: f for n, f in model.model_fields.items()}
        field = by_alias.get(part)
        if field is None:
            return None
        nested = _nested_model(field.annotation)
        if nested is None:
            return None
        model = nested
    return model


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def _issue(error: Any, prefix: str) -> SpecIssue:
    loc: tuple[str | int, ...] = tuple(error["loc"])
    ctx = error.get("ctx") or {}
    if error["type"] == "rule" and ctx.get("field"):
        loc = (*loc, ctx["field"])
    elif error["type"] == "duplicate":
        loc = (*loc, int(ctx["index"]))
    path = ".".join([prefix, *(f"[{p}]" if isinstance(p, int) else p for p in loc)])
    path = path.replace(".[", "[")
    message = str(error["msg"])
    if error["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        known = _field_names(parent) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(known)}"
        message = f"unknown field; {hint}"
    elif error["type"] == "missing":
        message = "required field is missing; add it"
    elif error["type"] == "literal_error" and isinstance(error.get("input"), bool):
        word = "on" if error["input"] else "off"
        message += f' (YAML read an unquoted {word} as a boolean; write "{word}" in quotes)'
    elif error["type"] in ("int_type", "float_type", "bool_type", "string_type") and isinstance(
        error.get("input"), str
    ):
        message += f" (got the string {error['input']!r}; remove the quotes)"
    return SpecIssue(path, message)


def parse_search(document: Any, source: str = "<spec>") -> SearchFile:
    """Validate a parsed YAML document: a whole resource or only its ``spec`` mapping.

    A whole resource may leave out ``apiVersion`` and ``kind`` (``kubectl apply`` needs
    them, ``mloptimizer run`` does not); when present they must be ArchitectureSearch's.

    Raises:
        SpecError: listing every problem with its field path.
    """
    if not isinstance(document, dict):
        raise SpecError(source, [SpecIssue("(file)", "expected a mapping at the top level")])
    issues: list[SpecIssue] = []
    name, namespace = "search", "default"
    if "spec" in document or "apiVersion" in document or "kind" in document:
        # apiVersion and kind may be left out (`mloptimizer run` needs neither), but when
        # given they must be these: kubectl would send the file elsewhere otherwise.
        if document.get("apiVersion", API_VERSION) != API_VERSION:
            got = document.get("apiVersion")
            issues.append(SpecIssue("apiVersion", f"must be {API_VERSION!r}, got {got!r}"))
        if document.get("kind", KIND) != KIND:
            issues.append(SpecIssue("kind", f"must be {KIND!r}, got {document.get('kind')!r}"))
        for key in document:
            if key not in _TOP_LEVEL:
                close = difflib.get_close_matches(str(key), _TOP_LEVEL, n=1)
                hint = f"did you mean {close[0]!r}?" if close else "remove it"
                issues.append(
                    SpecIssue(
                        str(key)[:64],
                        f"unknown top-level key; {hint} (known: {', '.join(_TOP_LEVEL)})",
                    )
                )
        metadata = document.get("metadata") or {}
        issues.extend(_metadata_issues(metadata))
        if isinstance(metadata, dict):
            name = str(metadata.get("name", name))
            namespace = str(metadata.get("namespace", namespace))
        spec_doc, prefix = document.get("spec"), "spec"
        if not isinstance(spec_doc, dict):
            issues.append(SpecIssue("spec", "required mapping is missing; add spec:"))
            raise SpecError(source, issues)
    else:
        spec_doc, prefix = document, "spec"
    try:
        spec = ArchitectureSearchSpec.model_validate(spec_doc)
    except ValidationError as error:
        issues.extend(_issue(e, prefix) for e in error.errors())
    if issues:
        raise SpecError(source, issues)
    return SearchFile(name=name, namespace=namespace, spec=spec, source=source)


def load_search(path: str | Path) -> SearchFile:
    """Read and validate a search file.

    Raises:
        SpecError: the file is unreadable, not YAML, or has invalid fields.
    """
    source = str(path)

    def fail(message: str) -> SpecError:
        return SpecError(source, [SpecIssue("(file)", message)])

    try:
        with Path(path).open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise fail(f"cannot read: {error.strerror}") from error
    if len(data) > MAX_FILE_BYTES:
        raise fail(f"over {MAX_FILE_BYTES // 1024} KiB: not a search file")
    if b"\0" in data:
        raise fail("a binary file, not YAML: give the search's .yaml file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise fail(f"not UTF-8 text (byte {error.start}): save the file as UTF-8") from error
    try:
        documents = [d for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]
    except yaml.YAMLError as error:
        raise fail(f"not valid YAML: {error}") from error
    except RecursionError as error:
        raise fail("nested too deeply to be a search file") from error
    if len(documents) != 1:
        raise SpecError(
            source,
            [SpecIssue("(file)", f"expected one YAML document, found {len(documents)}")],
        )
    return parse_search(documents[0], source)
