"""``demo``: ``up``, then publish orders and wait for every outcome; the summary on stdout, the
functions' logs in files. Orders left unfinished are exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import uuid

from orderflow.cli.common import (
    add_system_arguments,
    cluster_size,
    nats_server,
    provision,
    replicas,
    secure,
)
from orderflow.config import Topology
from orderflow.ops import auth
from orderflow.ops.supervisor import Supervisor
from orderflow.runtime.connect import connect
from orderflow.tools import demo

log = logging.getLogger("orderflow")

HELP = "up, publish orders, wait for every outcome, summarise"


def add(parser: argparse.ArgumentParser) -> None:
    add_system_arguments(parser)
    parser.add_argument("--orders", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="give up S seconds after the start (default: no deadline; "
                        "wait while orders keep finishing, give up once none has "
                        f"finished for {demo.STALL_S:g} s)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", action="store_true", help="summary as JSON on the last line")


def run(args: argparse.Namespace, topology: Topology) -> int:
    cluster = cluster_size(args, topology)
    secured = secure(args, topology)
    with nats_server(args.data_dir, secured.server_conf if secured else None, cluster) as url:
        admin = secured.admin if secured else None
        asyncio.run(provision(url, topology, args.config.parent, admin, cluster or 1))
        # The functions' own logs (retries of flaky cards...) go to files, so
        # the terminal shows progress and the summary.
        supervisor = Supervisor(
            url,
            args.config,
            replicas(args.replicas, topology),
            log_level=args.log_level,
            log_dir=args.data_dir / "logs",
            mode=topology.mode,
            function_env=auth.function_env(secured.directory, topology) if secured else None,
        )
        supervisor.start()
        # --secure: orders come from the client user, who may publish them and
        # read their outcomes, nothing else.
        client = (
            auth.identity(secured.directory, auth.CLIENT, dict(os.environ)) if secured else None
        )
        try:
            started = time.monotonic()
            summary = asyncio.run(_demo(url, args, supervisor, client))
        finally:
            supervisor.stop()
    if args.json:
        print(json.dumps(summary))
    else:
        print(demo.render(summary))
        print(f"\nfunction logs: {args.data_dir / 'logs'}/", file=sys.stderr)
        log.info("demo took %.1fs in all", time.monotonic() - started)
    return 1 if summary["unfinished"] else 0


async def _demo(
    url: str, args: argparse.Namespace, supervisor: Supervisor, env: dict[str, str] | None = None
) -> dict[str, object]:
    """Publish the orders, wait for their outcomes, the supervisor restarting what dies."""
    stop = asyncio.Event()
    watcher = asyncio.create_task(supervisor.watch(stop))
    nc = await connect(url, name="orderflow-demo", env=env)
    try:
        orders = demo.make_orders(
            args.orders, run_id=f"demo-{uuid.uuid4().hex[:8]}", seed=args.seed
        )
        progress = sys.stderr.isatty() and not args.json
        return await demo.run_orders(nc, orders, timeout=args.timeout, progress=progress)
    finally:
        await nc.close()
        stop.set()
        await watcher
