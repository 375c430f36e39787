"""What the trainer runs on and how: precision, XLA, threads and the dtype policy.

The decisions (:func:`choose_precision`, :func:`device_name`, :func:`use_xla`) are pure
functions of :class:`GpuInfo` records, so they are tested without a GPU; only
:func:`detect_gpus` asks TensorFlow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import keras
import tensorflow as tf

__all__ = [
    "GpuInfo",
    "Precision",
    "apply_precision",
    "choose_precision",
    "configure_threads",
    "detect_gpus",
    "device_name",
    "fresh_session",
    "use_xla",
]

Precision = Literal["mixed_float16", "float32"]

# Tensor cores, which make float16 pay off, arrived with Volta (compute capability 7.0).
_TENSOR_CORES = (7, 0)


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as TensorFlow sees it; ``compute_capability`` is None when TF does not say."""

    name: str
    compute_capability: tuple[int, int] | None


def detect_gpus() -> list[GpuInfo]:
    """The GPUs TensorFlow can use, with their names and compute capabilities."""
    found = []
    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device)
        capability = details.get("compute_capability")
        found.append(
            GpuInfo(
                name=str(details.get("device_name") or device.name),
                compute_capability=(
                    (int(capability[0]), int(capability[1])) if capability else None
                ),
            )
        )
    return found


def choose_precision(setting: Literal["auto", "on", "off"], gpus: Sequence[GpuInfo]) -> Precision:
    """The dtype policy for a trial's ``mixedPrecision`` setting on these GPUs.

    ``auto`` takes mixed_float16 only where every GPU has tensor cores: on a CPU or an
    older GPU float16 is slower than float32 (four times slower on a CPU). ``on`` is the
    user's explicit choice and is honoured even on a CPU.
    """
    if setting == "on":
        return "mixed_float16"
    if setting == "off" or not gpus:
        return "float32"
    if all(
        g.compute_capability is not None and g.compute_capability >= _TENSOR_CORES for g in gpus
    ):
        return "mixed_float16"
    return "float32"


def device_name(gpus: Sequence[GpuInfo]) -> str:
    """A short label for results and logs, as in ``CPU`` or ``GPU: NVIDIA A100 x2``."""
    if not gpus:
        return "CPU"
    label = f"GPU: {gpus[0].name}"
    return f"{label} x{len(gpus)}" if len(gpus) > 1 else label


def use_xla(gpus: Sequence[GpuInfo]) -> bool:
    """Whether to compile with XLA: on a GPU it pays off; on a CPU its compile time does not."""
    return bool(gpus)


def configure_threads(intra: int | None, inter: int | None) -> None:
    """Set TensorFlow's thread pools; None leaves TensorFlow's default (all cores).

    Must be called before the first TensorFlow op: once the runtime has started, the
    pools are fixed and TensorFlow refuses the change.

    Args:
        intra: Threads used inside one op (a convolution, a matrix product).
        inter: Ops run in parallel.

    Raises:
        RuntimeError: TensorFlow already ran an op, with different settings.
    """
    try:
        if intra is not None:
            tf.config.threading.set_intra_op_parallelism_threads(intra)
        if inter is not None:
            tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError as error:
        raise RuntimeError(
            f"configure_threads must run before the first TensorFlow op: {error}"
        ) from error


def apply_precision(policy: str) -> None:
    """Set Keras' global dtype policy for the layers built from now on."""
    keras.mixed_precision.set_dtype_policy(policy)


def fresh_session(policy: str) -> None:
    """Forget the previous model's graph state, then set ``policy``; call before each build.

    ``keras.backend.clear_session()`` also resets the global dtype policy to float32, so
    the policy must be set after clearing, never before.
    """
    keras.backend.clear_session()
    apply_precision(policy)
