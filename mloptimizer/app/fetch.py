"""``mloptimizer fetch NAMESPACE/NAME --to DIR``: the model a search delivered, on this machine.

The search's ``status.artifacts`` (read with ``kubectl``, so with your kubeconfig and your
rights) lists each file the final job wrote and its size. Files in S3 are downloaded with
your own credentials (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, else
``MINIO_ACCESS_KEY``/``MINIO_SECRET_KEY``, else ``~/.aws/credentials``; never the
operator's); files on a PersistentVolumeClaim are copied from
``--from-dir``, where that claim is reachable here (a mount, or a copy made with
``kubectl cp`` from a pod that mounts it). Every file is checked against the size the
status gives.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

__all__ = ["FetchError", "fetch"]


class FetchError(Exception):
    """Why nothing (more) can be fetched; the message says what to do."""


@dataclass(frozen=True)
class _Entry:
    format: str
    uri: str
    bytes: int | None
    accuracy: float | None

    @property
    def file(self) -> str:
        return self.uri.rsplit("/", 1)[-1]


def _search(ref: str, kubectl: list[str]) -> dict[str, Any]:
    namespace, _, name = ref.partition("/")
    if not namespace or not name or "/" in name:
        raise FetchError(f"{ref!r}: name the search as NAMESPACE/NAME, such as default/mnist")
    try:
        done = subprocess.run(
            [*kubectl, "get", "architecturesearches.mloptimizer.io", name, "-n", namespace,
             "-o", "json"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    except FileNotFoundError as error:
        raise FetchError(f"{kubectl[0]} not found: install kubectl, or pass --kubectl") from error
    if done.returncode != 0:
        raise FetchError(f"kubectl get {ref}: {done.stderr.strip() or done.returncode}")
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def _entries(search: dict[str, Any], ref: str) -> list[_Entry]:
    status = search.get("status") or {}
    listed = [a for a in status.get("artifacts") or [] if a.get("uri")]
    if listed:
        return [
            _Entry(a.get("format", "?"), a["uri"], a.get("bytes"), a.get("testAccuracy"))
            for a in listed
        ]
    delivered = next(
        (c for c in status.get("conditions") or [] if c.get("type") == "Delivered"), None
    )
    output = (search.get("spec") or {}).get("output") or {}
    if delivered is None:
        if not output.get("pvc") and not output.get("s3"):
            raise FetchError(
                f"{ref} delivers no model: its spec.output names no pvc or s3 (set one; "
                "a search applied again resumes and delivers when it ends)"
            )
        raise FetchError(f"{ref} has not ended yet (phase {status.get('phase', 'Pending')})")
    if delivered.get("status") == "Unknown":
        raise FetchError(f"{ref}: the final job is running: {delivered.get('message', '')}")
    raise FetchError(f"{ref}: nothing was delivered: {delivered.get('message', '')}")


def _from_s3(entries: list[_Entry], to: Path, endpoint: str | None, region: str | None) -> None:
    try:
        from minio import Minio
        from minio.credentials.providers import (
            AWSConfigProvider,
            ChainedProvider,
            EnvAWSProvider,
            EnvMinioProvider,
        )
        from minio.error import S3Error
    except ImportError as error:
        raise FetchError("files in S3 need the MinIO SDK: pip install 'mloptimizer[s3]'") from error
    if not endpoint:
        raise FetchError("no S3 endpoint: pass --endpoint-url")
    parts = urlsplit(endpoint)
    client = Minio(
        parts.netloc,
        secure=parts.scheme == "https",
        region=region,
        credentials=ChainedProvider([EnvAWSProvider(), EnvMinioProvider(), AWSConfigProvider()]),
    )
    for entry in entries:
        where = urlsplit(entry.uri)
        try:
            client.fget_object(where.netloc, where.path.lstrip("/"), str(to / entry.file))
        except S3Error as error:
            raise FetchError(f"{entry.uri}: {error.code}: {error.message}") from error


def _from_folder(entries: list[_Entry], to: Path, root: Path | None, ref: str) -> None:
    if root is None:
        claim = urlsplit(entries[0].uri).netloc
        folder = urlsplit(entries[0].uri).path.lstrip("/").rsplit("/", 1)[0]
        raise FetchError(
            f"{ref} delivered to PersistentVolumeClaim {claim!r} (folder {folder}/): pass "
            "--from-dir with the claim's content on this machine, e.g. after "
            f"`kubectl cp NAMESPACE/POD:/MOUNT/{folder} ./claim/{folder}` from a pod that "
            "mounts the claim at /MOUNT, --from-dir ./claim"
        )
    for entry in entries:
        source = root / urlsplit(entry.uri).path.lstrip("/")
        if not source.is_file():
            raise FetchError(f"{source} is not there: is --from-dir the root of the claim?")
        shutil.copyfile(source, to / entry.file)


def fetch(
    ref: str,
    to: Path,
    *,
    kubectl: list[str] | None = None,
    endpoint_url: str | None = None,
    from_dir: Path | None = None,
    out: TextIO = sys.stdout,
) -> list[Path]:
    """Download the files search ``ref`` (NAMESPACE/NAME) delivered into ``to``."""
    search = _search(ref, kubectl or ["kubectl"])
    entries = _entries(search, ref)
    to.mkdir(parents=True, exist_ok=True)
    s3 = [e for e in entries if e.uri.startswith("s3://")]
    pvc = [e for e in entries if e.uri.startswith("pvc://")]
    if s3:
        store = ((search.get("spec") or {}).get("output") or {}).get("s3") or {}
        _from_s3(s3, to, endpoint_url or store.get("endpoint"), store.get("region"))
    if pvc:
        _from_folder(pvc, to, from_dir, ref)
    paths = []
    for entry in entries:
        path = to / entry.file
        size = path.stat().st_size
        if entry.bytes is not None and size != entry.bytes:
            raise FetchError(f"{entry.file}: {size} bytes fetched, the status says {entry.bytes}")
        accuracy = f"test accuracy {entry.accuracy:.4f}" if entry.accuracy is not None else ""
        print(f"{path}  {entry.format:<15} {size / 1024:9.1f} KB  {accuracy}".rstrip(), file=out)
        paths.append(path)
    return paths
