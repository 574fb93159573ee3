"""``up``: a server (unless ``NATS_URL``), provisioned, and every function under a supervisor
that restarts what dies, until SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from orderflow.cli import console
from orderflow.cli.common import (
    add_system_arguments,
    cluster_size,
    connected,
    nats_server,
    provision,
    replicas,
    secure,
    stop_on_signals,
)
from orderflow.config import Topology
from orderflow.ops import auth
from orderflow.ops.supervisor import Supervisor
from orderflow.runtime.connect import redact

log = logging.getLogger("orderflow")

HELP = "start a server (unless NATS_URL) and every function"


def add(parser: argparse.ArgumentParser) -> None:
    add_system_arguments(parser)
    parser.add_argument("--console", action="store_true",
                        help="also serve the web console (see `console -h`)")  # fmt: skip
    console.add_console_arguments(parser, prefix="console-")


def run(args: argparse.Namespace, topology: Topology) -> int:
    counts = replicas(args.replicas, topology)
    cluster = cluster_size(args, topology)
    secured = secure(args, topology)
    with nats_server(args.data_dir, secured.server_conf if secured else None, cluster) as url:
        admin = secured.admin if secured else None
        provisioning = provision(url, topology, args.config.parent, admin, cluster or 1)
        for line in asyncio.run(provisioning):
            log.info("%s", line)
        supervisor = Supervisor(
            url,
            args.config,
            counts,
            log_level=args.log_level,
            function_env=auth.function_env(secured.directory, topology) if secured else None,
            mode=topology.mode,
        )
        supervisor.start()
        how = f" (--secure: a user per function, from {secured.directory})" if secured else ""
        print(f"order flow up on {redact(url)} ({topology.mode}){how}: "
              f"{', '.join(f'{n} x{c}' for n, c in counts.items())}. Ctrl-C stops.",
              file=sys.stderr)  # fmt: skip
        serving = _Console(args, topology, url, admin) if args.console else None
        try:
            asyncio.run(_until_signalled(supervisor, serving))
        finally:
            supervisor.stop()
    return 0


class _Console:
    """``up --console``: the console beside the supervisor, in the same loop."""

    def __init__(
        self, args: argparse.Namespace, topology: Topology, url: str, env: dict[str, str] | None
    ) -> None:
        self.args, self.topology, self.url, self.env = args, topology, url, env
        self.serve = console.web_stack()  # fails at start, not later, without the extra

    async def run(self, stop: asyncio.Event) -> None:
        a = self.args

        def started(url: str) -> None:
            console.announce(url, a.console_host)

        async with connected("console", self.url, self.env) as nc:
            await self.serve.serve(nc, self.topology, stop, a.console_host, a.console_port,
                                   a.console_read_only, started)  # fmt: skip


async def _until_signalled(supervisor: Supervisor, serving: _Console | None) -> None:
    stop = stop_on_signals()
    if serving is None:
        await supervisor.watch(stop)
        return
    await asyncio.gather(supervisor.watch(stop), serving.run(stop))
