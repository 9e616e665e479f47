"""`ztagent ztunnel-import LOCAL.yaml --nodes NODES.yaml [-o mesh.yaml]`: ztunnel's local config
(``LOCAL_XDS_PATH``: workloads, services, policies) as a ztagent config file.

The node map gives what ztunnel's file lacks: the nodes (``nodes:`` as in a MeshConfig, and
optionally ``trustDomain`` and ``rootNamespace``). The output is validated as the agents and
the CA will read it before it is written, so what this writes loads (`ztagent lab up --config`,
`ztagent run --config`, `ztagent ca serve --config`). Anything ztagent does not carry out is
refused, naming the ztunnel file's field; nothing is written then.

Exit codes: 0 written, 2 refused (every problem listed on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys

from mesh.errors import ConfigError
from mesh.parse import parse_config
from sources.ztunnel_local import translate_files


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "ztunnel-import", help="translate ztunnel's local config (LOCAL_XDS_PATH) to a mesh config"
    )
    p.add_argument("local", help="ztunnel's local config YAML (workloads, services, policies)")
    p.add_argument("--nodes", required=True, help="node map: nodes (and trustDomain, rootNamespace)")
    p.add_argument("-o", "--output", default="-", help="file to write (default stdout)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        text = translate_files(args.local, args.nodes)
        parse_config(text, file=f"{args.local} (translated)")
    except ConfigError as exc:
        print(f"error: {args.local} refused:", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return 2
    if args.output == "-":
        sys.stdout.write(text)
    else:
        tmp = args.output + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, args.output)
    return 0
