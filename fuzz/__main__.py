"""``python -m fuzz``: list / run / all / replay (see fuzz/__init__.py)."""

from __future__ import annotations

import argparse
import sys

from fuzz import runner


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_worker"]:  # the child process libFuzzer takes over (runner.run_target)
        _, name, runs, seconds, seed = argv
        runner.worker(name, int(runs), int(seconds), int(seed))
        return 0  # not reached: libFuzzer exits the process

    p = argparse.ArgumentParser(prog="python -m fuzz", description="coverage-guided fuzzing (atheris)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list the fuzz targets")
    for name, help_ in (("run", "fuzz one target"), ("all", "fuzz every target, one after another")):
        sp = sub.add_parser(name, help=help_)
        if name == "run":
            sp.add_argument("target")
        sp.add_argument("--runs", type=int, default=1_000_000, help="inputs to run (-1: until stopped)")
        sp.add_argument("--seconds", type=int, default=0, help="stop after this many seconds (0: no limit)")
        sp.add_argument("--seed", type=int, default=0, help="libFuzzer's random seed (0: a fresh one)")
        sp.add_argument("-q", "--quiet", action="store_true", help="only the summary (the log is kept)")
    rp = sub.add_parser("replay", help="run saved inputs (e.g. crash files) through a target, no fuzzer")
    rp.add_argument("target")
    rp.add_argument("files", nargs="+")
    args = p.parse_args(argv)

    if args.cmd == "list":
        for n in runner.target_names():
            print(n)
        return 0
    if args.cmd == "replay":
        return runner.replay(args.target, args.files)
    names = [args.target] if args.cmd == "run" else runner.target_names()
    echo = None if args.quiet else sys.stderr.buffer
    results = []
    for n in names:
        r = runner.run_target(n, runs=args.runs, seconds=args.seconds, echo=echo, seed=args.seed)
        results.append(r)
        print(r.line(), file=sys.stderr, flush=True)
    runner.summarize(results)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
