"""``exporter``: the whole flow's metrics for Prometheus, over NATS (orderflow.tools.exporter).

Against whichever server the other commands use (NATS_URL, the embedded one
of a running ``up``, as its admin under ``--secure``). Listens on loopback
unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
from types import ModuleType

from orderflow.cli import common
from orderflow.cli.common import connected, stop_on_signals
from orderflow.config import Topology

#: The exporter's defaults, repeated here: orderflow.tools.exporter needs its extra.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8471

HELP = "every function's metrics for Prometheus: one scrape target for the whole flow"


def add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port (default {DEFAULT_PORT}; 0: any free one)")  # fmt: skip
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (default 127.0.0.1: this machine)")  # fmt: skip


def run(args: argparse.Namespace, topology: Topology) -> int:
    return asyncio.run(_exporter(args, topology))


def metrics_stack() -> ModuleType:
    """orderflow.tools.exporter, which needs the extra ``exporter`` (prometheus_client):
    prometheus_client only where an exporter runs."""
    return common.with_extra("orderflow.tools.exporter", "exporter", "exporter")


async def _exporter(args: argparse.Namespace, topology: Topology) -> int:
    exporter = metrics_stack()
    stop = stop_on_signals()

    def started(url: str) -> None:
        common.announce(f"exporter on {url} ({topology.mode})", args.host)

    async with connected("exporter") as nc:
        await exporter.serve(nc, topology, stop, args.host, args.port, started)
    return 0
