"""`ztagent status`: one screen telling an operator whether this node's agent is healthy.

Reads the agent's admin ``/status`` (localhost:15000 by default). Exit codes: 0 healthy,
1 unhealthy (the problems are listed), 2 agent unreachable or not answering sensibly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any, TextIO

import yaml

DEFAULT_ADMIN = "127.0.0.1:15000"
EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_UNREACHABLE = 0, 1, 2


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="show whether the node agent is healthy (via its admin port)")
    p.add_argument(
        "--admin", default=DEFAULT_ADMIN, help=f"agent admin address host:port (default {DEFAULT_ADMIN})"
    )
    p.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the agent (default 3)")
    p.set_defaults(func=run)


def fetch_status(admin: str, timeout: float) -> dict[str, Any]:
    url = admin if admin.startswith(("http://", "https://")) else f"http://{admin}"
    with urllib.request.urlopen(url.rstrip("/") + "/status", timeout=timeout) as resp:
        data = json.load(resp)
    if not isinstance(data, dict) or "healthy" not in data:
        raise ValueError("the admin endpoint answered, but not with an agent status document")
    return data


def run(args: argparse.Namespace) -> int:
    try:
        status = fetch_status(args.admin, args.timeout)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        print(
            f"error: cannot reach the ztagent admin endpoint at {args.admin}: {reason}\n"
            "  is `ztagent run` running on this node? (the admin port listens on localhost only; "
            "inside the lab, run this in the node's namespace)",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    except ValueError as exc:
        print(f"error: {args.admin}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    code = EXIT_HEALTHY if status.get("healthy") else EXIT_UNHEALTHY
    try:
        if args.output == "json":
            json.dump(status, sys.stdout, indent=2)
            print()
        elif args.output == "yaml":
            yaml.safe_dump(status, sys.stdout, sort_keys=False)
        else:
            render_table(status, sys.stdout)
        sys.stdout.flush()  # inside the try: a small output is only written here (or at exit)
    except BrokenPipeError:
        # The reader is gone (`ztagent status | head`): stop quietly, as CLI tools do. Python's
        # documented idiom: point stdout at /dev/null so the flush at exit cannot fail again.
        # The exit code still says what the status was (the status was read; only output stopped).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return code


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    sign = "-" if s < 0 else ""
    s = abs(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    parts = [f"{d}d"] if d else []
    if h or d:
        parts.append(f"{h}h")
    if m or h or d:
        parts.append(f"{m}m")
    parts.append(f"{s}s")
    return sign + "".join(parts)


def _table(rows: list[list[str]], out: TextIO, indent: str = "  ") -> None:
    if not rows:
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


def render_table(st: dict[str, Any], out: TextIO) -> None:
    health = "HEALTHY" if st.get("healthy") else "UNHEALTHY"
    out.write(
        f"{health}  node {st.get('node', '?')}  ztagent {st.get('version', '?')}  "
        f"up {_fmt_duration(st.get('uptimeSeconds'))}  ready={'yes' if st.get('ready') else 'no'}\n"
    )
    for p in st.get("problems", []):
        out.write(f"  ! {p}\n")
    cap = st.get("capture", {})
    out.write(f"\nCapture: {cap.get('mode', '?')} ({cap.get('state', '?')})")
    out.write(f" - {cap['detail']}\n" if cap.get("detail") else "\n")
    cfg = st.get("config", {})
    out.write(f"Config:  {cfg.get('source', '?')} (sha256 {str(cfg.get('digest', ''))[:12]})\n")
    for e in cfg.get("errors", []):
        out.write(f"  ! refused update: {e}\n")
    for e in cfg.get("policyErrors", []):
        out.write(f"  ! policy error (enforced fail-closed): {e}\n")

    wl = st.get("workloads", [])
    out.write(f"\nEnrolled workloads ({len(wl)}):\n")
    rows = [["WORKLOAD", "IDENTITY", "IPS", "CERT SERIAL", "EXPIRES IN"]]
    for w in wl:
        cert = w.get("cert") or {}
        rows.append(
            [
                f"{w.get('namespace')}/{w.get('name')}",
                str(w.get("spiffeId", "")),
                ",".join(w.get("ips", [])),
                str(cert.get("serial", "NO CERT")),
                _fmt_duration(cert.get("expiresInSeconds")) if cert else "-",
            ]
        )
    _table(rows, out)

    t = st.get("tunnels", {})
    out.write(
        f"\nTunnels: inbound {t.get('inbound', 0)}, outbound {t.get('outbound', 0)}, "
        f"pooled mTLS connections {t.get('pooledConnections', 0)}; "
        f"open proxied connections {st.get('connections', {}).get('open', 0)}\n"
    )
    denials = st.get("recentDenials", [])
    out.write(f"\nRecent denials ({len(denials)}):\n")
    rows = [["TIME", "SOURCE", "DESTINATION", "POLICY", "REASON"]]
    for d in denials[-10:]:
        rows.append(
            [
                str(d.get("time", ""))[11:19],
                str(d.get("source_principal") or d.get("source_workload") or d.get("source_ip") or "?"),
                str(d.get("destination_workload") or "?"),
                str(d.get("policy") or "-"),
                str(d.get("reason") or ""),
            ]
        )
    if len(rows) > 1:
        _table(rows, out)
    else:
        out.write("  none\n")
