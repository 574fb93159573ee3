"""``stuck``: the unfinished orders older than a duration, and what each is waiting for."""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import UTC, datetime

from orderflow.cli.common import connected
from orderflow.config import Topology, seconds
from orderflow.tools import trace
from orderflow.tools.trace import Owed

HELP = "unfinished orders older than a duration"


def add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--older-than", default="30s", metavar="DURATION", help="e.g. 30s, 5m")
    parser.add_argument("--json", action="store_true")


def run(args: argparse.Namespace, topology: Topology) -> int:
    return asyncio.run(_stuck(args, topology))


async def _stuck(args: argparse.Namespace, topology: Topology) -> int:
    now = datetime.now(UTC)
    async with connected("stuck") as nc:
        stuck = await trace.stuck(nc, topology, seconds(args.older_than), now)
    if args.json:
        print(json.dumps([trace.as_json(t, now) for t in stuck], default=str))
        return 0
    if not stuck:
        print(f"no unfinished order older than {args.older_than}")
        return 0
    print(f"{'ORDER':<28} {'AGE':>8}  WAITING FOR")
    for t in stuck:
        age = f"{(now - t.steps[0].time).total_seconds():.0f}s"
        owed = "; ".join(f"{o.function}: {o.what}{_held(o)}" for o in t.owed)
        print(f"{t.order_id:<28} {age:>8}  {owed}")
    print(f"\n{len(stuck)} unfinished orders older than {args.older_than}")
    return 0


def _held(owed: Owed) -> str:
    ids = ", ".join(str(d.fields.get("id")) for d in owed.held_by)
    return f" (held by dead letter {ids}: dlq show/redrive)" if ids else ""
