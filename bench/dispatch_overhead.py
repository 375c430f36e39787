"""Dispatch overhead: the whole loop against bare Optuna ask/tell on the same PostgreSQL.

Measures, in one run, on the machine's PostgreSQL and RabbitMQ:

(a) trials per second through :class:`~mloptimizer.dispatch.Dispatcher` (ask, sample,
    publish with confirms, no-op trainers answering at once, result consumed, tell,
    status reporting) against a bare ``study.ask()`` + sample + ``study.tell()`` loop on
    a fresh study in the same database — with the random sampler (the system's own cost)
    and with TPE; the overhead per trial is the difference of the per-trial times;
(b) where a dispatched trial's time goes: ask + sample, publish, round trip to a trainer
    and back, tell, status;
(c) scaling efficiency with 1, 4, 16 and 32 no-op trainers holding each trial for a fixed
    time: ideal wall time / measured wall time.

Run: ``python bench/dispatch_overhead.py`` (``--help`` for sizes). Needs PostgreSQL on
127.0.0.1:5432 and RabbitMQ on 127.0.0.1:5672, as the tests do.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import optuna
import pika
import psycopg2
from psycopg2 import sql

from mloptimizer.amqp import AmqpTransport
from mloptimizer.broker import declare_queues
from mloptimizer.dispatch import Dispatcher
from mloptimizer.messages import QueueNames, ResultMessage, TrialMessage, decode, encode
from mloptimizer.space import sample_architecture
from mloptimizer.spec import ArchitectureSearchSpec
from mloptimizer.study import open_study, storage_url

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
BROKER = "amqp://guest:guest@127.0.0.1:5672/%2F"


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    admin = psycopg2.connect(ADMIN_DSN)
    admin.autocommit = True
    name = f"mlopt_bench_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cursor:
        cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        admin.close()


def make_spec(sampler: str, trials: int, parallelism: int) -> ArchitectureSearchSpec:
    return ArchitectureSearchSpec.model_validate(
        {
            "dataset": {"builtin": "digits"},
            "budget": {"maxTrials": trials, "parallelism": parallelism},
            "sampler": {"type": sampler, "seed": 0},
            "pruner": {"type": "none"},
        }
    )


class NoOpTrainer(threading.Thread):
    """Takes trials like a trainer (prefetch 1), holds each ``hold`` seconds, answers."""

    def __init__(self, names: QueueNames, hold: float, name: str) -> None:
        super().__init__(daemon=True, name=name)
        self.names = names
        self.hold = hold
        self.stop = threading.Event()

    def run(self) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(BROKER))
        channel = connection.channel()
        channel.confirm_delivery()
        declare_queues(channel, self.names)
        channel.basic_qos(prefetch_count=1)

        def on_trial(ch: Any, method: Any, props: Any, body: bytes) -> None:
            trial = decode(body)
            assert isinstance(trial, TrialMessage)
            if self.hold:
                connection.sleep(self.hold)
            result = ResultMessage(
                search=trial.search,
                trial_id=trial.trial_id,
                number=trial.number,
                phase=trial.phase,
                attempt=1,
                worker_id=self.name,
                state="complete",
                value=0.5 + (trial.trial_id % 97) / 200,
                train_seconds=self.hold,
            )
            ch.basic_publish("", self.names.results, encode(result))
            ch.basic_ack(method.delivery_tag)

        channel.basic_consume(self.names.trials, on_trial)
        while not self.stop.is_set():
            connection.process_data_events(time_limit=0.1)
        connection.close()


class Timings:
    """Per-phase wall time of dispatched trials."""

    def __init__(self) -> None:
        self.parts: dict[str, list[float]] = {}

    def wrap(self, part: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.parts.setdefault(part, []).append(time.perf_counter() - began)

        return timed


class _Status:
    """A status reporter without a cluster: builds the patch each second, like the operator."""

    def __init__(self, timings: Timings, spec: ArchitectureSearchSpec) -> None:
        from mloptimizer.operator.progress import status_from_counts

        self.build = timings.wrap("status", lambda d: status_from_counts(d.counts, spec, d.running))
        self.last = 0.0

    def started(self, trial: Any, dispatcher: Any) -> None:
        pass

    def finished(self, trial: Any, dispatcher: Any) -> None:
        pass

    def progressed(self, epoch: Any) -> None:
        pass

    def tick(self, dispatcher: Any) -> None:
        if time.monotonic() - self.last >= 1.0:
            self.build(dispatcher)
            self.last = time.monotonic()


def through_loop(
    dsn: str, sampler: str, trials: int, workers: int, hold: float, timings: Timings | None
) -> float:
    """Seconds to run ``trials`` trials through the dispatcher with no-op trainers."""
    search = f"bench.{sampler}-{uuid.uuid4().hex[:6]}"
    names = QueueNames(search)
    trainers = [NoOpTrainer(names, hold, f"noop-{i}") for i in range(workers)]
    for trainer in trainers:
        trainer.start()
    spec = make_spec(sampler, trials, workers)
    study = open_study(spec, search, dsn)
    transport = AmqpTransport(BROKER, search)
    observer = _Status(timings, spec) if timings else None
    dispatcher = Dispatcher(study, spec, transport, search=search, observer=observer)
    if timings is not None:
        sent: dict[int, float] = {}
        original_send = transport.send

        def send(trial: TrialMessage) -> None:
            original_send(trial)
            sent[trial.trial_id] = time.perf_counter()

        transport.send = timings.wrap("publish", send)  # type: ignore[method-assign]
        original_result = dispatcher._result

        def result(message: ResultMessage) -> None:
            if message.trial_id in sent:
                timings.parts.setdefault("round trip", []).append(
                    time.perf_counter() - sent.pop(message.trial_id)
                )
            original_result(message)

        dispatcher._result = result  # type: ignore[method-assign]
        study.ask = timings.wrap("ask", study.ask)  # type: ignore[method-assign]
        study.tell = timings.wrap("tell", study.tell)  # type: ignore[method-assign]
    began = time.perf_counter()
    outcome = dispatcher.run()
    seconds = time.perf_counter() - began
    assert outcome.reason == "maxTrials", outcome
    assert dispatcher.counts.complete == trials
    for trainer in trainers:
        trainer.stop.set()
    for trainer in trainers:
        trainer.join()
    connection = pika.BlockingConnection(pika.URLParameters(BROKER))
    channel = connection.channel()
    for queue in names.all:
        channel.queue_delete(queue)
    connection.close()
    return seconds


def bare(dsn: str, sampler: str, trials: int) -> float:
    """Seconds for ``trials`` bare ask + sample + tell on a fresh study."""
    spec = make_spec(sampler, trials, 1)
    study = open_study(spec, f"bare.{sampler}-{uuid.uuid4().hex[:6]}", dsn)
    began = time.perf_counter()
    for _ in range(trials):
        trial = study.ask()
        sample_architecture(trial, spec.search_space)
        study.tell(trial, 0.5 + (trial._trial_id % 97) / 200)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=500, help="trials per throughput run")
    parser.add_argument("--workers", type=int, default=4, help="no-op trainers for (a)")
    parser.add_argument("--hold", type=float, default=5.0, help="seconds per trial in (c)")
    parser.add_argument(
        "--scaling", default="1,4,16,32", help="trainer counts for the scaling runs"
    )
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    with fresh_database() as raw_dsn:
        dsn = storage_url(raw_dsn)
        print(f"(a) throughput: {args.trials} trials, {args.workers} no-op trainers, PostgreSQL")
        print(
            f"{'sampler':<8} {'bare trials/s':>14} {'loop trials/s':>14} {'overhead ms/trial':>18}"
        )
        parts: dict[str, Timings] = {}
        for sampler in ("random", "tpe"):
            bare_s = bare(dsn, sampler, args.trials)
            timings = Timings()
            loop_s = through_loop(dsn, sampler, args.trials, args.workers, 0.0, timings)
            parts[sampler] = timings
            overhead = (loop_s - bare_s) / args.trials * 1000
            print(
                f"{sampler:<8} {args.trials / bare_s:>14.1f} {args.trials / loop_s:>14.1f} "
                f"{overhead:>18.2f}"
            )
        print("\n(b) where a dispatched trial's time goes (median ms; round trip overlaps)")
        print(f"{'sampler':<8} " + " ".join(f"{p:>11}" for p in _PARTS))
        for sampler, timings in parts.items():
            cells = [
                f"{statistics.median(timings.parts[p]) * 1000:>11.2f}"
                if timings.parts.get(p)
                else f"{'-':>11}"
                for p in _PARTS
            ]
            print(f"{sampler:<8} " + " ".join(cells))

        print(f"\n(c) scaling: no-op trainers holding each trial {args.hold:.0f} s, random sampler")
        print(f"{'trainers':>8} {'trials':>7} {'ideal s':>8} {'wall s':>8} {'efficiency':>11}")
        for workers in (int(n) for n in args.scaling.split(",")):
            trials = 2 * workers
            wall = through_loop(dsn, "random", trials, workers, args.hold, None)
            ideal = trials * args.hold / workers
            print(f"{workers:>8} {trials:>7} {ideal:>8.1f} {wall:>8.1f} {ideal / wall:>10.1%}")


_PARTS = ("ask", "publish", "round trip", "tell", "status")


if __name__ == "__main__":
    main()
