"""`ztagent ztunnel-config`: the views of `istioctl ztunnel-config`, read from a node's agent.

    ztagent ztunnel-config workloads    [--workload-namespace NS] [--workload-node N] [--address IP]
    ztagent ztunnel-config services     [--service-namespace NS]
    ztagent ztunnel-config policies     [--policy-namespace NS]
    ztagent ztunnel-config certificates
    ztagent ztunnel-config connections  (open connections; from the admin port only)
    ztagent ztunnel-config all
    ztagent ztunnel-config log [--level LEVEL]   (ztunnel's runtime log-level switch)

Every view reads the agent's ``/config_dump`` (``--admin``, localhost:15000) or a saved dump
(``--file``), which has ztunnel's shape: a dump taken from a real ztunnel reads the same way.
``-o table`` (default) prints istioctl's columns; ``-o json|yaml`` prints the (filtered) records.
Exit codes: 0 shown, 2 agent unreachable or the file unreadable, 1 bad input (a bad level).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any, TextIO

import yaml

DEFAULT_ADMIN = "127.0.0.1:15000"
EXIT_OK, EXIT_BAD_INPUT, EXIT_UNREACHABLE = 0, 1, 2


class Unreachable(Exception):
    """The agent (or the dump file) could not be read; the message says which and why."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "ztunnel-config",
        help="show the node agent's workloads, services, policies, certificates, connections, log level "
        "(as `istioctl ztunnel-config`)",
    )
    views = p.add_subparsers(dest="view", metavar="VIEW", required=True)

    def common(v: argparse.ArgumentParser) -> None:
        v.add_argument(
            "--admin", default=DEFAULT_ADMIN, help=f"agent admin address (default {DEFAULT_ADMIN})"
        )
        v.add_argument("--file", default=None, help="read a saved /config_dump (ztagent's or ztunnel's)")
        v.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
        v.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the agent (default 3)")

    w = views.add_parser("workloads", help="every workload in the mesh, with protocol and waypoint")
    common(w)
    w.add_argument("--workload-namespace", default=None, help="only workloads in this namespace")
    w.add_argument("--workload-node", default=None, help="only workloads on this node")
    w.add_argument("--address", default=None, help="only the workload with this IP")
    w.set_defaults(func=_run(_workloads))
    s = views.add_parser("services", help="services, their VIPs and endpoints")
    common(s)
    s.add_argument("--service-namespace", default=None, help="only services in this namespace")
    s.set_defaults(func=_run(_services))
    pol = views.add_parser("policies", help="the authorization policies as the node enforces them")
    common(pol)
    pol.add_argument("--policy-namespace", default=None, help="only policies in this namespace")
    pol.set_defaults(func=_run(_policies))
    c = views.add_parser("certificates", help="this node's workload certificates: leaf and root, validity")
    common(c)
    c.set_defaults(func=_run(_certificates))
    cn = views.add_parser("connections", help="the connections this node's agent carries now")
    common(cn)
    cn.set_defaults(func=_run(_connections))
    a = views.add_parser("all", help="workloads, services, policies and certificates")
    common(a)
    a.set_defaults(func=_run(_all))
    lg = views.add_parser("log", help="show or set the agent's log level (ztunnel's /logging)")
    lg.add_argument("--admin", default=DEFAULT_ADMIN, help=f"agent admin address (default {DEFAULT_ADMIN})")
    lg.add_argument(
        "--level", default=None, help="LEVEL or TARGET:LEVEL[,...] (off, error, warn, info, debug)"
    )
    lg.add_argument("--timeout", type=float, default=3.0)
    lg.set_defaults(func=_log)


# -- fetching -----------------------------------------------------------------------------------


def _url(admin: str, path: str) -> str:
    base = admin if admin.startswith(("http://", "https://")) else f"http://{admin}"
    return base.rstrip("/") + path


def fetch(admin: str, path: str, timeout: float) -> Any:
    try:
        with urllib.request.urlopen(_url(admin, path), timeout=timeout) as resp:
            return json.load(resp)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unreachable(
            f"cannot reach the ztagent admin endpoint at {admin}: {reason}\n"
            "  is `ztagent run` running on this node? (the admin port listens on localhost only)"
        ) from None
    except ValueError as exc:
        raise Unreachable(f"{admin}{path}: not JSON: {exc}") from None


def load_dump(args: argparse.Namespace) -> dict[str, Any]:
    if args.file:
        try:
            with open(args.file) as f:
                data = json.load(f) if not args.file.endswith((".yaml", ".yml")) else yaml.safe_load(f)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise Unreachable(f"cannot read the config dump {args.file}: {exc}") from None
    else:
        data = fetch(args.admin, "/config_dump", args.timeout)
    if not isinstance(data, dict) or not isinstance(data.get("workloads", []), list):
        where = args.file or f"{args.admin}/config_dump"
        raise Unreachable(f"{where}: not a ztunnel-shaped config dump (expected a 'workloads' list)")
    return data


# -- the views: (records, table rows) -----------------------------------------------------------

Rows = list[list[str]]


def _waypoint(x: dict[str, Any]) -> str:
    wp = x.get("waypoint") or {}
    return str(wp.get("destination") or "None") if isinstance(wp, dict) else "None"


def _workloads(dump: dict[str, Any], args: argparse.Namespace) -> tuple[list[Any], Rows]:
    recs = [
        w
        for w in dump.get("workloads") or []
        if (args.workload_namespace is None or w.get("namespace") == args.workload_namespace)
        and (args.workload_node is None or w.get("node") == args.workload_node)
        and (args.address is None or args.address in (w.get("workloadIps") or []))
    ]
    recs.sort(key=lambda w: (w.get("namespace", ""), w.get("name", "")))
    rows = [["NAMESPACE", "POD NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"]]
    for w in recs:
        ips = ",".join(w.get("workloadIps") or []) or "None"
        rows.append(
            [
                w.get("namespace", ""),
                w.get("name", ""),
                ips,
                w.get("node", ""),
                _waypoint(w),
                w.get("protocol", ""),
            ]
        )
    return recs, rows


def _services(dump: dict[str, Any], args: argparse.Namespace) -> tuple[list[Any], Rows]:
    recs = [s for s in dump.get("services") or [] if args.service_namespace in (None, s.get("namespace"))]
    recs.sort(key=lambda s: (s.get("namespace", ""), s.get("name", "")))
    rows = [["NAMESPACE", "SERVICE NAME", "SERVICE VIP", "WAYPOINT", "ENDPOINTS"]]
    for s in recs:
        vips = ",".join(v.rpartition("/")[2] for v in s.get("vips") or []) or "None"
        eps = s.get("endpoints") or {}
        rows.append([s.get("namespace", ""), s.get("name", ""), vips, _waypoint(s), f"{len(eps)}/{len(eps)}"])
    return recs, rows


def _policies(dump: dict[str, Any], args: argparse.Namespace) -> tuple[list[Any], Rows]:
    recs = [p for p in dump.get("policies") or [] if args.policy_namespace in (None, p.get("namespace"))]
    recs.sort(key=lambda p: (p.get("namespace", ""), p.get("name", "")))
    rows = [["NAMESPACE", "POLICY NAME", "ACTION", "SCOPE", "RULES"]]
    for p in recs:
        rows.append(
            [
                p.get("namespace", ""),
                p.get("name", ""),
                p.get("action", ""),
                p.get("scope", ""),
                str(len(p.get("rules") or [])),
            ]
        )
    return recs, rows


def _parse_time(s: str) -> dt.datetime | None:
    try:
        t = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def cert_rows(certs: list[dict[str, Any]], now: dt.datetime) -> Rows:
    """istioctl's certificate table: one row per leaf and per root, with whether it is valid now."""
    rows = [["CERTIFICATE NAME", "TYPE", "STATUS", "VALID CERT", "SERIAL NUMBER", "NOT AFTER", "NOT BEFORE"]]
    for c in certs:
        for kind, chain in (
            ("Leaf", (c.get("certChain") or [])[:1]),
            ("Intermediate", (c.get("certChain") or [])[1:]),
            ("Root", c.get("rootCerts") or []),
        ):
            for x in chain:
                start, end = _parse_time(x.get("validFrom", "")), _parse_time(x.get("expirationTime", ""))
                valid = start is not None and end is not None and start <= now < end
                rows.append(
                    [
                        c.get("identity", ""),
                        kind,
                        str(c.get("state", "")),
                        "true" if valid else "false",
                        str(x.get("serialNumber", "")),
                        x.get("expirationTime", ""),
                        x.get("validFrom", ""),
                    ]
                )
        if not c.get("certChain"):
            rows.append([c.get("identity", ""), "Leaf", str(c.get("state", "")), "false", "-", "-", "-"])
    return rows


def _certificates(dump: dict[str, Any], args: argparse.Namespace) -> tuple[list[Any], Rows]:
    recs = list(dump.get("certificates") or [])
    return recs, cert_rows(recs, dt.datetime.now(dt.UTC))


def _connections(dump: dict[str, Any], args: argparse.Namespace) -> tuple[list[Any], Rows]:
    del dump
    if args.file:
        raise Unreachable("connections are live state: read them from --admin, not from a saved dump")
    recs = fetch(args.admin, "/connections", args.timeout)
    if not isinstance(recs, list):
        raise Unreachable(f"{args.admin}/connections: expected a list of connections")
    rows = [
        [
            "DIRECTION",
            "SOURCE",
            "DESTINATION",
            "PROTOCOL",
            "SOURCE IDENTITY",
            "DESTINATION WORKLOAD",
            "BYTES IN/OUT",
            "AGE",
        ]
    ]
    for c in recs:
        rows.append(
            [
                c.get("direction", ""),
                str(c.get("src") or "-"),
                c.get("originalDst", ""),
                c.get("protocol", ""),
                str(c.get("sourcePrincipal") or "-"),
                str(c.get("destinationWorkload") or "-"),
                f"{c.get('bytesReceived', 0)}/{c.get('bytesSent', 0)}",
                f"{c.get('ageSeconds', 0)}s",
            ]
        )
    return recs, rows


def _all(dump: dict[str, Any], args: argparse.Namespace) -> tuple[list[Any], Rows]:
    for attr in ("workload_namespace", "workload_node", "address", "service_namespace", "policy_namespace"):
        setattr(args, attr, None)
    out: list[Any] = []
    rows: Rows = []
    for name, fn in (
        ("workloads", _workloads),
        ("services", _services),
        ("policies", _policies),
        ("certificates", _certificates),
    ):
        recs, r = fn(dump, args)
        out.append({name: recs})
        rows.extend([[f"# {name}"], *r, [""]])
    return out, rows


def table(rows: Rows, out: TextIO) -> None:
    """Columns padded as istioctl pads them; a one-cell row is a heading printed as is."""
    block: Rows = []

    def flush() -> None:
        if block:
            widths = [max(len(r[i]) for r in block) for i in range(len(block[0]))]
            for r in block:
                out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")
            block.clear()

    for r in rows:
        if len(r) == 1:
            flush()
            out.write((r[0] + "\n") if r[0] else "\n")
        else:
            block.append(r)
    flush()


View = Callable[[dict[str, Any], argparse.Namespace], tuple[list[Any], Rows]]


def _run(view: View) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            dump = load_dump(args) if view is not _connections else {}
            recs, rows = view(dump, args)
        except Unreachable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        if args.output == "json":
            json.dump(recs, sys.stdout, indent=2)
            print()
        elif args.output == "yaml":
            yaml.safe_dump(recs, sys.stdout, sort_keys=False)
        else:
            table(rows, sys.stdout)
        return EXIT_OK

    return run


def _log(args: argparse.Namespace) -> int:
    path = "/logging"
    method = "GET"
    if args.level is not None:
        path += "?" + urllib.parse.urlencode({"level": args.level})
        method = "POST"
    req = urllib.request.Request(
        _url(args.admin, path), method=method, data=b"" if method == "POST" else None
    )
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:
            sys.stdout.write(resp.read().decode())
    except urllib.error.HTTPError as exc:
        print(f"error: {exc.read().decode().strip()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        print(
            f"error: cannot reach the ztagent admin endpoint at {args.admin}: {getattr(exc, 'reason', exc)}",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    return EXIT_OK
