"""lab/kubelet.py against the stand-in API server: the lab's MeshConfig written as a kubelet and
an operator would write it, read back by the Kubernetes source as the same mesh."""

from __future__ import annotations

import asyncio
import pathlib

import pytest

from lab.kubelet import DATAPLANE_MODE, LabKubelet, cluster_objects
from mesh.model import Snapshot
from sources.file import load_config
from sources.kubernetes import KubernetesConfigSource
from tests.kubeapi import running

pytestmark = pytest.mark.timeout(90)
LAB = pathlib.Path(__file__).resolve().parents[2] / "examples" / "lab.yaml"


def _mesh(cfg: Snapshot) -> dict[str, object]:
    workloads = {
        w.key: (w.service_account, w.node, w.ips, w.enrolled, str(w.spiffe_id),
                {k: v for k, v in w.labels.items() if k != DATAPLANE_MODE})
        for w in cfg.workloads
    }  # fmt: skip
    return {
        "nodes": {n.name: n.address for n in cfg.nodes},
        "workloads": workloads,
        # default/kubernetes: the API server's own Service, in every cluster
        "services": {
            s.key: (s.vips, s.ports, dict(s.selector)) for s in cfg.services if s.key != "default/kubernetes"
        },
        "policies": {p.key: p.raw["spec"] for p in cfg.policies},
    }


async def test_lab_registered_as_a_kubelet_reads_back_as_the_same_mesh(tmp_path: pathlib.Path) -> None:
    cfg = load_config(LAB)
    kinds = [o["kind"] for o in cluster_objects(cfg)]
    assert kinds.count("Node") == len(cfg.nodes) and kinds.count("Pod") == len(cfg.nodes) + len(cfg.workloads)
    async with running(tmp_path) as api:
        kubelet = LabKubelet(api.kubeconfig)
        try:
            await asyncio.to_thread(kubelet.register, cfg)
            await asyncio.to_thread(kubelet.register, cfg)  # again: idempotent
            node = api.server._get(api.server.res("v1", "Node"), None, "node-a")
            assert node["status"]["addresses"][0] == {"type": "InternalIP", "address": "10.250.0.1"}
            src = KubernetesConfigSource(api.kubeconfig, trust_domain=str(cfg.trust_domain))
            try:
                snap = await src.initial()
            finally:
                await src.close()
            assert _mesh(snap) == _mesh(cfg)
            assert not src.skipped
            await asyncio.to_thread(kubelet.unregister, cfg)
            assert api.server.store.count(api.server.res("v1", "Pod")) == 0
        finally:
            kubelet.close()
