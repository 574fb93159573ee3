"""``trace``: one order's causal timeline from the log, as text, JSON or a Mermaid diagram.

An order with no events in the log is exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime

from orderflow.cli.common import connected
from orderflow.config import Topology
from orderflow.tools import trace

HELP = "an order's causal timeline, and who owes the next step"


def add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("order_id")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--json", action="store_true")
    how.add_argument("--mermaid", action="store_true", help="a Mermaid sequence diagram")


def run(args: argparse.Namespace, topology: Topology) -> int:
    return asyncio.run(_trace(args, topology))


async def _trace(args: argparse.Namespace, topology: Topology) -> int:
    async with connected("trace") as nc:
        traces = await trace.load(nc, topology, {args.order_id})
    found = traces.get(args.order_id)
    if found is None:
        print(f"no events for order {args.order_id!r} in the log", file=sys.stderr)
        return 1
    now = datetime.now(UTC)
    if args.json:
        print(json.dumps(trace.as_json(found, now), default=str))
    elif args.mermaid:
        print(trace.mermaid_sequence(found, topology))
    else:
        print(trace.render(found, now))
    return 0
