"""GPU check: what a trainer does on this machine's NVIDIA GPU, in one table, in ~5 minutes.

No GPU has run MLOptimizer's trainer yet: mixed precision, XLA, memory growth, shared GPUs
(``workers.trainersPerGpu``) and device placement are chosen by logic unit-tested on CPUs
only. On a machine with an NVIDIA GPU and TensorFlow's CUDA build (the trainer-gpu
image, or ``pip install 'tensorflow[and-cuda]'``), this prints:

(a) images/s of one trainer on ``--dataset`` with mixed precision off/on and XLA off/on,
    each as a ratio to float32 without XLA (eager placement, TensorFlow's default);
(b) 1, 2 and 4 trainers sharing the GPU, each a process with an equal share of its memory
    as a hard limit (what ``trainersPerGpu`` sets): aggregate images/s, its ratio to one
    trainer's, and each trainer's peak GPU memory;
(c) the device each op of one training step ran on, counted by device;
(d) the best model of (a) exported to int8 LiteRT: its size and its accuracy on the test
    split against the Keras model's.

Without a GPU it says so and exits 0. Every measurement runs in a fresh process (the
precision policy, XLA and GPU memory are fixed when TensorFlow starts); each prints one
JSON line that this script reads. Run: ``python bench/gpu_check.py`` (``--help``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mloptimizer.trainer.sharing import LIMIT_ENV, gpu_memory_mb, memory_limit_mb

__all__ = [
    "ARCHITECTURE",
    "Config",
    "device_counts",
    "plan",
    "ratios_table",
    "result_of",
    "sharing_table",
]

SHARES = (1, 2, 4)
# The model every run trains: a small CNN of the kind a search on MNIST tries first.
ARCHITECTURE = {
    "family": "cnn",
    "conv_blocks": [{"filters": 32, "kernel_size": 3}, {"filters": 64, "kernel_size": 3}],
    "classifier": "mlp",
    "dense_units": 128,
    "dropout": 0.2,
    "learning_rate": 0.001,
}
_PLACED = re.compile(r"Executing op (\S+) in device (\S+)")


@dataclass(frozen=True)
class Config:
    """One training run: precision, XLA, and the trainers it shares the GPU with."""

    mixed: bool
    xla: bool
    share: int = 1

    @property
    def label(self) -> str:
        return f"{'mixed_float16' if self.mixed else 'float32'}, XLA {'on' if self.xla else 'off'}"


def plan() -> tuple[list[Config], list[Config]]:
    """The runs of (a), float32 without XLA first (the baseline), and of (b) (each trainer
    at the defaults a GPU trainer chooses: XLA on, mixed precision on tensor cores)."""
    single = [Config(mixed, xla) for mixed in (False, True) for xla in (False, True)]
    shared = [Config(mixed=True, xla=True, share=n) for n in SHARES]
    return single, shared


def device_counts(log: str) -> dict[str, int]:
    """Ops per device in TensorFlow's placement log (``Executing op X in device D``),
    devices shortened to their last part (``GPU:0``, ``CPU:0``)."""
    counts: Counter[str] = Counter()
    for _, device in _PLACED.findall(log):
        counts[device.rsplit("device:", 1)[-1]] += 1
    return dict(counts)


def ratios_table(results: Sequence[tuple[Config, dict[str, Any]]]) -> list[str]:
    """(a): images/s of each run and its ratio to the first (float32, XLA off)."""
    base = results[0][1]["images_per_second"]
    lines = [f"{'(a) one trainer':<34} {'images/s':>9} {'ratio':>6} {'val_acc':>8}"]
    for config, result in results:
        ips = result["images_per_second"]
        lines.append(
            f"{config.label:<34} {ips:>9.0f} {ips / base if base else 0.0:>6.2f} "
            f"{result['value']:>8.4f}"
        )
    return lines


def sharing_table(results: Sequence[tuple[Config, list[dict[str, Any]]]]) -> list[str]:
    """(b): aggregate images/s of ``share`` trainers, its ratio to one, peak MB each."""
    one = sum(r["images_per_second"] for r in results[0][1])
    lines = [f"{'(b) trainers on the GPU':<24} {'images/s':>9} {'ratio':>6}  peak MB each"]
    for config, runs in results:
        total = sum(r["images_per_second"] for r in runs)
        peaks = ", ".join(f"{r['peak_mb']:.0f}" for r in runs)
        lines.append(
            f"{config.share:<24} {total:>9.0f} {total / one if one else 0.0:>6.2f}  {peaks}"
        )
    return lines


# --- the measuring process ---------------------------------------------------------------


def _worker(args: argparse.Namespace) -> None:
    """One run in this fresh process; prints one JSON line."""
    import threading

    import mloptimizer.trainer  # noqa: F401 - quiets TensorFlow before it is imported
    from mloptimizer.trainer.sharing import configure_gpu_memory

    limit = os.environ.get(LIMIT_ENV)
    configure_gpu_memory(int(limit) if limit else None)
    import tensorflow as tf

    from mloptimizer.dispatch import trial_message
    from mloptimizer.loading import load_search
    from mloptimizer.space import Architecture
    from mloptimizer.trainer.data import load_dataset
    from mloptimizer.trainer.device import detect_gpus
    from mloptimizer.trainer.training import train_trial

    spec = load_search(Path(args.search)).spec
    config = Config(**json.loads(args.worker))
    splits = load_dataset(spec.dataset, cache_dir=Path(args.cache_dir))
    architecture = Architecture.model_validate(ARCHITECTURE)
    message = trial_message(
        spec.model_copy(
            update={
                "training": spec.training.model_copy(
                    update={"mixed_precision": "on" if config.mixed else "off"}
                )
            }
        ),
        search="bench.gpu-check",
        number=0,
        trial_id=0,
        phase="explore",
        architecture=architecture,
    )
    gpus = detect_gpus()
    keep: dict[str, Any] = {}
    outcome = train_trial(
        message,
        splits,
        on_epoch=lambda epoch, metrics: "continue",
        stop=threading.Event(),
        gpus=gpus if config.xla else (),  # XLA follows the GPUs handed in
        keep_model=keep,
    )
    peak = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20 if gpus else 0.0
    result: dict[str, Any] = {
        "images_per_second": outcome.images_per_second,
        "value": outcome.value or 0.0,
        "peak_mb": peak,
        "error": outcome.error,
    }
    if args.placement:
        tf.debugging.set_log_device_placement(True)
        model = keep["model"]
        model.train_on_batch(splits.x_train[:8].astype("float32") / 255.0, splits.y_train[:8])
        tf.debugging.set_log_device_placement(False)
    if args.export:
        from mloptimizer.trainer.export import export_model

        [artifact] = export_model(keep["model"], splits, Path(args.export), ("tflite-int8",))
        result["int8"] = {"kb": artifact.bytes / 1024, "accuracy": artifact.accuracy}
        result["int8_error"] = artifact.error
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(
    config: Config,
    args: argparse.Namespace,
    env: dict[str, str] | None = None,
    *,
    placement: bool = False,
    export: Path | None = None,
    start: Callable[..., subprocess.Popen[str]] = subprocess.Popen,
) -> subprocess.Popen[str]:
    """Start one measuring process (it prints its RESULT line at the end)."""
    command = [
        sys.executable,
        __file__,
        "--worker",
        json.dumps({"mixed": config.mixed, "xla": config.xla, "share": config.share}),
        "--search",
        str(args.search),
        "--cache-dir",
        str(args.cache_dir),
    ]
    if placement:
        command.append("--placement")
    if export is not None:
        command += ["--export", str(export)]
    return start(
        command,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def result_of(process: subprocess.Popen[str]) -> tuple[dict[str, Any], str]:
    """The RESULT line a measuring process printed, and its stderr."""
    out, err = process.communicate()
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :]), err
    raise RuntimeError(f"the measuring process printed no result:\n{err[-2000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--search",
        type=Path,
        default=Path(__file__).resolve().parent / "gpu-check.yaml",
        help="search file whose dataset and training every run uses (default "
        "bench/gpu-check.yaml: MNIST, 2 epochs, batch 256; mnist_5k works offline)",
    )
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/mloptimizer-gpu-check"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--placement", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--export", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return 0
    gpus = gpu_memory_mb()
    if not gpus:
        print("gpu check: no NVIDIA GPU here (nvidia-smi found none); nothing to measure")
        return 0
    return measure(args, gpus)


def measure(args: argparse.Namespace, gpus: list[int]) -> int:
    """(a) to (d) on the first GPU of ``gpus`` (MB each)."""
    from mloptimizer.loading import load_search

    started = time.perf_counter()
    spec = load_search(args.search).spec
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"gpu check: {len(gpus)} GPU(s) of {', '.join(f'{mb} MB' for mb in gpus)}; "
        f"{spec.dataset.builtin}, {spec.training.epochs} epochs, batch "
        f"{spec.training.batch_size}; the first GPU only",
        flush=True,
    )
    env = {"CUDA_VISIBLE_DEVICES": "0"}
    single, shared = plan()
    first: list[tuple[Config, dict[str, Any]]] = []
    for config in single:
        result, _ = result_of(run_worker(config, args, env))
        first.append((config, result))
    print("\n".join(ratios_table(first)), flush=True)

    sharing: list[tuple[Config, list[dict[str, Any]]]] = []
    for config in shared:
        limit = memory_limit_mb(gpus[0], config.share)
        share_env = {**env, **({LIMIT_ENV: str(limit)} if limit else {})}
        processes = [run_worker(config, args, share_env) for _ in range(config.share)]
        sharing.append((config, [result_of(p)[0] for p in processes]))
    print("\n" + "\n".join(sharing_table(sharing)), flush=True)

    best_config, _ = max(first, key=lambda cr: cr[1]["value"])
    out = args.cache_dir / "export"
    result, log = result_of(run_worker(best_config, args, env, placement=True, export=out))
    counts = device_counts(log)
    print(
        "\n(c) ops of one training step by device: "
        + (", ".join(f"{d} {n}" for d, n in sorted(counts.items())) or "none logged"),
        flush=True,
    )
    int8 = result.get("int8") or {}
    print(
        f"\n(d) int8 LiteRT of the best run ({best_config.label}): "
        + (
            f"{int8['kb']:.1f} KB, accuracy {int8['accuracy']:.4f} against Keras "
            f"{result['value']:.4f} (validation)"
            if int8.get("accuracy") is not None
            else f"failed: {result.get('int8_error')}"
        )
    )
    print(f"\ngpu check done in {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
