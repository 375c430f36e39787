"""One outage policy for every process: the decider's table, the hooks, the resume loop,
and the same fault through ``mloptimizer run``'s loop and the operator's ``run_search``."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes
import optuna
import pika.exceptions
import pytest
import sqlalchemy.exc

from mloptimizer.app import runner
from mloptimizer.faults import BUSY_STATUSES, Outage, Resume, lost_service, transient
from mloptimizer.loading import SearchFile
from mloptimizer.operator import daemon
from mloptimizer.operator.kube import kube_outage
from mloptimizer.operator.vastai import OfferUnavailable, VastError, vast_outage
from mloptimizer.spec import ArchitectureSearchSpec

DATABASE, BROKER = "the study's database", "the broker"


def lost_db() -> BaseException:
    return sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed"))


def caused(error: BaseException, cause: BaseException) -> BaseException:
    error.__cause__ = cause
    return error


def storage_error(cause: BaseException | None) -> BaseException:
    """What Optuna's RDBStorage raises when a commit fails: ``... from`` SQLAlchemy's error."""
    error = optuna.exceptions.StorageInternalError("An exception is raised during the commit.")
    return caused(error, cause) if cause is not None else error


def refused_write() -> BaseException:
    return sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("duplicate key"))


def api(status: int) -> BaseException:
    return kubernetes.client.ApiException(status=status, reason="test")


NO_HOOK: tuple[Outage, ...] = ()
OPERATOR = (kube_outage,)
POOL = (kube_outage, vast_outage)

# RabbitMQ's texts: a consumer timeout closes the channel (dialled again); a queue declared
# otherwise than ours, or a right the login lacks, is a refusal (reported, not awaited).
TIMED_OUT = "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out"
RESHAPED = "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'q' in vhost 'v'"

TABLE: list[tuple[str, BaseException, tuple[Outage, ...], str | None]] = [
    # the database
    ("a lost database", lost_db(), NO_HOOK, DATABASE),
    ("an interface error", sqlalchemy.exc.InterfaceError("x", {}, Exception()), NO_HOOK, DATABASE),
    ("a disconnection", sqlalchemy.exc.DisconnectionError("gone"), NO_HOOK, DATABASE),
    ("Optuna's error from a lost connection", storage_error(lost_db()), NO_HOOK, DATABASE),
    ("Optuna's error from a refused write", storage_error(refused_write()), OPERATOR, None),
    ("Optuna's error alone", storage_error(None), OPERATOR, None),
    # the broker
    ("the broker unreachable", pika.exceptions.AMQPConnectionError("refused"), NO_HOOK, BROKER),
    ("the stream lost", pika.exceptions.StreamLostError("reset"), NO_HOOK, BROKER),
    ("the broker closed it", pika.exceptions.ConnectionClosedByBroker(320, "x"), NO_HOOK, BROKER),
    ("a channel closed", pika.exceptions.ChannelClosedByBroker(404, "NOT_FOUND"), NO_HOOK, BROKER),
    ("a consumer timeout", pika.exceptions.ChannelClosedByBroker(406, TIMED_OUT), NO_HOOK, BROKER),
    ("a queue reshaped", pika.exceptions.ChannelClosedByBroker(406, RESHAPED), NO_HOOK, None),
    ("a right refused", pika.exceptions.ChannelClosedByBroker(403, "ACCESS_REFUSED"), (), None),
    ("a consumer cancelled", pika.exceptions.ConsumerCancelled(), NO_HOOK, BROKER),
    ("a publish unconfirmed", pika.exceptions.NackError([]), NO_HOOK, BROKER),
    ("a duplicate consumer tag", pika.exceptions.DuplicateConsumerTag("t"), OPERATOR, None),
    # the network, whoever's
    ("a refused socket", ConnectionRefusedError(), NO_HOOK, "a service"),
    ("a timeout", TimeoutError(), NO_HOOK, "a service"),
    ("a bug raised while a socket failed", caused(KeyError(1), TimeoutError()), (), "a service"),
    # the Kubernetes API: only through the operator's hook
    ("the API overloaded, no hook", api(503), NO_HOOK, None),
    *[(f"the API answering {s}", api(s), OPERATOR, "the Kubernetes API") for s in BUSY_STATUSES],
    ("a child not created yet", api(404), OPERATOR, "the Kubernetes API"),
    ("a conflict", api(409), OPERATOR, "the Kubernetes API"),
    ("a forbidden call", api(403), POOL, None),
    ("an invalid object", api(422), OPERATOR, None),
    # Vast.ai: only through the pool's hook
    ("Vast.ai refusing, operator hook", VastError("500 after 3 attempts", 500), OPERATOR, None),
    ("Vast.ai refusing", VastError("500 after 3 attempts", 500), POOL, "Vast.ai"),
    ("an offer taken", OfferUnavailable("gone"), POOL, "Vast.ai"),
    ("an aiohttp error", aiohttp.ClientPayloadError("cut"), POOL, "Vast.ai"),
    # ours
    ("a bug", ValueError("a bug"), POOL, None),
    ("a bug in a hook's clothes", RuntimeError("503"), POOL, None),
]


@pytest.mark.parametrize(
    ("error", "outages", "expected"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
def test_the_table_of_lost_services(
    error: BaseException, outages: tuple[Outage, ...], expected: str | None
) -> None:
    assert lost_service(error, *outages) == expected
    assert transient(error, *outages) is (expected is not None)


def test_a_hook_sees_the_whole_cause_chain() -> None:
    wrapped = caused(RuntimeError("patching the status failed"), api(503))
    assert lost_service(wrapped, kube_outage) == "the Kubernetes API"
    assert lost_service(wrapped) is None


class Waits:
    """A stop flag that records each wait instead of sleeping; set after ``limit`` waits."""

    def __init__(self, limit: int = 1000) -> None:
        self.waits: list[float] = []
        self.limit = limit

    def is_set(self) -> bool:
        return len(self.waits) >= self.limit

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.waits.append(timeout)
        return self.is_set()


def test_the_resume_loop_says_what_it_waits_for_and_doubles_to_its_cap() -> None:
    stop, said = Waits(), list[str]()
    noted: list[tuple[str, str]] = []
    resume = Resume(
        stop,
        first=0.5,
        cap=4.0,
        say=said.append,
        hint=" (Ctrl-C to stop)",
        on_wait=lambda what, error: noted.append((what, type(error).__name__)),
    )
    for _ in range(6):
        assert resume.retry(storage_error(lost_db()))
    assert stop.waits == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert said[0] == (
        "waiting for the study's database (StorageInternalError); retrying in 0.5 s"
        " (Ctrl-C to stop)"
    )
    assert said[3].endswith("retrying in 4 s (Ctrl-C to stop)")
    assert noted[0] == (DATABASE, "StorageInternalError")
    assert resume.back() == DATABASE  # what to say is back
    assert resume.back() is None
    assert resume.retry(pika.exceptions.StreamLostError("reset"))
    assert stop.waits[-1] == 0.5  # started over


def test_the_resume_loop_never_waits_for_a_bug() -> None:
    stop, said = Waits(), list[str]()
    resume = Resume(stop, say=said.append)
    assert not resume.retry(storage_error(refused_write()))
    assert not resume.retry(api(503))  # no hook: not this process's service
    assert stop.waits == []
    assert said == []
    assert Resume(stop, (kube_outage,), say=said.append).retry(api(503))


def test_a_dial_gives_up_past_its_cap_for_its_caller_to_wait() -> None:
    stop = Waits()
    resume = Resume(stop, first=0.5, cap=2.0, give_up_at_cap=True, say=lambda _: None)
    error = pika.exceptions.AMQPConnectionError("refused")
    while resume.retry(error):
        pass
    assert stop.waits == [0.5, 1.0, 2.0]
    assert not Resume(stop, cap=0.0, give_up_at_cap=True).retry(error)  # one dial


def test_jitter_spreads_the_waits_within_its_bounds() -> None:
    stop = Waits()
    resume = Resume(stop, first=1.0, cap=1.0, jitter=0.2, say=lambda _: None)
    for _ in range(50):
        resume.retry(TimeoutError())
    assert all(0.8 <= w <= 1.2 for w in stop.waits)
    assert len(set(stop.waits)) > 1


# --- the same fault through `mloptimizer run` and the operator ---------------------------


def spec() -> ArchitectureSearchSpec:
    return ArchitectureSearchSpec.model_validate(
        {"dataset": {"builtin": "digits"}, "budget": {"maxTrials": 2, "parallelism": 1}}
    )


def retried_by_run(fault: BaseException, monkeypatch: pytest.MonkeyPatch, tmp: Path) -> bool:
    """``mloptimizer run``'s loop meets ``fault`` opening its study: True if it waits."""

    def open_study(*_: Any, **__: Any) -> optuna.Study:
        raise fault

    monkeypatch.setattr(runner, "open_study", open_study)
    search = SearchFile("faults", "default", spec(), str(tmp / "search.yaml"))
    display = runner.ProgressDisplay(search, io.StringIO(), tty=False)
    interrupt = runner._Interrupt()
    said: list[str] = []

    def print_and_stop(line: str) -> None:  # Ctrl-C while it waits
        said.append(line)
        interrupt.requested.set()

    display._print = print_and_stop  # type: ignore[method-assign]
    options = runner.RunOptions(out=tmp, workers=1)
    try:
        runner._dispatch(search, options, "faults", "sqlite://", None, display, interrupt, False)
    except KeyboardInterrupt:
        assert said
        assert said[0].startswith("waiting for ")
        return True
    except type(fault):
        assert not said
        return False
    raise AssertionError("the loop neither waited nor raised")


def retried_by_operator(fault: BaseException, monkeypatch: pytest.MonkeyPatch) -> bool:
    """The operator's ``run_search`` meets ``fault`` opening its study: True if it waits
    (``Degraded``/``ConnectionLost``), False if it stops on it (``InternalError``)."""

    def open_study(*_: Any, **__: Any) -> optuna.Study:
        raise fault

    monkeypatch.setattr(daemon, "open_study", open_study)
    stop = threading.Event()
    reasons: list[str] = []

    class Kube:
        def patch_status(self, patch: dict[str, Any]) -> None:
            for c in patch.get("conditions", []):
                if c["type"] == "Degraded":
                    reasons.append(c["reason"])
                    stop.set()  # the operator shuts down while it waits

        def scale(self, replicas: int) -> None: ...

        def event(self, type_: str, reason: str, message: str) -> None: ...

        def ready_replicas(self) -> int:
            return 0

        def mark_busy(self, busy: dict[str, int]) -> None: ...

    config = daemon.SearchConfig("default", "faults", "sqlite://", "amqp://nowhere")
    assert daemon.run_search(config, spec(), Kube(), stop=stop) is None
    assert len(reasons) == 1
    return {"ConnectionLost": True, "InternalError": False}[reasons[0]]


@pytest.mark.parametrize(
    ("fault", "waited"),
    [
        (storage_error(lost_db()), True),
        (storage_error(refused_write()), False),
        (pika.exceptions.AMQPConnectionError("refused"), True),
        (ValueError("a bug"), False),
    ],
    ids=[
        "StorageInternalError-lost-connection",
        "StorageInternalError-refused-write",
        "broker-unreachable",
        "a-bug",
    ],
)
def test_run_and_the_operator_agree_on_the_same_fault(
    fault: BaseException, waited: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert retried_by_run(fault, monkeypatch, tmp_path) is waited
    assert retried_by_operator(fault, monkeypatch) is waited
