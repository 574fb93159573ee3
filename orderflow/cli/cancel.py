"""``cancel ORDER_ID [--reason TEXT]``: ask for an order to be cancelled; the answer at once.

Asks the ``cancel`` function (``orders.cancel``; the rule is in functions/cancel.py)
and prints its answer: ``accepted`` (the order will end cancelled: the charge
refunded, the stock released, no delivery), ``too late`` with the rule that
says why, or ``unknown``. Exit status 0 if accepted, 1 otherwise. The request
and its answer are recorded on the order (``trace`` shows them).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from functions.events import CancelRequest
from orderflow.cli.common import connected
from orderflow.config import Topology
from orderflow.ops import interventions

HELP = "cancel an order: answered at once, accepted or too late"


def add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("order_id")
    parser.add_argument("--reason", default="", help="why, for the record and the order's end")
    parser.add_argument("--request-id", default="",
                        help="name the request (asking again with it gets the same answer); "
                        "default: derived from the order, reason and user")  # fmt: skip


def run(args: argparse.Namespace, topology: Topology) -> int:
    return asyncio.run(_cancel(args, topology))


async def _cancel(args: argparse.Namespace, topology: Topology) -> int:
    request = CancelRequest(
        args.order_id,
        reason=args.reason,
        requested_by=interventions.who(),
        request_id=args.request_id,
    )
    async with connected("cancel") as nc:
        answer = await interventions.cancel(nc, topology, request)
    print(f"{answer.order_id}: {answer.answer} ({answer.rule}) [request {answer.request_id}]")
    if answer.answer != "accepted":
        print(f"not cancelled: {answer.rule}", file=sys.stderr)
    return 0 if answer.answer == "accepted" else 1
