"""The services a search uses besides its trainers: the study's database and the broker."""

from __future__ import annotations

from pydantic import Field

from mloptimizer.rules import SpecModel
from mloptimizer.spec.common import SecretKeyRef

__all__ = ["Broker", "Storage"]


class Storage(SpecModel):
    """Where the Optuna study lives."""

    secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key with a PostgreSQL URL (postgresql://...), read by the "
        "operator alone (the Secret labelled mloptimizer.io/usable-by-searches=true); "
        "defaults to the operator's database.",
    )
    delete_study_on_delete: bool = Field(
        default=False,
        description="Delete the study from the database when the search is deleted; by "
        "default it stays as history.",
    )


class Broker(SpecModel):
    """How trials reach the trainers."""

    secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key with an AMQP URL (amqp://...), which reaches the trainer pods: "
        "the Secret must be labelled mloptimizer.io/usable-by-searches=trainers (a Secret "
        "labelled true, for the operator's use, is refused). Defaults to a broker identity "
        "the operator makes for this search alone.",
    )
