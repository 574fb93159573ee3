"""``replay``: a recording's inputs through the handlers again, outputs compared with the
recorded ones; in-process (``--offline``) or against a server. A difference is exit status 1,
an unreadable recording 2.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from orderflow.config import Topology
from orderflow.tools import recording

HELP = "replay a recording's inputs and compare the outputs"


def add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path)
    parser.add_argument("--offline", action="store_true", help="handlers in-process, no server")
    parser.add_argument("--into", metavar="NATS_URL", help="a fresh server to replay into")
    parser.add_argument("--speed", choices=["max", "original"], default="max")
    parser.add_argument("--timeout", type=float, default=120.0)


def run(args: argparse.Namespace, topology: Topology) -> int:
    # Here, not at the top: it brings the handlers and the pipeline in-process, for replay only.
    from orderflow.tools import replay

    try:
        records = recording.read(args.file)
    except recording.RecordingError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    if args.offline:
        result = asyncio.run(replay.replay_offline(records, topology, args.config.parent))
    else:
        result = asyncio.run(
            replay.replay_live(
                records,
                topology,
                args.config,
                into=args.into,
                original_speed=args.speed == "original",
                timeout=args.timeout,
                progress=sys.stderr.isatty(),
            )
        )
    print(result.render())
    return 0 if result.ok else 1
