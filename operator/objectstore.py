"""S3-compatible object storage, as the operator alone uses it: pre-signed PUT URLs for the
final job, and a HEAD and a SHA-256 of each object it reports written; pre-signed PUT and
GET URLs of each trial's checkpoint objects, which it deletes when the trial ends.

The access key stays in the operator: a trainer (maybe a rented host whose owner has root)
gets one URL per file, each allowing a single PUT of one key until it expires — nothing to
list, read or overwrite anything else with. Signed with the MinIO SDK (AWS Signature
Version 4, which every S3-compatible store accepts).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, get_args
from urllib.parse import urlsplit

from mloptimizer.messages import CheckpointObject, CheckpointUrls

__all__ = ["MAX_HASHED_BYTES", "Bucket", "TrialCheckpoints", "client"]

log = logging.getLogger(__name__)

# S3 caps a SigV4 pre-signed URL at 7 days.
MAX_EXPIRY_SECONDS = 7 * 24 * 3600
# The operator reads back at most this much of an object to hash it (its memory holds one
# chunk at a time; a larger artifact is left unhashed, and said so).
MAX_HASHED_BYTES = 2 * 1024**3
_CHUNK = 1024**2


def client(endpoint: str, region: str, access_key: str, secret_key: str) -> Any:
    """A MinIO SDK client for an endpoint URL (http:// or https://, host and port)."""
    from minio import Minio

    parts = urlsplit(endpoint)
    return Minio(
        parts.netloc,
        secure=parts.scheme == "https",
        region=region,  # given: signing needs no request to ask the bucket's region
        access_key=access_key,
        secret_key=secret_key,
    )


@dataclass
class Bucket:
    """One bucket at one endpoint, with the operator's key for it."""

    endpoint: str
    bucket: str
    region: str
    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    _client: Any = field(default=None, init=False, repr=False)

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = client(
                self.endpoint, self.region, self.access_key_id, self.secret_access_key
            )
        return self._client

    def upload_url(self, key: str, expires: float) -> str:
        """A URL that lets its holder PUT ``key``, for ``expires`` seconds."""
        seconds = int(min(max(expires, 60), MAX_EXPIRY_SECONDS))
        url: str = self.client.presigned_put_object(
            self.bucket, key, expires=datetime.timedelta(seconds=seconds)
        )
        return url

    def download_url(self, key: str, expires: float) -> str:
        """A URL that lets its holder GET ``key``, for ``expires`` seconds."""
        seconds = int(min(max(expires, 60), MAX_EXPIRY_SECONDS))
        url: str = self.client.presigned_get_object(
            self.bucket, key, expires=datetime.timedelta(seconds=seconds)
        )
        return url

    def remove(self, key: str) -> None:
        """Delete ``key`` (nothing when it is not there)."""
        self.client.remove_object(self.bucket, key)

    def size(self, key: str) -> int | None:
        """The size of ``key`` in bytes, or None when it is not there."""
        from minio.error import S3Error

        try:
            found = self.client.stat_object(self.bucket, key)
        except S3Error as error:
            if error.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                return None
            raise
        return int(found.size)

    def sha256(self, key: str, size: int) -> str | None:
        """The SHA-256 (hex) of ``key`` as the bucket holds it, read back in chunks; None
        when its ``size`` (from :meth:`size`, already asked) is over
        :data:`MAX_HASHED_BYTES`."""
        if size > MAX_HASHED_BYTES:
            return None
        digest = hashlib.sha256()
        response = self.client.get_object(self.bucket, key)
        try:
            for chunk in response.stream(_CHUNK):
                digest.update(chunk)
        finally:
            response.close()
            response.release_conn()
        return digest.hexdigest()


class TrialCheckpoints:
    """Each trial's checkpoints in the search's bucket, under ``prefix/trial-<id>/``: the
    URLs its message carries (a PUT and a GET for each of its objects, nothing else, for
    the longest S3 allows), and their removal once the trial ended.

    Removal happens on a thread of its own: the dispatch loop never waits on the bucket. A
    removal that fails is logged (a bucket lifecycle rule on the prefix is the backstop).
    """

    def __init__(self, bucket: Bucket, prefix: str) -> None:
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self._doomed: queue.Queue[int | None] = queue.Queue()  # None: stop
        self._remover = threading.Thread(target=self._remove, daemon=True, name="ckpt-rm")
        self._remover.start()

    def key(self, trial_id: int, name: str) -> str:
        return f"{self.prefix}/trial-{trial_id}/{name}"

    def urls(self, trial_id: int) -> CheckpointUrls:
        names: tuple[CheckpointObject, ...] = get_args(CheckpointObject)
        keys = {name: self.key(trial_id, name) for name in names}
        return CheckpointUrls(
            put={n: self.bucket.upload_url(k, MAX_EXPIRY_SECONDS) for n, k in keys.items()},
            get={n: self.bucket.download_url(k, MAX_EXPIRY_SECONDS) for n, k in keys.items()},
        )

    def discard(self, trial_id: int) -> None:
        self._doomed.put(trial_id)

    def close(self, timeout: float = 30.0) -> bool:
        """Finish the removals asked for, then end the thread (the search's daemon is
        done); whether they finished within ``timeout``."""
        self._doomed.put(None)
        self._remover.join(timeout)
        return not self._remover.is_alive()

    def _remove(self) -> None:
        while (trial_id := self._doomed.get()) is not None:
            try:
                for name in get_args(CheckpointObject):
                    self.bucket.remove(self.key(trial_id, name))
            except Exception as error:  # the bucket away: left for its lifecycle rule
                log.warning("could not remove trial %d's checkpoints: %s", trial_id, error)
