"""The storage the dispatcher writes through: the same study in Optuna's tables, in fewer
transactions, on the machine's PostgreSQL; read back by Optuna's own storage and by
optuna-dashboard."""

from __future__ import annotations

import json
import threading
import uuid
import wsgiref.util
from typing import Any

import optuna
import optuna_dashboard
import pytest
import sqlalchemy
from dispatch import make_spec, result_of
from optuna.trial import FrozenTrial
from services import RABBITMQ_URL, connect_rabbitmq
from test_dispatch import ScriptedTransport

from mloptimizer.amqp import AmqpTransport
from mloptimizer.broker import PERSISTENT
from mloptimizer.dispatch import Dispatcher, Inbound
from mloptimizer.messages import QueueNames, ResultMessage, TrialMessage, decode, encode
from mloptimizer.spec import ArchitectureSearchSpec
from mloptimizer.storage import SearchStorage
from mloptimizer.study import Attr, open_study, records, storage_url

pytestmark = pytest.mark.services


@pytest.fixture
def url(postgres_dsn: str) -> str:
    return storage_url(postgres_dsn)


def frozen_fields(trial: FrozenTrial) -> dict[str, Any]:
    return {
        "number": trial.number,
        "state": trial.state,
        "values": trial.values,
        "params": trial.params,
        "distributions": trial.distributions,
        "user_attrs": trial.user_attrs,
        "system_attrs": trial.system_attrs,
        "intermediate_values": trial.intermediate_values,
        "datetime_start": trial.datetime_start,
        "datetime_complete": trial.datetime_complete,
    }


def run_search(
    spec: ArchitectureSearchSpec, url: str, transport: ScriptedTransport
) -> optuna.Study:
    study = open_study(spec, "ns.search", url)
    assert isinstance(study._storage, SearchStorage)
    Dispatcher(study, spec, transport, search="ns.search").run()
    return study


def test_the_dispatchers_study_reads_the_same_through_optunas_own_storage(url: str) -> None:
    # Every kind of write: pruned trials (intermediate values), failed ones, constraint
    # values (system attributes), enqueued refine trials (waiting, then running).
    spec = make_spec(
        budget={"maxTrials": 8, "parallelism": 3},
        pruner={"type": "median", "startupTrials": 2, "warmupEpochs": 0},
        objective={"constraints": {"maxParams": 5_000_000}},
        training={"epochs": 3, "refine": {"topK": 2, "epochs": 4}},
    )
    transport = ScriptedTransport(
        fail=lambda t: "out of memory" if t.number == 4 else None,
        measures=lambda t: {"parameter_count": 1000 * (t.number + 1)},
    )
    ours = run_search(spec, url, transport)
    theirs = optuna.load_study(study_name="ns.search", storage=url)  # Optuna's own storage
    assert not isinstance(theirs._storage, SearchStorage)
    mine, stored = ours.get_trials(), theirs.get_trials()
    assert [frozen_fields(t) for t in mine] == [frozen_fields(t) for t in stored]
    states = {t.state.name for t in stored}
    assert {"COMPLETE", "PRUNED", "FAIL"} <= states, states
    assert any(t.intermediate_values for t in stored)
    assert any(k.startswith("constraints:") for t in stored for k in t.system_attrs)
    assert [t.user_attrs.get(Attr.PHASE) for t in stored].count("refine") == 2
    assert theirs.best_trial.number == ours.best_trial.number


def test_a_trial_is_written_in_three_transactions(url: str) -> None:
    # One at a time: nothing arrives together to share a transaction (see the next test).
    spec = make_spec(budget={"maxTrials": 12, "parallelism": 1}, sampler={"type": "random"})
    study = open_study(spec, "ns.search", url)
    storage = study._storage
    assert isinstance(storage, SearchStorage)
    commits: list[int] = []
    sqlalchemy.event.listen(storage.backend.engine, "commit", lambda _: commits.append(1))
    Dispatcher(study, spec, ScriptedTransport(), search="ns.search").run()
    # Create (ask), parameters with the architecture (once the broker confirmed it), and
    # the result with the tell; plus each epoch's value, written as it comes (3 epochs).
    # Optuna's own storage commits each parameter and attribute on its own, and reads a
    # running trial back at each ask and tell (about 20 commits a trial in this space).
    # Once per study: its capability key, looked up and made (mloptimizer/capability.py).
    assert len(commits) == 12 * (3 + 3) + 2


def test_parameters_reach_the_database_once_the_broker_confirmed_the_trial(url: str) -> None:
    spec = make_spec(budget={"maxTrials": 3, "parallelism": 1})
    snapshots: list[tuple[int, list[tuple[int, bool, bool]]]] = []

    class Watching(ScriptedTransport):
        def send(self, trial: TrialMessage) -> None:
            # What another process sees while the broker confirms this trial.
            stored = optuna.load_study(study_name="ns.search", storage=url).get_trials()
            seen = [(t.number, bool(t.params), Attr.ARCHITECTURE in t.user_attrs) for t in stored]
            snapshots.append((trial.number, seen))
            super().send(trial)

    run_search(spec, url, Watching())
    assert [number for number, _ in snapshots] == [0, 1, 2]
    for number, seen in snapshots:
        # The trials sent before it whole; this one created and running, nothing else yet.
        assert seen == [(n, True, True) for n in range(number)] + [(number, False, False)]


def test_optuna_dashboard_reads_the_dispatchers_study(url: str) -> None:
    spec = make_spec(budget={"maxTrials": 5, "parallelism": 2})
    ours = run_search(spec, url, ScriptedTransport())
    app = optuna_dashboard.wsgi(url)

    def get(path: str) -> Any:
        environ: dict[str, Any] = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
        wsgiref.util.setup_testing_defaults(environ)
        status: list[str] = []
        body = b"".join(app(environ, lambda s, headers, exc=None: status.append(s)))
        assert status[0].startswith("200"), (path, status, body[:300])
        return json.loads(body)

    (study,) = get("/api/studies")["study_summaries"]
    assert study["study_name"] == "ns.search"
    detail = get(f"/api/studies/{study['study_id']}")
    trials = detail["trials"]
    assert [t["number"] for t in trials] == [t.number for t in ours.trials]
    for shown, trial in zip(trials, ours.trials, strict=True):
        assert shown["state"] == trial.state.name.capitalize()
        assert {p["name"] for p in shown["params"]} == set(trial.params)
        assert shown["values"] == trial.values


def test_messages_received_together_are_told_in_one_transaction_and_acked_after_it(
    url: str,
) -> None:
    spec = make_spec(budget={"maxTrials": 8, "parallelism": 4}, training={"epochs": 1})
    study = open_study(spec, "ns.search", url)
    storage = study._storage
    assert isinstance(storage, SearchStorage)
    reader = optuna.storages.RDBStorage(url)  # what the database holds
    acked: list[str] = []

    class Acking(ScriptedTransport):
        def receive(self, timeout: float) -> list[Inbound]:
            received = super().receive(timeout)
            for inbound in received:
                if isinstance(inbound.message, ResultMessage):
                    trial_id = inbound.message.trial_id
                    inbound.settle = lambda t=trial_id: acked.append(  # type: ignore[misc]
                        reader.get_trial(t).state.name
                    )
            return received

    commits: list[int] = []
    sqlalchemy.event.listen(storage.backend.engine, "commit", lambda _: commits.append(1))
    Dispatcher(study, spec, Acking(), search="ns.search").run()
    assert acked == ["COMPLETE"] * 8  # never acked before the database has the result
    # Two waves of 4, each in four transactions: its 4 trials created together, their
    # parameters once the broker confirmed them, their epoch values (received together)
    # and their results; one transaction a write would take 8 x 4. Plus, once per study,
    # its capability key looked up and made.
    assert len(commits) == 2 * 4 + 2
    numbers = [t.number for t in optuna.load_study(study_name="ns.search", storage=url).trials]
    assert numbers == list(range(8))  # numbered as Optuna numbers them


def test_a_lost_database_while_telling_acks_nothing_and_the_results_come_again(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over the machine's RabbitMQ: the results stay unacked in the broker while the
    database is lost, and the broker itself delivers them again to the next dispatcher."""
    search = f"test.storage-{uuid.uuid4().hex[:8]}"
    names = QueueNames(search)
    spec = make_spec(budget={"maxTrials": 4, "parallelism": 4}, training={"epochs": 1})
    trained: list[int] = []
    done = threading.Event()

    def trainer() -> None:
        """Takes each trial, reports it complete, acks it: a trainer that never fails."""
        connection = connect_rabbitmq()
        channel = connection.channel()
        for method, _, body in channel.consume(names.trials, inactivity_timeout=0.2):
            if done.is_set():
                break
            if method is not None:
                trial = decode(body)
                assert isinstance(trial, TrialMessage)
                trained.append(trial.trial_id)
                channel.basic_publish("", names.results, encode(result_of(trial)), PERSISTENT)
                channel.basic_ack(method.delivery_tag)
        connection.close()

    original_commit = SearchStorage._commit

    def commit(self: SearchStorage, writes: list[Any]) -> None:
        if any(w.state is not None for w in writes):
            raise sqlalchemy.exc.OperationalError("COMMIT", {}, ConnectionError("db gone"))
        original_commit(self, writes)

    monkeypatch.setattr(SearchStorage, "_commit", commit)
    worker = threading.Thread(target=trainer, daemon=True)
    try:
        first = AmqpTransport(RABBITMQ_URL, search, prefetch=8)
        worker.start()
        with pytest.raises(sqlalchemy.exc.OperationalError):
            Dispatcher(open_study(spec, search, url), spec, first, search=search).run()
        reader = optuna.load_study(study_name=search, storage=url)
        assert [t.state.name for t in reader.trials] == ["RUNNING"] * 4
        # nothing acked: the broker holds every result again once the channel closed
        connection = connect_rabbitmq()
        held = connection.channel().queue_declare(names.results, passive=True)
        assert held.method.message_count == 4
        connection.close()

        # The database is back: a new dispatcher adopts the trials; the broker redelivers.
        monkeypatch.setattr(SearchStorage, "_commit", original_commit)
        again = AmqpTransport(RABBITMQ_URL, search, prefetch=8)
        d = Dispatcher(open_study(spec, search, url), spec, again, search=search)
        assert d.run().reason == "maxTrials"
    finally:
        done.set()
        worker.join(10)
        connection = connect_rabbitmq()
        channel = connection.channel()
        for queue in names.all:
            channel.queue_delete(queue)
        connection.close()
    reader = optuna.load_study(study_name=search, storage=url)
    assert [t.state.name for t in reader.trials] == ["COMPLETE"] * 4
    assert sorted(trained) == sorted(t._trial_id for t in reader.trials)  # none trained twice


def test_trials_created_for_a_wave_and_not_sent_are_ended_uncounted(url: str) -> None:
    spec = make_spec(budget={"maxTrials": 8, "parallelism": 4})
    transport = ScriptedTransport(mute=lambda trial: True)
    d = Dispatcher(open_study(spec, "ns.search", url), spec, transport, search="ns.search")
    # Exploration closes for refine after the wave's first trial (the timeout's rule).
    answers = iter([False, False])
    d._time_for_refine = lambda: next(answers, True)  # type: ignore[method-assign]
    d._fill()
    assert [m.number for m in transport.sent] == [0]
    assert d.counts.explore_used == 1
    stored = records(optuna.load_study(study_name="ns.search", storage=url))
    assert [(r.number, r.state, r.interrupted) for r in stored] == [
        (0, "running", False),
        (1, "failed", True),
        (2, "failed", True),
        (3, "failed", True),
    ]


def test_trials_created_for_a_wave_when_the_dispatcher_died_are_interrupted_on_recovery(
    url: str,
) -> None:
    spec = make_spec(budget={"maxTrials": 4, "parallelism": 4})
    study = open_study(spec, "ns.search", url)
    storage = study._storage
    assert isinstance(storage, SearchStorage)
    storage.reserve(study._study_id, 4)  # then the process dies before sending any
    transport = ScriptedTransport(durable=True)
    d = Dispatcher(open_study(spec, "ns.search", url), spec, transport, search="ns.search")
    assert not d.in_flight
    assert d.run().reason == "maxTrials"
    stored = records(d.study)
    assert [r.state for r in stored[:4]] == ["failed"] * 4
    assert all(r.interrupted for r in stored[:4])
    assert [r.state for r in stored[4:]] == ["complete"] * 4  # the budget is whole


def test_a_batch_writing_a_trial_twice_keeps_the_last_values(url: str) -> None:
    study = open_study(make_spec(), "ns.search", url)
    storage = study._storage
    assert isinstance(storage, SearchStorage)
    trial = study.ask()
    trial.suggest_int("units", 1, 8)
    with storage.batch():
        trial.set_user_attr("note", "first")
        storage.persist(trial._trial_id)
        trial.set_user_attr("note", "second")
        trial.report(0.5, step=1)
        # A step written again: the later value, as Optuna's own storage keeps it.
        storage.set_trial_intermediate_value(trial._trial_id, 1, 0.6)
        trial.report(0.7, step=2)
        study.tell(trial, 0.9)
    (stored,) = optuna.load_study(study_name="ns.search", storage=url).trials
    assert stored.user_attrs["note"] == "second"
    assert stored.intermediate_values == {1: 0.6, 2: 0.7}
    assert stored.params["units"] == trial.params["units"]
    assert stored.value == 0.9


def test_trials_stay_in_number_order_when_one_is_enqueued_while_others_are_reserved(
    url: str,
) -> None:
    study = open_study(make_spec(), "ns.search", url)
    storage = study._storage
    assert isinstance(storage, SearchStorage)
    storage.reserve(study._study_id, 3)  # numbers 0-2
    study.enqueue_trial({}, user_attrs={Attr.PHASE: "refine"})  # number 3
    asked = [study.ask().number for _ in range(3)]
    assert asked == [3, 0, 1]  # the enqueued one first, as Optuna hands them out
    assert [t.number for t in study.get_trials()] == [0, 1, 3]  # samplers read them in order
    assert storage.release(study._study_id) == [study.trials[2]._trial_id]
    stored = optuna.load_study(study_name="ns.search", storage=url).trials
    assert [t.number for t in study.trials] == [t.number for t in stored] == [0, 1, 2, 3]
