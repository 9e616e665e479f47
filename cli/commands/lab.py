"""`ztagent lab up|down|exec|status`: a whole mesh of namespace nodes and pods on one host (DESIGN §6).

    ztagent lab up --config examples/lab.yaml [--name ztlab] [--detach] [--no-agents]
    ztagent lab exec frontend/sleep -- curl -s http://10.96.0.10:8000/
    ztagent lab exec --node node-a -- curl -s http://127.0.0.1:15020/metrics
    ztagent lab exec --node node-a -- ztagent status   # the node's health (admin on its 127.0.0.1)
    ztagent lab restart node-a           # restart one agent; it reuses the pinned capture
    ztagent lab status
    ztagent lab down [--name ztlab]      # without --name: every lab recorded on this host
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from lab.topology import LAB_ROOT, LabError, LabState, list_labs, proc_alive, teardown

DEFAULT_NAME = "ztlab"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("lab", help="a mesh lab of network-namespace nodes and pods on this host")
    lsub = p.add_subparsers(dest="lab_command", metavar="up|down|exec|restart|status", required=True)

    u = lsub.add_parser("up", help="build the lab, start its CA and node agents, wait until ready")
    u.add_argument("--config", required=True, help="mesh config (the same file the agents read)")
    u.add_argument("--name", default=DEFAULT_NAME, help=f"lab name, namespace prefix ({DEFAULT_NAME})")
    u.add_argument("--detach", action="store_true", help="return once ready; stop with `ztagent lab down`")
    u.add_argument("--no-agents", action="store_true", help="topology only: no CA, no agents")
    u.add_argument("--ready-timeout", type=float, default=90.0, help="seconds to wait for readiness")
    u.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    u.add_argument("--cni", choices=("ptp", "bridge"), default=None,
                   help="make pods with Debian's real CNI plugins (ptp or bridge + host-local) and "
                   "ztagent-cni chained, as a container runtime does, instead of the lab's own wiring")
    u.set_defaults(func=cmd_up)

    d = lsub.add_parser("down", help="remove a lab (processes, namespaces, pins, state) by recorded names")
    d.add_argument("--name", default=None, help="lab to remove (default: every recorded lab)")
    d.set_defaults(func=cmd_down)

    e = lsub.add_parser("exec", help="run a command inside a pod (or --node: a node) of a lab")
    e.add_argument("--name", default=None, help="lab name (default: the only lab, or ztlab)")
    e.add_argument("--node", action="store_true", help="TARGET is a node, not a pod")
    e.add_argument("target", metavar="TARGET", help="pod as namespace/name (or name if unique), or node")
    e.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command and arguments")
    e.set_defaults(func=cmd_exec)

    r = lsub.add_parser("restart", help="restart one node's agent (it reuses the pinned capture)")
    r.add_argument("--name", default=None, help="lab name (default: the only lab, or ztlab)")
    r.add_argument("node", help="node whose agent to restart")
    r.set_defaults(func=cmd_restart)

    s = lsub.add_parser("status", help="show labs, their namespaces and processes")
    s.add_argument("--name", default=None)
    s.add_argument("-o", "--output", choices=("text", "json"), default="text")
    s.set_defaults(func=cmd_status)


def _root() -> str:
    return os.environ.get("ZTAGENT_LAB_ROOT", LAB_ROOT)


def _pick(name: str | None) -> LabState:
    if name is None:
        labs = list_labs(_root())
        name = labs[0] if len(labs) == 1 else DEFAULT_NAME
    return LabState.load(name, _root())


def cmd_up(args: argparse.Namespace) -> int:
    from lab.runner import UpOptions, describe, run_until_signal, up
    from mesh.config import ConfigError
    from sources.file import load_config

    if os.geteuid() != 0:
        print("ztagent lab up: needs root (network namespaces, eBPF)", file=sys.stderr)
        return 1
    opts = UpOptions(config=args.config, name=args.name, root=_root(), agents=not args.no_agents,
                     ready_timeout=args.ready_timeout, log_level=args.log_level, cni=args.cni)
    try:
        state = up(opts)
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"ztagent lab up: invalid config:\n  {e}", file=sys.stderr)
        return 2
    except (LabError, OSError) as e:
        print(f"ztagent lab up: {e}", file=sys.stderr)
        return 1
    print(describe(state, cfg), flush=True)
    if args.detach:
        return 0
    print("running; Ctrl-C (or SIGTERM) stops and removes the lab", flush=True)
    run_until_signal(state, out=lambda s: print(s, flush=True))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    names = [args.name] if args.name else list_labs(_root())
    if not names:
        print("no lab recorded")
        return 0
    rc = 0
    for name in names:
        try:
            state = LabState.load(name, _root())
        except LabError as e:
            print(f"ztagent lab down: {e}", file=sys.stderr)
            rc = 1
            continue
        removed = teardown(state)
        print(f"lab {name} removed" + "".join(f"\n  {r}" for r in removed))
    return rc


def cmd_exec(args: argparse.Namespace) -> int:
    from lab.runner import node_ns_of

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("ztagent lab exec: give a command after --", file=sys.stderr)
        return 2
    if cmd[0] == "ztagent":
        # This installation's ztagent, the one the agents run: the venv is often not on PATH (and
        # another ztagent there could be a different version).
        from lab.runner import ztagent_argv

        cmd = [*ztagent_argv(), *cmd[1:]]
    try:
        state = _pick(args.name)
        if args.node:
            argv = ["nsenter", f"--net=/run/netns/{node_ns_of(state, args.target)}", *cmd]
        else:
            argv = ["ip", "netns", "exec", str(state.find_pod(args.target)["netns"]), *cmd]
    except LabError as e:
        print(f"ztagent lab exec: {e}", file=sys.stderr)
        return 1
    sys.stdout.flush()
    os.execvp(argv[0], argv)
    return 127  # not reached


def cmd_restart(args: argparse.Namespace) -> int:
    from lab.runner import restart_agent

    try:
        pid = restart_agent(_pick(args.name), args.node)
    except (LabError, OSError) as e:
        print(f"ztagent lab restart: {e}", file=sys.stderr)
        return 1
    print(f"agent on {args.node} restarted (pid {pid}) and ready")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    names = [args.name] if args.name else list_labs(_root())
    out: list[dict[str, Any]] = []
    for name in names:
        try:
            st = LabState.load(name, _root())
        except LabError as e:
            print(f"ztagent lab status: {e}", file=sys.stderr)
            return 1
        out.append({
            "lab": st.lab, "dir": st.dir, "config": st.config, "netns": st.netns,
            "nodes": st.nodes, "pods": st.pods,
            "processes": [{"pid": p.pid, "role": p.role, "alive": proc_alive(p), "log": p.log}
                          for p in st.processes],
        })
    if args.output == "json":
        print(json.dumps(out, indent=2, sort_keys=True))
        return 0
    if not out:
        print("no lab recorded")
    for lab in out:
        print(f"lab {lab['lab']} ({lab['dir']})")
        for p in lab["processes"]:
            print(f"  {p['role']:<16} pid {p['pid']:<8} {'running' if p['alive'] else 'EXITED'}  {p['log']}")
        for ref, pod in lab["pods"].items():
            print(f"  pod {ref:<24} {','.join(pod['ips']):<15} node {pod['node']}  netns {pod['netns']}")
    return 0
