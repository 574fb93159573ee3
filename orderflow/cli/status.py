"""``status``: instances, counters, backlog, dead letters and streams, once or until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from orderflow.cli.common import connected
from orderflow.config import Topology
from orderflow.tools import status

HELP = "instances, counters, backlog, dead letters, streams"


def add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between refreshes")


def run(args: argparse.Namespace, topology: Topology) -> int:
    try:
        return asyncio.run(_status(args, topology))
    except KeyboardInterrupt:
        return 0


async def _status(args: argparse.Namespace, topology: Topology) -> int:
    async with connected("status") as nc:
        while True:
            current = await status.collect(nc, topology)
            if args.json:
                print(json.dumps(current), flush=True)
            else:
                if args.watch and sys.stdout.isatty():
                    print("\x1b[2J\x1b[H", end="")  # clear the screen, cursor home
                print(status.render(current), flush=True)
            if not args.watch:
                return 0
            await asyncio.sleep(args.every)
