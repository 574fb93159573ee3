"""``dlq``: list, show and redrive the dead letters; an unknown id is exit status 1."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from orderflow.cli.common import connected
from orderflow.config import Topology
from orderflow.tools import dlq

HELP = "list, show and redrive dead letters"


def add(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="a table of every dead letter")
    listing.add_argument("--json", action="store_true")
    show = actions.add_parser("show", help="one dead letter: reason, headers, payload")
    show.add_argument("ids", type=int, nargs="+", metavar="ID")
    redrive = actions.add_parser("redrive", help="republish to the original subject")
    redrive.add_argument("ids", type=int, nargs="*", metavar="ID")
    redrive.add_argument("--all", action="store_true")


def run(args: argparse.Namespace, topology: Topology) -> int:
    return asyncio.run(_dlq(args, topology))


async def _dlq(args: argparse.Namespace, topology: Topology) -> int:
    async with connected("dlq") as nc:
        letters = await dlq.dead_letters(nc, topology)
        if args.action == "list":
            if args.json:
                print(json.dumps([d.as_json() for d in letters]))
            else:
                print(dlq.render_table(letters))
            return 0
        by_id = {d.id: d for d in letters}
        missing = [i for i in args.ids if i not in by_id]
        if missing:
            print(f"no dead letter with id {', '.join(map(str, missing))}", file=sys.stderr)
            return 1
        if args.action == "show":
            for i in args.ids:
                print(dlq.render_one(by_id[i]))
            return 0
        chosen = letters if args.all else [by_id[i] for i in args.ids]
        if not chosen:
            print("nothing to redrive (give IDs or --all)", file=sys.stderr)
            return 1
        for line in await dlq.redrive(nc, topology, chosen):
            print(line)
        return 0
