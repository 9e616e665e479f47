"""What an async Kubernetes client library costs an idle process, to choose the agent's one.

For each candidate (kubernetes_asyncio, lightkube, kr8s), in a fresh interpreter that already has
what the agent imports anyway (asyncio, ssl, json, yaml, uvloop): VmRSS before the import, after
it, and once the client holds one open pod watch (list, then watch from the list's
resourceVersion; "held" = an ADDED event for a pod created after the watch started has arrived).
The API server is the stand-in of tests/kubeapi, in its own process. Runs are bounded: N runs per
library (default 3), each with a 60 s limit; the report is the median.

    .venv/bin/pip install kubernetes_asyncio kr8s   # the two not chosen are not project dependencies
    .venv/bin/python -m bench.k8s_client_rss [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

CANDIDATES = ("kubernetes_asyncio", "lightkube", "kr8s")

_CHILD = r"""
import asyncio, json, os, ssl, sys, yaml, uvloop  # what the agent has loaded anyway
import urllib.request

def rss_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

lib, kubeconfig, state = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
out = {"baseline_kb": rss_kb()}

def create_pod(name):
    ctx = ssl.create_default_context(cafile=state["ca_file"])
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [{"name": "c", "image": "busybox:1"}]}}
    url = state["url"] + "/api/v1/namespaces/default/pods"
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Authorization": "Bearer " + state["token"],
                                          "Content-Type": "application/json"})
    urllib.request.urlopen(req, context=ctx, timeout=10).read()

async def run_kubernetes_asyncio():
    from kubernetes_asyncio import client, config, watch
    out["imported_kb"] = rss_kb()
    await config.load_kube_config(config_file=kubeconfig)
    async with client.ApiClient() as api_client:
        api = client.CoreV1Api(api_client)
        lst = await api.list_namespaced_pod("default")
        w = watch.Watch()
        asyncio.get_running_loop().call_later(0.5, create_pod, f"bench-{os.getpid()}")
        rv = lst.metadata.resource_version
        async for ev in w.stream(api.list_namespaced_pod, "default", resource_version=rv,
                                 allow_watch_bookmarks=True, timeout_seconds=30):
            if ev["type"] == "ADDED":
                out["watching_kb"] = rss_kb()
                break
        w.stop()

async def run_lightkube():
    from lightkube import AsyncClient, KubeConfig
    from lightkube.resources.core_v1 import Pod
    out["imported_kb"] = rss_kb()
    c = AsyncClient(config=KubeConfig.from_file(kubeconfig))
    lst = c.list(Pod, namespace="default")
    async for _ in lst:
        pass
    rv = lst.resourceVersion
    asyncio.get_running_loop().call_later(0.5, create_pod, f"bench-{os.getpid()}")
    async for op, obj in c.watch(Pod, namespace="default", resource_version=rv):
        if op == "ADDED":
            out["watching_kb"] = rss_kb()
            break
    await c.close()

async def run_kr8s():
    import kr8s.asyncio
    out["imported_kb"] = rss_kb()
    api = await kr8s.asyncio.api(kubeconfig=kubeconfig)
    async for _ in api.get("pods", namespace="default"):
        pass
    asyncio.get_running_loop().call_later(0.5, create_pod, f"bench-{os.getpid()}")
    async for ev, obj in api.watch("pods", namespace="default"):
        if ev == "ADDED" and obj.name.startswith("bench-"):
            out["watching_kb"] = rss_kb()
            break

asyncio.run(asyncio.wait_for(globals()["run_" + lib](), 50))
print(json.dumps(out))
"""


def measure(lib: str, state: dict[str, Any], kubeconfig: str) -> dict[str, int]:
    r = subprocess.run(
        [sys.executable, "-c", _CHILD, lib, kubeconfig, json.dumps(state)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if r.returncode != 0:
        raise RuntimeError(f"{lib}: {r.stderr.strip()[-800:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.k8s_client_rss")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    from tests.kubeapi.harness import ApiServerProcess

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kubeapi-rss-") as d, ApiServerProcess(Path(d)) as api:
        for lib in CANDIDATES:
            runs = []
            for _ in range(args.runs):
                try:
                    runs.append(measure(lib, api.state, str(api.kubeconfig)))
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    results[lib] = {"error": str(e)}
                    break
            if runs:
                base = statistics.median(r["baseline_kb"] for r in runs)
                imp = statistics.median(r["imported_kb"] - r["baseline_kb"] for r in runs)
                watch = statistics.median(r["watching_kb"] - r["baseline_kb"] for r in runs)
                results[lib] = {
                    "baseline_kb": base,
                    "import_delta_kb": imp,
                    "watching_delta_kb": watch,
                    "runs": len(runs),
                }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'library':<20} {'baseline':>10} {'+import':>10} {'+1 watch':>10}   (RSS, MiB; median of runs)")
    for lib, r in results.items():
        if "error" in r:
            print(f"{lib:<20} error: {r['error']}")
        else:
            print(
                f"{lib:<20} {r['baseline_kb'] / 1024:>10.1f} {r['import_delta_kb'] / 1024:>10.1f} "
                f"{r['watching_delta_kb'] / 1024:>10.1f}"
            )
    print(
        f"python {sys.version.split()[0]}; versions: " + ", ".join(f"{m}={_version(m)}" for m in CANDIDATES)
    )


def _version(mod: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(
            mod.replace("_", "-") if mod != "kubernetes_asyncio" else "kubernetes_asyncio"
        )
    except metadata.PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
