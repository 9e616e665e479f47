"""`ztagent precheck`: can this node run the agent's eBPF capture? Says what is missing.

Checks, each with what to do when it fails:

* kernel >= 5.17: the capture program reads ``ingress_ifindex`` in its ``sk_lookup`` context
  (added in 5.17) to tell which pod a packet came from;
* the ``sk_lookup`` program type loads (a two-instruction program through ``bpf(2)``; needs
  CAP_BPF or CAP_SYS_ADMIN, so it is skipped, not failed, without them);
* bpffs mounted (the capture pins its maps and link under it);
* nftables with owner-flag tables (kernel >= 5.12 and libnftables): the fail-closed guard's
  tables die with the agent's netlink socket;
* BCC importable and kernel headers or BTF present: the program is compiled on the node;
* CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN in the effective set.

The judgement (:func:`evaluate`) is a pure function of the facts; :func:`gather` reads them.
Exit 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import importlib.util
import json
import os
import platform
import re
import sys
from dataclasses import asdict, dataclass
from typing import Any

import yaml

from bpf import abi

MIN_KERNEL = (5, 17)  # sk_lookup's ingress_ifindex
MIN_KERNEL_NFT_OWNER = (5, 12)  # NFT_TABLE_F_OWNER
CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39
BPF_PROG_LOAD = 5


@dataclass(frozen=True)
class HostFacts:
    kernel_release: str
    cap_eff: int  # /proc/self/status CapEff
    bpffs_mounted: bool
    btf: bool  # /sys/kernel/btf/vmlinux
    kernel_headers: bool  # /lib/modules/<release>/build or the kheaders module
    bcc: str | None  # bcc's version, None if it does not import
    libnftables: bool
    # None: the probe program loaded; "skip: ..." not attempted; anything else: why it failed.
    sk_lookup: str | None


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: could not be checked here
    detail: str
    fix: str = ""


def kernel_version(release: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", release)
    if m is None:
        raise ValueError(f"kernel release {release!r}: expected MAJOR.MINOR...")
    return int(m.group(1)), int(m.group(2))


def _has(caps: int, bit: int) -> bool:
    return bool(caps >> bit & 1)


def evaluate(f: HostFacts) -> list[Check]:
    """What the node lacks, as checks with a fix each."""
    ver = kernel_version(f.kernel_release)
    vs = ".".join(map(str, ver))
    can_bpf = _has(f.cap_eff, CAP_BPF) or _has(f.cap_eff, CAP_SYS_ADMIN)
    out = [
        Check(
            "kernel",
            ver >= MIN_KERNEL,
            f"{f.kernel_release} (capture needs >= 5.17 for ingress_ifindex)",
            "upgrade the node's kernel to 5.17 or later",
        ),
    ]
    if f.sk_lookup is None:
        out.append(Check("sk_lookup", True, "an sk_lookup program loads"))
    elif f.sk_lookup.startswith("skip"):
        out.append(Check("sk_lookup", None, f.sk_lookup, "run precheck as root to probe the program type"))
    else:
        out.append(
            Check(
                "sk_lookup",
                False,
                f"the sk_lookup program type does not load: {f.sk_lookup}",
                "a kernel built with CONFIG_BPF_SYSCALL and CONFIG_NET (5.9+)",
            )
        )
    out += [
        Check(
            "bpffs",
            f.bpffs_mounted,
            "bpffs mounted" if f.bpffs_mounted else "no bpf filesystem mounted",
            "mount -t bpf bpffs /sys/fs/bpf (the agent mounts it when it may)",
        ),
        Check(
            "nftables-owner",
            ver >= MIN_KERNEL_NFT_OWNER and f.libnftables,
            f"kernel {vs} (owner-flag tables need >= 5.12), "
            f"libnftables {'found' if f.libnftables else 'missing'}",
            "apt-get install nftables (libnftables1); kernel 5.12 or later",
        ),
        Check(
            "bcc",
            f.bcc is not None,
            f"bcc {f.bcc}" if f.bcc else "python3 bcc does not import",
            "apt-get install python3-bpfcc bpfcc-tools",
        ),
        Check(
            "kernel-headers",
            f.kernel_headers or f.btf,
            f"headers {'present' if f.kernel_headers else 'missing'}, "
            f"BTF {'present' if f.btf else 'missing'}",
            f"apt-get install linux-headers-{f.kernel_release} (or a kernel with CONFIG_IKHEADERS / BTF)",
        ),
        Check(
            "CAP_BPF",
            can_bpf,
            "CAP_BPF or CAP_SYS_ADMIN " + ("held" if can_bpf else "missing"),
            "run the agent with CAP_BPF (or CAP_SYS_ADMIN on kernels before 5.8)",
        ),
        Check(
            "CAP_NET_ADMIN",
            _has(f.cap_eff, CAP_NET_ADMIN),
            "CAP_NET_ADMIN " + ("held" if _has(f.cap_eff, CAP_NET_ADMIN) else "missing"),
            "run the agent with CAP_NET_ADMIN (policy routing, nftables)",
        ),
    ]
    return out


# -- gathering (I/O) ----------------------------------------------------------------------------


def _cap_eff() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def _bpffs_mounted() -> bool:
    with open("/proc/mounts") as f:
        return any(len(p) > 2 and p[2] == "bpf" for p in (line.split() for line in f))


def _bcc_version() -> str | None:
    if importlib.util.find_spec("bcc") is None:
        return None
    try:
        import bcc  # type: ignore[import-not-found,unused-ignore]
    except Exception:
        return None
    return str(getattr(bcc, "__version__", "unknown"))


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
    ]


def probe_sk_lookup(cap_eff: int) -> str | None:
    """Load ``r0 = 1 (SK_PASS); exit`` as an sk_lookup program and close it at once."""
    if not (_has(cap_eff, CAP_BPF) or _has(cap_eff, CAP_SYS_ADMIN)):
        return "skip: no CAP_BPF/CAP_SYS_ADMIN to load a probe program"
    # bpf/syscall.py has no program-load call (BCC loads the real program), so the probe's two
    # instructions go through bpf(2) here: BPF_MOV64_IMM(r0, 1), BPF_EXIT.
    insns = (ctypes.c_uint64 * 2)(0x00000001_000000B7, 0x95)
    lic = ctypes.create_string_buffer(b"GPL")
    attr = _ProgLoadAttr(
        prog_type=abi.BPF_PROG_TYPE_SK_LOOKUP,
        insn_cnt=2,
        insns=ctypes.addressof(insns),
        license=ctypes.addressof(lic),
        expected_attach_type=abi.BPF_SK_LOOKUP,
    )
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    nr = {"x86_64": 321, "aarch64": 280}.get(platform.machine())
    if nr is None:
        return f"skip: bpf(2) number unknown on {platform.machine()}"
    fd = libc.syscall(
        ctypes.c_long(nr), ctypes.c_int(BPF_PROG_LOAD), ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr))
    )
    if fd < 0:
        err = ctypes.get_errno()
        return f"bpf(BPF_PROG_LOAD): {errno.errorcode.get(err, err)} ({os.strerror(err)})"
    os.close(fd)
    return None


def gather() -> HostFacts:
    release = platform.release()
    caps = _cap_eff()
    return HostFacts(
        kernel_release=release,
        cap_eff=caps,
        bpffs_mounted=_bpffs_mounted(),
        btf=os.path.exists("/sys/kernel/btf/vmlinux"),
        kernel_headers=os.path.isdir(f"/lib/modules/{release}/build")
        or os.path.exists("/sys/kernel/kheaders.tar.xz"),
        bcc=_bcc_version(),
        libnftables=ctypes.util.find_library("nftables") is not None,
        sk_lookup=probe_sk_lookup(caps),
    )


# -- command ------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("precheck", help="check this node's kernel and eBPF prerequisites for capture")
    p.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    p.set_defaults(func=run)


def report(checks: list[Check]) -> dict[str, Any]:
    return {"ok": all(c.ok is not False for c in checks), "checks": [asdict(c) for c in checks]}


def run(args: argparse.Namespace) -> int:
    checks = evaluate(gather())
    rep = report(checks)
    if args.output == "json":
        json.dump(rep, sys.stdout, indent=2)
        print()
    elif args.output == "yaml":
        yaml.safe_dump(rep, sys.stdout, sort_keys=False)
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            mark = {True: "ok  ", False: "FAIL", None: "skip"}[c.ok]
            print(f"{mark}  {c.name.ljust(width)}  {c.detail}")
            if c.ok is not True and c.fix:
                print(f"      {' ' * width}  -> {c.fix}")
        print("node is ready for eBPF capture" if rep["ok"] else "node is NOT ready for eBPF capture")
    return 0 if rep["ok"] else 1
