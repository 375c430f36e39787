"""A local Vast.ai API: the four endpoints a GPU pool uses, with their request and response
shapes, a state machine per instance (created -> loading -> running) on a controllable
clock, and faults to inject (offer taken, 429/5xx, instance exited or offline, a machine
that never boots).

It serves on 127.0.0.1 from its own thread, so sync code, the test's event loop and a kopf
operator thread can all call it::

    with VastMock() as vast:
        vast.add_offer(machine_id=7, dph_total=0.3)
        ... VastClient("test-key", url=vast.url) ...
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp.web

API_KEY = "test-key"


@dataclass
class Fault:
    """Answer the next call of ``method`` to a path starting with ``path`` with ``status``."""

    method: str
    path: str
    status: int
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class VastMock:
    """The mock server and its state (read it from tests; it is guarded by ``lock``)."""

    api_key: str = API_KEY
    clock: Callable[[], float] = time.time
    create_seconds: float = 1.0  # created -> loading
    boot_seconds: float = 3.0  # created -> running
    on_running: Callable[[dict[str, Any]], None] | None = None  # e.g. "join" as a Node
    offers: dict[int, dict[str, Any]] = field(default_factory=dict)
    instances: dict[int, dict[str, Any]] = field(default_factory=dict)
    destroyed: dict[int, dict[str, Any]] = field(default_factory=dict)
    taken: set[int] = field(default_factory=set)  # offers someone else rents first
    never_boot: set[int] = field(default_factory=set)  # machine_ids that stay loading
    faults: deque[Fault] = field(default_factory=deque)
    calls: list[tuple[str, str, Any]] = field(default_factory=list)
    rejected_auth: int = 0
    preempt_rate_per_hour: float = 0.0  # chance an interruptible instance is taken back
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    lock: threading.Lock = field(default_factory=threading.Lock)
    _answered: threading.Condition = field(default_factory=threading.Condition)
    url: str = ""
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1000))
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _runner: aiohttp.web.AppRunner | None = None

    # --- set-up ---------------------------------------------------------------------

    def add_offer(self, machine_id: int, dph_total: float = 0.3, **fields: Any) -> int:
        """Put an offer in the book (Vast.ai's field names); returns its id."""
        offer_id = next(self._ids)
        offer = {
            "id": offer_id,
            "ask_contract_id": offer_id,
            "machine_id": machine_id,
            "gpu_name": "RTX 4090",
            "num_gpus": 1,
            "dph_total": dph_total,
            "dph_base": round(dph_total * 0.9, 6),
            "min_bid": round(dph_total * 0.5, 6),
            "reliability2": 0.995,
            "reliability": 0.995,
            "cuda_max_good": 12.4,
            "disk_space": 200.0,
            "verified": True,
            "vms_enabled": True,
            "rentable": True,
            "rented": False,
            "geolocation": "Sweden, SE",
            "inet_down": 900.0,
            "gpu_ram": 24564,
        }
        offer.update(fields)
        with self.lock:
            self.offers[offer_id] = offer
        return offer_id

    def set_status(self, instance_id: int, status: str) -> None:
        """Force an instance's ``actual_status`` (exited, offline, ...)."""
        with self.lock:
            self.instances[instance_id]["actual_status"] = status
            self.instances[instance_id]["forced"] = True

    def preempt(self, instance_id: int) -> None:
        """Take an interruptible instance back, as an outbidding renter does."""
        with self.lock:
            self._stop(self.instances[instance_id])

    @staticmethod
    def _stop(instance: dict[str, Any]) -> None:
        instance.update(actual_status="stopped", cur_state="stopped", forced=True,
                        status_msg="stopped: outbid")  # fmt: skip

    def live(self) -> list[dict[str, Any]]:
        """Instances not destroyed, after advancing their state to the clock."""
        with self.lock:
            self._advance()
            return [dict(i) for i in self.instances.values()]

    # --- running ----------------------------------------------------------------------

    def __enter__(self) -> VastMock:
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = aiohttp.web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = aiohttp.web.AppRunner(app)
            loop.run_until_complete(self._runner.setup())
            site = aiohttp.web.TCPSite(self._runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.url = f"http://127.0.0.1:{port}"
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name="vast-mock", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    # --- the API ------------------------------------------------------------------------

    async def wait_until(self, condition: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Await until ``condition()`` is truthy, checking after every call the mock answers."""
        return await asyncio.to_thread(self._wait_until, condition, timeout)

    def _wait_until(self, condition: Callable[[], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        with self._answered:
            while not (result := condition()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"condition not met within {timeout}s: {condition!r}")
                self._answered.wait(remaining)
            return result

    async def _handle(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        try:
            return await self._answer(request)
        finally:
            with self._answered:
                self._answered.notify_all()

    async def _answer(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        body = await request.json() if request.can_read_body else None
        path = request.path
        with self.lock:
            self.calls.append((request.method, path, body))
            if request.headers.get("Authorization") != f"Bearer {self.api_key}":
                self.rejected_auth += 1
                return _json(401, {"success": False, "error": "not_authorized"})
            for fault in list(self.faults):
                if fault.method == request.method and path.startswith(fault.path):
                    self.faults.remove(fault)
                    return _json(fault.status, {"success": False}, fault.headers)
            self._advance()
            return self._route(request.method, path, body)

    def _route(self, method: str, path: str, body: Any) -> aiohttp.web.Response:
        parts = [p for p in path.split("/") if p]
        if method == "POST" and path == "/api/v0/bundles/":
            offers = [o for o in self.offers.values() if _matches(o, body or {})]
            offers.sort(key=lambda o: o["dph_total"])
            return _json(200, {"offers": offers})
        if method == "PUT" and parts[:3] == ["api", "v0", "asks"] and len(parts) == 4:
            return self._rent(int(parts[3]), body or {})
        if method == "GET" and path == "/api/v1/instances/":
            return _json(200, {"instances": [self._public(i) for i in self.instances.values()]})
        if method == "DELETE" and parts[:3] == ["api", "v0", "instances"] and len(parts) == 4:
            instance = self.instances.pop(int(parts[3]), None)
            if instance is None:
                return _json(404, {"success": False, "error": "no_such_instance"})
            instance["destroyed_at"] = self.clock()
            self.destroyed[instance["id"]] = instance
            return _json(200, {"success": True})
        return _json(404, {"success": False, "error": "not_found", "msg": path})

    def _rent(self, offer_id: int, body: dict[str, Any]) -> aiohttp.web.Response:
        offer = self.offers.get(offer_id)
        if offer is None or offer_id in self.taken:
            self.offers.pop(offer_id, None)
            return _json(
                400,
                {"success": False, "error": "no_such_ask", "msg": f"Instance {offer_id} "
                 "is not available."},
            )  # fmt: skip
        if "image" not in body:
            return _json(400, {"success": False, "error": "invalid_args", "msg": "image"})
        del self.offers[offer_id]
        instance_id = next(self._ids)
        price = float(body.get("price") or offer["dph_total"])
        self.instances[instance_id] = {
            "id": instance_id,
            "machine_id": offer["machine_id"],
            "label": body.get("label"),
            "actual_status": None,
            "intended_status": "running",
            "cur_state": "running",
            "dph_total": price,
            "gpu_name": offer["gpu_name"],
            "num_gpus": offer["num_gpus"],
            "start_date": self.clock(),
            "image_uuid": body["image"],
            "status_msg": "",
            "is_bid": "price" in body,
            "request": body,
            "joined": False,
            "checked_at": self.clock(),
        }
        return _json(200, {"success": True, "new_contract": instance_id})

    def _advance(self) -> None:
        now = self.clock()
        for instance in self.instances.values():
            if instance.get("forced"):
                continue
            since, instance["checked_at"] = instance["checked_at"], now
            if instance["is_bid"] and instance["actual_status"] == "running":
                taken = 1 - math.exp(-self.preempt_rate_per_hour * max(0.0, now - since) / 3600)
                if self.rng.random() < taken:
                    self._stop(instance)
                    continue
            age = now - instance["start_date"]
            status = instance["actual_status"]
            if status is None and age >= self.create_seconds:
                instance["actual_status"] = status = "loading"
            elif status is None:
                instance["actual_status"] = status = "created"
            if (
                status in ("created", "loading")
                and age >= self.boot_seconds
                and instance["machine_id"] not in self.never_boot
            ):
                instance["actual_status"] = "running"
                if self.on_running is not None and not instance["joined"]:
                    instance["joined"] = True
                    self.on_running(dict(instance))

    @staticmethod
    def _public(instance: dict[str, Any]) -> dict[str, Any]:
        hidden = ("request", "joined", "forced", "checked_at")
        return {k: v for k, v in instance.items() if k not in hidden}


def _matches(offer: dict[str, Any], query: dict[str, Any]) -> bool:
    """Whether an offer passes a ``/bundles/`` query (``{"field": {"op": value}}``)."""
    for name, condition in query.items():
        if name in ("order", "type", "limit") or not isinstance(condition, dict):
            continue
        value = offer.get(name)
        for op, expected in condition.items():
            if op in ("eq", "neq", "in"):
                ok = {"eq": value == expected, "neq": value != expected}.get(op)
                ok = value in expected if op == "in" else ok
            else:
                ok = value is not None and _ORDER[op](value, expected)
            if not ok:
                return False
    return True


_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "lte": lambda a, b: a <= b,
    "lt": lambda a, b: a < b,
    "gte": lambda a, b: a >= b,
    "gt": lambda a, b: a > b,
}


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> aiohttp.web.Response:
    return aiohttp.web.Response(
        status=status, text=json.dumps(payload), content_type="application/json", headers=headers
    )
