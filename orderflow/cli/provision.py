"""``provision``: make the server (``NATS_URL``, else a running ``up``'s) match streams.yaml."""

from __future__ import annotations

import argparse
import asyncio

from orderflow.cli.common import provision, server_url
from orderflow.config import Topology

HELP = "create or update streams, consumers and buckets (NATS_URL)"


def add(parser: argparse.ArgumentParser) -> None:
    """No options of its own."""


def run(args: argparse.Namespace, topology: Topology) -> int:
    for line in asyncio.run(provision(server_url(), topology, args.config.parent)):
        print(line)
    return 0
