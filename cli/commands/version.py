"""`ztagent version`: print the agent version."""

from __future__ import annotations

import argparse
from importlib.metadata import version


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("version", help="print the ztagent version")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(version("ztagent"))
    return 0
