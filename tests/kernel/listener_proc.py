"""A minimal node-agent process for capture tests, run inside a node netns with `nsenter --net=...`.

It does what the agent does with the capture API and nothing else: opens the three IP_TRANSPARENT
listeners, install()s capture (reusing sound pins), set_listeners(), enrolls the pods given on the
command line, then answers every accepted connection with one line naming the listener that got
it and the addresses it saw, e.g. "outbound dst=10.244.2.2:8080 src=10.244.1.2", and closes it.
SIGTERM: with --detach-on-term it calls capture.detach() (clean stop) before exiting.
"""

from __future__ import annotations

import argparse
import selectors
import signal
import socket
import sys
import time

from bpf.capture import Capture, EnrolledPod

SOL_IP = 0
IP_TRANSPARENT = 19


def listener() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
    s.bind(("127.0.0.1", 0))  # the address does not matter: sk_lookup assigns by socket
    s.listen(128)
    s.setblocking(False)
    return s


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--pin-dir", required=True)
    p.add_argument("--table", type=int, required=True)
    p.add_argument("--ready", required=True, help="file written once serving")
    p.add_argument("--enroll", action="append", default=[], help="name,host_ifname,ip[,ip...]")
    p.add_argument("--detach-on-term", action="store_true")
    p.add_argument("--max-seconds", type=float, default=600)
    args = p.parse_args()

    cap = Capture(args.pin_dir, table=args.table)
    socks = {"outbound": listener(), "inbound": listener(), "hbone": listener()}
    cap.install()
    cap.set_listeners(socks["outbound"].fileno(), socks["inbound"].fileno(), socks["hbone"].fileno())
    for spec in args.enroll:
        name, ifname, *ips = spec.split(",")
        cap.enroll(EnrolledPod(name, ifname, tuple(ips)))

    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    sel = selectors.DefaultSelector()
    for slot, s in socks.items():
        sel.register(s, selectors.EVENT_READ, slot)
    with open(args.ready, "w") as f:
        f.write(str(cap.status().link_id))
    deadline = time.monotonic() + args.max_seconds
    while not stopping and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.1):
            conn, peer = key.fileobj.accept()  # type: ignore[union-attr]
            with conn:
                local = conn.getsockname()
                line = f"{key.data} dst={local[0]}:{local[1]} src={peer[0]}\n"
                conn.setblocking(True)
                conn.sendall(line.encode())
    if args.detach_on_term:
        cap.detach()
    else:
        cap.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
