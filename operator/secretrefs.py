"""Secrets a search names: the one place they are read.

A search may name Secrets for its study database, its broker, its GPU pool and its
output bucket. Each is read
here, with the same error when it is missing (a temporary error: the user may create it
next), and a setting falls back to the operator's own value when the search names none.

Whoever may create a search in a namespace must not be able to read every Secret there
through the operator (into a trainer image of their choice, or a rented machine): so a
Secret is used only when an admin opened it to searches with the label
``mloptimizer.io/usable-by-searches: "true"``; any other is refused for good
(:class:`SecretNotUsable`), and the search fails naming the field.
"""

from __future__ import annotations

import base64

import kopf
import kubernetes

from mloptimizer.spec import ArchitectureSearchSpec, SecretKeyRef

__all__ = ["USABLE_LABEL", "SecretNotUsable", "read_secret", "secret_or", "secret_refs"]

USABLE_LABEL = "mloptimizer.io/usable-by-searches"


class SecretNotUsable(kopf.PermanentError):
    """A Secret a search names that no admin opened to searches."""


def secret_refs(spec: ArchitectureSearchSpec) -> list[tuple[str, SecretKeyRef]]:
    """Every Secret key the spec names, with the field that names it."""
    refs = [
        ("spec.storage.secretRef", spec.storage.secret_ref),
        ("spec.broker.secretRef", spec.broker.secret_ref),
    ]
    pool = spec.workers.gpu_pool
    if pool is not None:
        refs.append(("spec.workers.gpuPool.apiKeySecretRef", pool.api_key_secret_ref))
        join = pool.join_secret_ref
        if join is not None:
            for key in (join.server_key, join.token_key):
                refs.append(
                    ("spec.workers.gpuPool.joinSecretRef", SecretKeyRef(name=join.name, key=key))
                )
    store = spec.output.s3
    if store is not None:
        for key in (store.secret_ref.access_key_id_key, store.secret_ref.secret_access_key_key):
            refs.append(
                ("spec.output.s3.secretRef", SecretKeyRef(name=store.secret_ref.name, key=key))
            )
    return [(field, ref) for field, ref in refs if ref is not None]


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
    labels = (secret.metadata.labels if secret.metadata else None) or {}
    if labels.get(USABLE_LABEL) != "true":
        raise SecretNotUsable(
            f"Secret {namespace}/{ref.name} is not open to searches: an admin must label it "
            f"(kubectl label secret {ref.name} -n {namespace} {USABLE_LABEL}=true)"
        )
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
