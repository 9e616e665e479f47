"""The pinned capture objects (link + maps under one bpffs directory), operated with raw bpf(2).

This is what the long-running agent holds: a handful of fds, no BCC, no LLVM. Opening validates
everything (map types and sizes, ABI version, that the link is still attached to the expected
network namespace), so a restarted agent either reuses a sound set of pins or is told they are
stale and reloads.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket

from bpf import abi, syscall


class StalePins(Exception):
    """The pin directory does not hold a usable, attached capture (reason in the message)."""


def _u32(v: int) -> bytes:
    return v.to_bytes(4, "little")


def _ip_key(ip: str) -> bytes:
    # Network byte order, as the program reads ctx->remote_ip4/local_ip4.
    return socket.inet_aton(str(ipaddress.IPv4Address(ip)))


class PinnedCapture:
    """Open fds on the pinned link and maps; close() releases fds only (pins stay)."""

    def __init__(self, pin_dir: str, fds: dict[str, int], link_fd: int, link: syscall.LinkInfo,
                 hbone_port: int) -> None:
        self.pin_dir = pin_dir
        self._fds = fds
        self._link_fd = link_fd
        self.link = link
        self.hbone_port = hbone_port

    @classmethod
    def open(cls, pin_dir: str, netns_ino: int) -> PinnedCapture:
        """Open and validate the pins; StalePins if anything is missing, foreign or detached."""
        fds: dict[str, int] = {}
        link_fd = -1
        try:
            link_path = os.path.join(pin_dir, abi.LINK_PIN)
            try:
                link_fd = syscall.obj_get(link_path)
            except syscall.BpfError as e:
                raise StalePins(f"no capture link pinned at {link_path} ({e.strerror})") from e
            link = syscall.link_info(link_fd, link_path)
            if link.type != abi.BPF_LINK_TYPE_NETNS or link.attach_type != abi.BPF_SK_LOOKUP:
                raise StalePins(f"{link_path} is not an sk_lookup netns link (type {link.type})")
            if link.netns_ino != netns_ino:
                # 0 when the namespace it was attached to is gone (e.g. a recreated node netns).
                raise StalePins(f"{link_path} is attached to netns inode {link.netns_ino}, "
                                f"not this one ({netns_ino})")
            for name in abi.ALL_MAPS:
                path = os.path.join(pin_dir, name)
                try:
                    fds[name] = syscall.obj_get(path)
                except syscall.BpfError as e:
                    raise StalePins(f"map {name} not pinned at {path} ({e.strerror})") from e
                info = syscall.map_info(fds[name], path)
                got = (info.type, info.key_size, info.value_size, info.max_entries)
                if got != abi.MAP_LAYOUT[name]:
                    raise StalePins(f"map {path} has layout {got}, expected {abi.MAP_LAYOUT[name]}")
            meta = fds[abi.MAP_META]
            abi_raw = syscall.map_lookup(meta, _u32(abi.META_ABI), 8, abi.MAP_META) or b""
            abi_v = int.from_bytes(abi_raw, "little")
            if abi_v != abi.ABI_VERSION:
                raise StalePins(f"pinned program has ABI {abi_v}, this agent speaks {abi.ABI_VERSION}")
            port_raw = syscall.map_lookup(meta, _u32(abi.META_HBONE_PORT), 8, abi.MAP_META) or b""
            hbone_port = int.from_bytes(port_raw, "little")
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            if link_fd >= 0:
                os.close(link_fd)
            raise
        return cls(pin_dir, fds, link_fd, link, hbone_port)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        if self._link_fd >= 0:
            os.close(self._link_fd)
            self._link_fd = -1

    def detach(self) -> None:
        """Detach the link now (the program stops running) and remove the pins."""
        with contextlib.suppress(syscall.BpfError):
            syscall.link_detach(self._link_fd, "capture link")
        self.close()
        remove_pins(self.pin_dir)

    # --- listeners ------------------------------------------------------------------------------

    def set_listener(self, slot: int, fd: int | None) -> None:
        m = self._fds[abi.MAP_LISTENERS]
        what = f"{abi.MAP_LISTENERS}[{abi.SLOT_NAMES[slot]}]"
        if fd is None:
            try:
                syscall.map_delete(m, _u32(slot), what)
            except syscall.BpfError as e:
                # A sockmap answers EINVAL, not ENOENT, for an empty slot: already what we want.
                if e.errno != errno.EINVAL:
                    raise
        else:
            syscall.map_update(m, _u32(slot), fd.to_bytes(8, "little"), what)

    def listener_cookie(self, slot: int) -> int | None:
        raw = syscall.map_lookup(self._fds[abi.MAP_LISTENERS], _u32(slot), 8, abi.MAP_LISTENERS)
        return None if raw is None else int.from_bytes(raw, "little")

    # --- pods -----------------------------------------------------------------------------------

    def add_iface(self, ifindex: int) -> None:
        syscall.map_update(self._fds[abi.MAP_IFACES], _u32(ifindex), bytes(abi.IfaceValue()), abi.MAP_IFACES)

    def del_iface(self, ifindex: int) -> bool:
        return syscall.map_delete(self._fds[abi.MAP_IFACES], _u32(ifindex), abi.MAP_IFACES)

    def ifaces(self) -> set[int]:
        keys = syscall.map_keys(self._fds[abi.MAP_IFACES], 4, abi.MAP_IFACES, limit=abi.MAX_IFACES + 1)
        return {int.from_bytes(k, "little") for k in keys}

    def add_pod_ip(self, ip: str, ifindex: int) -> None:
        value = bytes(abi.PodIpValue(ifindex=ifindex, flags=0))
        try:
            syscall.map_update(self._fds[abi.MAP_POD_IPS], _ip_key(ip), value, f"{abi.MAP_POD_IPS}[{ip}]")
        except syscall.BpfError as e:
            if e.errno == errno.E2BIG:
                raise syscall.BpfError(e.errno, f"{abi.MAP_POD_IPS} is full ({abi.MAX_POD_IPS})") from e
            raise

    def pod_ip_ifindex(self, ip: str) -> int | None:
        raw = syscall.map_lookup(self._fds[abi.MAP_POD_IPS], _ip_key(ip), 8, abi.MAP_POD_IPS)
        return None if raw is None else abi.PodIpValue.from_buffer_copy(raw).ifindex

    def del_pod_ip(self, ip: str) -> bool:
        return syscall.map_delete(self._fds[abi.MAP_POD_IPS], _ip_key(ip), abi.MAP_POD_IPS)

    def pod_ips(self) -> dict[str, int]:
        fd = self._fds[abi.MAP_POD_IPS]
        out: dict[str, int] = {}
        for key in syscall.map_keys(fd, 4, abi.MAP_POD_IPS, limit=abi.MAX_POD_IPS + 1):
            raw = syscall.map_lookup(fd, key, 8, abi.MAP_POD_IPS)
            if raw is not None:
                out[socket.inet_ntoa(key)] = abi.PodIpValue.from_buffer_copy(raw).ifindex
        return out

    def counters(self) -> dict[str, int]:
        fd = self._fds[abi.MAP_COUNTERS]
        out: dict[str, int] = {}
        for idx, name in abi.COUNTER_NAMES.items():
            raw = syscall.map_lookup(fd, _u32(idx), 8, abi.MAP_COUNTERS)
            out[name] = int.from_bytes(raw or b"", "little")
        return out


def detach_stale_link(pin_dir: str, netns_ino: int) -> bool:
    """Detach a pinned link that is attached to *this* namespace (e.g. an older ABI), so a reload
    never leaves two programs running; links of other namespaces are left to their owners."""
    try:
        fd = syscall.obj_get(os.path.join(pin_dir, abi.LINK_PIN))
    except syscall.BpfError:
        return False
    try:
        info = syscall.link_info(fd, "stale capture link")
        if info.netns_ino != netns_ino:
            return False
        syscall.link_detach(fd, "stale capture link")
        return True
    finally:
        os.close(fd)


def remove_pins(pin_dir: str) -> None:
    """Unlink every pin this package makes, then the directory if empty. Idempotent."""
    for name in (abi.LINK_PIN, *abi.ALL_MAPS):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(pin_dir, name))
    with contextlib.suppress(FileNotFoundError, OSError):
        os.rmdir(pin_dir)
