"""Several trainers on one GPU (``workers.trainersPerGpu``).

A small CNN keeps a modern GPU busy a fraction of the time, so a pod may run several
trainer processes on its GPUs. They must not starve each other: TensorFlow takes almost
all of a GPU's memory at its first op unless told otherwise, so each process gets a hard
limit, an equal share of the GPU less what a CUDA context keeps outside it
(:func:`memory_limit_mb`); a trainer alone on its GPU grows its memory as it needs
instead. ``auto`` fits as many trainers as the space's largest model leaves room for
(:func:`auto_share`). A trial then costs its share of the machine: each process reports
the share in its results.

The decisions are pure functions; :func:`gpu_memory_mb` asks ``nvidia-smi`` and
:func:`configure_gpu_memory` asks TensorFlow. The processes are started and watched by
:class:`TrainerProcesses`: one that crashes is started again, SIGTERM goes to all of them.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence

from mloptimizer.spec.workers import MAX_TRAINERS_PER_GPU

__all__ = [
    "CONTEXT_MB",
    "LIMIT_ENV",
    "SHARE_ENV",
    "TrainerProcesses",
    "auto_share",
    "child_env",
    "configure_gpu_memory",
    "gpu_memory_mb",
    "memory_limit_mb",
    "resolve_share",
    "run_shared",
    "share_from_env",
    "trainer_command",
]

log = logging.getLogger(__name__)

# What a process's CUDA context, cuDNN and cuBLAS keep on the GPU outside TensorFlow's
# allocator: a few hundred MB, by CUDA version and GPU (not measured here: counted high).
CONTEXT_MB = 600
SHARE_ENV = "MLOPT_GPU_SHARE"  # trainer processes sharing this one's pod (and its price)
LIMIT_ENV = "MLOPT_GPU_MEMORY_MB"  # this process's hard limit on its GPU
_MIN_LIMIT_MB = 256


def memory_limit_mb(total_mb: int, share: int) -> int | None:
    """Each process's limit on a GPU of ``total_mb`` shared by ``share`` trainers; None
    for a trainer alone on its GPU (its memory grows as it needs)."""
    if share <= 1:
        return None
    return max(_MIN_LIMIT_MB, (total_mb - share * CONTEXT_MB) // share)


def auto_share(total_mb: int, need_mb: float) -> int:
    """How many trainers needing ``need_mb`` each (and a CUDA context) fit a GPU of
    ``total_mb``: at least 1, at most :data:`MAX_TRAINERS_PER_GPU`."""
    fits = int(total_mb // (max(need_mb, 1.0) + CONTEXT_MB))
    return max(1, min(MAX_TRAINERS_PER_GPU, fits))


def resolve_share(setting: str, gpus_mb: Sequence[int], need_mb: float | None) -> int:
    """Trainers per GPU for ``--trainers-per-gpu`` (a number or ``auto``) on GPUs of
    ``gpus_mb`` each: 1 without a GPU; ``auto`` sizes for the smallest GPU.

    Raises:
        ValueError: ``setting`` is neither a number from 1 to 8 nor ``auto``, or ``auto``
            lacks the memory a trainer needs.
    """
    if setting == "auto":
        if need_mb is None:
            raise ValueError("--trainers-per-gpu auto needs --trainer-memory-mb")
        return auto_share(min(gpus_mb), need_mb) if gpus_mb else 1
    share = int(setting) if setting.isdigit() else 0
    if not 1 <= share <= MAX_TRAINERS_PER_GPU:
        raise ValueError(f"--trainers-per-gpu must be 1 to {MAX_TRAINERS_PER_GPU} or auto")
    return share if gpus_mb else 1


def gpu_memory_mb(
    run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
) -> list[int]:
    """Each visible GPU's total memory in MB, from ``nvidia-smi`` (empty: no GPU, or no
    ``nvidia-smi``: the NVIDIA container toolkit mounts it into GPU containers)."""
    try:
        done = run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    if done.returncode != 0:
        return []
    sizes = []
    for line in done.stdout.splitlines():
        try:
            sizes.append(int(float(line.strip())))
        except ValueError:
            continue
    return sizes


def configure_gpu_memory(limit_mb: int | None) -> None:
    """Before TensorFlow's first op: a hard limit of ``limit_mb`` on each GPU, or memory
    that grows as needed (None) instead of all of it at once."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        if limit_mb is None:
            tf.config.experimental.set_memory_growth(gpu, True)
        else:
            tf.config.set_logical_device_configuration(
                gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=limit_mb)]
            )


def child_env(
    base: Mapping[str, str],
    index: int,
    share: int,
    gpus_mb: Sequence[int],
    worker_id: str,
    threads: int | None,
) -> dict[str, str]:
    """The environment of trainer process ``index`` of ``share`` x ``len(gpus_mb)``: its
    own GPU (processes spread over the pod's GPUs), its memory limit and cost share, its
    worker id (the pod's, suffixed: a machine's name in it stays readable), its threads,
    and one trainer per process (it starts no processes of its own)."""
    gpu = index % len(gpus_mb)
    processes = share * len(gpus_mb)
    limit = memory_limit_mb(gpus_mb[gpu], share)
    env = dict(base)
    env.update(
        {
            "CUDA_VISIBLE_DEVICES": str(gpu),
            "MLOPT_TRAINERS_PER_GPU": "1",
            SHARE_ENV: str(processes),
            "MLOPT_WORKER_ID": f"{worker_id}/{index}",
        }
    )
    if limit is not None:
        env[LIMIT_ENV] = str(limit)
    if threads is not None:
        env["MLOPT_INTRA_OP_THREADS"] = str(max(1, threads // processes))
    return env


class TrainerProcesses:
    """One trainer process per environment, watched: :meth:`stop` sends SIGTERM to all
    (each hands its trial back); one that crashes (a non-zero exit while no stop was
    asked) is started again, so that one trial's fault costs no other trainer its trial.
    """

    def __init__(
        self,
        command: Sequence[str],
        envs: Sequence[Mapping[str, str]],
        popen: Callable[..., subprocess.Popen[bytes]] = subprocess.Popen,
    ) -> None:
        self._command, self._envs, self._popen = list(command), list(envs), popen
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.started = 0  # processes started, restarts included
        self.processes = [self._start(i) for i in range(len(self._envs))]
        self._codes = [0] * len(self.processes)
        self._watchers = [
            threading.Thread(target=self._watch, args=(i,), daemon=True)
            for i in range(len(self.processes))
        ]
        for watcher in self._watchers:
            watcher.start()

    def _start(self, index: int) -> subprocess.Popen[bytes]:
        self.started += 1
        return self._popen(self._command, env=dict(self._envs[index]))

    def _watch(self, index: int) -> None:
        while True:
            returned = self.processes[index].wait()
            with self._lock:
                if returned == 0 or self._stopping.is_set():
                    self._codes[index] = returned
                    return
                log.warning("trainer process %d exited %d; starting it again", index, returned)
                self.processes[index] = self._start(index)

    def stop(self) -> None:
        """Ask every process to stop (SIGTERM: it requeues its trial and exits)."""
        with self._lock:
            self._stopping.set()
            for process in self.processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)

    def wait(self) -> int:
        """Once every process has ended: the first non-zero exit code, else 0."""
        for watcher in self._watchers:
            watcher.join()
        return next((code for code in self._codes if code != 0), 0)


def trainer_command() -> list[str]:
    """The command that started this trainer, to start its siblings the same way."""
    return [sys.executable, *sys.orig_argv[1:]] if sys.orig_argv else [sys.executable]


def share_from_env() -> int:
    """The trainer processes sharing this one's pod, as it reports them (1: alone)."""
    try:
        return max(1, min(64, int(os.environ.get(SHARE_ENV, "1"))))
    except ValueError:
        return 1


def run_shared(
    setting: str, need_mb: float | None, worker_id: str | None, threads: int | None
) -> int | None:
    """``mloptimizer trainer --trainers-per-gpu``: start that many trainer processes on
    each GPU and watch them until they end (this process never imports TensorFlow);
    returns their exit code, or None when one trainer is to run in this process (no GPU,
    or ``auto`` fits one). A bad setting is exit code 2, with the reason on stderr."""
    gpus_mb = gpu_memory_mb()
    try:
        share = resolve_share(setting, gpus_mb, need_mb)
    except ValueError as error:
        print(f"mloptimizer trainer: {error}", file=sys.stderr)
        return 2
    if share == 1:
        why = "no GPU found" if not gpus_mb else "one trainer fits each GPU"
        print(f"mloptimizer trainer: {why}; one trainer runs", file=sys.stderr)
        return None
    name = worker_id or f"{socket.gethostname()}-{os.getpid()}"
    envs = [
        child_env(os.environ, index, share, gpus_mb, name, threads)
        for index in range(share * len(gpus_mb))
    ]
    print(
        f"mloptimizer trainer: {len(envs)} trainer processes, {share} on each GPU "
        f"({', '.join(f'{mb} MB' for mb in gpus_mb)})",
        file=sys.stderr,
    )
    group = TrainerProcesses(trainer_command(), envs)
    signal.signal(signal.SIGTERM, lambda *_: group.stop())
    signal.signal(signal.SIGINT, lambda *_: group.stop())
    return group.wait()
