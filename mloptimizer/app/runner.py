"""``mloptimizer run``: a whole search on one machine, with the operator's dispatch loop.

The study lives in ``<out>/study.db`` (SQLite) unless ``--storage`` names another
(PostgreSQL); trials go to local trainer processes unless ``--broker`` names a RabbitMQ,
where ``mloptimizer trainer`` processes started anywhere take them. Running the same
command again resumes the same study. ``run.json`` in the output folder records what
``mloptimizer report`` needs to rebuild the report.

Once the search runs, a lost database or broker is waited out (with backoff, saying what
it waits for), never a crash: the study holds everything the loop needs to go on.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import optuna

from mloptimizer.app.export import RUN_FILE
from mloptimizer.dispatch import Dispatcher, EpochProgress, Outcome, Transport
from mloptimizer.faults import Resume
from mloptimizer.loading import SearchFile
from mloptimizer.messages import CHECKPOINTS_DIR
from mloptimizer.sizing import trainer_budget
from mloptimizer.study import Attr, TrialRecord, open_study, study_name
from mloptimizer.trainer.kept import MODELS_DIR  # no TensorFlow in it
from mloptimizer.urls import redact

__all__ = ["ProgressDisplay", "RunOptions", "memory_budget", "run_search", "storage_for"]

log = logging.getLogger(__name__)

STUDY_FILE = "study.db"  # the run folder's own study, unless --storage names another


@dataclass(frozen=True)
class RunOptions:
    """What ``mloptimizer run`` was asked."""

    out: Path
    workers: int
    storage: str | None = None
    broker: str | None = None
    cache_dir: Path | None = None


def storage_for(out: Path, storage: str | None) -> str:
    """The study storage URL: the one given, or SQLite in the output folder."""
    return storage or f"sqlite:///{(out / STUDY_FILE).resolve()}"


def _relative_to(path: Path, out: Path) -> str:
    """``path`` relative to ``out`` when inside it, else absolute."""
    try:
        return str(path.resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path.resolve())


def _fmt_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ProgressDisplay:
    """A live bar on a terminal, one line per finished trial, plain lines otherwise."""

    def __init__(self, search: SearchFile, stream: TextIO, tty: bool | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.metric = search.spec.objective.metric
        refine = search.spec.training.refine
        self.total = search.spec.budget.max_trials + (refine.top_k if refine else 0)
        self.started_at = time.monotonic()
        self._bar_shown = False
        self._last_draw = 0.0
        self._done_at_start: int | None = None

    def _print(self, line: str) -> None:
        if self.tty and self._bar_shown:
            self.stream.write("\r\x1b[K")
            self._bar_shown = False
        self.stream.write(line + "\n")
        self.stream.flush()

    def started(self, trial: TrialRecord, dispatcher: Dispatcher) -> None:
        if not self.tty:
            arch = trial.architecture.summary() if trial.architecture else "?"
            self._print(f"trial {trial.number:>3} started ({trial.phase}): {arch}")

    def finished(self, trial: TrialRecord, dispatcher: Dispatcher) -> None:
        arch = trial.architecture.summary() if trial.architecture else "?"
        trained = Attr.WORKER in trial.attrs  # an infeasible model may never have been sent
        value = (
            f"{self.metric} {trial.value:.4f}"
            if trial.value is not None and (trained or trial.feasible)
            else ""
        )
        state: str = trial.state if trial.state != "complete" else ""
        if trial.state == "failed" and trial.error:
            state = f"failed: {trial.error.splitlines()[0][:160]}"
        elif not trial.feasible:
            state = f"infeasible: {str(trial.attrs.get(Attr.INFEASIBLE))[:160]}"
        self._print(
            f"trial {trial.number:>3} {trial.phase:<7} {arch:<48} {value:<22} "
            f"{trial.seconds:6.1f}s {state}".rstrip()
        )
        self.tick(dispatcher, force=True)

    def progressed(self, epoch: EpochProgress) -> None:
        """One line per epoch in plain-line mode (the bar shows the rest on a terminal)."""
        if self.tty:
            return
        value = epoch.metrics.get(self.metric)
        shown = f"{self.metric} {value:.4f}" if value is not None else ""
        self._print(
            f"trial {epoch.number:>3} epoch {epoch.epoch}/{epoch.epochs} {shown:<22} "
            f"{epoch.seconds_per_epoch:6.1f}s/epoch  ETA {_fmt_seconds(epoch.eta_seconds)}"
        )

    def tick(self, dispatcher: Dispatcher, force: bool = False) -> None:
        if not self.tty:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.5:
            return
        self._last_draw = now
        c = dispatcher.counts
        done = len(c.history)
        if self._done_at_start is None:
            self._done_at_start = done
        elapsed = now - self.started_at
        new = done - self._done_at_start
        eta = _fmt_seconds(elapsed / new * max(0, self.total - done)) if new > 0 else "--:--"
        width = 24
        filled = min(width, width * done // max(1, self.total))
        best = (
            f"best {c.best.value:.4f} (#{c.best.number})"
            if c.best is not None and c.best.value is not None
            else "best -"
        )
        bar = (
            f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
            f"| {dispatcher.running} running | {best} | {_fmt_seconds(elapsed)} | ETA {eta}"
        )
        self.stream.write("\r\x1b[K" + bar)
        self.stream.flush()
        self._bar_shown = True

    def close(self) -> None:
        if self.tty and self._bar_shown:
            self.stream.write("\n")
            self.stream.flush()


class _Interrupt:
    """First Ctrl-C: stop cleanly. Second: stop now."""

    def __init__(self) -> None:
        self.requested = threading.Event()

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.requested.is_set():
            raise KeyboardInterrupt
        self.requested.set()
        print(
            "\nstopping: trials in flight go back to the queue (Ctrl-C again to quit now)",
            file=sys.stderr,
        )


def memory_budget(search: SearchFile, options: RunOptions) -> int:
    """Bytes one trainer may use: this machine's memory shared by the local trainers, or
    (with ``--broker``, trainers elsewhere) the spec's ``workers.resources.memory``."""
    if options.broker:
        return trainer_budget(search.spec)
    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return machine // max(1, options.workers)


def _transport(search: SearchFile, options: RunOptions, name: str) -> Transport:
    if options.broker:
        from mloptimizer.amqp import AmqpTransport, prefetch_for

        prefetch = prefetch_for(search.spec.budget.parallelism)
        return AmqpTransport(options.broker, name, prefetch=prefetch)
    from mloptimizer.local import LocalTransport, default_threads

    cache_dir = options.cache_dir or options.out / "cache"
    return LocalTransport(
        options.workers,
        serve=local_trainer,
        cache_dir=cache_dir,
        base_dir=Path(search.source).resolve().parent,
        threads=default_threads(options.workers),
        models_dir=options.out / MODELS_DIR,
        checkpoints_dir=options.out / CHECKPOINTS_DIR,
    )


def local_trainer(*args: Any) -> None:
    """A local trainer process's entry point (spawned: TensorFlow loads in it, not here)."""
    from mloptimizer.trainer.local import serve

    serve(*args)


def _broker_trainers(
    options: RunOptions, name: str, base_dir: Path
) -> list[subprocess.Popen[bytes]]:
    """With ``--broker``, ``--workers N`` also starts N ``mloptimizer trainer`` here; a
    relative image-folder path is read next to the search file, as local trainers do."""
    if not options.broker or options.workers <= 0:
        return []
    executable = Path(sys.executable).with_name("mloptimizer")
    program = str(executable) if executable.exists() else "mloptimizer"
    command = [program, "trainer"]
    command += ["--search", name, "--cache-dir", str(options.cache_dir or options.out / "cache")]
    command += ["--data-dir", str(base_dir), "--keep-models", str(options.out / MODELS_DIR)]
    command += ["--checkpoint-dir", str(options.out / CHECKPOINTS_DIR)]
    # The URL (a password) goes in the environment: argv is visible to every user (`ps`).
    env = {**os.environ, "MLOPT_BROKER_URL": options.broker}
    return [
        subprocess.Popen([*command, "--worker-id", f"local-{i + 1}"], env=env)
        for i in range(options.workers)
    ]


def run_search(search: SearchFile, options: RunOptions, stream: TextIO = sys.stdout) -> Outcome:
    """Run (or resume) ``search`` to its end; returns why it ended."""
    options.out.mkdir(parents=True, exist_ok=True)
    name = study_name(search.namespace, search.name)
    storage = storage_for(options.out, options.storage)
    study = open_study(search.spec, name, storage)  # a wrong URL fails here, at once
    run = {
        "search": name,
        "source": str(Path(search.source).resolve()),
        # The folder's own study and cache are named relative to it: a copied or moved run
        # folder still rebuilds its report (`mloptimizer report DIR`).
        "storage": redact(options.storage) if options.storage else STUDY_FILE,
        "broker": redact(options.broker) if options.broker else None,
        "cache_dir": _relative_to(options.cache_dir or options.out / "cache", options.out),
        "spec": search.spec.model_dump(mode="json", by_alias=True),
        "ended": None,
    }
    run_file = options.out / RUN_FILE
    run_file.write_text(json.dumps(run, indent=2))
    display = ProgressDisplay(search, stream)
    interrupt = _Interrupt()
    previous = signal.signal(signal.SIGINT, interrupt)
    trainers = _broker_trainers(options, name, Path(search.source).resolve().parent)
    try:
        outcome = _dispatch(
            search, options, name, storage, study, display, interrupt, bool(trainers)
        )
        run["ended"] = {"reason": outcome.reason, "message": outcome.message}
        run_file.write_text(json.dumps(run, indent=2))
    finally:
        signal.signal(signal.SIGINT, previous)
        display.close()
        for process in trainers:
            process.terminate()
        for process in trainers:
            process.wait(timeout=30)
    return outcome


def _dispatch(
    search: SearchFile,
    options: RunOptions,
    name: str,
    storage: str,
    study: optuna.Study | None,
    display: ProgressDisplay,
    interrupt: _Interrupt,
    own_trainers: bool,
) -> Outcome:
    """Run the dispatch loop; wait out a lost database or broker, then resume from the study."""
    resume = Resume(interrupt.requested, first=1.0, say=display._print, hint=" (Ctrl-C to stop)")
    first = True
    while True:
        transport: Transport | None = None
        try:
            if study is None:  # after an outage: the old connections are gone
                study = open_study(search.spec, name, storage)
            transport = _transport(search, options, name)
            dispatcher = Dispatcher(
                study,
                search.spec,
                transport,
                search=name,
                observer=display,
                memory_budget=memory_budget(search, options),
            )
            waited = resume.back()
            if first:
                _say_where(dispatcher, display, options, name, own_trainers)
            elif waited:
                display._print(f"{waited} is back; resuming the search")
            first = False
            return dispatcher.run(should_stop=interrupt.requested.is_set)
        except Exception as error:
            study = None
            if transport is not None:
                transport.close()
            if interrupt.requested.is_set() or not resume.retry(error):
                raise
            if interrupt.requested.is_set():
                raise KeyboardInterrupt from error


def _say_where(
    dispatcher: Dispatcher,
    display: ProgressDisplay,
    options: RunOptions,
    name: str,
    own_trainers: bool,
) -> None:
    """On start: what a resumed study holds, and whether trainers are missing."""
    c = dispatcher.counts
    if c.history or dispatcher.in_flight:
        display._print(
            f"resuming: {len(c.history)} trials finished, {dispatcher.running} in flight"
        )
    consumers = getattr(dispatcher.transport, "consumers", None)
    if options.broker and not own_trainers and consumers is not None and consumers() == 0:
        display._print(
            f"waiting for trainers: mloptimizer trainer --broker {redact(options.broker)} "
            f"--search {name}"
        )
