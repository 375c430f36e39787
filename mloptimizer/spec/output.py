"""What the search leaves behind: the best model's export formats and where it is delivered."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from mloptimizer.formats import DEFAULT_FORMATS, EXPORT_FORMATS, ExportFormat, formats_help
from mloptimizer.rules import Rule, SpecModel
from mloptimizer.spec.common import Name

__all__ = [
    "EXPORT_FORMATS",
    "FOLDER_PATTERN",
    "ExportFormat",
    "ObjectStore",
    "Output",
    "OutputVolume",
    "S3Secret",
]

# A relative folder: segments of letters, digits, _ . - that never start with a dot, so
# neither ".." nor an absolute path can name a place outside the claim or the prefix.
FOLDER_PATTERN = r"^([A-Za-z0-9_][A-Za-z0-9_.-]*/)*([A-Za-z0-9_][A-Za-z0-9_.-]*)?$"


class OutputVolume(SpecModel):
    """A PersistentVolumeClaim the search's final job writes its model to."""

    claim_name: Name = Field(
        description="PersistentVolumeClaim (ReadWriteOnce is enough when one node runs the "
        "trainers, ReadWriteMany otherwise), mounted read-write on this search's trainers "
        "only, once an admin labelled it mloptimizer.io/usable-by-searches=true (otherwise "
        "the search fails, ClaimNotUsable). They also keep their best models in it, so the "
        "final job reuses them."
    )
    path: Annotated[str, Field(max_length=1024, pattern=FOLDER_PATTERN)] = Field(
        default="",
        description="Folder inside the claim (relative, no ..); empty writes under "
        "<namespace>/<name>/.",
    )


class S3Secret(SpecModel):
    """A Secret with an S3 access key, read by the operator alone."""

    name: Name = Field(
        description="Name of the Secret, in the search's namespace (labelled "
        "mloptimizer.io/usable-by-searches=true by an admin). Only the operator reads it: "
        "trainers get one pre-signed PUT URL per file."
    )
    access_key_id_key: Annotated[str, Field(min_length=1, max_length=253)] = Field(
        default="accessKeyId", description="Key holding the access key id."
    )
    secret_access_key_key: Annotated[str, Field(min_length=1, max_length=253)] = Field(
        default="secretAccessKey", description="Key holding the secret access key."
    )


class ObjectStore(SpecModel):
    """An S3-compatible bucket (AWS S3, MinIO, Ceph, R2...) the final job uploads to."""

    endpoint: Annotated[str, Field(max_length=2048, pattern=r"^https?://[^/?#\s]+/?$")] = Field(
        description="Endpoint URL, such as https://s3.eu-west-1.amazonaws.com or "
        "http://minio.storage:9000. Trainers must reach it: the chart's "
        "networkPolicy.objectStorageEgress opens it when it is in the cluster."
    )
    bucket: Annotated[
        str, Field(min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$")
    ] = Field(description="Bucket name; it must exist.")
    prefix: Annotated[str, Field(max_length=512, pattern=FOLDER_PATTERN)] = Field(
        default="", description="Key prefix (a folder); empty writes under <namespace>/<name>/."
    )
    region: Annotated[str, Field(min_length=1, max_length=64)] = Field(
        default="us-east-1", description="Region the URLs are signed for."
    )
    secret_ref: S3Secret = Field(description="The Secret with the access key.")


def _default_formats() -> list[ExportFormat]:
    return list(DEFAULT_FORMATS)


class Output(SpecModel):
    """What the search leaves behind besides the study: the best model, for devices."""

    rules = (
        Rule(
            cel="self.formats.all(f, self.formats.exists_one(g, g == f))",
            check=lambda s: len(set(s.formats)) == len(s.formats),
            message="output.formats lists a format twice; name each once",
            field="formats",
        ),
        Rule(
            cel="!has(self.pvc) || !has(self.s3)",
            check=lambda s: s.pvc is None or s.s3 is None,
            message="output: name one destination, pvc or s3, not both",
            field="s3",
        ),
    )

    formats: list[ExportFormat] = Field(
        default_factory=_default_formats,
        min_length=1,
        max_length=len(EXPORT_FORMATS),
        description="Formats the best model is exported in, each run on the test split to "
        f"measure its accuracy, size and one-image latency: {formats_help()}. "
        "mloptimizer run writes them to export/; in a cluster, the final job delivers them "
        "to pvc or s3.",
    )
    pvc: OutputVolume | None = Field(
        default=None,
        description="Deliver the best model to a PersistentVolumeClaim when the search ends.",
    )
    s3: ObjectStore | None = Field(
        default=None,
        description="Deliver the best model to S3-compatible object storage when the search "
        "ends (pre-signed uploads: no storage credential reaches a trainer).",
    )

    def destination_path(self, namespace: str, name: str) -> str:
        """The folder (in the claim, or key prefix in the bucket) the artifacts go to."""
        given = self.pvc.path if self.pvc is not None else self.s3.prefix if self.s3 else ""
        return (given.strip("/") or f"{namespace}/{name}").strip("/")
