"""``contract``: write the published contract (an AsyncAPI 3 document and the JSON Schema of every
event) from streams.yaml and the Structs, both wirings at once; needs no server.

The directory defaults to ``contract/`` beside the topology file, where the committed one is
(``tests/contract/test_contract.py`` fails while it differs from what the code generates).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orderflow import config
from orderflow.config import Mode, Topology
from orderflow.tools import contract

HELP = "write the AsyncAPI contract and the events' JSON Schemas"


def add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, metavar="DIR", help="default: contract/ beside the topology file"
    )


def wirings(path: Path, topology: Topology) -> dict[Mode, Topology]:
    """Both wirings of the topology file (the one loaded, and the other if it has one)."""
    modes: list[Mode] = ["choreography"]
    if topology.orchestration is not None:
        modes.append("orchestration")
    return {mode: topology if topology.mode == mode else config.load(path, mode) for mode in modes}


def run(args: argparse.Namespace, topology: Topology) -> int:
    out = args.out or args.config.parent / "contract"
    written = contract.write(out, wirings(args.config, topology))
    print(f"wrote {out / contract.DOCUMENT} and {len(written) - 1} schemas", file=sys.stderr)
    return 0
