"""Secrets and claims a search names: the one place they are read and checked.

A search may name Secrets for its study database, its broker, its GPU pool and its
output bucket. Each is read
here, with the same error when it is missing (a temporary error: the user may create it
next), and a setting falls back to the operator's own value when the search names none.

Whoever may create a search in a namespace must not be able to read every Secret there
through the operator (into a trainer image of their choice, or a rented machine): so a
Secret is used only when an admin opened it to searches, by purpose, with the label
``mloptimizer.io/usable-by-searches``:

* ``"true"``: the operator may use it (a study database URL, S3 keys, a Vast.ai key, a
  k3s join token); its keys never reach a trainer pod;
* ``"trainers"``: its keys may be routed into the search's trainer pods (today only
  ``spec.broker.secretRef``, the broker URL the trainers log in with).

Any other is refused for good (:class:`SecretNotUsable`), and the search fails naming the
field and the label to add. The two values exclude each other, so an S3 key labelled for
the operator can never be named as a broker URL and land in the author's image.

Claims (``dataset.imageFolder.claimName`` read-only, ``output.pvc.claimName`` read-write)
need the same label, ``"true"``, before the operator mounts them into a trainer
(:class:`ClaimNotUsable`).
"""

from __future__ import annotations

import base64

import kopf
import kubernetes

from mloptimizer.spec import ArchitectureSearchSpec, SecretKeyRef

__all__ = [
    "FOR_OPERATOR",
    "FOR_TRAINERS",
    "USABLE_LABEL",
    "ClaimNotUsable",
    "Purpose",
    "SecretNotUsable",
    "check_claim",
    "claim_refs",
    "read_secret",
    "secret_or",
    "secret_refs",
]

USABLE_LABEL = "mloptimizer.io/usable-by-searches"
FOR_OPERATOR = "true"  # the operator may read it; never routed into a trainer pod
FOR_TRAINERS = "trainers"  # its keys may reach the search's trainer pods

Purpose = str  # FOR_OPERATOR or FOR_TRAINERS

# What each label value lets a Secret be used for, in the error that asks for it.
_MEANING = {
    FOR_OPERATOR: "used by the operator (never by trainers)",
    FOR_TRAINERS: "routed into trainer pods",
}


class SecretNotUsable(kopf.PermanentError):
    """A Secret a search names that no admin opened to searches for that purpose."""


class ClaimNotUsable(kopf.PermanentError):
    """A PersistentVolumeClaim a search names that no admin opened to searches."""


# Fields whose Secret key goes into the trainer pods (the rest stays in the operator).
TRAINER_FIELDS = frozenset({"spec.broker.secretRef"})


def secret_refs(spec: ArchitectureSearchSpec) -> list[tuple[str, SecretKeyRef]]:
    """Every Secret key the spec names, with the field that names it."""
    refs: list[tuple[str, SecretKeyRef | None]] = [
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


def purpose_of(field_path: str) -> Purpose:
    """The label value a Secret named in ``field_path`` needs."""
    return FOR_TRAINERS if field_path in TRAINER_FIELDS else FOR_OPERATOR


def read_secret(namespace: str, ref: SecretKeyRef, purpose: Purpose = FOR_OPERATOR) -> str:
    """The value of a Secret key opened to searches for ``purpose``; kopf.TemporaryError
    naming what is missing, :class:`SecretNotUsable` when no admin opened it so."""
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
    if labels.get(USABLE_LABEL) != purpose:
        raise SecretNotUsable(
            f"Secret {namespace}/{ref.name} is not open to searches to be {_MEANING[purpose]}: "
            f"an admin must label it (kubectl label secret {ref.name} -n {namespace} "
            f"{USABLE_LABEL}={purpose} --overwrite)"
        )
    data = secret.data or {}
    if ref.key not in data:
        raise kopf.TemporaryError(
            f"Secret {namespace}/{ref.name} has no key {ref.key!r} (keys: {sorted(data)})",
            delay=30,
        )
    return base64.b64decode(data[ref.key]).decode()


def secret_or(
    namespace: str, ref: SecretKeyRef | None, default: str, purpose: Purpose = FOR_OPERATOR
) -> str:
    """The Secret key the search names, or the operator's own ``default`` when it names none."""
    return read_secret(namespace, ref, purpose) if ref is not None else default


def claim_refs(spec: ArchitectureSearchSpec) -> list[tuple[str, str]]:
    """Every PersistentVolumeClaim the spec mounts into trainers, with the field naming it."""
    claims: list[tuple[str, str]] = []
    folder = spec.dataset.image_folder
    if folder is not None and folder.claim_name:
        claims.append(("spec.dataset.imageFolder.claimName", folder.claim_name))
    if spec.output.pvc is not None:
        claims.append(("spec.output.pvc.claimName", spec.output.pvc.claim_name))
    return claims


def check_claim(namespace: str, claim: str) -> None:
    """Pass when the claim exists and an admin opened it to searches; kopf.TemporaryError
    when it is missing, :class:`ClaimNotUsable` when it is not opened."""
    api = kubernetes.client.CoreV1Api()
    try:
        found = api.read_namespaced_persistent_volume_claim(claim, namespace)
    except kubernetes.client.ApiException as error:
        if error.status == 404:
            raise kopf.TemporaryError(
                f"PersistentVolumeClaim {namespace}/{claim} not found; create it", delay=30
            ) from error
        raise
    labels = (found.metadata.labels if found.metadata else None) or {}
    if labels.get(USABLE_LABEL) != FOR_OPERATOR:
        raise ClaimNotUsable(
            f"PersistentVolumeClaim {namespace}/{claim} is not open to searches: an admin "
            f"must label it (kubectl label pvc {claim} -n {namespace} "
            f"{USABLE_LABEL}={FOR_OPERATOR})"
        )
