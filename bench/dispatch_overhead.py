"""Dispatch overhead: the whole loop against bare Optuna ask/tell on the same PostgreSQL.

Measures, in one run, on the machine's PostgreSQL and RabbitMQ:

(a) trials per second through :class:`~mloptimizer.dispatch.Dispatcher` (ask, sample,
    publish with confirms, no-op trainers answering at once, result consumed, tell,
    status reporting) against bare ``study.ask()`` + sample + ``study.tell()`` loops on
    fresh studies in the same database: through Optuna's own RDB storage (what a plain
    Optuna user runs) and through :class:`~mloptimizer.storage.SearchStorage` (what the
    dispatcher writes through) -- with the random sampler (the system's own cost) and with
    TPE; the loop's overhead per trial is its time a trial minus bare ask/tell's on the
    same storage;
(b) where a dispatched trial's time goes: ask + sample, publish, round trip to a trainer
    and back, tell, status;
(c) scaling efficiency with 1, 4, 16, 32 and 128 no-op trainers holding each trial for a
    fixed time (two trials each): ideal wall time / measured wall time;
(d) the dispatch time (ask, sample, publish, write) of trials 176-225 against the last 50
    of a 2,000-trial TPE study, and how much of it is the sampler's.

The no-op trainers run in a process of their own (one AMQP channel each, prefetch 1, as
trainer pods are to the broker), so that the dispatcher has the interpreter to itself.

Run: ``python bench/dispatch_overhead.py`` (``--help`` for sizes). Needs PostgreSQL on
127.0.0.1:5432 and RabbitMQ on 127.0.0.1:5672, as the tests do.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import optuna
import pika
import psycopg2
from psycopg2 import sql

from mloptimizer.amqp import AmqpTransport
from mloptimizer.broker import declare_queues, to_dispatcher
from mloptimizer.dispatch import Dispatcher
from mloptimizer.dispatch import loop as dispatch  # where the dispatcher samples
from mloptimizer.messages import QueueNames, ResultMessage, TrialMessage, decode, encode
from mloptimizer.space import build_sampler, sample_architecture
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


def _noop_pool(url: str, search: str, count: int, hold: float, ready: Any, stop: Any) -> None:
    """``count`` no-op trainers in one process: one channel each (prefetch 1), like
    ``count`` trainer pods to the broker, each holding its trial ``hold`` seconds."""
    names = QueueNames(search)
    declaring = pika.BlockingConnection(pika.URLParameters(url))
    declare_queues(declaring.channel(), names)
    declaring.close()
    consuming = [0]
    connection: pika.SelectConnection

    def answer(channel: Any, tag: int, trial: TrialMessage, worker: str) -> None:
        result = ResultMessage(
            search=trial.search,
            trial_id=trial.trial_id,
            number=trial.number,
            phase=trial.phase,
            attempt=1,
            worker_id=worker,
            state="complete",
            value=0.5 + (trial.trial_id % 97) / 200,
            train_seconds=hold,
            token=trial.token,
        )
        to_dispatcher(channel, names, names.results, encode(result), pika.BasicProperties())
        channel.basic_ack(tag)

    def on_trial(channel: Any, method: Any, props: Any, body: bytes) -> None:
        trial = decode(body)
        assert isinstance(trial, TrialMessage)
        worker = f"noop-{channel.channel_number}"
        if hold:
            connection.ioloop.call_later(
                hold, lambda: answer(channel, method.delivery_tag, trial, worker)
            )
        else:
            answer(channel, method.delivery_tag, trial, worker)

    def on_channel(channel: Any) -> None:
        def on_consuming(_: Any) -> None:
            consuming[0] += 1
            if consuming[0] == count:
                ready.set()

        def on_qos(_: Any) -> None:
            channel.basic_consume(names.trials, on_trial, callback=on_consuming)

        channel.basic_qos(prefetch_count=1, callback=on_qos)

    def on_open(_: Any) -> None:
        for _ in range(count):
            connection.channel(on_open_callback=on_channel)
        watch()

    def watch() -> None:
        if stop.is_set():
            connection.close()
        else:
            connection.ioloop.call_later(0.1, watch)

    connection = pika.SelectConnection(
        pika.URLParameters(url),
        on_open_callback=on_open,
        on_close_callback=lambda *_: connection.ioloop.stop(),
    )
    connection.ioloop.start()


@contextlib.contextmanager
def noop_trainers(search: str, count: int, hold: float) -> Iterator[None]:
    """No-op trainers in a process of their own (as trainers are), consuming when entered."""
    context = multiprocessing.get_context("spawn")
    ready, stop = context.Event(), context.Event()
    pool = context.Process(
        target=_noop_pool, args=(BROKER, search, count, hold, ready, stop), daemon=True
    )
    pool.start()
    try:
        if not ready.wait(60):
            raise RuntimeError(f"{count} no-op trainers did not start consuming within 60 s")
        yield
    finally:
        stop.set()
        pool.join(30)
        names = QueueNames(search)
        connection = pika.BlockingConnection(pika.URLParameters(BROKER))
        channel = connection.channel()
        for queue in names.all:
            channel.queue_delete(queue)
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
    """A status reporter without a cluster: builds the patch each second, like the operator;
    keeps each trial's dispatch time (ask, sample, publish, persist) by number."""

    def __init__(self, timings: Timings | None, spec: ArchitectureSearchSpec) -> None:
        from mloptimizer.operator.progress import status_from_counts

        def build(d: Dispatcher) -> object:
            return status_from_counts(d.counts, spec, d.running)

        self.build = timings.wrap("status", build) if timings else build
        self.last = 0.0
        self.dispatch_seconds: dict[int, float] = {}

    def started(self, trial: Any, dispatcher: Any) -> None:
        self.dispatch_seconds[trial.number] = dispatcher.last_dispatch_seconds

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
) -> tuple[float, dict[int, float], dict[int, float]]:
    """Seconds to run ``trials`` trials through the dispatcher with no-op trainers, and each
    trial's dispatch time and sampling time by number."""
    search = f"bench.{sampler}-{uuid.uuid4().hex[:6]}"
    spec = make_spec(sampler, trials, workers)
    sampling: dict[int, float] = {}

    def timed_sample(trial: Any, space: Any, *rest: Any) -> Any:
        began = time.perf_counter()
        try:
            return sample_architecture(trial, space, *rest)
        finally:
            sampling[trial.number] = time.perf_counter() - began

    with noop_trainers(search, workers, hold), _patched(dispatch, timed_sample):
        study = open_study(spec, search, dsn)
        transport = AmqpTransport(BROKER, search)
        observer = _Status(timings, spec)
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
    return seconds, observer.dispatch_seconds, sampling


@contextlib.contextmanager
def _patched(module: Any, sample: Callable[..., Any]) -> Iterator[None]:
    """The dispatcher's sampling call timed (the sampler's share of a dispatch)."""
    original = module.sample_architecture
    module.sample_architecture = sample
    try:
        yield
    finally:
        module.sample_architecture = original


def bare(dsn: str, sampler: str, trials: int, optuna_storage: bool) -> float:
    """Seconds for ``trials`` bare ask + sample + tell on a fresh study: through Optuna's own
    storage (``optuna_storage``), or the one the dispatcher writes through."""
    spec = make_spec(sampler, trials, 1)
    name = f"bare.{sampler}-{uuid.uuid4().hex[:6]}"
    if optuna_storage:
        study = optuna.create_study(
            study_name=name, storage=dsn, sampler=build_sampler(spec.sampler), direction="maximize"
        )
    else:
        study = open_study(spec, name, dsn)
    began = time.perf_counter()
    for _ in range(trials):
        trial = study.ask()
        sample_architecture(trial, spec.search_space)
        study.tell(trial, 0.5 + (trial._trial_id % 97) / 200)
    return time.perf_counter() - began


def _median_ms(seconds: dict[int, float], numbers: range) -> float:
    return statistics.median(seconds[n] for n in numbers if n in seconds) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=500, help="trials per throughput run")
    parser.add_argument("--workers", type=int, default=4, help="no-op trainers for (a)")
    parser.add_argument("--hold", type=float, default=5.0, help="seconds per trial in (c)")
    parser.add_argument(
        "--scaling", default="1,4,16,32,128", help="trainer counts for the scaling runs"
    )
    parser.add_argument(
        "--growth", type=int, default=2000, help="trials of the TPE study in (d); 0: skip (d)"
    )
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    with fresh_database() as raw_dsn:
        dsn = storage_url(raw_dsn)
        print(f"(a) throughput: {args.trials} trials, {args.workers} no-op trainers, PostgreSQL")
        print(
            f"{'sampler':<8} {'bare, Optuna storage':>21} {'bare, ours':>12} {'loop':>12} "
            f"{'overhead ms/trial':>18} {'vs Optuna bare':>15}"
        )
        parts: dict[str, Timings] = {}
        for sampler in ("random", "tpe"):
            optuna_s = bare(dsn, sampler, args.trials, optuna_storage=True)
            ours_s = bare(dsn, sampler, args.trials, optuna_storage=False)
            timings = Timings()
            loop_s, _, _ = through_loop(dsn, sampler, args.trials, args.workers, 0.0, timings)
            parts[sampler] = timings
            overhead = (loop_s - ours_s) / args.trials * 1000
            versus = (loop_s - optuna_s) / args.trials * 1000
            rates = [f"{args.trials / t:.1f} tr/s" for t in (optuna_s, ours_s, loop_s)]
            print(
                f"{sampler:<8} {rates[0]:>21} {rates[1]:>12} {rates[2]:>12} "
                f"{overhead:>+18.2f} {versus:>+15.2f}"
            )
        print(
            "overhead: the loop's time a trial minus bare ask/tell on the same storage; "
            "vs Optuna bare: minus bare ask/tell through Optuna's own RDB storage"
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

        print(f"\n(c) scaling: no-op trainers holding each trial {args.hold:g} s, random sampler")
        print(f"{'trainers':>8} {'trials':>7} {'ideal s':>8} {'wall s':>8} {'efficiency':>11}")
        for workers in (int(n) for n in args.scaling.split(",")):
            trials = 2 * workers
            wall, _, _ = through_loop(dsn, "random", trials, workers, args.hold, None)
            ideal = trials * args.hold / workers
            print(f"{workers:>8} {trials:>7} {ideal:>8.1f} {wall:>8.1f} {ideal / wall:>10.1%}")

        if args.growth >= 250:
            n = args.growth
            print(f"\n(d) TPE study of {n} trials, {args.workers} no-op trainers: dispatch time")
            _, seconds, sampling = through_loop(dsn, "tpe", n, args.workers, 0.0, None)
            rest = {k: v - sampling.get(k, 0.0) for k, v in seconds.items()}
            print(
                f"{'median ms':<28} {'trials 176-225':>15} {f'trials {n - 50}-{n - 1}':>15} "
                f"{'ratio':>6}"
            )
            for what, times in (
                ("dispatch (ask..write)", seconds),
                ("  of it, TPE sampling", sampling),
                ("  the rest (loop, storage)", rest),
            ):
                early = _median_ms(times, range(176, 226))
                late = _median_ms(times, range(n - 50, n))
                print(f"{what:<28} {early:>15.1f} {late:>15.1f} {late / early:>6.2f}")
            print("target: dispatch of trial 2,000 <= 2x trial 200's")


_PARTS = ("ask", "publish", "round trip", "tell", "status")


if __name__ == "__main__":
    main()
