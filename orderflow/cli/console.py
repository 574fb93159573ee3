"""``console``: the flow, every order and what it waits on, in a browser (orderflow.tools.console).

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
from orderflow.tools.console import DEFAULT_HOST, DEFAULT_PORT

HELP = "a web console on 127.0.0.1: the flow live, orders, stuck, dead letters"


def add(parser: argparse.ArgumentParser) -> None:
    add_console_arguments(parser, prefix="")


def add_console_arguments(parser: argparse.ArgumentParser, prefix: str) -> None:
    """``--port``, ``--host``, ``--read-only`` (``--console-...`` under ``up``)."""
    parser.add_argument(f"--{prefix}port", type=int, default=DEFAULT_PORT,
                        help=f"port (default {DEFAULT_PORT}; 0: any free one)")  # fmt: skip
    parser.add_argument(f"--{prefix}host", default=DEFAULT_HOST,
                        help="address to listen on (default 127.0.0.1: this machine)")  # fmt: skip
    parser.add_argument(f"--{prefix}read-only", action="store_true",
                        help="no actions: no redrive buttons, every POST refused")  # fmt: skip


def run(args: argparse.Namespace, topology: Topology) -> int:
    return asyncio.run(_console(args, topology))


def announce(url: str, host: str) -> None:
    common.announce(f"console on {url}", host)


def web_stack() -> ModuleType:
    """orderflow.tools.console.serve, which needs the extra ``console`` (starlette, uvicorn):
    the web stack only where a console runs."""
    return common.with_extra("orderflow.tools.console.serve", "console", "console")


async def _console(args: argparse.Namespace, topology: Topology) -> int:
    serve = web_stack()
    stop = stop_on_signals()
    async with connected("console") as nc:
        await serve.serve(nc, topology, stop, args.host, args.port, args.read_only,
                          started=lambda url: announce(url, args.host))  # fmt: skip
    return 0
