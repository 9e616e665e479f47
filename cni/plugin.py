"""``ztagent-cni``: the chained CNI plugin the container runtime executes for every pod sandbox.

ADD asks the node agent (over its Unix socket, cni/protocol.py) to put the pod in capture and
returns the previous plugin's result unchanged only once the agent answered ``enrolled`` or
``not-enrolled``. Fail closed: if the agent cannot be reached, ADD fails with code 11 ("try again
later"), so the runtime tears the sandbox down and retries it; the pod's containers never start
outside the mesh (istio-cni does the same). CHECK fails the same way when the agent is down (the
spec lists "a daemon required for connectivity" among what CHECK must verify). DEL succeeds when
the agent is down or the attachment is unknown, as the spec requires; the agent drops enrollments
whose sandbox is gone when it starts (cni/README.md).

Results and error JSON go to stdout, where runtimes (libcni) read them; stderr gets one human line
on failure or anything unusual, for the runtime's log.

Start-up matters (one exec per pod): this module imports only ``contextlib``, ``json``, ``os``,
``socket``, ``sys`` and ``time`` besides our two pure modules; the installed zipapp runs under
``python3 -IS``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO, TextIO

from cni import protocol, spec
from cni.protocol import EnrollResult, PodEvent

PROG = "ztagent-cni"


class AgentUnreachable(Exception):
    """No answer from the node agent: nothing listens on the socket, or it did not reply in time."""


def ask_agent(path: str, timeout_s: float, event: PodEvent) -> EnrollResult:
    """One request/reply exchange with the agent, all of it within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_s)
        try:
            sock.connect(path)
        except OSError as e:
            raise AgentUnreachable(f"connecting to {path}: {e.strerror or e}") from None
        try:
            # An agent refusing us (peer credentials) answers before reading: read that answer.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(protocol.encode_request(event))
            header = _recv_exactly(sock, protocol.HEADER.size, deadline)
            payload = _recv_exactly(sock, protocol.frame_length(header), deadline)
        except TimeoutError:
            raise AgentUnreachable(f"no reply from the agent on {path} within {timeout_s:g}s") from None
        except (ConnectionError, EOFError) as e:
            raise AgentUnreachable(
                f"the agent on {path} closed the connection without a reply ({e})"
            ) from None
        return protocol.decode_reply(payload)
    finally:
        sock.close()


def _recv_exactly(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"end of stream after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


Ask = Callable[[str, float, PodEvent], EnrollResult]


def run(environ: Mapping[str, str], data: bytes, ask: Ask, log: Callable[[str], None]) -> tuple[int, Any]:
    """One invocation: (exit code, JSON to print or None). ``ask`` is :func:`ask_agent` in production."""
    try:
        env = spec.parse_env(environ)
        if env.command == "VERSION":
            return 0, spec.version_result(data)
        conf = spec.parse_config(data, env.command)
    except spec.CniError as e:
        log(f"{environ.get('CNI_COMMAND', '?')}: {e}")
        return 1, e.to_json(spec.version_of(data))
    if conf.ignored_keys:
        log(f"DEL: ignoring {', '.join(conf.ignored_keys)}")
    prev = conf.prev_result
    event = PodEvent(
        op=env.command,  # type: ignore[arg-type]  # parse_env allows only ADD/DEL/CHECK here
        container_id=env.container_id,
        ifname=env.ifname,
        netns=env.netns,
        network=conf.name,
        cni_version=conf.cni_version,
        pod=spec.pod_ref(env),
        interfaces=prev.interfaces if prev else (),
        ips=prev.ips if prev else (),
    )
    who = f"container {env.container_id}" + (
        f" (pod {event.pod.namespace}/{event.pod.name})" if event.pod.name else ""
    )
    try:
        reply = ask(conf.socket_path, conf.timeout_s, event)
    except AgentUnreachable as e:
        if env.command == "DEL":
            log(f"DEL {who}: ztagent node agent not reachable ({e}); nothing to undo here, the agent "
                "drops this attachment when it starts")
            return 0, None
        err = spec.CniError(
            spec.TRY_AGAIN_LATER,
            "ztagent node agent not reachable: pod held back (fail closed)",
            f"{e}. The pod is not started until the agent has it in capture, so its traffic cannot "
            "bypass the mesh; the runtime retries.",
        )
        log(f"{env.command} {who}: {err}")
        return 1, err.to_json(conf.cni_version)
    except protocol.ProtocolError as e:
        err = spec.CniError(spec.AGENT_PROTOCOL, "invalid reply from the ztagent node agent", str(e))
        log(f"{env.command} {who}: {err}")
        return 1, err.to_json(conf.cni_version)
    if reply.status == "error":
        code = spec.TRY_AGAIN_LATER if reply.retry else spec.AGENT_REFUSED
        verb = {"ADD": "enroll", "CHECK": "confirm capture of", "DEL": "un-enroll"}[env.command]
        err = spec.CniError(
            code, f"ztagent node agent could not {verb} the pod", reply.reason or "no reason given"
        )
        log(f"{env.command} {who}: {err}")
        return 1, err.to_json(conf.cni_version)
    if env.command == "ADD":
        return 0, spec.add_result(conf)
    return 0, None  # CHECK and DEL print nothing on success


def main(
    environ: Mapping[str, str] | None = None,
    stdin: BinaryIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    environ = os.environ if environ is None else environ
    out = sys.stdout if stdout is None else stdout
    errs = sys.stderr if stderr is None else stderr

    def log(line: str) -> None:
        print(f"{PROG}: {line}", file=errs)

    try:
        data = (sys.stdin.buffer if stdin is None else stdin).read()
    except OSError as e:
        err = spec.CniError(spec.IO_FAILURE, "failed to read network configuration from stdin", str(e))
        log(str(err))
        json.dump(err.to_json(spec.SPEC_VERSION), out)
        return 1
    code, result = run(environ, data, ask_agent, log)
    if result is not None:
        json.dump(result, out)
        out.write("\n")
    out.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
