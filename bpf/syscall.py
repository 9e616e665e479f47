"""The few bpf(2) commands the capture needs, over ctypes, with no BCC/LLVM in the process.

BCC 0.26 has no BPF-link, pinning or sockmap API, and the long-running agent must not carry LLVM:
everything it does to the pinned objects goes through this module. Layouts follow
include/uapi/linux/bpf.h (union bpf_attr members and the *_info structs); the kernel zero-extends
shorter attrs, so each command passes only the members it uses.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import socket
from collections.abc import Iterator
from dataclasses import dataclass

_NR_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351, "riscv64": 280}

# enum bpf_cmd
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_LINK_CREATE = 28
BPF_LINK_DETACH = 34

BPF_ANY = 0
BPF_FS_MAGIC = 0xCAFE4A11

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A bpf(2) command failed; carries errno and names the command and object."""


def _nr_bpf() -> int:
    machine = platform.machine()
    try:
        return _NR_BPF[machine]
    except KeyError:
        raise BpfError(errno.ENOSYS, f"bpf(2) syscall number unknown for architecture {machine}") from None


def _bpf(cmd: int, attr: ctypes.Structure, what: str) -> int:
    ret = _libc.syscall(_nr_bpf(), ctypes.c_int(cmd), ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return int(ret)


class _MapElemAttr(ctypes.Structure):
    _fields_ = (
        ("map_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),  # also next_key
        ("flags", ctypes.c_uint64),
    )


class _ObjAttr(ctypes.Structure):
    _fields_ = (
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
    )


class _InfoAttr(ctypes.Structure):
    _fields_ = (("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64))


class _LinkCreateAttr(ctypes.Structure):
    _fields_ = (
        ("prog_fd", ctypes.c_uint32),
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    )


class _LinkDetachAttr(ctypes.Structure):
    _fields_ = (("link_fd", ctypes.c_uint32),)


class _TestRunAttr(ctypes.Structure):
    _fields_ = (
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    )


class SkLookupCtx(ctypes.Structure):
    """struct bpf_sk_lookup as BPF_PROG_TEST_RUN takes it (ingress_ifindex must stay 0 there)."""

    _fields_ = (
        ("cookie", ctypes.c_uint64),
        ("family", ctypes.c_uint32),
        ("protocol", ctypes.c_uint32),
        ("remote_ip4", ctypes.c_uint32),  # network byte order
        ("remote_ip6", ctypes.c_uint32 * 4),
        ("remote_port", ctypes.c_uint16),  # network byte order
        ("_pad", ctypes.c_uint16),
        ("local_ip4", ctypes.c_uint32),  # network byte order
        ("local_ip6", ctypes.c_uint32 * 4),
        ("local_port", ctypes.c_uint32),  # host byte order
        ("ingress_ifindex", ctypes.c_uint32),
    )


class _MapInfo(ctypes.Structure):
    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    )


class _LinkInfo(ctypes.Structure):
    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("netns_ino", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
    )


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    name: str


@dataclass(frozen=True)
class LinkInfo:
    type: int
    id: int
    prog_id: int
    netns_ino: int
    attach_type: int


def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(os.fsencode(path))
    attr = _ObjAttr(pathname=ctypes.addressof(p), bpf_fd=fd)
    _bpf(BPF_OBJ_PIN, attr, f"pin {path}")


def obj_get(path: str) -> int:
    p = ctypes.create_string_buffer(os.fsencode(path))
    attr = _ObjAttr(pathname=ctypes.addressof(p))
    return _bpf(BPF_OBJ_GET, attr, f"open pinned {path}")


def map_update(fd: int, key: bytes, value: bytes, what: str, flags: int = BPF_ANY) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    attr = _MapElemAttr(map_fd=fd, key=ctypes.addressof(k), value=ctypes.addressof(v), flags=flags)
    _bpf(BPF_MAP_UPDATE_ELEM, attr, f"update {what}")


def map_lookup(fd: int, key: bytes, value_size: int, what: str) -> bytes | None:
    """The value, or None when the key is absent."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    attr = _MapElemAttr(map_fd=fd, key=ctypes.addressof(k), value=ctypes.addressof(v))
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, attr, f"lookup {what}")
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_delete(fd: int, key: bytes, what: str) -> bool:
    """Delete a key; False when it was not there."""
    k = ctypes.create_string_buffer(key, len(key))
    attr = _MapElemAttr(map_fd=fd, key=ctypes.addressof(k))
    try:
        _bpf(BPF_MAP_DELETE_ELEM, attr, f"delete from {what}")
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_keys(fd: int, key_size: int, what: str, limit: int = 1 << 20) -> Iterator[bytes]:
    """Iterate keys (bounded by `limit`, so a map mutated under us cannot loop forever)."""
    cur: ctypes.Array[ctypes.c_char] | None = None
    for _ in range(limit):
        nxt = ctypes.create_string_buffer(key_size)
        attr = _MapElemAttr(map_fd=fd, key=ctypes.addressof(cur) if cur is not None else 0,
                            value=ctypes.addressof(nxt))
        try:
            _bpf(BPF_MAP_GET_NEXT_KEY, attr, f"iterate {what}")
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return
            raise
        yield nxt.raw
        cur = nxt


def link_create(prog_fd: int, target_fd: int, attach_type: int, what: str) -> int:
    attr = _LinkCreateAttr(prog_fd=prog_fd, target_fd=target_fd, attach_type=attach_type)
    return _bpf(BPF_LINK_CREATE, attr, f"attach {what}")


def link_detach(link_fd: int, what: str) -> None:
    _bpf(BPF_LINK_DETACH, _LinkDetachAttr(link_fd=link_fd), f"detach {what}")


def map_info(fd: int, what: str) -> MapInfo:
    info = _MapInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"info of {what}")
    return MapInfo(info.type, info.id, info.key_size, info.value_size, info.max_entries,
                   info.name.decode(errors="replace"))


def link_info(fd: int, what: str) -> LinkInfo:
    info = _LinkInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"info of {what}")
    return LinkInfo(info.type, info.id, info.prog_id, info.netns_ino, info.attach_type)


def prog_test_run_sk_lookup(prog_fd: int, ctx: SkLookupCtx) -> tuple[int, int]:
    """Run an sk_lookup program once on a synthetic lookup: (verdict, cookie of the assigned socket or 0)."""
    out = SkLookupCtx()
    attr = _TestRunAttr(
        prog_fd=prog_fd,
        repeat=1,
        ctx_size_in=ctypes.sizeof(ctx),
        ctx_in=ctypes.addressof(ctx),
        ctx_size_out=ctypes.sizeof(out),
        ctx_out=ctypes.addressof(out),
    )
    _bpf(BPF_PROG_TEST_RUN, attr, "test-run sk_lookup program")
    return int(attr.retval), int(out.cookie)


class _Statfs(ctypes.Structure):
    # Only f_type is read; the buffer is sized for the whole struct statfs (120 bytes on 64-bit).
    _fields_ = (("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 248))


def is_bpffs(path: str) -> bool:
    st = _Statfs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(st)) != 0:
        return False
    return bool((st.f_type & 0xFFFFFFFF) == BPF_FS_MAGIC)


def mount_bpffs(path: str) -> None:
    os.makedirs(path, exist_ok=True)
    if _libc.mount(b"bpf", os.fsencode(path), b"bpf", ctypes.c_ulong(0), None) != 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"mount bpffs at {path}: {os.strerror(err)}")


def socket_cookie(sock_fd: int) -> int:
    """SO_COOKIE of a socket: what a sockmap lookup returns for it."""
    so_cookie = 57
    with socket.socket(fileno=os.dup(sock_fd)) as s:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, so_cookie, 8), "little")
