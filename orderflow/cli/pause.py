"""``pause FUNCTION [--until TIME] [--reason TEXT]``: stop a function's deliveries, losing nothing.

The server's consumer pause (orderflow/ops/interventions.py): the function's
processes keep running, its backlog waits, and the pause is recorded (who,
when, why, until when). ``resume`` ends it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime, timedelta

from orderflow.cli.common import connected
from orderflow.config import ConfigError, Topology, seconds
from orderflow.ops import interventions

HELP = "pause a function's consumers (nothing lost; `resume` ends it)"


def add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("function")
    parser.add_argument("--until", metavar="TIME",
                        help="an RFC 3339 time (2026-12-01T14:00:00Z) or a duration (30m, 2h); "
                        "default: until resumed")  # fmt: skip
    parser.add_argument("--reason", default="", help="why, for the record")


def until_of(text: str | None, now: datetime) -> datetime | None:
    if not text:
        return None
    try:
        return now + timedelta(seconds=seconds(text))
    except (ValueError, ConfigError):
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--until {text!r}: neither a time (RFC 3339) nor a duration") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def run(args: argparse.Namespace, topology: Topology) -> int:
    return asyncio.run(_pause(args, topology))


async def _pause(args: argparse.Namespace, topology: Topology) -> int:
    now = datetime.now(UTC)
    until = until_of(args.until, now)
    interventions.consumers_of(topology, args.function)  # a typo fails before connecting
    async with connected("pause") as nc:
        record = await interventions.pause(nc, topology, args.function, until, args.reason,
                                           now, interventions.who())  # fmt: skip
    ends = f"until {record.until}" if record.until else "until resumed"
    print(f"{args.function} paused {ends} (by {record.by})", file=sys.stderr)
    return 0
