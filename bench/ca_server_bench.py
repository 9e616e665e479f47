"""CA over the network: CSRs signed per second by a real `ztagent ca serve` process over gRPC/mTLS,
and the time for a node agent's CertificateManager to get certificates for 1000 workloads,
beside the in-process signing rate (identity.ca, no network) measured in the same run.

    .venv/bin/python -m bench.ca_server_bench [--workloads 1000] [--csrs 1000] [--concurrency 16]

Figures drift between machines; compare the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from caserver import store as ca_store
from credentials.client import CaClient, NodeCredentials
from credentials.identities import CA_SERVER_NAME, node_identity
from credentials.manager import CertificateManager
from credentials.proto import ca_pb2, ca_pb2_grpc
from identity.keys import build_csr, generate_key, key_to_pem
from identity.spiffe import SpiffeId

TD = "cluster.local"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _config(workloads: int) -> str:
    lines = [
        "apiVersion: ztagent.io/v1alpha1",
        "kind: MeshConfig",
        f"trustDomain: {TD}",
        "nodes:",
        "  - {name: node-a, address: 10.250.0.1}",
        "workloads:",
    ]
    for i in range(workloads):
        ip = f"10.{100 + i // 65536}.{(i // 256) % 256}.{i % 256}"
        lines.append(f"  - {{name: w{i}, namespace: bench, serviceAccount: w{i}, node: node-a, ips: [{ip}]}}")
    return "\n".join(lines) + "\n"


def _ids(n: int) -> list[SpiffeId]:
    return [SpiffeId.for_workload(TD, "bench", f"w{i}") for i in range(n)]


def in_process_rate(st: ca_store.CaStore, csrs: list[bytes]) -> float:
    t0 = time.perf_counter()
    for csr in csrs:
        st.ca.sign_csr(csr, allowed=lambda _s: True, now=_now())
    return len(csrs) / (time.perf_counter() - t0)


async def grpc_rate(address: str, node_dir: Path, csrs: list[bytes], concurrency: int) -> float:
    files = ca_store.read_credentials(node_dir)
    ch = grpc.aio.secure_channel(
        address,
        grpc.ssl_channel_credentials(files.roots_pem, files.key_pem, files.chain_pem),
        options=[("grpc.ssl_target_name_override", CA_SERVER_NAME)],
    )
    stub: Any = ca_pb2_grpc.IstioCertificateServiceStub(ch)  # type: ignore[no-untyped-call]
    reqs = [ca_pb2.IstioCertificateRequest(csr=c.decode()) for c in csrs]
    await stub.CreateCertificate(reqs[0], timeout=10)  # connect + handshake outside the timing
    queue = list(reversed(reqs))

    async def worker() -> None:
        while queue:
            await stub.CreateCertificate(queue.pop(), timeout=30)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    await ch.close()
    return len(reqs) / elapsed


async def manager_time(address: str, node_dir: Path, ids: list[SpiffeId]) -> float:
    client = CaClient(address, NodeCredentials.from_dir(node_dir), timeout=30)
    mgr = CertificateManager(client, client.bundles(), registry=CollectorRegistry())
    t0 = time.perf_counter()
    await mgr.start(ids, background=False)
    elapsed = time.perf_counter() - t0
    assert all(mgr.current(i).spiffe_id == i for i in ids)
    await client.close()
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--workloads", type=int, default=1000)
    ap.add_argument("--csrs", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix=f"ztcab{os.getpid()}-", dir="/tmp"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        st = ca_store.init_self_signed(base / "ca", TD, now=_now())
        (base / "mesh.yaml").write_text(_config(args.workloads))
        node_key = generate_key()
        issued = st.ca.sign_csr(
            build_csr(node_key, node_identity(st.trust_domain, "node-a")),
            allowed=lambda _s: True,
            ttl=dt.timedelta(hours=2),
            now=_now(),
        )
        node_files = ca_store.CredentialFiles(key_to_pem(node_key), issued.chain_pem, st.bundle.to_pem())
        ca_store.write_credentials(base / "node-a", node_files)
        ids = _ids(args.workloads)
        csrs = [build_csr(generate_key(), ids[i % len(ids)]) for i in range(args.csrs)]

        ref = in_process_rate(st, csrs)

        exe = str(Path(sys.executable).parent / "ztagent")
        proc = subprocess.Popen(
            [exe, "ca", "serve", "--dir", str(base / "ca"), "--config", str(base / "mesh.yaml"),
             "--listen", f"unix:{base}/ca.sock", "-o", "json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert proc.stdout is not None
        address = json.loads(proc.stdout.readline())["address"]

        net = asyncio.run(grpc_rate(address, base / "node-a", csrs, args.concurrency))
        took = asyncio.run(manager_time(address, base / "node-a", ids))
        # The reference for the manager run: signing the same number in process.
        ref_total = args.workloads / ref
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(base, ignore_errors=True)

    result = {
        "in_process_csrs_per_s": round(ref, 1),
        "grpc_csrs_per_s": round(net, 1),
        "grpc_vs_in_process": round(net / ref, 3),
        "workloads": args.workloads,
        "manager_seconds_for_workloads": round(took, 3),
        "in_process_seconds_for_workloads": round(ref_total, 3),
        "concurrency": args.concurrency,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"in-process signing (reference) : {ref:8.1f} CSRs/s")
        print(f"ztagent ca serve over gRPC/mTLS: {net:8.1f} CSRs/s  ({net / ref:.2f}x reference, "
              f"{args.concurrency} in flight, one unix-socket connection)")  # fmt: skip
        print(f"{args.workloads} workloads via CertificateManager.start: {took:.2f} s "
              f"(keygen + CSR + RPC + verify each; in-process signing alone: {ref_total:.2f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
