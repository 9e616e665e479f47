"""python -m tests.kubeapi --port 0 --dir D --state-file F

Runs the stand-in API server until SIGTERM/SIGINT. Once it listens it writes F (JSON: url,
ca_file, token, kubeconfig, pid), so a parent process knows where it is."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import signal
import tempfile

from .harness import start


async def _main(args: argparse.Namespace) -> None:
    directory = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="kubeapi-"))
    api = await start(
        directory,
        host=args.host,
        port=args.port,
        history=args.history,
        bookmark_interval=args.bookmark_interval,
        endpointslice_controller=not args.no_endpointslice_controller,
    )
    state = {
        "url": api.url,
        "ca_file": str(api.ca_file),
        "token": api.token,
        "kubeconfig": str(api.kubeconfig),
        "pid": os.getpid(),
    }
    if args.state_file:
        tmp = pathlib.Path(args.state_file + ".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(args.state_file)  # atomic: a reader never sees half a file
    print(json.dumps(state), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await api.close()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tests.kubeapi", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--dir", help="where the PKI and the kubeconfig go (default: a new temp dir)")
    p.add_argument("--state-file", help="written with url/ca_file/token/kubeconfig once listening")
    p.add_argument("--history", type=int, default=10_000, help="events kept before compaction (410 window)")
    p.add_argument("--bookmark-interval", type=float, default=60.0, help="seconds between watch bookmarks")
    p.add_argument(
        "--no-endpointslice-controller",
        action="store_true",
        help="do not maintain EndpointSlices for Services (tests that write them by hand)",
    )
    asyncio.run(_main(p.parse_args()))


if __name__ == "__main__":
    main()
