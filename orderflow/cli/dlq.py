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
    redrive.add_argument("--all", action="store_true", help="every dead letter (or every one "
                         "that matches the filters below)")  # fmt: skip
    redrive.add_argument("--function", default="", help="only those this function gave up")
    redrive.add_argument("--reason", default="", metavar="TEXT",
                         help="only those whose reason contains TEXT")  # fmt: skip
    redrive.add_argument("--since", default="", metavar="TIME",
                         help="only those dead-lettered at or after TIME (ISO, UTC)")  # fmt: skip
    redrive.add_argument("--dry-run", action="store_true",
                         help="say how many and which, redrive nothing")  # fmt: skip


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
        filtered = bool(args.function or args.reason or args.since)
        chosen = letters if args.all or filtered else [by_id[i] for i in args.ids]
        if filtered:
            chosen = dlq.matching(chosen, args.function, args.reason, dlq.since_of(args.since))
        if args.dry_run:
            print(f"{len(chosen)} dead letters would be redriven")
            for d in chosen:
                print(f"  {d.id}: {d.function} on {d.subject}: {d.reason[:80]}")
            return 0
        if not chosen:
            print("nothing to redrive (give IDs, --all or filters that match)", file=sys.stderr)
            return 1
        for line in await dlq.redrive(nc, topology, chosen):
            print(line)
        print(f"redrove {len(chosen)} dead letters")
        return 0
