"""Where trials train: the trainer pods, their resources and tolerations, rented GPU pools."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from mloptimizer.rules import Rule, SpecModel
from mloptimizer.spec.common import RELEASE, Duration, Name, Quantity, SecretKeyRef

__all__ = [
    "CPU_TRAINER_IMAGE",
    "GPU_TRAINER_IMAGE",
    "GpuPool",
    "JoinSecret",
    "Resources",
    "Toleration",
    "Workers",
]

# The trainer images scripts/images builds, TensorFlow's CPU and CUDA builds.
CPU_TRAINER_IMAGE = f"ghcr.io/mloptimizer/trainer:{RELEASE}"
GPU_TRAINER_IMAGE = f"ghcr.io/mloptimizer/trainer-gpu:{RELEASE}"


class Toleration(SpecModel):
    """A Kubernetes toleration for the trainer pods."""

    key: Annotated[str, Field(max_length=316)] | None = Field(
        default=None, description="Taint key; omit with operator Exists to tolerate all."
    )
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: Annotated[str, Field(max_length=63)] | None = Field(
        default=None, description="Taint value, with operator Equal."
    )
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; omit for all."
    )
    toleration_seconds: int | None = Field(
        default=None, ge=0, description="NoExecute only: how long the pod stays bound."
    )


class Resources(SpecModel):
    """What each trainer pod asks for (requests and limits are set equal)."""

    gpu: int = Field(
        default=0, ge=0, le=16, description="nvidia.com/gpu per trainer; 0 trains on CPU."
    )
    cpu: Quantity = Field(default="2", description="CPU cores, such as 2 or 1500m.")
    memory: Quantity = Field(default="4Gi", description="Memory, such as 4Gi.")


class JoinSecret(SpecModel):
    """A Secret with what a rented VM needs to join the cluster as a k3s agent."""

    name: Name = Field(
        description="Name of the Secret, in the search's namespace (labelled "
        "mloptimizer.io/usable-by-searches=true by an admin)."
    )
    server_key: Annotated[str, Field(min_length=1, max_length=253)] = Field(
        default="server",
        description="Key holding the API server URL the agents join, such as "
        "https://k3s.example.com:6443 (reachable from the internet or over a mesh VPN).",
    )
    token_key: Annotated[str, Field(min_length=1, max_length=253)] = Field(
        default="token", description="Key holding the k3s agent join token."
    )


# A pool's machines and the trainer pods are both counted in a min..max range.
REPLICA_RANGE = Rule(
    cel="self.minReplicas <= self.maxReplicas",
    check=lambda s: s.min_replicas <= s.max_replicas,
    message="minReplicas must be <= maxReplicas",
    field="minReplicas",
)


class GpuPool(SpecModel):
    """GPU machines rented from Vast.ai for this search, under a price cap and a spend cap."""

    rules = (
        REPLICA_RANGE,
        Rule(
            cel="!has(self.capacity) || self.capacity == 'Interruptible' || !self.interruptible",
            check=lambda s: (
                s.capacity is None or s.capacity == "Interruptible" or not s.interruptible
            ),
            message="interruptible: true says capacity Interruptible: set capacity alone "
            "(OnDemand, Interruptible or Auto)",
            field="capacity",
        ),
        Rule(
            cel="(has(self.capacity) ? self.capacity != 'Interruptible' : !self.interruptible) "
            "|| has(self.bidPricePerHour)",
            check=lambda s: s.rented_as != "Interruptible" or s.bid_price_per_hour is not None,
            message="bidPricePerHour is required with capacity Interruptible (interruptible: true)",
            field="bidPricePerHour",
        ),
        Rule(
            cel="!has(self.bidPricePerHour) || "
            "(has(self.capacity) ? self.capacity != 'OnDemand' : self.interruptible)",
            check=lambda s: s.bid_price_per_hour is None or s.rented_as != "OnDemand",
            message="bidPricePerHour is a spot bid: set capacity to Interruptible or Auto, or "
            "remove it",
            field="bidPricePerHour",
        ),
        Rule(
            cel="self.mode != 'Node' || has(self.joinSecretRef)",
            check=lambda s: s.mode != "Node" or s.join_secret_ref is not None,
            message="mode Node needs joinSecretRef: a Secret with the k3s server URL and join "
            "token the rented VMs join with",
            field="joinSecretRef",
        ),
        Rule(
            cel="self.mode != 'Direct' || has(self.brokerEndpoint)",
            check=lambda s: s.mode != "Direct" or s.broker_endpoint is not None,
            message="mode Direct needs brokerEndpoint: the amqps:// address at which rented "
            "machines reach the broker from the internet",
            field="brokerEndpoint",
        ),
        Rule(
            cel="!has(self.bidPricePerHour) || self.bidPricePerHour <= self.maxPricePerHour",
            check=lambda s: (
                s.bid_price_per_hour is None or s.bid_price_per_hour <= s.max_price_per_hour
            ),
            message="bidPricePerHour must not exceed maxPricePerHour",
            field="bidPricePerHour",
        ),
    )

    provider: Literal["vastai"] = Field(default="vastai", description="Only vastai for now.")
    mode: Literal["Node", "Direct"] = Field(
        default="Node",
        description="Node: rent VMs that join the cluster as tainted GPU nodes. Direct: "
        "rent containers that run the trainer image and reach the broker over TLS with "
        "credentials scoped to this search.",
    )
    gpu_name: Annotated[str, Field(min_length=1, max_length=64)] = Field(
        default="RTX 4090", description="GPU model as Vast.ai names it, such as RTX 3090."
    )
    num_gpus: int = Field(default=1, ge=1, le=16, description="GPUs per machine.")
    min_replicas: int = Field(default=0, ge=0, le=1000, description="Machines kept rented.")
    max_replicas: int = Field(default=2, ge=0, le=1000, description="Most machines rented.")
    max_price_per_hour: float = Field(
        default=0.5, gt=0.0, le=100.0, description="Highest price in USD/hour per machine."
    )
    max_spend_usd: float | None = Field(
        default=None,
        gt=0.0,
        alias="maxSpendUSD",
        description="No scale-up that would pass this total spend in USD.",
    )
    min_reliability: float = Field(
        default=0.98, ge=0.0, le=1.0, description="Lowest host reliability score (0-1)."
    )
    min_cuda_version: Annotated[str, Field(pattern=r"^[0-9]+\.[0-9]+$", max_length=8)] = Field(
        default="12.0", description="Lowest CUDA driver version, such as 12.2."
    )
    disk_gb: int = Field(default=40, ge=10, le=2000, description="Disk per machine in GB.")
    verified_only: bool = Field(default=True, description="Rent verified hosts only.")
    interruptible: bool = Field(
        default=False,
        description="Bid for interruptible (spot) machines only: the same as capacity "
        "Interruptible (the older spelling).",
    )
    capacity: Literal["OnDemand", "Interruptible", "Auto"] | None = Field(
        default=None,
        description="How machines are rented. OnDemand (the default, unless interruptible "
        "is true); Interruptible: spot machines at a bid, which Vast.ai may take back; Auto: "
        "each offer the way a finished epoch is expected to cost less, from its on-demand "
        "price, the bid, the preemptions per machine-hour seen so far for this GPU type "
        "(status.pool.interruptions) and the epoch in progress a preemption costs with "
        "checkpoints.",
    )
    bid_price_per_hour: float | None = Field(
        default=None,
        gt=0.0,
        description="Bid in USD/hour for an interruptible machine (under capacity Auto, "
        "optional: each offer's minimum bid when absent); never less than the offer's "
        "minimum bid.",
    )
    provision_timeout: Duration = Field(
        default="10m",
        description="A machine not ready within this time is destroyed and its host avoided.",
    )
    api_key_secret_ref: SecretKeyRef = Field(description="Secret key holding the Vast.ai API key.")
    join_secret_ref: JoinSecret | None = Field(
        default=None,
        description="Node mode: the Secret with the k3s server URL and join token.",
    )
    broker_endpoint: (
        Annotated[str, Field(pattern=r"^amqps://[^/@\s]+/?$", max_length=512)] | None
    ) = Field(
        default=None,
        description="Direct mode: the broker as rented machines reach it over TLS, "
        "amqps://HOST:PORT, without credentials or vhost: the operator adds the search's own "
        "user and vhost, the same identity as its in-cluster trainers.",
    )
    drain_timeout: Duration = Field(
        default="60s",
        description="How long a surplus machine's trainers get to hand back their trials "
        "before the machine is destroyed.",
    )

    @property
    def rented_as(self) -> Literal["OnDemand", "Interruptible", "Auto"]:
        """``capacity``, or what ``interruptible`` says when it is not set."""
        return self.capacity or ("Interruptible" if self.interruptible else "OnDemand")


MAX_TRAINERS_PER_GPU = 8


def _a_share(value: int | str) -> int | str:
    """1 to 8 or auto, refused in the words the API server uses for the CRD's bounds."""
    if isinstance(value, str) and value != "auto":
        raise ValueError(
            "should match pattern '^auto$': a whole number from 1 to "
            f"{MAX_TRAINERS_PER_GPU} (unquoted), or auto"
        )
    if isinstance(value, int) and value < 1:
        raise ValueError("should be greater than or equal to 1")
    if isinstance(value, int) and value > MAX_TRAINERS_PER_GPU:
        raise ValueError(f"should be less than or equal to {MAX_TRAINERS_PER_GPU}")
    return value


class Workers(SpecModel):
    """The trainer pods that consume trials."""

    rules = (
        REPLICA_RANGE,
        Rule(
            cel="string(self.trainersPerGpu) == '1' || (has(self.resources) && "
            "self.resources.gpu > 0) || has(self.gpuPool)",
            check=lambda s: (
                s.trainers_per_gpu == 1 or s.resources.gpu > 0 or s.gpu_pool is not None
            ),
            message="trainersPerGpu shares GPUs between trainers: set resources.gpu (or a "
            "gpuPool), or leave trainersPerGpu at 1",
            field="trainersPerGpu",
        ),
        Rule(
            cel="!(has(self.gpuPool) && has(self.pricePerHour))",
            check=lambda s: not (s.gpu_pool is not None and s.price_per_hour is not None),
            message="pricePerHour is for GPUs the cluster already has; a gpuPool reports "
            "real prices, so drop pricePerHour",
            field="pricePerHour",
        ),
    )

    image: Annotated[str, Field(min_length=1, max_length=512)] | None = Field(
        default=None,
        description="Trainer image (runs `mloptimizer trainer`). Default: "
        f"{GPU_TRAINER_IMAGE} (TensorFlow's CUDA build) when the trainers use GPUs "
        f"(resources.gpu above 0, or a gpuPool), else {CPU_TRAINER_IMAGE} (the CPU build); "
        "scripts/images builds both. An operator with allowed images takes only images of "
        "those repositories (a prefix ends at /, : or @, or is the whole repository).",
    )
    min_replicas: int = Field(
        default=0, ge=0, le=1000, description="Trainers kept while the search runs."
    )
    max_replicas: int = Field(
        default=4, ge=0, le=1000, description="Most trainers while the search runs."
    )
    resources: Resources = Field(
        default_factory=Resources, description="Requests and limits of each trainer."
    )
    node_selector: Annotated[dict[str, str], Field(max_length=64)] = Field(
        default_factory=dict,
        description="Node labels the trainer pods require. The control plane's "
        "(node-role.kubernetes.io/control-plane, .../master) and rented pools' "
        "(mloptimizer.io/pool) are refused (PlacementNotAllowed).",
    )
    tolerations: Annotated[list[Toleration], Field(max_length=64)] = Field(
        default_factory=list,
        description="Taints the trainer pods tolerate. Tolerating the control plane's or a "
        "rented pool's taints, or every taint (no key, operator Exists), is refused "
        "(PlacementNotAllowed).",
    )

    @property
    def _pod_gpus(self) -> int:
        """GPUs a trainer pod (or a Direct-mode machine's one container) has."""
        if self.gpu_pool is not None and self.gpu_pool.mode == "Direct":
            return self.gpu_pool.num_gpus
        return self.resources.gpu or (1 if self.gpu_pool is not None else 0)

    def cost_share(self, claimed: int) -> int:
        """The trainer processes a result says share its pod (and so the pod's price),
        believed up to what ``trainersPerGpu`` allows: a trainer cannot make its trials
        cheaper than that."""
        if self._pod_gpus == 0:
            return 1
        per_gpu = self.trainers_per_gpu if isinstance(self.trainers_per_gpu, int) else 0
        return max(1, min(claimed, (per_gpu or MAX_TRAINERS_PER_GPU) * self._pod_gpus))

    @property
    def processes_per_pod(self) -> int:
        """Trainer processes each pod runs, as far as the operator can tell (``auto`` is
        decided in the pod, from its GPU: counted as one)."""
        share = self.trainers_per_gpu if isinstance(self.trainers_per_gpu, int) else 1
        return share * self._pod_gpus if share > 1 and self._pod_gpus else 1

    @property
    def trainer_image(self) -> str:
        """The image the trainers run: ``image``, or the build that fits their devices."""
        if self.image is not None:
            return self.image
        gpus = self.resources.gpu > 0 or self.gpu_pool is not None
        return GPU_TRAINER_IMAGE if gpus else CPU_TRAINER_IMAGE

    price_per_hour: float | None = Field(
        default=None,
        ge=0.0,
        description="USD an hour of one trainer pod, used for cost when GPUs are not rented "
        "through gpuPool; the trainers sharing its GPUs (trainersPerGpu) split it.",
    )
    trainers_per_gpu: Annotated[int | str, AfterValidator(_a_share)] = Field(
        default=1,
        json_schema_extra={"minimum": 1, "maximum": MAX_TRAINERS_PER_GPU, "pattern": "^auto$"},
        description="Trainer processes sharing each GPU (1 to 8, or auto), for models too "
        "small to keep a GPU busy. Each gets an equal share of the GPU's memory as a hard "
        "limit (1: the whole GPU, its memory allocated as it grows), and a trial costs its "
        "share of the machine's price. Each process holds its own dataset and TensorFlow: "
        "resources.memory is shared by them all. auto divides each GPU's memory by the "
        "trainer memory the space's largest model needs at training.batchSize (sizing's "
        "estimate), at most 8; the operator then scales pods as if each held one trainer.",
    )
    gpu_pool: GpuPool | None = Field(
        default=None, description="Rent GPU machines from Vast.ai for this search."
    )
