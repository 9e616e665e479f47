"""The node agent's CNI handler decides, for every pod the runtime makes, what ADD answers (agent/cni.py):
a table over a real mesh config and store. The kernel side (capture, bridge ports) is in
tests/kernel/test_cni_lab.py; here capture is ``none``, so only identification is at stake."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from agent.capture import Capture, NullCapture
from agent.cni import Attachments, CniEnrollment, PodAttachment
from cni.protocol import PodEvent
from cni.spec import Interface, IPConfig, PodRef
from mesh.config import parse_config
from mesh.store import WorkloadStore

CONFIG = """\
apiVersion: ztagent.io/v1alpha1
kind: MeshConfig
trustDomain: cluster.local
nodes:
  - {name: node-a, address: 10.250.0.1, podCIDR: 10.244.1.0/24}
  - {name: node-b, address: 10.250.0.2, podCIDR: 10.244.2.0/24}
workloads:
  - {name: sleep, namespace: frontend, serviceAccount: sleep, node: node-a, ips: [10.244.1.2]}
  - {name: legacy, namespace: frontend, node: node-a, ips: [10.244.1.3], enrolled: false}
  - {name: httpbin, namespace: backend, node: node-b, ips: [10.244.2.2]}
"""


@dataclass
class FakeAgent:
    """The parts of NodeAgent the handler reads: a real store, no certificates needed for these rows."""

    store: WorkloadStore
    node_name: str = "node-a"
    capture: Capture = field(default_factory=NullCapture)

    @property
    def cert_manager(self) -> object:
        raise AssertionError("identification rows never reach the certificate step")


def event(ns: str | None, name: str | None, ip: str = "10.244.1.2", op: str = "ADD") -> PodEvent:
    ifaces = (Interface("veth0"), Interface("eth0", sandbox="/run/netns/none"))
    return PodEvent(op, "c0ffee", "eth0", "/run/netns/none", "k8s-pod-network", "1.0.0",  # type: ignore[arg-type]
                    PodRef(ns, name, "uid"), ifaces, (IPConfig(f"{ip}/24", "10.244.1.1", 1),))


@pytest.fixture
def handler() -> CniEnrollment:
    h = CniEnrollment(FakeAgent(WorkloadStore(parse_config(CONFIG), "node-a")), state_path=None)  # type: ignore[arg-type]
    h.reconciled = True
    return h


@pytest.mark.parametrize(("ev", "status", "retry", "words"), [
    (event(None, None), "error", False, "cannot identify"),
    (event("frontend", None), "error", False, "K8S_POD_NAME"),
    (event("frontend", "ghost"), "error", True, "not in the mesh config"),
    (event("backend", "httpbin", "10.244.2.2"), "error", True, "places it on node node-b"),
    (event("frontend", "sleep", "10.244.1.9"), "error", True, "the mesh config says ['10.244.1.2']"),
    (event("frontend", "legacy", "10.244.1.3"), "not-enrolled", False, "not enrolled"),
])
def test_what_add_answers_for_a_pod_it_cannot_capture(
    handler: CniEnrollment, ev: PodEvent, status: str, retry: bool, words: str
) -> None:
    res = asyncio.run(handler.add(ev))
    assert (res.status, res.retry) == (status, retry), res
    assert words in res.reason


def test_add_before_reconciliation_is_retried(handler: CniEnrollment) -> None:
    handler.reconciled = False
    res = asyncio.run(handler.add(event("frontend", "legacy", "10.244.1.3")))
    assert (res.status, res.retry) == ("error", True) and "reconciling" in res.reason


def test_del_is_idempotent_and_check_reports_an_unknown_attachment(handler: CniEnrollment) -> None:
    assert asyncio.run(handler.del_(event("frontend", "sleep", op="DEL"))).status == "not-enrolled"
    assert asyncio.run(handler.del_(event("frontend", "sleep", op="DEL"))).status == "not-enrolled"
    res = asyncio.run(handler.check(event("frontend", "sleep", op="CHECK")))
    assert res.status == "error" and "not in capture" in res.reason
    legacy = event("frontend", "legacy", "10.244.1.3", op="CHECK")
    assert asyncio.run(handler.check(legacy)).status == "not-enrolled"


def test_attachments_survive_a_restart_and_bad_state_is_dropped(tmp_path: object) -> None:
    path = f"{tmp_path}/attachments.json"
    a = Attachments(path)
    att = PodAttachment("c1", "eth0", "/run/netns/p", "frontend/sleep", "veth1", ("10.244.1.2",), "cni0")
    a.put(att)
    b = Attachments(path)
    b.load()
    assert b.by_key == {("c1", "eth0"): att} and b.for_workload("frontend/sleep") == att
    with open(path, "w") as f:
        f.write("{not json")
    c = Attachments(path)
    c.load()  # logged, starts empty: reconciliation finds the pods by their namespaces
    assert c.by_key == {}


def test_a_workload_the_source_has_no_address_for_yet_is_taken_at_the_runtimes_address() -> None:
    """A Kubernetes source learns a pod's IP only after this ADD (kubelet reports it): identification
    accepts the runtime's address and goes on to the pod's interface (absent here: a retry)."""
    import dataclasses

    cfg = parse_config(CONFIG)
    cfg = dataclasses.replace(cfg, workloads=tuple(
        dataclasses.replace(w, ips=()) if w.name == "sleep" else w for w in cfg.workloads))
    h = CniEnrollment(FakeAgent(WorkloadStore(cfg, "node-a")), state_path=None)  # type: ignore[arg-type]
    h.reconciled = True
    res = asyncio.run(h.add(event("frontend", "sleep", "10.244.1.9")))
    assert (res.status, res.retry) == ("error", True) and "no veth into" in res.reason, res
    res = asyncio.run(h.add(PodEvent("ADD", "c1", "eth0", "/run/netns/none", "n", "1.0.0",
                                     PodRef("frontend", "sleep"), (), ())))
    assert res.status == "error" and "no IPv4 address" in res.reason
