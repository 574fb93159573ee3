"""``contract``: write the published contract (an AsyncAPI 3 document and the JSON Schema of every
event) from streams.yaml and the Structs, both wirings at once; needs no server.

The directory defaults to ``contract/`` beside the topology file, where the committed one is
(``tests/contract/test_contract.py`` fails while it differs from what the code generates).
``--check OLD.json`` writes nothing: it says whether the contract the code generates now and
the old one can read each other's events (``orderflow.tools.compatibility``), naming every
breaking change; exit status 1 if there is one, 2 if OLD.json is not a contract.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orderflow import config
from orderflow.config import Mode, Topology
from orderflow.tools import compatibility, contract

HELP = "write the AsyncAPI contract and the events' JSON Schemas, or check an old one"


def add(parser: argparse.ArgumentParser) -> None:
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--out", type=Path, metavar="DIR", help="default: contract/ beside the topology file"
    )
    action.add_argument(
        "--check",
        type=Path,
        metavar="OLD.json",
        help="write nothing; exit 1 if this contract and OLD.json cannot read each other's events",
    )


def wirings(path: Path, topology: Topology) -> dict[Mode, Topology]:
    """Both wirings of the topology file (the one loaded, and the other if it has one)."""
    modes: list[Mode] = ["choreography"]
    if topology.orchestration is not None:
        modes.append("orchestration")
    return {mode: topology if topology.mode == mode else config.load(path, mode) for mode in modes}


def run(args: argparse.Namespace, topology: Topology) -> int:
    if args.check is not None:
        try:
            old = contract.load(args.check)
        except ValueError as exc:
            print(f"contract: {exc}", file=sys.stderr)
            return 2
        report = compatibility.compare(old, contract.document(wirings(args.config, topology)))
        print(report.render(str(args.check)))
        return 0 if report.ok else 1
    out = args.out or args.config.parent / "contract"
    written = contract.write(out, wirings(args.config, topology))
    print(f"wrote {out / contract.DOCUMENT} and {len(written) - 1} schemas", file=sys.stderr)
    return 0
