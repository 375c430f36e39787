"""The images, measured: their sizes, and how long a container takes to be of use against the
same program started as a plain process on this machine, in one run.

* image sizes (podman's count, uncompressed): operator, trainer (CPU), trainer-gpu (CUDA;
  "not built" unless ``scripts/images --gpu`` ran);
* a trainer's cold start: ``podman run`` of the trainer image (read-only root, a /tmp and a
  cache volume, as its pod has them) until it logs "serving", against
  ``.venv/bin/mloptimizer trainer`` until the same line; median of ``--repeats``;
* the operator's start: ``podman run`` of the operator image until its ``/healthz`` answers,
  against ``.venv/bin/mloptimizer operator`` until the same; both against the test suite's
  Kubernetes emulator (watching one namespace), the machine's PostgreSQL and RabbitMQ.

Prints each figure and the ratio container / process. Needs the images
(``scripts/images``) and podman; run on a quiet machine:
``.venv/bin/python bench/containers.py`` (about 2 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the emulator of the test suite

from k8s import start_emulator, write_kubeconfig  # noqa: E402

REGISTRY = "ghcr.io/mloptimizer"
RELEASE = "0.1.0"
BROKER = "amqp://guest:guest@127.0.0.1:5672/%2F"
DATABASE = "postgresql://postgres@127.0.0.1:5432/postgres"
EXE = str(Path(sys.executable).parent / "mloptimizer")


def image_size(image: str) -> str:
    done = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Size}}", image],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        return "not built"
    return f"{int(done.stdout) / 1e6:,.0f} MB"


def until_line(command: list[str], text: str, timeout: float = 300) -> float:
    """Seconds from starting ``command`` until ``text`` appears in its output; then stops it."""
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    try:
        for line in process.stdout:
            if text in line:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                break
        raise RuntimeError(f"{command[:3]} never printed {text!r}")
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(30)
        if process.poll() is None:
            process.kill()
            process.wait()


def until_healthy(command: list[str], port: int, timeout: float = 300) -> float:
    """Seconds from starting ``command`` until http://127.0.0.1:PORT/healthz answers 200."""
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.monotonic() - started < timeout:
            url = f"http://127.0.0.1:{port}/healthz"
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return time.monotonic() - started
            time.sleep(0.05)  # a port: nothing to await but the answer
        raise RuntimeError(f"{command[:3]} never answered on /healthz")
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(30)
        if process.poll() is None:
            process.kill()
            process.wait()


def trainer_commands(search: str, cache: Path) -> tuple[list[str], list[str]]:
    args = ["trainer", "--broker", BROKER, "--search", search, "--intra-op-threads", "2"]
    container = [
        "podman", "run", "--rm", "--name", f"bench-{uuid.uuid4().hex[:6]}", "--network", "host",
        "--read-only", "--user", "1000", "--tmpfs", "/tmp", "-v", "/var/cache/mloptimizer",
        f"{REGISTRY}/trainer:{RELEASE}", *args,
    ]  # fmt: skip
    host = [EXE, *args, "--cache-dir", str(cache)]
    return container, host


@contextlib.contextmanager
def emulator_kubeconfig(folder: Path) -> Iterator[Path]:
    """The test suite's emulator, served from a thread, and a kubeconfig naming it."""
    ready = threading.Event()
    stop: list[asyncio.Event] = []
    found: list[Path] = []

    async def serve() -> None:
        async with start_emulator() as emulator:
            found.append(write_kubeconfig(emulator, folder / "kubeconfig"))
            stop.append(asyncio.Event())
            ready.set()
            await stop[0].wait()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    ready.wait(30)
    try:
        yield found[0]
    finally:
        loop.call_soon_threadsafe(stop[0].set)
        thread.join(30)


def operator_commands(kubeconfig: Path, port: int) -> tuple[list[str], list[str]]:
    env = {
        "MLOPT_DATABASE_URL": DATABASE,
        "MLOPT_BROKER_URL": BROKER,
        "MLOPT_NAMESPACES": "bench",
        "MLOPT_LIVENESS_PORT": str(port),
        "MLOPT_METRICS_PORT": "0",
    }
    container = [
        "podman", "run", "--rm", "--network", "host", "--read-only", "--tmpfs", "/tmp",
        "-v", f"{kubeconfig}:/kube/config:ro", "-e", "KUBECONFIG=/kube/config",
    ]  # fmt: skip
    for key, value in env.items():
        container += ["-e", f"{key}={value}"]
    container += [f"{REGISTRY}/operator:{RELEASE}", "operator"]
    host = ["env", f"KUBECONFIG={kubeconfig}", *(f"{k}={v}" for k, v in env.items()), EXE,
            "operator"]  # fmt: skip
    return container, host


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("image sizes (uncompressed):")
    for image in ("operator", "trainer", "trainer-gpu"):
        print(f"  {REGISTRY}/{image}:{RELEASE}: {image_size(f'{REGISTRY}/{image}:{RELEASE}')}")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ.setdefault("KERAS_HOME", str(folder / "keras"))
        search = f"bench.cold-{uuid.uuid4().hex[:6]}"
        container, host = trainer_commands(search, folder / "cache")
        in_container, in_process = [], []
        for _ in range(args.repeats):
            in_container.append(until_line(container, "serving"))
            in_process.append(until_line(host, "serving"))
        c, h = statistics.median(in_container), statistics.median(in_process)
        print(f"trainer cold start to 'serving' (median of {args.repeats}): container {c:.1f} s, "
              f"process {h:.1f} s: ratio {c / h:.2f}")  # fmt: skip

        with emulator_kubeconfig(folder) as kubeconfig:
            kubeconfig.chmod(0o644)
            in_container, in_process = [], []
            for _ in range(args.repeats):
                port = free_port()
                container, host = operator_commands(kubeconfig, port)
                in_container.append(until_healthy(container, port))
                port = free_port()
                container, host = operator_commands(kubeconfig, port)
                in_process.append(until_healthy(host, port))
        c, h = statistics.median(in_container), statistics.median(in_process)
        print(f"operator start to /healthz (median of {args.repeats}): container {c:.1f} s, "
              f"process {h:.1f} s: ratio {c / h:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
