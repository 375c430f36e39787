"""The message contract: versioned JSON, validated on receipt, clear reasons for rejects."""

from __future__ import annotations

import json
from typing import Any, get_args

import pytest

from mloptimizer.broker import attempt_of
from mloptimizer.messages import (
    ROUTES,
    Kind,
    Message,
    MessageError,
    ProgressReply,
    QueueNames,
    Receiver,
    Refuse,
    ResultMessage,
    TrialMessage,
    arriving,
    decode,
    encode,
)
from mloptimizer.space import Architecture
from mloptimizer.spec import Dataset

ARCH = Architecture(family="cnn", conv_blocks=(), classifier="gap", dropout=0.1, learning_rate=0.01)


def trial() -> TrialMessage:
    return TrialMessage(
        search="ns.s",
        trial_id=3,
        number=2,
        architecture=ARCH,
        dataset=Dataset(builtin="digits"),
        epochs=2,
        batch_size=32,
        seed=1,
    )


def test_round_trip_of_every_kind() -> None:
    result = ResultMessage(
        search="ns.s",
        trial_id=3,
        number=2,
        attempt=1,
        worker_id="w",
        state="complete",
        value=0.9,
        token=trial().token,
    )
    reply = ProgressReply(trial_id=3, decision="prune")
    for message in (trial(), result, reply):
        assert decode(encode(message)) == message
    assert json.loads(encode(trial()))["version"] == 3


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{oops", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"version": 4, "kind": "trial"}', "unsupported schema version 4"),
        (b'{"version": 2, "kind": "trial"}', "unsupported schema version 2"),
        (b'{"version": 1, "kind": "trial"}', "unsupported schema version 1"),
        (b'{"kind": "trial"}', "unsupported schema version None"),
        (b'{"version": 3, "kind": "shout"}', "invalid shout"),
        (b'{"version": 3, "kind": "trial", "search": "s"}', "invalid trial: trial.trial_id"),
    ],
)
def test_rejects_name_the_reason(body: bytes, reason: str) -> None:
    with pytest.raises(MessageError) as caught:
        decode(body)
    assert caught.value.reason.startswith(reason), caught.value.reason


def test_pickle_is_refused() -> None:
    import pickle

    with pytest.raises(MessageError, match="not JSON"):
        decode(pickle.dumps({"version": 1}))


def test_extra_fields_are_refused() -> None:
    data = json.loads(encode(trial())) | {"shell": "rm -rf /"}
    with pytest.raises(MessageError, match="shell"):
        decode(json.dumps(data).encode())


def test_queue_names_are_per_search_and_safe() -> None:
    names = QueueNames("team-a.cifar/10 run")
    assert names.trials == "mlopt.team-a.cifar-10-run.trials"
    assert len({names.trials, names.progress, names.results, names.dead_letters}) == 4
    assert QueueNames("b.x").trials != names.trials


def test_attempt_from_delivery_count() -> None:
    assert attempt_of(None) == 1
    assert attempt_of({"x-delivery-count": 2}) == 3


def _result_body(**fields: object) -> bytes:
    base: dict[str, object] = {
        "version": 3,
        "kind": "result",
        "search": "ns.s",
        "trial_id": 3,
        "number": 2,
        "attempt": 1,
        "worker_id": "w",
        "state": "complete",
        "value": 0.9,
        "token": "t" * 24,
    }
    return json.dumps({**base, **fields}).encode()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (_result_body(history=[{"loss": 0.1}] * 1_500_000), "body of "),
        (b"{" + b" " * (300 * 1024) + b"}", "body of "),
        (_result_body(value=0.9).replace(b"0.9", b"Infinity"), "invalid result: result.value"),
        (_result_body(value=0.9).replace(b"0.9", b"NaN"), "invalid result: result.value"),
        (_result_body(value=0.9).replace(b"0.9", b"1e999"), "invalid result: result.value"),
        (b'{"version": 1, "n": ' + b"9" * 5000 + b"}", "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON: maximum recursion depth"),
        (_result_body(epochs_run=2**40), "invalid result: result.epochs_run"),
        (_result_body(trial_id=2**31), "invalid result: result.trial_id"),
        (_result_body(history=[{}] * 10_001), "invalid result: result.history"),
        (_result_body(error="x" * 5000), "invalid result: result.error"),
        (_result_body(worker_id=""), "invalid result: result.worker_id"),
        (_result_body(value="0.9x"), "invalid result: result.value"),
        (_result_body(history=[{"a": 1.0, "b": float("inf")}]), "invalid result: result.history"),
        # values out of their range (issue 24): a best of 1e300, an accuracy of 1.5, ...
        (_result_body(value=1e300), "invalid result: result.value"),
        (_result_body(val_accuracy=1.5), "invalid result: result.val_accuracy"),
        (_result_body(val_loss=-1.0), "invalid result: result.val_loss"),
        (_result_body(model_kb=-5.0), "invalid result: result.model_kb"),
        (_result_body(mflops=1e300), "invalid result: result.mflops"),
        (_result_body(images_per_second=-1.0), "invalid result: result.images_per_second"),
        (_result_body(history=[{"val_accuracy": 2.0}]), "invalid result: result.history"),
        (_result_body(history=[{"loss": -0.5}]), "invalid result: result.history"),
        (_result_body(history=[{"bad\nkey": 0.5}]), "invalid result: result.history"),
        (_result_body(worker_id="w\n2026 forged log line"), "invalid result: result.worker_id"),
        # no capability token, or one that is not a token
        (_result_body(token=None), "invalid result: result.token"),
        (_result_body(token="short"), "invalid result: result.token"),
    ],
)
def test_oversized_unbounded_and_non_finite_messages_are_refused(body: bytes, reason: str) -> None:
    with pytest.raises(MessageError) as caught:
        decode(body)
    assert caught.value.reason.startswith(reason), caught.value.reason


def test_an_oversized_body_is_refused_before_it_is_parsed() -> None:
    import tracemalloc

    body = _result_body(history=[{"loss": 0.1, "val_accuracy": 0.5}] * 1_500_000)
    assert len(body) > 16 * 2**20
    tracemalloc.start()
    with pytest.raises(MessageError):
        decode(body)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2**20  # parsing it would take hundreds of MiB


def test_progress_epoch_is_bounded_below_the_databases_32_bit_step() -> None:
    body = json.dumps(
        {
            "version": 3,
            "kind": "progress",
            "search": "ns.s",
            "trial_id": 3,
            "number": 2,
            "attempt": 1,
            "worker_id": "w",
            "epoch": 2**31,
            "metrics": {"val_accuracy": 0.5},
            "token": "t" * 24,
        }
    ).encode()
    with pytest.raises(MessageError, match="epoch"):
        decode(body)


def test_trainers_send_only_finite_numbers() -> None:
    from mloptimizer.messages import finite, finite_metrics

    assert finite(float("nan")) is None
    assert finite(float("inf")) is None
    assert finite(0.5) == 0.5
    assert finite_metrics({"loss": float("nan"), "val_accuracy": 0.5}) == {"val_accuracy": 0.5}
    # a diverging loss above the bound, or an accuracy out of [0, 1], is left out (the
    # receiver would refuse the whole message for it)
    assert finite(1e300) is None
    assert finite_metrics({"loss": 1e31, "accuracy": 1.2, "val_loss": 0.3}) == {"val_loss": 0.3}


def test_text_a_trainer_chooses_reaches_no_log_line_or_condition_raw() -> None:
    body = _result_body(state="failed", value=None, error="oom\n2026-12-06 ERROR forged\x1b[31m")
    message = decode(body)
    assert isinstance(message, ResultMessage)
    assert message.error == "oom 2026-12-06 ERROR forged [31m"


def test_routes_declare_every_message_once_under_its_kind() -> None:
    union = get_args(get_args(Message)[0])  # Annotated[Union[...], discriminator]
    assert {route.model for route in ROUTES.values()} == set(union)
    for kind, route in ROUTES.items():
        assert route.model.model_fields["kind"].default == kind
        assert route.sender != route.reader, kind
    assert set(ROUTES) == set(get_args(Kind))


def test_what_arrives_where() -> None:
    assert arriving(("trials",)) == {"trial", "deliver"}
    assert arriving(("dead",)) == arriving(("trials",))  # what the trials queue gave up on
    assert arriving(("progress", "results")) == {"progress", "result", "delivered"}
    assert arriving(("reply_to",)) == {"progress-reply"}


def receivers() -> dict[str, Receiver[Any]]:
    """Every receiver of the contract, by where it lives."""
    from mloptimizer.dispatch.loop import RECEIVER as dispatcher
    from mloptimizer.local import _RECEIVER as local_transport
    from mloptimizer.operator.delivery import RECEIVER as final_job
    from mloptimizer.trainer.local import RECEIVER as local_trainer
    from mloptimizer.trainer.worker import RECEIVER as trainer

    return {
        "dispatch/loop.py (and amqp.py's transport)": dispatcher,
        "local.py": local_transport,
        "operator/delivery.py": final_job,
        "trainer/worker.py": trainer,
        "trainer/local.py": local_trainer,
    }


def test_every_receiver_answers_each_kind_that_can_arrive_where_it_reads() -> None:
    for where, receiver in receivers().items():
        assert arriving(receiver.reads) <= set(receiver.handlers), where


def test_every_message_type_has_a_handler_at_its_reader() -> None:
    for kind, route in ROUTES.items():
        handlers = [
            r.handlers.get(kind)
            for r in receivers().values()
            if r.party == route.reader and kind in arriving(r.reads)
        ]
        assert any(h is not None and not isinstance(h, Refuse) for h in handlers), kind


def test_a_receiver_lacking_a_kind_fails_when_built() -> None:
    with pytest.raises(TypeError, match="no handler or refusal for deliver"):
        Receiver(party="trainer", reads=("trials",), handlers={"trial": print})


def test_a_kind_on_a_queue_it_does_not_travel_on_is_refused_whatever_the_table() -> None:
    from mloptimizer.dispatch.loop import RECEIVER as dispatcher

    on_results = dispatcher.route(trial(), "results")
    assert isinstance(on_results, Refuse)
    assert on_results.reason == "a trial message does not travel on results"
    assert not isinstance(dispatcher.route(trial(), "dead"), Refuse)  # given up on: failed
