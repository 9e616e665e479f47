"""The agent's CNI socket: file permissions and SO_PEERCRED as the two locks, the versioned frame
protocol on a real Unix socket, timeouts and handler failures answered explicitly, per-attachment
serialization, and taking the path over from a previous agent."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from cni import protocol
from cni.protocol import EnrollResult, PodEvent, ProtocolError
from cni.server import CniServer
from cni.spec import Interface, IPConfig, PodRef

pytestmark = pytest.mark.timeout(60)

EVENT = PodEvent(
    op="ADD", container_id="c1", ifname="eth0", netns="/var/run/netns/cni-x", network="n",
    cni_version="1.0.0", pod=PodRef("demo", "web", "u1"),
    interfaces=(Interface("eth0", "aa:bb:cc:dd:ee:ff", "/var/run/netns/cni-x"),),
    ips=(IPConfig("10.1.0.5/24", "10.1.0.1", 0),),
)


class Handler:
    def __init__(self) -> None:
        self.events: list[PodEvent] = []
        self.active = 0
        self.max_active = 0
        self.delay = 0.0
        self.fail: Exception | None = None

    async def _do(self, pod: PodEvent, res: EnrollResult) -> EnrollResult:
        self.events.append(pod)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.delay)
            if self.fail is not None:
                raise self.fail
            return res
        finally:
            self.active -= 1

    async def add(self, pod: PodEvent) -> EnrollResult:
        return await self._do(pod, EnrollResult.enrolled())

    async def del_(self, pod: PodEvent) -> EnrollResult:
        return await self._do(pod, EnrollResult.not_enrolled())

    async def check(self, pod: PodEvent) -> EnrollResult:
        return await self._do(pod, EnrollResult.enrolled())


async def exchange(path: str, raw: bytes) -> EnrollResult:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(raw)
        await writer.drain()
        n = protocol.frame_length(await reader.readexactly(4))
        return protocol.decode_reply(await reader.readexactly(n))
    finally:
        writer.close()


def test_protocol_round_trip_and_version_check() -> None:
    raw = protocol.encode_request(EVENT)
    assert protocol.decode_request(raw[4:]) == EVENT
    assert protocol.frame_length(raw[:4]) == len(raw) - 4
    res = EnrollResult.error("nope", retry=True)
    assert protocol.decode_reply(protocol.encode_reply(res)[4:]) == res
    bad = json.loads(raw[4:])
    bad["version"] = 2
    with pytest.raises(ProtocolError, match="unsupported protocol version 2"):
        protocol.decode_request(json.dumps(bad).encode())
    bad["version"], bad["op"] = 1, "GC"
    with pytest.raises(ProtocolError, match="op: 'GC'"):
        protocol.decode_request(json.dumps(bad).encode())
    with pytest.raises(ProtocolError, match="exceeds"):
        protocol.frame_length(struct.pack("!I", protocol.MAX_FRAME + 1))


async def test_socket_is_0600_in_a_0750_dir_and_answers(sock_dir: Path) -> None:
    path = str(sock_dir / "run" / "cni.sock")
    h = Handler()
    async with CniServer(h, path):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
        assert stat.S_IMODE(os.stat(sock_dir / "run").st_mode) == 0o750
        assert await exchange(path, protocol.encode_request(EVENT)) == EnrollResult.enrolled()
        assert h.events == [EVENT]
    assert not os.path.exists(path)


async def test_group_mode_is_0660(sock_dir: Path) -> None:
    path = str(sock_dir / "cni.sock")
    async with CniServer(Handler(), path, group=os.getegid()):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660


NOBODY = 65534
_NOBODY_CLIENT = r"""
import json, socket, struct, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(json.dumps({"connect_error": e.errno})); sys.exit(0)
try:
    s.sendall(bytes.fromhex(sys.argv[2]))
except BrokenPipeError:
    pass  # refused before the request was read: the answer is already queued
n, = struct.unpack("!I", s.recv(4, socket.MSG_WAITALL))
print(s.recv(n, socket.MSG_WAITALL).decode())
"""


def _as_nobody(path: str) -> dict[str, object]:
    p = subprocess.run(
        ["/usr/bin/python3", "-I", "-c", _NOBODY_CLIENT, path, protocol.encode_request(EVENT).hex()],
        capture_output=True, text=True, timeout=30, user=NOBODY, group=NOBODY, extra_groups=[],
    )
    assert p.returncode == 0, p.stderr
    out: dict[str, object] = json.loads(p.stdout)
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
async def test_non_root_peer_is_stopped_by_file_mode_then_by_peer_credentials(sock_dir: Path) -> None:
    path = str(sock_dir / "cni.sock")
    h = Handler()
    os.chmod(sock_dir, 0o755)
    async with CniServer(h, path) as srv:
        out = await asyncio.to_thread(_as_nobody, path)
        assert out == {"connect_error": 13}  # EACCES: 0600 root socket
        os.chmod(path, 0o666)  # a loosened file mode: SO_PEERCRED still holds
        out = await asyncio.to_thread(_as_nobody, path)
        assert out["status"] == "error" and out["retry"] is False
        assert f"peer uid {NOBODY}" in str(out["reason"]) and "only uid 0" in str(out["reason"])
        assert srv.refused == 1
    assert h.events == []


@pytest.mark.parametrize("raw, reason", [
    (struct.pack("!I", 5) + b"hello", "bad request: message is not UTF-8 JSON"),
    (protocol.frame({"version": 7, "op": "ADD"}), "unsupported protocol version 7"),
    (protocol.frame({"version": 1, "op": "ADD"}), "containerId: required"),
])
async def test_bad_requests_get_an_error_naming_the_problem(sock_dir: Path, raw: bytes, reason: str) -> None:
    path = str(sock_dir / "cni.sock")
    h = Handler()
    async with CniServer(h, path):
        res = await exchange(path, raw)
    assert res.status == "error" and reason in res.reason, res
    assert h.events == []


async def test_oversized_or_missing_requests_are_dropped_without_reaching_the_handler(sock_dir: Path) -> None:
    path = str(sock_dir / "cni.sock")
    h = Handler()
    async with CniServer(h, path, read_timeout_s=0.3):
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(struct.pack("!I", protocol.MAX_FRAME + 1))
        res = protocol.decode_reply((await reader.read(4096))[4:])
        assert res.status == "error" and "exceeds" in res.reason
        writer.close()
        reader, writer = await asyncio.open_unix_connection(path)  # says nothing: timed out, closed
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    assert h.events == []


async def test_handler_failure_and_timeout_are_explicit_errors(sock_dir: Path) -> None:
    path = str(sock_dir / "cni.sock")
    h = Handler()
    async with CniServer(h, path, handler_timeout_s=0.2):
        h.fail = RuntimeError("netns vanished")
        res = await exchange(path, protocol.encode_request(EVENT))
        assert res == EnrollResult.error("ADD failed in the agent: RuntimeError: netns vanished")
        h.fail, h.delay = None, 1.0
        res = await exchange(path, protocol.encode_request(EVENT))
        assert res == EnrollResult.error("ADD did not finish within 0.2s", retry=True)


async def test_one_attachment_is_serialized_different_ones_run_in_parallel(sock_dir: Path) -> None:
    path = str(sock_dir / "cni.sock")
    h = Handler()
    h.delay = 0.2
    async with CniServer(h, path):
        same = [protocol.encode_request(EVENT._replace(op=op)) for op in ("ADD", "DEL", "ADD")]
        await asyncio.gather(*(exchange(path, r) for r in same))
        assert h.max_active == 1
        others = [protocol.encode_request(EVENT._replace(container_id=f"c{i}")) for i in range(4)]
        await asyncio.gather(*(exchange(path, r) for r in others))
        assert h.max_active > 1


async def test_a_new_agent_takes_the_path_over_and_the_old_one_leaves_it_alone(sock_dir: Path) -> None:
    path = str(sock_dir / "cni.sock")
    Path(path).write_text("stale")  # e.g. left by a crashed agent
    old, new = Handler(), Handler()
    s1 = CniServer(old, path)
    await s1.start()
    assert await exchange(path, protocol.encode_request(EVENT)) == EnrollResult.enrolled()
    s2 = CniServer(new, path)
    await s2.start()
    await s1.close()  # the draining predecessor must not unlink its successor's socket
    assert await exchange(path, protocol.encode_request(EVENT)) == EnrollResult.enrolled()
    assert (len(old.events), len(new.events)) == (1, 1)
    await s2.close()
    assert not os.path.exists(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the plugin as another uid")
async def test_the_plugin_run_by_a_non_root_user_reports_the_agents_refusal(
    sock_dir: Path, plugin_exe: Path
) -> None:
    path = str(sock_dir / "cni.sock")
    os.chmod(sock_dir, 0o755)
    os.chmod(plugin_exe.parent, 0o755)
    conf = {"cniVersion": "1.0.0", "name": "n", "type": "ztagent-cni", "socketPath": path,
            "prevResult": {"cniVersion": "1.0.0", "interfaces": [], "ips": []}}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/x", "CNI_IFNAME": "eth0"}
    h = Handler()
    async with CniServer(h, path):
        os.chmod(path, 0o666)
        p = await asyncio.to_thread(
            subprocess.run, [str(plugin_exe)], input=json.dumps(conf).encode(), env=env,
            capture_output=True, timeout=30, user=NOBODY, group=NOBODY, extra_groups=[],
        )
    err = json.loads(p.stdout)
    assert p.returncode == 1 and err["code"] == 100, err
    assert f"peer uid {NOBODY}" in err["details"]
    assert h.events == []


async def test_a_plugin_that_gave_up_before_the_reply_is_a_warning_not_a_crash(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(sock_dir / "cni.sock")
    h = Handler()
    h.delay = 0.3
    async with CniServer(h, path):
        _, writer = await asyncio.open_unix_connection(path)
        writer.write(protocol.encode_request(EVENT))
        await writer.drain()
        writer.close()  # gone before the handler answers
        await asyncio.sleep(0.6)
        assert await exchange(path, protocol.encode_request(EVENT)) == EnrollResult.enrolled()
    assert len(h.events) == 2
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
