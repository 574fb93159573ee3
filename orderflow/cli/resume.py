"""``resume FUNCTION [--reason TEXT]``: end a pause; the backlog is delivered again at once."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime

from orderflow.cli.common import connected
from orderflow.config import Topology
from orderflow.ops import interventions

HELP = "resume a paused function"


def add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("function")
    parser.add_argument("--reason", default="", help="why, for the record")


def run(args: argparse.Namespace, topology: Topology) -> int:
    return asyncio.run(_resume(args, topology))


async def _resume(args: argparse.Namespace, topology: Topology) -> int:
    interventions.consumers_of(topology, args.function)  # a typo fails before connecting
    async with connected("resume") as nc:
        record = await interventions.resume(nc, topology, args.function, args.reason,
                                            datetime.now(UTC), interventions.who())  # fmt: skip
    print(f"{args.function} resumed (by {record.by})", file=sys.stderr)
    return 0
