"""The `ztagent` command line: one program, one subcommand per role.

Each role lives in its own module under `cli.commands`; a module there exposes
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

import cli.commands


def _command_names() -> list[str]:
    return sorted(
        info.name for info in pkgutil.iter_modules(cli.commands.__path__) if not info.name.startswith("_")
    )


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with ``only`` the parser for that one subcommand: a long-running
    `ztagent run` then does not keep every other role's imports resident (the lab's pyroute2,
    the CA server, the policy linter: ~9 MB of RSS)."""
    parser = argparse.ArgumentParser(
        prog="ztagent",
        description="Sidecar-less service-mesh node agent: SPIFFE identity, HBONE mTLS, Istio policy.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _command_names():
        if only is not None and name != only:
            continue
        module = importlib.import_module(f"cli.commands.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Usage errors and --help on the top level still see every subcommand.
    first = argv[0] if argv else None
    parser = build_parser(first if first in _command_names() else None)
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
