"""One search's trainer identity floods its own search; another search goes on, and the
flooded dispatcher's memory stays bounded (the machine's RabbitMQ, real transports).

The broker refuses any message over its ``max_message_size`` (``scripts/test`` sets it to
twice the contract's MAX_BODY_BYTES, as a production broker should be), so the most the
dispatcher's side ever holds is its prefetch of such messages, on all the queues it consumes
together (the prefetch is per channel).
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pika
import pika.exceptions
import pytest
from dispatch import digits_trial, result_of
from services import SearchIdentity as Search
from services import search_identity

from mloptimizer.amqp import AmqpTransport
from mloptimizer.broker import PERSISTENT, REJECTED_BYTES
from mloptimizer.messages import (
    MAX_BODY_BYTES,
    ResultMessage,
    TrialMessage,
    decode,
    encode,
)

pytestmark = pytest.mark.services

MAX_MESSAGE_SIZE = 2 * MAX_BODY_BYTES  # the broker's bound (scripts/test, the chart)
PREFETCH = 64  # the dispatcher's most (mloptimizer.amqp.prefetch_for)
BODY = 500 * 1024  # under the broker's bound, over the contract's: each one is refused
FLOOD = 640  # messages into progress and results: 312 MiB, ten times what it may hold

# The flooded dispatcher's side: its AMQP transport at full prefetch, refusing what comes
# (as the dispatcher does: into the rejected queue, acked), printing its peak memory.
DISPATCHER = """
import sys
from mloptimizer.amqp import AmqpTransport
from mloptimizer.dispatch.contract import Malformed

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

transport = AmqpTransport(sys.argv[1], sys.argv[2], prefetch=int(sys.argv[3]))
transport.receive(0.1)
print("baseline", kib("VmHWM"), flush=True)
refused = 0
while refused < int(sys.argv[4]):
    for inbound in transport.receive(0.2):
        assert isinstance(inbound.message, Malformed), inbound.message
        inbound.reject(inbound.message.reason)
        refused += 1
print("peak", kib("VmHWM"), "refused", refused, flush=True)
transport.close()
"""


@pytest.fixture
async def searches() -> AsyncIterator[tuple[Search, Search]]:
    """Two searches, each with its identity and queues: the flooded one and its neighbour."""
    async with search_identity("flood") as flooded, search_identity("flood") as neighbour:
        yield flooded, neighbour


@pytest.fixture
def broker_bound() -> None:
    """The broker's own bound, as scripts/test sets it (a no-op there)."""
    subprocess.run(
        [
            "rabbitmqctl",
            "eval",
            f"application:set_env(rabbit, max_message_size, {MAX_MESSAGE_SIZE}).",
        ],
        check=True,
        capture_output=True,
    )


def fake_trainer(search: Search, stop: threading.Event, answered: list[int]) -> None:
    """A trainer of ``search`` in raw pika: each trial taken is answered with its result,
    through the search's inbox exchange (its number appended to ``answered``)."""
    connection = pika.BlockingConnection(pika.URLParameters(search.trainer_url))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=1)
    while not stop.is_set():
        method, _, body = channel.basic_get(search.names.trials)
        if method is None:
            connection.sleep(0.02)
            continue
        trial = decode(body)
        assert isinstance(trial, TrialMessage)
        channel.basic_publish(
            search.names.inbox, search.names.results, encode(result_of(trial)), PERSISTENT
        )
        channel.basic_ack(method.delivery_tag)
        answered.append(trial.trial_id)
    connection.close()


def flood(search: Search, sent: list[float]) -> None:
    """What a rented host's root does with its search's identity: bodies the broker refuses,
    then as many as it takes of the largest it accepts, into both queues it can reach."""
    connection = pika.BlockingConnection(pika.URLParameters(search.trainer_url))
    channel = connection.channel()
    channel.confirm_delivery()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        channel.basic_publish(search.names.inbox, search.names.results, b"x" * (16 << 20))
    assert refused.value.reply_code == 406
    assert f"larger than configured max size {MAX_MESSAGE_SIZE}" in refused.value.reply_text
    channel = connection.channel()
    for i in range(FLOOD):
        queue = search.names.results if i % 2 else search.names.progress
        channel.basic_publish(search.names.inbox, queue, b"x" * BODY)
        sent.append(time.monotonic())
    connection.close()


@pytest.mark.alone(
    "floods the shared broker with 312 MiB and times another search's trials beside it: "
    "a loaded machine's slowness would read as starvation (twice, in CI, a round took 60 s)"
)
@pytest.mark.usefixtures("broker_bound")
async def test_a_flooded_search_holds_the_dispatcher_to_its_prefetch_and_others_go_on(
    searches: tuple[Search, Search], tmp_path: Path
) -> None:
    flooded, neighbour = searches
    script = tmp_path / "dispatcher.py"
    script.write_text(DISPATCHER)
    dispatcher = subprocess.Popen(
        [sys.executable, str(script), flooded.operator_url, flooded.names.search,
         str(PREFETCH), str(FLOOD)],
        cwd=tmp_path, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    stop = threading.Event()
    sent: list[float] = []
    answered: list[int] = []  # the neighbour's trials its trainer answered
    try:
        assert dispatcher.stdout is not None
        baseline = int(dispatcher.stdout.readline().split()[1])
        trainer = threading.Thread(target=fake_trainer, args=(neighbour, stop, answered))
        trainer.start()
        flooding = asyncio.create_task(asyncio.to_thread(flood, flooded, sent))
        # The neighbour's trials go round (trial out, result back) while the flood runs.
        transport = AmqpTransport(neighbour.operator_url, neighbour.names.search)
        rounds: list[float] = []  # seconds each, of those that ended while the flood ran
        while not flooding.done():
            started = time.monotonic()
            number = len(rounds) + 1
            transport.send(digits_trial(neighbour.names.search, number))
            while not (got := [i.message for i in transport.receive(0.05)]):
                # starved, it would never come back; under a loaded CI machine one round
                # once took over 10 s (alone: 0.05 s), so the bound is for starvation only
                assert time.monotonic() - started < 60, (
                    f"the neighbour's trial {number} did not come back: its trainer answered "
                    f"{answered[-3:]} and is {'alive' if trainer.is_alive() else 'dead'}; "
                    f"{len(sent)} of {FLOOD} flood messages sent"
                )
            assert isinstance(got[0], ResultMessage)
            assert got[0].trial_id == number
            rounds.append(time.monotonic() - started)
            await asyncio.sleep(0)
        await flooding
        transport.close()
        out, _ = await asyncio.to_thread(dispatcher.communicate, timeout=60)
    finally:
        stop.set()
        if dispatcher.poll() is None:
            dispatcher.kill()
    words = out.split()
    peak, refused = int(words[1]), int(words[3])
    assert refused == FLOOD
    # What the dispatcher may hold at once (its prefetch, for the channel's consumers
    # together), each held body at most three times over (pika's frames, the joined body,
    # its frames republished to the rejected queue): nothing grows with the flood itself,
    # which is larger than that bound.
    held = PREFETCH * MAX_MESSAGE_SIZE
    bound_kib = baseline + 3 * held // 1024
    assert 3 * held < FLOOD * BODY
    print(
        f"dispatcher VmHWM {baseline} -> {peak} KiB (bound {bound_kib} KiB); neighbour: "
        f"{len(rounds)} trials during the flood, slowest {max(rounds):.2f} s"
    )
    assert peak < bound_kib
    assert len(rounds) >= 5
    assert statistics.median(rounds) < 2  # the flood does not slow the neighbour's trials
    # what the flood left for a person to read is capped by bytes, not only by count
    connection = pika.BlockingConnection(pika.URLParameters(flooded.operator_url))
    kept = connection.channel().queue_declare(flooded.names.rejected, passive=True).method
    connection.close()
    assert kept.message_count * BODY <= REJECTED_BYTES
