"""The NetworkPolicy of one search's trainer pods, built as a pure function.

Trainers run the search author's image on a rented or shared node: nothing reaches them,
and they reach DNS (the cluster's resolver in ``kube-system``) and the broker only; plus,
when the search delivers to S3, the object store on its port. Never the cloud metadata
address (169.254.169.254, with the node's credentials), never the API server, never the
rest of the cluster. The operator creates one per search, owned by it, in the search's
namespace, whichever namespaces it watches.

Where the broker or the object store is reached by name (a Service, a DNS name), a policy
cannot say so: the admin's rules say it (the chart's ``networkPolicy.trainerEgress`` and
``networkPolicy.objectStorageEgress``, passed as ``MLOPT_TRAINER_EGRESS`` and
``MLOPT_OBJECT_STORE_EGRESS``). An address given as an IP literal becomes a rule here.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Sequence
from typing import Any

from mloptimizer.operator.builders import label_value, network_policy_name
from mloptimizer.spec import ArchitectureSearchSpec

__all__ = [
    "DNS_RULE",
    "NEVER",
    "address_rules",
    "build_trainer_policy",
    "egress_admits",
    "trainer_selector",
]

# The cluster's resolver: kube-dns / CoreDNS pods in kube-system.
DNS_RULE: dict[str, Any] = {
    "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}],
    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
}

# Never opened by a derived rule: private ranges (the cluster, its API server), carrier-grade
# NAT, loopback and link-local (169.254.169.254, the cloud metadata address).
NEVER = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
)
_NEVER = tuple(ipaddress.ip_network(n) for n in NEVER)

_PORTS = {"amqp": 5672, "amqps": 5671, "http": 80, "https": 443}


def trainer_selector(search: str) -> dict[str, str]:
    """Labels that pick the search's trainer pods (a subset of their labels)."""
    return {
        "app.kubernetes.io/name": "mloptimizer-trainer",
        "mloptimizer.io/search": label_value(search),
    }


def address_rules(url: str, *, public_by_name: bool) -> list[dict[str, Any]]:
    """Egress to the host and port of ``url``.

    An IP literal outside :data:`NEVER` gets its own ``/32`` (or ``/128``); a private or
    link-local literal gets nothing (the admin's rules must open it). A host name gets the
    public internet on that port when ``public_by_name`` (no private range, no metadata
    address), else nothing.
    """
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or _PORTS.get(parts.scheme, 443)
    except ValueError:
        return []
    host = parts.hostname or ""
    ports = [{"protocol": "TCP", "port": port}]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if not public_by_name or not host:
            return []
        return [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": list(NEVER)}}], "ports": ports}]
    if any(address in network for network in _NEVER if network.version == address.version):
        return []
    if address.is_loopback or address.is_link_local or address.is_private:
        return []
    bits = 32 if address.version == 4 else 128
    return [{"to": [{"ipBlock": {"cidr": f"{address}/{bits}"}}], "ports": ports}]


def build_trainer_policy(
    search: str,
    spec: ArchitectureSearchSpec,
    *,
    broker_url: str | None = None,
    trainer_egress: Sequence[dict[str, Any]] = (),
    object_store_egress: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The NetworkPolicy of search ``search``'s trainers (to be adopted by the search).

    Args:
        search: ``metadata.name`` of the ArchitectureSearch.
        spec: its parsed spec (``output.s3`` opens the object store).
        broker_url: the URL its trainers log in with (the host part is all that is used).
        trainer_egress: the admin's rules for every trainer (the broker by name, ...).
        object_store_egress: the admin's rules to the object store, for S3 searches.
    """
    egress: list[dict[str, Any]] = [DNS_RULE]
    if broker_url:
        egress += address_rules(broker_url, public_by_name=False)
    egress += [dict(rule) for rule in trainer_egress]
    store = spec.output.s3
    if store is not None:
        if object_store_egress:
            egress += [dict(rule) for rule in object_store_egress]
        else:
            egress += address_rules(store.endpoint, public_by_name=True)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": network_policy_name(search),
            "labels": {
                "app.kubernetes.io/managed-by": "mloptimizer",
                "mloptimizer.io/search": label_value(search),
            },
        },
        "spec": {
            "podSelector": {"matchLabels": trainer_selector(search)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": egress,
        },
    }


def egress_admits(policy: dict[str, Any], address: str, port: int) -> bool:
    """Whether a NetworkPolicy's egress rules let its pods reach ``address:port``, an
    address outside the cluster's pods (pod and namespace selectors never match it): the
    check the tests make of every rendered trainer policy."""
    spec = policy["spec"]
    if "Egress" not in spec.get("policyTypes", []):
        return True
    ip = ipaddress.ip_address(address)
    for rule in spec.get("egress") or []:
        ports = rule.get("ports")
        if ports and not any(p.get("port") in (None, port) for p in ports):
            continue
        peers = rule.get("to")
        if not peers:
            return True
        for peer in peers:
            block = peer.get("ipBlock")
            if block is None:
                continue
            if ip in ipaddress.ip_network(block["cidr"]) and not any(
                ip in ipaddress.ip_network(cut) for cut in block.get("except") or []
            ):
                return True
    return False
