"""Fast, honest failure while no agent serves the node: captured SYNs get a TCP reset at once.

Capture alone fails closed by dropping: with no listener in the sockmap the sk_lookup program
returns SK_DROP, so a pod's new connection times out (5-10 s in clients, ~127 s with the
kernel's SYN retries) instead of being refused. A reset cannot come from the kernel's own path
(the reply's source is the non-local original destination, which the output route refuses), and
an sk_lookup program cannot reject. So two nftables tables in the node's namespace do it:

``table ip ztagent`` (persistent, like the routing rules: it outlives the agent)
    a set ``pods`` of enrolled pod addresses, and an input chain (priority -150) that answers a
    SYN from or to an enrolled pod with ``reject with tcp reset`` — unless the SYN carries the
    ``ALIVE_MARK`` bit, which it clears. nftables' reject routes its reset with any source
    address, so the pod (or the remote agent dialling HBONE) gets it within milliseconds.

``table ip ztagent-alive`` (``flags owner``: owned by the serving agent's netlink socket)
    one input chain (priority -200) that sets ``ALIVE_MARK`` on every SYN. The kernel deletes an
    owned table when its socket closes, i.e. the moment the agent process exits for any reason,
    so "an agent serves this node" needs no heartbeat and cannot outlive the agent.

Neither table ever accepts a packet the capture would not: with the agent alive, marked SYNs
continue to sk_lookup exactly as before; with it gone, they are reset instead of dropped. Never a
bypass. The owner flag needs Linux >= 5.12 (bpf/README.md lists the kernels).

Both tables are written through libnftables (the ``nft`` library Debian's nftables ships), by
ctypes: the owned table must be created through a netlink socket this process keeps open for its
lifetime, which the ``nft`` command line (a separate process) cannot do. Python bindings exist
(``python3-nftables``) but are a thin JSON layer over the same three calls and only ship for
Debian's python3, as BCC does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import os
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

GUARD_TABLE = "ztagent"
ALIVE_TABLE = "ztagent-alive"
# One bit of skb->mark, set on SYNs while an agent serves the node and cleared again by the guard
# before anything else sees the packet (no other mark bits are touched).
ALIVE_MARK = 0x20000000
_CLEAR_MASK = ~ALIVE_MARK & 0xFFFFFFFF
_SYN = "tcp flags & (syn | ack) == syn"
CLONE_NEWNET = 0x40000000  # os.setns arrived in Python 3.12; this runs on 3.11 too
_libc = ctypes.CDLL(None, use_errno=True)

T = TypeVar("T")


class GuardError(Exception):
    """An nftables command failed; the message carries nft's own error."""


def guard_ruleset() -> str:
    """The persistent table's definition (idempotent: re-applying keeps the set's contents)."""
    return (
        f"add table ip {GUARD_TABLE}\n"
        f"add set ip {GUARD_TABLE} pods {{ type ipv4_addr; }}\n"
        f"add chain ip {GUARD_TABLE} input {{ type filter hook input priority -150; policy accept; }}\n"
        f"flush chain ip {GUARD_TABLE} input\n"
        f"add rule ip {GUARD_TABLE} input {_SYN} meta mark & {ALIVE_MARK:#x} == {ALIVE_MARK:#x} "
        f"meta mark set meta mark & {_CLEAR_MASK:#x} return\n"
        f"add rule ip {GUARD_TABLE} input {_SYN} ip saddr @pods counter reject with tcp reset\n"
        f"add rule ip {GUARD_TABLE} input {_SYN} ip daddr @pods counter reject with tcp reset\n"
    )


def alive_ruleset() -> str:
    return (
        f"table ip {ALIVE_TABLE} {{\n"
        "  flags owner\n"
        "  chain input {\n"
        "    type filter hook input priority -200; policy accept;\n"
        f"    {_SYN} meta mark set meta mark | {ALIVE_MARK:#x}\n"
        "  }\n"
        "}\n"
    )


class _Nft:
    """One libnftables context: a netlink socket in the namespace it was created in."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            raise GuardError(f"libnftables is not available ({exc}): install Debian's nftables") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        self._lib = lib
        ctx = lib.nft_ctx_new(0)
        if not ctx:
            raise GuardError("nft_ctx_new failed")
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        self._ctx: int | None = ctx

    def run(self, commands: str) -> str:
        if self._ctx is None:
            raise GuardError("nftables context closed")
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, commands.encode())
        out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
        if rc != 0:
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace").strip()
            raise GuardError(err.splitlines()[0] if err else f"nft failed ({rc})")
        return out

    def close(self) -> None:
        if self._ctx is not None:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None


def _in_netns(netns_path: str | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` with this thread in ``netns_path`` (None: where we are). Netlink sockets made
    there stay bound to that namespace, whichever thread uses them later."""
    if netns_path is None:
        return fn()
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(netns_path, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns_path}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    t = threading.Thread(target=target, name="ztagent-nft-netns")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


class Guard:
    """The two tables for one node namespace (``netns_path`` None: this process's)."""

    def __init__(self, netns_path: str | None = None) -> None:
        self.netns_path = netns_path
        self._nft: _Nft | None = None
        self._alive: _Nft | None = None

    def _cmd(self, commands: str) -> str:
        if self._nft is None:
            self._nft = _in_netns(self.netns_path, _Nft)
        return self._nft.run(commands)

    def install(self) -> None:
        """Create (or refresh) the persistent table; enrolled addresses already in it stay."""
        self._cmd(guard_ruleset())

    def add_pods(self, ips: Iterable[str]) -> None:
        addrs = [str(ipaddress.IPv4Address(ip)) for ip in ips]
        if addrs:
            self._cmd(f"add element ip {GUARD_TABLE} pods {{ {', '.join(addrs)} }}\n")

    def remove_pods(self, ips: Iterable[str]) -> None:
        held = self.pods()
        addrs = [str(ipaddress.IPv4Address(ip)) for ip in ips if str(ipaddress.IPv4Address(ip)) in held]
        if addrs:
            self._cmd(f"delete element ip {GUARD_TABLE} pods {{ {', '.join(addrs)} }}\n")

    def pods(self) -> set[str]:
        try:
            out = self._cmd(f"list set ip {GUARD_TABLE} pods\n")
        except GuardError:
            return set()
        found: set[str] = set()
        for line in out.splitlines():
            line = line.strip()
            if line.startswith("elements = {"):
                body = line[len("elements = {") :].rstrip("}").strip()
                found.update(x.strip() for x in body.split(",") if x.strip())
        return found

    def installed(self) -> bool:
        try:
            self._cmd(f"list table ip {GUARD_TABLE}\n")
        except GuardError:
            return False
        return True

    def rejected(self) -> int:
        """SYNs reset so far (both directions), from the rules' counters."""
        try:
            out = self._cmd(f"list chain ip {GUARD_TABLE} input\n")
        except GuardError:
            return 0
        total = 0
        for line in out.splitlines():
            if "reject" in line and "packets" in line:
                words = line.split()
                total += int(words[words.index("packets") + 1])
        return total

    def mark_serving(self) -> None:
        """This process serves the node from now on: SYNs pass to the capture until it exits."""
        if self._alive is not None:
            return
        alive = _in_netns(self.netns_path, _Nft)
        try:
            alive.run(alive_ruleset())
        except GuardError:
            alive.close()
            raise
        self._alive = alive

    def unmark_serving(self) -> None:
        """Stop marking (clean stop: before the listeners close, so new SYNs are reset at once)."""
        alive, self._alive = self._alive, None
        if alive is not None:
            try:
                alive.run(f"delete table ip {ALIVE_TABLE}\n")
            finally:
                alive.close()

    @property
    def serving(self) -> bool:
        return self._alive is not None

    def remove(self) -> None:
        """Take the guard off the node (uninstall): un-enrolled traffic is not ours to reset."""
        self.unmark_serving()
        if self.installed():
            self._cmd(f"delete table ip {GUARD_TABLE}\n")

    def close(self) -> None:
        """Drop this process's sockets. The owned table goes with them (what a crash does); the
        persistent table stays."""
        for ctx in (self._alive, self._nft):
            if ctx is not None:
                ctx.close()
        self._alive = self._nft = None


__all__ = [
    "ALIVE_MARK",
    "ALIVE_TABLE",
    "GUARD_TABLE",
    "Guard",
    "GuardError",
    "alive_ruleset",
    "guard_ruleset",
]
