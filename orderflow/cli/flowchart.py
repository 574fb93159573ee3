"""``map``: the topology of streams.yaml as a Mermaid flowchart; needs no server."""

from __future__ import annotations

import argparse

from orderflow.config import Topology
from orderflow.tools.trace import mermaid_map

HELP = "the topology as a Mermaid flowchart"


def add(parser: argparse.ArgumentParser) -> None:
    """No options of its own."""


def run(args: argparse.Namespace, topology: Topology) -> int:
    print(mermaid_map(topology))
    return 0
