"""A small async client for the four Vast.ai endpoints a GPU pool needs.

Search offers (``POST /api/v0/bundles/``), rent one (``PUT /api/v0/asks/{id}/``), list our
instances (``GET /api/v1/instances/``) and destroy one (``DELETE /api/v0/instances/{id}/``).
Every call has a timeout and is retried on connection errors, 429 and 5xx, honouring
``Retry-After``. The API key goes only into the ``Authorization`` header: it is not in
``repr``, in log lines or in error messages.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from mloptimizer.faults import BUSY_STATUSES

__all__ = [
    "DEFAULT_URL",
    "Instance",
    "Offer",
    "OfferUnavailable",
    "VastClient",
    "VastError",
    "vast_outage",
]

DEFAULT_URL = "https://console.vast.ai"
RETRIED_STATUSES = BUSY_STATUSES

log = logging.getLogger(__name__)


class VastError(Exception):
    """The Vast.ai API refused a call, or stayed unreachable through every retry."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class OfferUnavailable(VastError):
    """The offer was rented by someone else (or withdrawn) before our rent call."""


def vast_outage(error: BaseException) -> str | None:
    """The GPU pool's hook into :func:`mloptimizer.faults.lost_service`: "Vast.ai" when
    ``error`` is its API refusing or unreachable (after the client's own retries) or a
    socket's error, else None. A pool pass that meets one is tried again the next pass."""
    if isinstance(error, VastError | aiohttp.ClientError | OSError):
        return "Vast.ai"
    return None


@dataclass(frozen=True)
class Offer:
    """A machine for rent, as ``/bundles/`` describes it (the fields a pool uses)."""

    id: int
    machine_id: int
    gpu_name: str
    num_gpus: int
    dph_total: float  # USD per hour, all in (GPU, storage, bandwidth estimate)
    reliability: float
    cuda_max_good: float
    verified: bool
    vms_enabled: bool
    min_bid: float

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Offer:
        return cls(
            id=int(data["id"]),
            machine_id=int(data.get("machine_id") or 0),
            gpu_name=str(data.get("gpu_name") or ""),
            num_gpus=int(data.get("num_gpus") or 0),
            dph_total=float(data.get("dph_total") or 0.0),
            reliability=float(data.get("reliability2", data.get("reliability")) or 0.0),
            cuda_max_good=float(data.get("cuda_max_good") or 0.0),
            verified=bool(data.get("verified", False)),
            vms_enabled=bool(data.get("vms_enabled", False)),
            min_bid=float(data.get("min_bid") or 0.0),
        )


@dataclass(frozen=True)
class Instance:
    """One of our rented machines, as ``/instances/`` lists it."""

    id: int
    machine_id: int
    label: str
    actual_status: str  # created, loading, running, exited, offline, stopped, ...
    dph_total: float
    start_date: float | None  # epoch seconds
    status_msg: str = ""
    intended_status: str = ""  # what we asked for: running (a stop we did not ask is not ours)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Instance:
        start = data.get("start_date")
        return cls(
            id=int(data["id"]),
            machine_id=int(data.get("machine_id") or 0),
            label=str(data.get("label") or ""),
            actual_status=str(data.get("actual_status") or "created"),
            dph_total=float(data.get("dph_total") or 0.0),
            start_date=float(start) if start is not None else None,
            status_msg=str(data.get("status_msg") or ""),
            intended_status=str(data.get("intended_status") or ""),
        )


@dataclass
class VastClient:
    """Vast.ai's REST API, with retries. Use as ``async with VastClient(key) as vast:``.

    Args:
        api_key: the account's key, read from the search's Secret.
        url: the API root (a local mock in tests).
        timeout: seconds per HTTP call.
        attempts: calls per request before giving up.
        max_delay: the longest wait between attempts, in seconds (also caps Retry-After).
    """

    api_key: str = field(repr=False)
    url: str = DEFAULT_URL
    timeout: float = 30.0
    attempts: int = 5
    max_delay: float = 30.0
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep, repr=False)
    _session: aiohttp.ClientSession | None = field(default=None, init=False, repr=False)

    async def __aenter__(self) -> VastClient:
        self._session = aiohttp.ClientSession(
            base_url=self.url.rstrip("/") + "/",
            headers={"Authorization": f"Bearer {self.api_key}", "Accept": "application/json"},
            timeout=aiohttp.ClientTimeout(total=self.timeout),
        )
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def search_offers(self, query: dict[str, Any]) -> list[Offer]:
        """Offers matching ``query`` (Vast.ai's filter language), cheapest first."""
        body = {**query, "order": [["dph_total", "asc"]], "type": "on-demand"}
        data = await self._call("POST", "api/v0/bundles/", body)
        return sorted(
            (Offer.from_api(o) for o in data.get("offers") or []), key=lambda o: o.dph_total
        )

    async def rent(self, offer_id: int, request: dict[str, Any]) -> int:
        """Rent offer ``offer_id``; returns the new instance's id.

        Raises:
            OfferUnavailable: the offer is gone (taken by someone else): try the next one.
        """
        try:
            data = await self._call("PUT", f"api/v0/asks/{offer_id}/", request)
        except VastError as error:
            if error.status in (400, 404, 410):
                raise OfferUnavailable(str(error), error.status) from error
            raise
        if not data.get("success") or "new_contract" not in data:
            raise OfferUnavailable(f"offer {offer_id} not rented: {_reason(data)}")
        return int(data["new_contract"])

    async def instances(self) -> list[Instance]:
        """Every instance of the account."""
        data = await self._call("GET", "api/v1/instances/", None)
        return [Instance.from_api(i) for i in data.get("instances") or []]

    async def destroy(self, instance_id: int) -> None:
        """Destroy an instance (billing stops); an instance already gone counts as done."""
        try:
            await self._call("DELETE", f"api/v0/instances/{instance_id}/", None)
        except VastError as error:
            if error.status != 404:
                raise

    async def _call(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        if self._session is None:
            raise RuntimeError("use VastClient as an async context manager")
        delay = 1.0
        status: int | None = None  # of the last answer; None after a connection error
        for attempt in range(1, self.attempts + 1):
            wait: float | None = None
            status = None
            try:
                async with self._session.request(method, path, json=body) as response:
                    if response.status < 400:
                        data = await response.json(content_type=None)
                        return data if isinstance(data, dict) else {"data": data}
                    text = (await response.text())[:300]
                    if response.status not in RETRIED_STATUSES:
                        raise VastError(
                            f"{method} /{path}: HTTP {response.status}: {text}", response.status
                        )
                    wait = _retry_after(response.headers.get("Retry-After"))
                    status = response.status
                    problem = f"HTTP {status}"
            except (aiohttp.ClientConnectionError, TimeoutError) as error:
                problem = f"{type(error).__name__}: {error}"
            if attempt == self.attempts:
                break
            pause = min(self.max_delay, wait if wait is not None else delay * random.uniform(1, 2))
            log.info("vast.ai %s /%s: %s; retry %d in %.1fs", method, path, problem, attempt, pause)
            await self.sleep(pause)
            delay = min(self.max_delay, delay * 2)
        raise VastError(f"{method} /{path}: {problem} after {self.attempts} attempts", status)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (the delta-seconds form Vast.ai sends)."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _reason(data: dict[str, Any]) -> str:
    return str(data.get("msg") or data.get("error") or data)[:300]
