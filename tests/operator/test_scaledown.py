"""A scale-down takes idle trainers first: busy pods are marked with a deletion cost.

Kubernetes, not the operator, picks which pod a ReplicaSet removes; it removes the pods
with the lowest ``controller.kubernetes.io/pod-deletion-cost`` first. The search's daemon
knows which pod trains which trial (the progress it hears) and marks them before it
lowers ``replicas``. Here: the reporter's decision with a recording Kube, and the marking
against the emulator's pods. The emulator has no ReplicaSet controller, and this machine
no kubelet of its own, so the choice Kubernetes makes from the annotation is not played
here.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import kubernetes
import pytest
from test_daemon import RecordingKube, spec

from mloptimizer.dispatch.contract import EpochProgress
from mloptimizer.operator.builders import trainer_labels
from mloptimizer.operator.daemon import StatusReporter
from mloptimizer.operator.kube import DELETION_COST, ApiKube


def epoch(number: int, done: int, worker: str) -> EpochProgress:
    return EpochProgress(number=number, phase="explore", epoch=done, epochs=10,
                         metrics={}, seconds_per_epoch=1.0, worker_id=worker)  # fmt: skip


def test_before_a_scale_down_the_busy_trainers_are_marked() -> None:
    kube = RecordingKube()
    reporter = StatusReporter(kube, spec(), interval=1.0)
    reporter.scale(3)
    reporter.progressed(epoch(4, 2, "s-trainer-aaaa@node-1"))
    reporter.progressed(epoch(5, 1, "s-trainer-bbbb@node-2"))
    reporter.progressed(epoch(4, 3, "s-trainer-aaaa@node-1"))  # trial 4 went on
    reporter.scale(4)  # up: nothing to protect
    assert kube.marked == []
    finished = SimpleNamespace(number=5, state="complete", interrupted=False)
    reporter.finished(finished, SimpleNamespace(counts=SimpleNamespace(best=None)))  # type: ignore[arg-type]
    reporter.scale(1)
    # marked before the replicas went down (the Deployment still had 4), with its epochs
    assert kube.marked == [({"s-trainer-aaaa": 3}, 4)]
    assert kube.replicas == [3, 4, 1]


def test_a_failed_marking_does_not_stop_the_scale_down() -> None:
    class Refusing(RecordingKube):
        def mark_busy(self, busy: dict[str, int]) -> None:
            raise kubernetes.client.ApiException(status=403, reason="Forbidden")

    kube = Refusing()
    reporter = StatusReporter(kube, spec(), interval=1.0)
    reporter.scale(2)
    reporter.progressed(epoch(1, 1, "s-trainer-aaaa@n"))
    reporter.scale(0)
    assert kube.replicas == [2, 0]


async def test_busy_pods_cost_their_epochs_and_idle_ones_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from k8s import kubernetes_configuration, start_emulator

    def pod(name: str, labels: dict[str, str], cost: str | None = None) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": name, "labels": labels}
        if cost is not None:
            meta["annotations"] = {DELETION_COST: cost}
        return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
                "spec": {"containers": [{"name": "trainer", "image": "t"}]}}  # fmt: skip

    search = {"apiVersion": "mloptimizer.io/v1alpha1", "kind": "ArchitectureSearch",
              "metadata": {"name": "s", "namespace": "default", "uid": "u"}}  # fmt: skip
    async with start_emulator() as emulator:
        monkeypatch.setattr(
            kubernetes.client.Configuration, "_default", kubernetes_configuration(emulator)
        )
        ours = trainer_labels("s")
        emulator.create_object("pods", pod("busy", ours), namespace="default")
        emulator.create_object("pods", pod("idle", ours, cost="7"), namespace="default")  # was busy
        emulator.create_object("pods", pod("other", trainer_labels("t")), namespace="default")
        await asyncio.to_thread(ApiKube(search, "default", "s").mark_busy, {"busy": 4})

        def cost(name: str) -> str | None:
            found = emulator.fetch_object("pods", "default", name)
            assert found is not None
            return (found["metadata"].get("annotations") or {}).get(DELETION_COST)

        assert cost("busy") == "5"  # 1 + epochs done: a trial further on costs more to lose
        assert cost("idle") == "0"
        assert cost("other") is None  # another search's trainer: untouched
