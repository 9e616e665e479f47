"""The `ztagent` command line: one program, one subcommand per role.

Each role lives in its own module under `agent.commands`; a module there exposes
`register(subparsers)` which adds its subcommand and sets `func` (called with the parsed
namespace, returning the process exit code). Modules are discovered, so adding a role touches
no shared file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

import agent.commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ztagent",
        description="Sidecar-less service-mesh node agent: SPIFFE identity, HBONE mTLS, Istio policy.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(agent.commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"agent.commands.{info.name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
