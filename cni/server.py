"""The node agent's side of the CNI protocol: an asyncio Unix socket server that authenticates each
caller by its peer credentials and hands every ADD / DEL / CHECK to a :class:`CniHandler`.

Authentication is two locks: the socket file is mode 0600 (0660 with ``group``) in a 0750
directory, and every accepted connection's ``SO_PEERCRED`` uid must be in ``allowed_uids`` (root by
default: container runtimes run CNI plugins as root). A refused peer gets an error reply naming its
uid, and the connection is closed.

The socket is bound under a temporary name, chmod-ed, then renamed over ``path``: a client never
sees it with looser permissions, and a restarted agent takes the path over from a stale file (or a
draining predecessor) atomically.

Operations on one attachment (container id, ifname) are serialized: a runtime that timed out and
retried must not race its own earlier request inside the handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Protocol

from cni import protocol
from cni.protocol import EnrollResult, PodEvent
from cni.spec import DEFAULT_SOCKET

log = logging.getLogger("ztagent.cni")

_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


class CniHandler(Protocol):
    """What the node agent implements. Each call returns only when the outcome holds: ``add`` returns
    ``enrolled`` once the pod's traffic is captured (or ``not-enrolled`` once it decided the pod is
    not in the mesh); ``del_`` returns ``not-enrolled`` once nothing of the attachment is left (also
    when it never knew it); ``check`` answers whether an ADDed attachment is still as ADD left it.
    ``EnrollResult.error(reason, retry=True)`` for transient conditions (e.g. still reconciling)."""

    async def add(self, pod: PodEvent) -> EnrollResult: ...

    async def del_(self, pod: PodEvent) -> EnrollResult: ...

    async def check(self, pod: PodEvent) -> EnrollResult: ...


class CniServer:
    def __init__(
        self,
        handler: CniHandler,
        path: str = DEFAULT_SOCKET,
        *,
        group: int | None = None,
        allowed_uids: frozenset[int] = frozenset({0}),
        read_timeout_s: float = 5.0,
        handler_timeout_s: float = 25.0,
    ) -> None:
        # handler_timeout_s stays below the plugin's default timeoutSeconds (30) so that the plugin
        # gets our explicit "retry" answer rather than its own timeout.
        self.handler = handler
        self.path = path
        self.group = group
        self.allowed_uids = allowed_uids
        self.read_timeout_s = read_timeout_s
        self.handler_timeout_s = handler_timeout_s
        self._server: asyncio.Server | None = None
        self._inode: tuple[int, int] | None = None
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._lock_users: dict[tuple[str, str], int] = {}
        self._conns: set[asyncio.Task[None]] = set()
        self.refused = 0  # connections refused by peer credentials (for metrics/tests)

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("CniServer already started")
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o750, exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # umask-independent: bind, then tighten before the file gets its public name.
            sock.bind(tmp)
            if self.group is not None:
                os.chown(tmp, -1, self.group)
            os.chmod(tmp, 0o660 if self.group is not None else 0o600)
            sock.listen(128)
            sock.setblocking(False)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock)
            os.replace(tmp, self.path)
        except BaseException:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        log.info("CNI socket listening on %s", self.path)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for t in list(self._conns):
            t.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        # Remove the path only if it is still ours (a successor may have renamed its socket over it).
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)

    async def __aenter__(self) -> CniServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            await self._one(reader, writer)
        except asyncio.CancelledError:
            pass
        except ConnectionError as e:
            # Typically a plugin that gave up (its timeoutSeconds) before the handler finished.
            log.warning("CNI connection closed by the plugin before the reply: %s", e)
        except Exception:
            log.exception("CNI connection failed")
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _reply(self, writer: asyncio.StreamWriter, res: EnrollResult) -> None:
        writer.write(protocol.encode_reply(res))
        await writer.drain()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if uid not in self.allowed_uids:
            self.refused += 1
            log.warning("CNI socket: refused peer pid %d uid %d", pid, uid)
            allowed = ", ".join(str(u) for u in sorted(self.allowed_uids))
            await self._reply(writer, EnrollResult.error(
                f"peer uid {uid} (pid {pid}) is not allowed on {self.path}: only uid {allowed} "
                "(the container runtime) may call the node agent"))
            return
        try:
            header = await asyncio.wait_for(reader.readexactly(protocol.HEADER.size), self.read_timeout_s)
            payload = await asyncio.wait_for(
                reader.readexactly(protocol.frame_length(header)), self.read_timeout_s
            )
            event = protocol.decode_request(payload)
        except (TimeoutError, asyncio.IncompleteReadError) as e:
            log.warning("CNI socket: pid %d sent no complete request within %.0fs (%s)",
                        pid, self.read_timeout_s, type(e).__name__)
            return
        except protocol.ProtocolError as e:
            log.warning("CNI socket: bad request from pid %d: %s", pid, e)
            await self._reply(writer, EnrollResult.error(f"bad request: {e}"))
            return
        res = await self._dispatch(event)
        log.info("CNI %s %s/%s container %s ifname %s: %s%s", event.op, event.pod.namespace,
                 event.pod.name, event.container_id, event.ifname, res.status,
                 f" ({res.reason})" if res.reason else "")
        await self._reply(writer, res)

    async def _dispatch(self, event: PodEvent) -> EnrollResult:
        call: Callable[[PodEvent], Awaitable[EnrollResult]] = {
            "ADD": self.handler.add, "DEL": self.handler.del_, "CHECK": self.handler.check,
        }[event.op]
        key = event.key
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._lock_users[key] = self._lock_users.get(key, 0) + 1
        try:
            # The wait for an earlier operation on the same attachment counts against the timeout.
            res = await asyncio.wait_for(_locked(lock, call, event), self.handler_timeout_s)
            if not isinstance(res, EnrollResult):
                raise TypeError(f"handler returned {type(res).__name__}, expected EnrollResult")
            return res
        except TimeoutError:
            return EnrollResult.error(
                f"{event.op} did not finish within {self.handler_timeout_s:g}s", retry=True)
        except Exception as e:
            log.exception("CNI handler %s failed for container %s", event.op, event.container_id)
            return EnrollResult.error(f"{event.op} failed in the agent: {type(e).__name__}: {e}")
        finally:
            self._lock_users[key] -= 1
            if not self._lock_users[key]:
                del self._lock_users[key]
                del self._locks[key]


async def _locked(
    lock: asyncio.Lock, call: Callable[[PodEvent], Awaitable[EnrollResult]], event: PodEvent
) -> EnrollResult:
    async with lock:
        return await call(event)
