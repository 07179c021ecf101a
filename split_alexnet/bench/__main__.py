"""``python -m split_alexnet.bench data [--quick] [--json FILE] [--workers N]``."""

from __future__ import annotations

import argparse
from typing import Sequence

from ..cli import UsageError, run as cli_run


def _data(args: argparse.Namespace) -> None:
    from . import data
    data.run(args)


COMMANDS = {"data": _data}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m split_alexnet.bench",
                                 description="Benchmarks (see docs/benchmarks.md).")
    sub = ap.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        p = sub.add_parser(name)
        p.add_argument("--quick", action="store_true", help="small sizes, short timings")
        p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
        p.add_argument("--workers", type=int, default=None, help="DataLoader workers")
        if name == "data":
            from .data import add_arguments
            add_arguments(p)
    a = ap.parse_args(argv)
    if a.workers is not None and a.workers < 0:
        raise UsageError("--workers must be >= 0")
    COMMANDS[a.command](a)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_run(main, "split_alexnet.bench"))
