"""The message contract: versioned JSON, validated on receipt, clear reasons for rejects."""

from __future__ import annotations

import json

import pytest

from mloptimizer.broker import attempt_of
from mloptimizer.messages import (
    MessageError,
    ProgressReply,
    QueueNames,
    ResultMessage,
    TrialMessage,
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
        search="ns.s", trial_id=3, number=2, attempt=1, worker_id="w", state="complete", value=0.9
    )
    reply = ProgressReply(trial_id=3, decision="prune")
    for message in (trial(), result, reply):
        assert decode(encode(message)) == message
    assert json.loads(encode(trial()))["version"] == 1


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{oops", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"version": 2, "kind": "trial"}', "unsupported schema version 2"),
        (b'{"kind": "trial"}', "unsupported schema version None"),
        (b'{"version": 1, "kind": "shout"}', "invalid shout"),
        (b'{"version": 1, "kind": "trial", "search": "s"}', "invalid trial: trial.trial_id"),
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
