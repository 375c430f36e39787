"""The fault drill: a real search over the machine's PostgreSQL and RabbitMQ while things die.

`mloptimizer run --storage postgresql://… --broker amqp://…` with external `mloptimizer
trainer` processes runs a digits search of 40 trials, parallelism 3. During it, at points
chosen by a seeded random draw (the seed is printed; set MLOPT_DRILL_SEED to replay one):
trainers are killed with SIGKILL and one is stopped with SIGTERM mid-trial, the runner is
killed with SIGKILL twice and started again, RabbitMQ is restarted (its application:
every connection drops, the queues recover from disk) and PostgreSQL is restarted. The
trainers keep checkpoints in the run folder, as `mloptimizer run` gives its own: a trial
whose trainer went away goes on from its last epoch, and no more than one epoch is trained
again for each trainer lost. At the end the study must read as if nothing had happened.

The operator gets the same drill through its search daemon (``run_search``, in a process of
its own so that it can be killed with SIGKILL: an operator pod dying), with its status
written where the test reads it.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import psycopg2
import pytest
import yaml
from services import RABBITMQ_URL, TrainerProcess, connect_rabbitmq

from mloptimizer.messages import QueueNames
from mloptimizer.spec import ArchitectureSearchSpec
from mloptimizer.study import Attr, records, storage_url

MAX_TRIALS = 40
PARALLELISM = 3


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.2)


def restart_rabbitmq() -> None:
    """Restart RabbitMQ's application: connections drop, queues recover from disk."""
    subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=120)
    subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=120)


def restart_postgres() -> None:
    version = sorted(os.listdir("/etc/postgresql"))[0]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart", "-m", "fast"],
        check=True,
        capture_output=True,
        timeout=120,
    )


class NullKube:
    """The operator's Kubernetes side, writing the status where the test reads it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.status: dict[str, object] = {}

    def patch_status(self, patch: dict[str, object]) -> None:
        self.status.update(patch)
        self.path.write_text(json.dumps(self.status))

    def scale(self, replicas: int) -> None: ...

    def event(self, type_: str, reason: str, message: str) -> None: ...

    def ready_replicas(self) -> int:
        return 0

    def mark_busy(self, busy: dict[str, int]) -> None: ...


def serve_as_operator(namespace: str, name: str, dsn: str, spec: str, status: str) -> None:
    """An operator process serving one search (spawned; SIGKILL is its pod dying)."""
    import threading

    from mloptimizer.operator.daemon import SearchConfig, run_search

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = SearchConfig(
        namespace=namespace,
        name=name,
        storage_url=dsn,
        broker_url=RABBITMQ_URL,
        max_backoff=5.0,
        uid="drill-uid",
    )
    searched = ArchitectureSearchSpec.model_validate_json(spec)
    outcome = run_search(config, searched, NullKube(Path(status)), stop=threading.Event())
    sys.exit(0 if outcome is not None and not outcome.failed else 1)


class Drill:
    """The runner (or operator) and trainers of the drill, and what it did."""

    def __init__(
        self, workdir: Path, dsn: str, search: str, spec_file: Path, operator: bool = False
    ) -> None:
        self.workdir, self.dsn, self.search = workdir, dsn, search
        self.spec_file = spec_file
        self.operator = operator
        self.trainers: list[TrainerProcess] = []
        self.runner: subprocess.Popen[bytes] | multiprocessing.process.BaseProcess | None = None
        self.runs = 0
        self.done: list[str] = []

    def start_runner(self) -> None:
        self.runs += 1
        if self.operator:
            namespace, name = self.search.split(".", 1)
            spec = yaml.safe_load(self.spec_file.read_text())["spec"]
            context = multiprocessing.get_context("spawn")
            self.runner = context.Process(
                target=serve_as_operator,
                args=(namespace, name, self.dsn, json.dumps(spec), str(self.status_file)),
            )
            self.runner.start()
            return
        exe = Path(sys.executable).with_name("mloptimizer")
        log = (self.workdir / f"runner-{self.runs}.log").open("w")
        self.runner = subprocess.Popen(
            [str(exe), "run", str(self.spec_file), "--storage", self.dsn, "--broker",
             RABBITMQ_URL, "--workers", "0", "--out", str(self.workdir / "out")],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "KERAS_HOME":
             str(self.workdir / "keras")},
        )  # fmt: skip

    @property
    def status_file(self) -> Path:
        return self.workdir / "status.json"

    def kill_runner(self) -> None:
        runner = self.runner
        assert runner is not None
        if isinstance(runner, subprocess.Popen):
            runner.send_signal(signal.SIGKILL)
            runner.wait()
        else:
            runner.kill()
            runner.join()
        self.done.append("operator killed -9" if self.operator else "runner killed -9")

    def wait_runner(self, timeout: float) -> int | None:
        """The runner's exit code, or None when it did not end in time."""
        runner = self.runner
        assert runner is not None
        if isinstance(runner, subprocess.Popen):
            try:
                return runner.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return None
        runner.join(timeout)
        return runner.exitcode

    def start_trainer(self) -> None:
        name = f"t{len(self.trainers) + 1}"
        # the run folder's checkpoints, as `mloptimizer run` gives its trainers
        keep = ("--checkpoint-dir", str(self.workdir / "out" / "checkpoints"))
        self.trainers.append(TrainerProcess(RABBITMQ_URL, self.search, self.workdir, name, *keep))

    def live(self) -> list[TrainerProcess]:
        return [t for t in self.trainers if t.process.poll() is None]

    def finished(self) -> int:
        """Trials finished in the study (0 while PostgreSQL restarts)."""
        try:
            with psycopg2.connect(self.dsn, connect_timeout=2) as db, db.cursor() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED', 'FAIL')"
                )
                row = cursor.fetchone()
                return int(row[0]) if row else 0
        except psycopg2.Error:
            return 0

    def at(self, trials: int) -> None:
        wait_until(lambda: self.finished() >= trials, 240, f"{trials} finished trials")

    def logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in sorted(self.workdir.glob("*.log")))

    def stop(self) -> None:
        for trainer in self.trainers:
            trainer.stop()
        if self.runner is not None and self.wait_runner(0) is None:
            self.kill_runner()


@pytest.fixture(params=["runner", "operator"])
def drill(request: pytest.FixtureRequest, tmp_path: Path, postgres_dsn: str) -> Iterator[Drill]:
    name = f"drill-{uuid.uuid4().hex[:8]}"
    search = f"default.{name}"
    spec = {
        "apiVersion": "mloptimizer.io/v1alpha1",
        "kind": "ArchitectureSearch",
        "metadata": {"name": name},
        "spec": {
            "dataset": {"builtin": "digits"},
            "budget": {"maxTrials": MAX_TRIALS, "parallelism": PARALLELISM, "maxFailedTrials": 10},
            "sampler": {"seed": 7, "nStartupTrials": 8},
            "pruner": {"type": "none"},
            "training": {"epochs": 3, "batchSize": 64},
            "searchSpace": {
                "architectures": ["cnn"],
                "cnn": {
                    "blocks": {"min": 1, "max": 2},
                    "filters": {"min": 8, "max": 32, "step": 8},
                },
                "classifier": {"types": ["gap"]},
            },
        },
    }
    spec_file = tmp_path / "drill.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    found = Drill(tmp_path, postgres_dsn, search, spec_file, operator=request.param == "operator")
    yield found
    found.stop()
    connection = connect_rabbitmq()
    channel = connection.channel()
    for queue in QueueNames(search).all:
        channel.queue_delete(queue)
    connection.close()


def test_a_search_survives_kills_and_service_restarts_and_loses_nothing(drill: Drill) -> None:
    seed = int(os.environ.get("MLOPT_DRILL_SEED", random.randrange(1 << 16)))
    print(f"fault drill seed {seed} (MLOPT_DRILL_SEED={seed} replays it)")
    rng = random.Random(seed)
    marks = iter(sorted(rng.sample(range(3, MAX_TRIALS - 6), 6)))

    drill.start_runner()
    for _ in range(PARALLELISM):
        drill.start_trainer()

    drill.at(next(marks))
    rng.choice(drill.live()).process.send_signal(signal.SIGKILL)
    drill.done.append("trainer killed -9")
    drill.start_trainer()

    drill.at(next(marks))
    drill.kill_runner()
    drill.start_runner()

    drill.at(next(marks))
    restart_rabbitmq()
    drill.done.append("RabbitMQ restarted")

    drill.at(next(marks))
    stopped = rng.choice(drill.live())
    stopped.process.send_signal(signal.SIGTERM)
    assert stopped.process.wait(timeout=60) == 0, stopped.log()
    drill.done.append("trainer stopped with SIGTERM")
    drill.start_trainer()

    drill.at(next(marks))
    restart_postgres()
    drill.done.append("PostgreSQL restarted")

    drill.at(next(marks))
    drill.kill_runner()
    rng.choice(drill.live()).process.send_signal(signal.SIGKILL)
    drill.done.append("trainer killed -9")
    drill.start_trainer()
    drill.start_runner()

    code = drill.wait_runner(300)
    assert code is not None, f"seed {seed}: it did not finish\n{drill.logs()}"
    assert code == 0, f"seed {seed}: {drill.done}\n{drill.logs()}"

    study = optuna.load_study(study_name=drill.search, storage=storage_url(drill.dsn))
    trials = records(study)
    context = f"seed {seed}, {drill.done}"
    assert not [t.number for t in trials if not t.finished], context
    explored = [t for t in trials if t.phase == "explore" and t.counted]
    assert len(explored) == MAX_TRIALS, context
    # Told once each: a told trial carries exactly the one result it was told with.
    assert all(t.attrs.get("worker_id") for t in explored if t.state == "complete"), context
    failed = [(t.number, t.error) for t in explored if t.state == "failed"]
    assert not failed, context
    replaced = [t for t in trials if t.interrupted]
    retried_of = {t.attrs.get("retry_of") for t in trials} - {None}
    assert {t.number for t in replaced} <= retried_of, context  # each one re-run
    # Trainers keep checkpoints (the run folder's): a trainer that went away (killed, stopped,
    # or cut off by the broker's restart, which stops it so as not to train beside the
    # trial's next holder) costs at most the epoch it was in. Every epoch told was kept
    # first, so no told epoch is trained again, unless a finished trial's copy was taken
    # before its result was in: pruned at its first epoch.
    lost = sum(what.startswith("trainer") for what in drill.done) + PARALLELISM  # + broker
    resumed = {t.number: t.attrs[Attr.RESUMED_AT] for t in trials if t.attrs.get(Attr.RESUMED_AT)}
    redone = {t.number: int(t.attrs.get(Attr.REDONE_EPOCHS, 0)) for t in trials}
    print(f"fault drill: trials resumed at epoch {resumed}; epochs trained again: "
          f"{sum(redone.values())} (at most {lost}, one for each trainer lost)")  # fmt: skip
    assert sum(redone.values()) <= lost, (redone, context)

    if drill.operator:
        status = json.loads(drill.status_file.read_text())
        assert status["phase"] == "Succeeded", (status, context)
        counted = [t for t in trials if t.counted]
        for state in ("complete", "pruned", "failed"):
            assert status["trials"][state] == sum(t.state == state for t in counted), context
    else:
        summary = json.loads((drill.workdir / "out" / "summary.json").read_text())
        by_number = {t["number"]: t for t in summary["trials"]}
        for t in trials:
            if t.counted:
                assert by_number[t.number]["state"] == t.state, (t.number, context)

    connection = connect_rabbitmq()
    channel = connection.channel()
    for queue in QueueNames(drill.search).all:
        left = channel.queue_declare(queue, passive=True).method.message_count
        assert left == 0, (queue, left, context)
    connection.close()
