"""``record``: a stream's messages to a JSON Lines file, for ``replay``.

The stream is the topology's events stream (the one storing ``orders.created``) unless
``--stream`` names another, so a stream renamed in streams.yaml is still the default.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import datetime
from pathlib import Path

from orderflow.cli.common import connected
from orderflow.config import Topology
from orderflow.tools.recording import record

HELP = "write a stream's messages to JSON Lines"


def add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path)
    parser.add_argument(
        "--stream", help="default: the events stream, the one storing orders.created"
    )
    parser.add_argument("--subjects", help="comma-separated filter, e.g. orders.created,orders.>")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--since", help="ISO time, e.g. 2026-11-26T05:00:00+00:00")
    start.add_argument("--from-seq", type=int, default=1)


def run(args: argparse.Namespace, topology: Topology) -> int:
    stream = topology.events_stream if args.stream is None else args.stream
    return asyncio.run(_record(args, stream))


async def _record(args: argparse.Namespace, stream: str) -> int:
    since = datetime.fromisoformat(args.since) if args.since else None
    async with connected("record") as nc:
        count = await record(
            nc,
            stream,
            args.file,
            subjects=args.subjects.split(",") if args.subjects else None,
            since=since,
            from_seq=args.from_seq,
            progress=sys.stderr.isatty(),
        )
    print(f"recorded {count} messages of {stream} to {args.file}", file=sys.stderr)
    return 0
