"""Secrets a search names: the one place they are read.

A search may name Secrets for its study database, its broker and its GPU pool. Each is read
here, with the same error when it is missing (a temporary error: the user may create it
next), and a setting falls back to the operator's own value when the search names none.
"""

from __future__ import annotations

import base64

import kopf
import kubernetes

from mloptimizer.spec import SecretKeyRef

__all__ = ["read_secret", "secret_or"]


def read_secret(namespace: str, ref: SecretKeyRef) -> str:
    """The value of a Secret key, or kopf.TemporaryError naming what is missing."""
    api = kubernetes.client.CoreV1Api()
    try:
        secret = api.read_namespaced_secret(ref.name, namespace)
    except kubernetes.client.ApiException as error:
        if error.status == 404:
            raise kopf.TemporaryError(
                f"Secret {namespace}/{ref.name} not found; create it with key {ref.key}",
                delay=30,
            ) from error
        raise
    data = secret.data or {}
    if ref.key not in data:
        raise kopf.TemporaryError(
            f"Secret {namespace}/{ref.name} has no key {ref.key!r} (keys: {sorted(data)})",
            delay=30,
        )
    return base64.b64decode(data[ref.key]).decode()


def secret_or(namespace: str, ref: SecretKeyRef | None, default: str) -> str:
    """The Secret key the search names, or the operator's own ``default`` when it names none."""
    return read_secret(namespace, ref) if ref is not None else default
