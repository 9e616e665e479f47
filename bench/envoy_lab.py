"""Envoy as the two node proxies of a lab, fed by ztagent's eBPF capture.

The lab scenario of the benchmark compares pod -> ztagent -> HBONE -> ztagent -> pod with the same
path through Envoy. For that, a lab brought up with ``ztagent lab up --no-agents`` gets, in each
node's network namespace:

- the capture itself (``bpf.capture.Capture``: per-pod policy routing + the sk_lookup program),
  installed by this process instead of by an agent;
- one Envoy (one worker, like the loopback pair) with two *transparent* listeners: ``outbound``
  (plaintext from the node's enrolled pods -> ``tcp_proxy`` tunnelling to the destination pod's
  port 15008 as HTTP/2 CONNECT over mTLS with the client pod's SVID, ``:authority`` = the original
  destination) and ``hbone`` (mTLS + CONNECT -> the pod named by ``:authority``);
- Envoy's listening sockets in the capture's sockmap slots. Envoy cannot be handed sockets it did
  not create, so the sockets it bound are copied out of the running Envoy with pidfd_getfd(2)
  (Linux >= 5.6, root) and put into the slots; the sockmap holds the socket, and it leaves the map
  when Envoy closes it. An accepted connection's local address is the original destination
  (sk_lookup does not rewrite it), which is what ``%DOWNSTREAM_LOCAL_ADDRESS%`` puts into the
  CONNECT.

The Envoy configurations are the loopback pair's (``bench.envoy``), re-bound: this is a
benchmark harness for one client pod and one server pod, not a general Envoy-based node proxy
(no per-destination identities, no policy).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from bench.envoy import EnvoyProcess, hbone_client_config, hbone_server_config, start_envoy
from lab.topology import LabState

OUTBOUND_PORT = 15001
HBONE_PORT = 15008
_SYS_PIDFD_GETFD = 438  # x86-64 and arm64 (the generic syscall table); alpha and mips differ
_libc = ctypes.CDLL(None, use_errno=True)


def pidfd_getfd(pid: int, target_fd: int) -> int:
    """A duplicate, in this process, of file descriptor ``target_fd`` of process ``pid``."""
    pidfd = os.pidfd_open(pid)
    try:
        fd = int(_libc.syscall(_SYS_PIDFD_GETFD, pidfd, target_fd, 0))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd({pid}, {target_fd}): {os.strerror(err)}")
        return fd
    finally:
        os.close(pidfd)


def listening_sockets(pid: int, ports: dict[str, int]) -> dict[str, socket.socket]:
    """Copies of the listening TCP sockets of process ``pid`` bound to ``ports`` (name -> port)."""
    found: dict[str, socket.socket] = {}
    by_port = {port: name for name, port in ports.items()}
    fd_dir = f"/proc/{pid}/fd"
    for entry in os.listdir(fd_dir):
        try:
            if not os.readlink(os.path.join(fd_dir, entry)).startswith("socket:"):
                continue
            fd = pidfd_getfd(pid, int(entry))
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.EBADF):
                continue  # closed since we listed it
            raise
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)  # a socket family Python does not know: not a TCP listener
            continue
        name = None
        tcp = sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
        if tcp and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            name = by_port.get(sock.getsockname()[1])
        if name is None or name in found:
            sock.close()
        else:
            found[name] = sock
    missing = set(ports) - set(found)
    if missing:
        for s in found.values():
            s.close()
        raise RuntimeError(f"process {pid} has no listening socket for {sorted(missing)} ({ports})")
    return found


def _rebind(config: dict[str, Any], listener: str, port: int) -> dict[str, Any]:
    """Give the named listener a fixed port and IP_TRANSPARENT (the capture requires it: the
    listener answers for the pods' addresses). It binds the wildcard address: Envoy takes a
    connection's local address from getsockname() only for wildcard listeners, and otherwise
    assumes the bound one, which would lose the original destination."""
    for ls in config["static_resources"]["listeners"]:
        if ls["name"] == listener:
            ls["address"] = {"socket_address": {"address": "0.0.0.0", "port_value": port}}
            ls["transparent"] = True
            return config
    raise KeyError(listener)


@dataclass
class LabPod:
    ref: str  # "namespace/name"
    ip: str
    credential: Any  # identity.svid.WorkloadCredential


@contextmanager
def envoy_node_proxies(
    state: LabState, client: LabPod, server: LabPod, server_ports: list[int], bundles: Any
) -> Iterator[dict[str, EnvoyProcess]]:
    """Capture + Envoy on the client's and the server's nodes of a lab that runs no agents
    (``LabState.load(name)`` of ``ztagent lab up --no-agents``); yields the two Envoys as
    ``{"client": ..., "server": ...}``.
    Everything is removed again on exit, also on failure; the pin directories are recorded in
    the lab's state first, so tearing the lab down removes them too."""
    from bpf.capture import Capture, EnrolledPod
    from lab.runner import pin_root

    lab = state.lab
    node_of = {p.ref: state.pods[p.ref]["node"] for p in (client, server)}
    if node_of[client.ref] == node_of[server.ref]:
        raise ValueError("client and server pods must sit on different nodes")
    client_cfg = _rebind(
        hbone_client_config(
            target="%DOWNSTREAM_LOCAL_ADDRESS%",
            server=(server.ip, HBONE_PORT),
            cred=client.credential,
            bundles=bundles,
            expect_san=str(server.credential.spiffe_id),
        ),
        "outbound",
        OUTBOUND_PORT,
    )
    server_cfg = _rebind(
        hbone_server_config(
            backend=(server.ip, server_ports[0]),
            cred=server.credential,
            bundles=bundles,
            routes={f"{server.ip}:{p}": (server.ip, p) for p in server_ports},
        ),
        "hbone_in",
        HBONE_PORT,
    )
    pin_dirs = {p.ref: os.path.join(pin_root(lab), f"envoy-{node_of[p.ref]}") for p in (client, server)}
    state.pin_dirs = [*state.pin_dirs, *pin_dirs.values(), pin_root(lab)]
    state.save()
    roles = [
        ("client", client, client_cfg, "outbound", OUTBOUND_PORT),
        ("server", server, server_cfg, "hbone_in", HBONE_PORT),
    ]
    with ExitStack() as stack:
        envoys: dict[str, EnvoyProcess] = {}
        for role, pod, config, listener, port in roles:
            rec = state.pods[pod.ref]
            ns = rec["node_netns"]
            cap = Capture(pin_dir=pin_dirs[pod.ref], netns=ns)
            stack.callback(cap.uninstall)  # also undoes a half-finished install
            cap.install()
            envoy = start_envoy(config, netns=ns)
            stack.callback(envoy.stop)
            socks = listening_sockets(envoy.proc.pid, {listener: port})
            with socks[listener] as sock:  # the sockmap keeps its own reference
                fd = sock.fileno()
                if listener == "outbound":
                    cap.set_listeners(fd, None, None)
                else:
                    cap.set_listeners(None, None, fd)
            ips = tuple(rec["ips"])
            cap.enroll(EnrolledPod(pod.ref, cap.host_ifname_for(ips), ips))
            envoys[role] = envoy
        yield envoys
