"""``run``: one function of streams.yaml as this process (what ``up`` starts, one per replica)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from orderflow.cli.common import server_url
from orderflow.config import Topology

HELP = "run one function as this process"


def add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("function")


def run(args: argparse.Namespace, topology: Topology) -> int:
    # Here, not at the top: the handlers and the whole worker runtime, for this command only.
    from orderflow.runtime.service import serve

    if args.function not in topology.functions:
        print(f"unknown function {args.function!r}; streams.yaml defines: "
              f"{', '.join(topology.functions)}", file=sys.stderr)  # fmt: skip
        return 2
    asyncio.run(serve(server_url(), topology, args.function))
    return 0
