"""The Vast.ai client against the local mock: shapes, retries, and the key kept secret."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from vastmock import API_KEY, Fault, VastMock

from mloptimizer.operator.vastai import OfferUnavailable, VastClient, VastError


@pytest.fixture
def vast() -> Iterator[VastMock]:
    with VastMock() as mock:
        yield mock


class Sleeps:
    """Records the client's waits instead of sleeping them."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


async def test_search_rent_list_destroy(vast: VastMock) -> None:
    cheap = vast.add_offer(machine_id=1, dph_total=0.25)
    vast.add_offer(machine_id=2, dph_total=0.20, gpu_name="RTX 3090")
    vast.add_offer(machine_id=3, dph_total=0.60)
    async with VastClient(API_KEY, url=vast.url) as client:
        offers = await client.search_offers(
            {"gpu_name": {"eq": "RTX 4090"}, "dph_total": {"lte": 0.5}}
        )
        assert [o.id for o in offers] == [cheap]
        assert offers[0].machine_id == 1
        assert offers[0].reliability == pytest.approx(0.995)
        instance_id = await client.rent(cheap, {"image": "img", "label": "mlopt:u:x"})
        [instance] = await client.instances()
        assert (instance.id, instance.label, instance.dph_total) == (instance_id, "mlopt:u:x", 0.25)
        assert instance.actual_status == "created"
        await client.destroy(instance_id)
        assert await client.instances() == []
        await client.destroy(instance_id)  # already gone: done, not an error


async def test_a_taken_offer_is_offer_unavailable(vast: VastMock) -> None:
    offer = vast.add_offer(machine_id=1)
    vast.taken.add(offer)
    async with VastClient(API_KEY, url=vast.url) as client:
        with pytest.raises(OfferUnavailable, match="not available"):
            await client.rent(offer, {"image": "img"})


async def test_429_and_5xx_are_retried_honouring_retry_after(vast: VastMock) -> None:
    vast.faults.extend(
        [
            Fault("GET", "/api/v1/instances/", 429, {"Retry-After": "7"}),
            Fault("GET", "/api/v1/instances/", 503),
        ]
    )
    sleeps = Sleeps()
    async with VastClient(API_KEY, url=vast.url, sleep=sleeps) as client:
        assert await client.instances() == []
    assert sleeps.waits[0] == 7.0
    assert len(sleeps.waits) == 2
    assert 2.0 <= sleeps.waits[1] <= 4.0
    assert [c[0] for c in vast.calls] == ["GET", "GET", "GET"]


async def test_retries_end_with_a_clear_error(vast: VastMock) -> None:
    vast.faults.extend(Fault("POST", "/api/v0/bundles/", 502) for _ in range(3))
    async with VastClient(API_KEY, url=vast.url, attempts=3, sleep=Sleeps()) as client:
        with pytest.raises(VastError, match=r"POST /api/v0/bundles/: HTTP 502 after 3 attempts"):
            await client.search_offers({})


async def test_an_unreachable_api_is_retried_then_reported() -> None:
    sleeps = Sleeps()
    async with VastClient(
        API_KEY, url="http://127.0.0.1:9", attempts=2, timeout=2, sleep=sleeps
    ) as client:
        with pytest.raises(VastError, match="after 2 attempts"):
            await client.instances()
    assert len(sleeps.waits) == 1


async def test_the_key_is_never_shown(vast: VastMock, caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cr3t-key-0123456789"
    caplog.set_level(logging.DEBUG)
    vast.faults.append(Fault("GET", "/api/v1/instances/", 429, {"Retry-After": "0"}))
    client = VastClient(secret, url=vast.url, sleep=Sleeps())
    assert secret not in repr(client)
    async with client:
        with pytest.raises(VastError) as refused:
            await client.instances()  # a wrong key: 401, not retried
    assert refused.value.status == 401
    assert secret not in str(refused.value)
    assert secret not in caplog.text
    assert vast.rejected_auth == 1
