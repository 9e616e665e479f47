"""CNI 1.0 conformance of ``ztagent-cni``: each row execs the installed plugin (the zipapp a node
gets) with a CNI_* environment and a configuration on stdin, against a real agent socket, and
checks exit code and stdout against the JSON shapes and error codes of SPEC.md 1.0.0 (section 5)."""

from __future__ import annotations

import copy
import json
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cni import spec
from cni.protocol import EnrollResult
from tests.cni.agent import AgentThread, RecordingHandler, running_agent
from tests.cni.conftest import invoke

pytestmark = pytest.mark.timeout(120)

# The final result of a bridge + host-local ADD, in the shape of the spec's "Add example".
PREV_1_0 = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "cni0", "mac": "00:11:22:33:44:55"},
        {"name": "veth3243", "mac": "55:44:33:22:11:11"},
        {"name": "eth0", "mac": "99:88:77:66:55:44", "sandbox": "/var/run/netns/cni-blue"},
    ],
    "ips": [{"address": "10.1.0.5/16", "gateway": "10.1.0.1", "interface": 2}],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {"nameservers": ["10.1.0.1"]},
}
# A 0.3.1 result (flannel/Calico conflists still say 0.3.1): IPs carry "version".
PREV_0_3_1 = {
    "cniVersion": "0.3.1",
    "interfaces": [{"name": "eth0", "mac": "0a:58:0a:f4:01:05", "sandbox": "/proc/4242/ns/net"}],
    "ips": [{"version": "4", "address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 0}],
    "dns": {},
}


def conf(version: str = "1.0.0", prev: dict[str, Any] | None = PREV_1_0, **extra: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"cniVersion": version, "name": "dbnet", "type": "ztagent-cni"}
    if prev is not None:
        c["prevResult"] = dict(prev, cniVersion=version)
    c.update(extra)
    return c


def env(command: str, pod: str = "web-1", **over: str | None) -> dict[str, str]:
    e: dict[str, str | None] = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": f"ctr-{pod}",
        "CNI_NETNS": "/var/run/netns/cni-blue",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME={pod};"
                    f"K8S_POD_INFRA_CONTAINER_ID=ctr-{pod};K8S_POD_UID=uid-{pod}",
        "CNI_PATH": "/opt/cni/bin",
    }
    e.update(over)
    return {k: v for k, v in e.items() if v is not None}


@dataclass
class Case:
    id: str
    env: dict[str, str]
    stdin: dict[str, Any] | bytes | None
    rc: int
    code: int | None = None  # expected error code (rc != 0)
    stdout: str | None = None  # "prev": prevResult echoed; "empty"; "version"
    details: list[str] = field(default_factory=list)  # substrings of msg + details
    agent_ops: list[str] | None = None  # ops the agent must have seen for this pod
    socket: str = "up"  # "up": the agent's socket; "down": a path nobody listens on
    version: str = "1.0.0"  # cniVersion expected in the output


CASES = [
    # VERSION
    Case("version-empty-stdin", env("VERSION"), None, 0, stdout="version"),
    Case("version-echoes-input", env("VERSION"), {"cniVersion": "0.4.0"}, 0, stdout="version",
         version="0.4.0"),
    Case("version-bad-json", env("VERSION"), b"{nope", 1, code=6),
    # ADD
    Case("add-enrolled", env("ADD"), conf(), 0, stdout="prev", agent_ops=["ADD"]),
    Case("add-not-enrolled", env("ADD", "outside"), conf(), 0, stdout="prev", agent_ops=["ADD"]),
    Case("add-0.3.1-passthrough", env("ADD"), conf("0.3.1", PREV_0_3_1), 0, stdout="prev",
         agent_ops=["ADD"], version="0.3.1"),
    Case("add-0.4.0", env("ADD"), conf("0.4.0"), 0, stdout="prev", agent_ops=["ADD"], version="0.4.0"),
    Case("add-missing-prevResult", env("ADD"), conf(prev=None), 1, code=7,
         details=["prevResult", "chained"], agent_ops=[]),
    Case("add-unsupported-version-old", env("ADD"), conf("0.2.0"), 1, code=1, details=["0.2.0"],
         agent_ops=[], version="0.2.0"),
    Case("add-unsupported-version-new", env("ADD"), conf("2.0.0"), 1, code=1, details=["2.0.0"],
         agent_ops=[], version="2.0.0"),
    Case("add-version-not-semver", env("ADD"), conf("one"), 1, code=7, details=["cniVersion"],
         agent_ops=[], version="one"),
    Case("add-missing-version", env("ADD"), {"name": "dbnet", "type": "ztagent-cni", "prevResult": PREV_1_0},
         1, code=7, details=["cniVersion"]),
    Case("add-bad-json", env("ADD"), b'{"cniVersion": "1.0.0",', 1, code=6),
    Case("add-not-utf8", env("ADD"), b'{"cniVersion": "\xff"}', 1, code=6),
    Case("add-config-not-object", env("ADD"), b"[1, 2]", 1, code=7, details=["JSON object"]),
    Case("add-bad-name", env("ADD"), conf(name="-bad"), 1, code=7, details=["name"]),
    Case("add-unknown-field", env("ADD"), conf(socketpath="/run/x.sock"), 1, code=2,
         details=['socketpath="/run/x.sock"'], agent_ops=[]),
    Case("add-bad-timeout", env("ADD"), conf(timeoutSeconds=0), 1, code=7, details=["timeoutSeconds"]),
    Case("add-relative-socket", env("ADD"), conf(socketPath="cni.sock"), 1, code=7, details=["socketPath"]),
    Case("add-bad-prev-ip", env("ADD"),
         conf(prev=dict(PREV_1_0, ips=[{"address": "10.1.0.500/16", "interface": 2}])), 1, code=7,
         details=["prevResult.ips[0].address"]),
    Case("add-prev-ip-interface-out-of-range", env("ADD"),
         conf(prev=dict(PREV_1_0, ips=[{"address": "10.1.0.5/16", "interface": 3}])), 1, code=7,
         details=["prevResult.ips[0].interface"]),
    Case("add-missing-env", env("ADD", CNI_CONTAINERID=None, CNI_NETNS=None), conf(), 1, code=4,
         details=["CNI_CONTAINERID", "CNI_NETNS"]),
    Case("add-bad-container-id", env("ADD", CNI_CONTAINERID="_x"), conf(), 1, code=4,
         details=["CNI_CONTAINERID"]),
    Case("add-ifname-too-long", env("ADD", CNI_IFNAME="eth0123456789012"), conf(), 1, code=4,
         details=["CNI_IFNAME"]),
    Case("add-ifname-slash", env("ADD", CNI_IFNAME="et/h0"), conf(), 1, code=4, details=["CNI_IFNAME"]),
    Case("add-bad-cni-args", env("ADD", CNI_ARGS="K8S_POD_NAME"), conf(), 1, code=4, details=["CNI_ARGS"]),
    Case("no-command", env("ADD", CNI_COMMAND=None), conf(), 1, code=4, details=["CNI_COMMAND"]),
    Case("unknown-command", env("STATUS"), conf(), 1, code=4, details=["CNI_COMMAND", "STATUS"]),
    Case("add-agent-refuses", env("ADD", "refused"), conf(), 1, code=100, details=["quota exceeded"],
         agent_ops=["ADD"]),
    Case("add-agent-busy", env("ADD", "busy"), conf(), 1, code=11, details=["reconciling"],
         agent_ops=["ADD"]),
    Case("add-agent-down", env("ADD"), conf(), 1, code=11, details=["not reachable", "fail closed"],
         socket="down"),
    # CHECK
    Case("check-after-add", env("CHECK", "checked"), conf(), 0, stdout="empty", agent_ops=["ADD", "CHECK"]),
    Case("check-not-in-capture", env("CHECK", "never-added"), conf(), 1, code=100,
         details=["not in capture"], agent_ops=["CHECK"]),
    Case("check-missing-prevResult", env("CHECK"), conf(prev=None), 1, code=7, details=["prevResult"]),
    Case("check-before-0.4.0", env("CHECK"), conf("0.3.1", PREV_0_3_1), 1, code=1, details=["CHECK", "0.4.0"],
         version="0.3.1"),
    Case("check-agent-down", env("CHECK"), conf(), 1, code=11, details=["not reachable"], socket="down"),
    # DEL
    Case("del", env("DEL"), conf(), 0, stdout="empty", agent_ops=["DEL"]),
    Case("del-without-netns-or-prevResult", env("DEL", CNI_NETNS=None), conf(prev=None), 0, stdout="empty",
         agent_ops=["DEL"]),
    Case("del-unknown-field-tolerated", env("DEL"), conf(mystery=1), 0, stdout="empty", agent_ops=["DEL"]),
    Case("del-invalid-prevResult-tolerated", env("DEL"),
         conf(prev=dict(PREV_1_0, ips=[{"address": "garbage"}])), 0, stdout="empty", agent_ops=["DEL"]),
    Case("del-agent-down", env("DEL"), conf(), 0, stdout="empty", socket="down"),
    Case("del-agent-error", env("DEL", "stuck"), conf(), 1, code=100, details=["netns still busy"],
         agent_ops=["DEL"]),
    Case("del-missing-ifname", env("DEL", CNI_IFNAME=None), conf(), 1, code=4, details=["CNI_IFNAME"]),
]


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentThread]:
    import tempfile

    d = tempfile.mkdtemp(prefix="cni-conf-", dir="/tmp")
    handler = RecordingHandler(script={
        "outside": EnrollResult.not_enrolled("namespace demo is not labelled for the mesh"),
        "refused": EnrollResult.error("quota exceeded"),
        "busy": EnrollResult.error("agent is reconciling, not ready", retry=True),
        "stuck": EnrollResult.error("netns still busy"),
    })
    with running_agent(os.path.join(d, "cni.sock"), handler) as a:
        yield a
    os.rmdir(d)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_conformance(case: Case, plugin_exe: Path, agent: AgentThread) -> None:
    stdin = case.stdin
    sock = agent.path if case.socket == "up" else agent.path + ".nobody"
    if isinstance(stdin, dict) and "socketPath" not in stdin:
        stdin = dict(stdin, socketPath=sock)
    pod = next((v for k, v in (a.split("=", 1) for a in case.env.get("CNI_ARGS", "").split(";") if "=" in a)
                if k == "K8S_POD_NAME"), None)
    if case.id == "check-after-add":  # CHECK is only called after an ADD (SPEC.md 2)
        assert invoke(plugin_exe, dict(case.env, CNI_COMMAND="ADD"), stdin).rc == 0
    before = len(agent.handler.events)
    out = invoke(plugin_exe, case.env, stdin)
    assert out.rc == case.rc, (out.stdout, out.stderr)
    if case.rc == 0:
        if case.stdout == "empty":
            assert out.stdout == ""
        elif case.stdout == "version":
            assert out.json == {"cniVersion": case.version,
                                "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]}
        elif case.stdout == "prev":
            assert isinstance(stdin, dict)
            assert out.json == dict(stdin["prevResult"], cniVersion=case.version)
    else:
        err = out.json
        assert {"cniVersion", "code", "msg"} <= set(err) <= {"cniVersion", "code", "msg", "details"}
        assert err["code"] == case.code, err
        assert err["cniVersion"] == case.version
        assert isinstance(err["msg"], str) and err["msg"]
        text = err["msg"] + " " + err.get("details", "")
        for s in case.details:
            assert s in text, err
        assert out.stderr.startswith("ztagent-cni: "), out.stderr  # one line for the runtime's log
    if case.agent_ops is not None:
        seen = [e for e in agent.handler.events if e.pod.name == pod]
        if case.id != "check-after-add":
            seen = agent.handler.events[before:]
        assert [e.op for e in seen] == case.agent_ops


def test_add_hands_the_agent_pod_identity_netns_interfaces_and_ips(
    plugin_exe: Path, agent: AgentThread
) -> None:
    out = invoke(plugin_exe, env("ADD", "ident"), conf(socketPath=agent.path))
    assert out.rc == 0, out.stderr
    ev = next(e for e in agent.handler.events if e.pod.name == "ident")
    assert (ev.op, ev.container_id, ev.ifname, ev.netns, ev.network, ev.cni_version) == (
        "ADD", "ctr-ident", "eth0", "/var/run/netns/cni-blue", "dbnet", "1.0.0")
    assert (ev.pod.namespace, ev.pod.name, ev.pod.uid) == ("demo", "ident", "uid-ident")
    assert [i.name for i in ev.interfaces] == ["cni0", "veth3243", "eth0"]
    assert [i.name for i in ev.sandbox_interfaces()] == ["eth0"]
    assert [(p.address, p.gateway, p.interface) for p in ev.ips] == [("10.1.0.5/16", "10.1.0.1", 2)]


def test_del_is_idempotent(plugin_exe: Path, agent: AgentThread) -> None:
    for _ in range(2):
        out = invoke(plugin_exe, env("DEL", "twice"), conf(socketPath=agent.path))
        assert (out.rc, out.stdout) == (0, "")
    assert [e.op for e in agent.handler.events if e.pod.name == "twice"] == ["DEL", "DEL"]


def test_add_waits_for_a_slow_agent_within_timeoutSeconds_then_fails_try_again(
    plugin_exe: Path, sock_dir: Path
) -> None:
    handler = RecordingHandler(delay_s={"slow": 3.0})
    with running_agent(str(sock_dir / "a.sock"), handler) as a:
        out = invoke(plugin_exe, env("ADD", "slow"), conf(socketPath=a.path, timeoutSeconds=0.5))
        assert out.rc == 1
        assert out.json["code"] == spec.TRY_AGAIN_LATER
        assert "within 0.5s" in out.json["details"]


def test_agent_handler_timeout_is_answered_as_try_again(plugin_exe: Path, sock_dir: Path) -> None:
    handler = RecordingHandler(delay_s={"slow": 3.0})
    with running_agent(str(sock_dir / "a.sock"), handler, handler_timeout_s=0.3) as a:
        out = invoke(plugin_exe, env("ADD", "slow"), conf(socketPath=a.path))
        assert out.rc == 1
        assert (out.json["code"], out.json["msg"]) == (11, "ztagent node agent could not enroll the pod")
        assert "did not finish within 0.3s" in out.json["details"]


def _one_shot_server(path: str, reply: Callable[[bytes], bytes]) -> threading.Thread:
    """A peer on the socket that answers one request with ``reply(request_payload)``."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def run() -> None:
        with srv:
            c, _ = srv.accept()
            with c:
                (n,) = struct.unpack("!I", c.recv(4, socket.MSG_WAITALL))
                c.sendall(reply(c.recv(n, socket.MSG_WAITALL)))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("answer, detail", [
    (b'{"version": 2, "status": "enrolled"}', "unsupported protocol version 2"),
    (b'{"version": 1, "status": "maybe"}', "status: 'maybe'"),
    (b"not json", "not UTF-8 JSON"),
])
def test_a_reply_the_plugin_cannot_read_fails_with_101(
    plugin_exe: Path, sock_dir: Path, answer: bytes, detail: str
) -> None:
    path = str(sock_dir / "odd.sock")
    got: list[dict[str, Any]] = []

    def reply(req: bytes) -> bytes:
        got.append(json.loads(req))
        return struct.pack("!I", len(answer)) + answer

    t = _one_shot_server(path, reply)
    out = invoke(plugin_exe, env("ADD"), conf(socketPath=path))
    t.join(10)
    assert got and got[0]["version"] == 1 and got[0]["op"] == "ADD"
    assert out.rc == 1 and out.json["code"] == spec.AGENT_PROTOCOL
    assert detail in out.json["details"]


def test_agent_closing_without_reply_is_try_again(plugin_exe: Path, sock_dir: Path) -> None:
    path = str(sock_dir / "rude.sock")
    t = _one_shot_server(path, lambda req: b"")
    out = invoke(plugin_exe, env("ADD"), conf(socketPath=path))
    t.join(10)
    assert out.rc == 1 and out.json["code"] == spec.TRY_AGAIN_LATER
    assert "closed the connection" in out.json["details"]


def test_add_result_is_prevResult_unchanged_even_with_unknown_result_fields(
    plugin_exe: Path, agent: AgentThread
) -> None:
    prev: dict[str, Any] = copy.deepcopy(PREV_1_0)
    prev["routes"].append({"dst": "10.96.0.0/12", "gw": "10.1.0.1", "mtu": 1450})  # a newer-spec field
    out = invoke(plugin_exe, env("ADD", "extra"), conf(prev=prev, socketPath=agent.path))
    assert out.rc == 0 and out.json == prev


def test_the_per_pod_exec_imports_nothing_heavy(plugin_exe: Path, agent: AgentThread) -> None:
    """The plugin starts once per pod; these modules each cost milliseconds (dataclasses + inspect
    ~9 ms, http.client ~20 ms here) and none is needed for one socket exchange."""
    import subprocess

    p = subprocess.run(
        ["/usr/bin/python3", "-IS", "-X", "importtime", str(plugin_exe)],
        input=json.dumps(conf(socketPath=agent.path)).encode(), env=env("ADD", "imports"),
        capture_output=True, timeout=30,
    )
    assert p.returncode == 0, p.stderr
    mods = {line.split("|")[-1].strip() for line in p.stderr.decode().splitlines()
            if line.startswith("import time:")}
    assert {"cni.plugin", "cni.spec", "cni.protocol", "socket", "json"} <= mods
    heavy = {"asyncio", "logging", "dataclasses", "inspect", "http", "http.client", "email", "ssl",
             "subprocess", "zlib", "cni.server", "cni.install", "argparse"}
    assert not mods & heavy, mods & heavy
