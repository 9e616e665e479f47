"""Compile, load, attach and pin the capture program: the only module that imports BCC.

Compiling with BCC maps LLVM into the process (tens of MB). The agent therefore runs this as a
short-lived child (`python -m bpf.loader load ...`) and afterwards touches only the pinned link and
maps through raw bpf(2) calls (bpf/pinned.py). The child exits; the pins keep everything alive.

    python -m bpf.loader load --pin-dir /sys/fs/bpf/ztagent/node-a --netns /proc/<pid>/ns/net
    python -m bpf.loader status --pin-dir ...
    python -m bpf.loader uninstall --pin-dir ... [--netns NAME] [--table N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bpf import abi, syscall


@dataclass(frozen=True)
class Loaded:
    prog_id: int
    link_id: int
    netns_ino: int
    pin_dir: str


def compile_program(extra_cflags: Sequence[str] = ()) -> tuple[Any, Any]:
    """Compile and load (not attach) the sk_lookup program: (BPF module, loaded function).

    Constants go in as -D flags. Tests use this directly for BPF_PROG_TEST_RUN.
    """
    from bcc import BPF  # deferred: importing bcc loads libbcc/LLVM

    cflags = [f"-I{abi.SOURCE_DIR}", "-Wno-unused-function", *extra_cflags]
    module = BPF(src_file=str(abi.PROGRAM_SOURCE).encode(), cflags=cflags)
    fn = module.load_func(abi.PROG_NAME.encode(), abi.BPF_PROG_TYPE_SK_LOOKUP,
                          attach_type=abi.BPF_SK_LOOKUP)
    return module, fn


def map_fd(module: Any, name: str) -> int:
    """fd of a map of a BCC module; works for map types BCC's table classes do not know (sockmap)."""
    from bcc.libbcc import lib

    fd = int(lib.bpf_table_fd(module.module, name.encode()))
    if fd < 0:
        raise RuntimeError(f"BCC module has no map {name}")
    return fd


def load(pin_dir: str, netns_path: str, hbone_port: int = abi.HBONE_PORT) -> Loaded:
    """Load the program, pin its maps, attach it to the netns with a BPF link and pin the link.

    The link is pinned last: a pin directory with a link in it is complete. On failure every pin
    made here is removed again, so a half-done load never looks valid.
    """
    if not 0 < hbone_port < 65536:
        raise ValueError(f"hbone port {hbone_port} out of range")
    if os.path.exists(os.path.join(pin_dir, abi.LINK_PIN)):
        raise FileExistsError(f"{pin_dir} already holds a capture link; remove stale pins first")
    os.makedirs(pin_dir, exist_ok=True)
    module, fn = compile_program([f"-DZT_HBONE_PORT={hbone_port}"])
    pinned: list[str] = []
    netns_fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        meta = map_fd(module, abi.MAP_META)
        for idx, value in ((abi.META_ABI, abi.ABI_VERSION), (abi.META_HBONE_PORT, hbone_port)):
            syscall.map_update(meta, idx.to_bytes(4, "little"), value.to_bytes(8, "little"), abi.MAP_META)
        for name in abi.ALL_MAPS:
            path = os.path.join(pin_dir, name)
            syscall.obj_pin(map_fd(module, name), path)
            pinned.append(path)
        link_fd = syscall.link_create(fn.fd, netns_fd, abi.BPF_SK_LOOKUP, f"sk_lookup to {netns_path}")
        try:
            path = os.path.join(pin_dir, abi.LINK_PIN)
            syscall.obj_pin(link_fd, path)
            pinned.append(path)
            info = syscall.link_info(link_fd, "capture link")
        finally:
            os.close(link_fd)
    except BaseException:
        for path in pinned:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        raise
    finally:
        os.close(netns_fd)
        module.cleanup()
    return Loaded(prog_id=info.prog_id, link_id=info.id, netns_ino=info.netns_ino, pin_dir=pin_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bpf.loader", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_load = sub.add_parser("load", help="compile, load, attach and pin (prints JSON)")
    p_load.add_argument("--pin-dir", required=True)
    p_load.add_argument("--netns", required=True, help="path of the network namespace to attach to")
    p_load.add_argument("--hbone-port", type=int, default=abi.HBONE_PORT)
    p_status = sub.add_parser("status", help="print the pinned capture's state as JSON")
    p_status.add_argument("--pin-dir", required=True)
    p_status.add_argument("--netns", default=None, help="netns name or path (default: this one)")
    p_status.add_argument("--table", type=int, default=None)
    p_un = sub.add_parser("uninstall", help="remove link, maps, pins, rules and routes (fails open!)")
    p_un.add_argument("--pin-dir", required=True)
    p_un.add_argument("--netns", default=None, help="netns name or path (default: this one)")
    p_un.add_argument("--table", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "load":
            print(json.dumps(asdict(load(args.pin_dir, args.netns, args.hbone_port))))
            return 0
        from bpf.capture import DEFAULT_TABLE, Capture

        cap = Capture(args.pin_dir, table=args.table or DEFAULT_TABLE, netns=args.netns)
        if args.cmd == "status":
            print(json.dumps(asdict(cap.status()), indent=2, sort_keys=True))
        else:
            cap.uninstall()
        return 0
    except (OSError, ValueError, RuntimeError) as e:
        print(f"bpf.loader {args.cmd}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
