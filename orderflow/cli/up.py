"""``up``: a server (unless ``NATS_URL``), provisioned, and every function under a supervisor
that restarts what dies, until SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

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
from orderflow.runtime.connect import redact

log = logging.getLogger("orderflow")

HELP = "start a server (unless NATS_URL) and every function"


def add(parser: argparse.ArgumentParser) -> None:
    add_system_arguments(parser)


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
        try:
            asyncio.run(_until_signalled(supervisor))
        finally:
            supervisor.stop()
    return 0


async def _until_signalled(supervisor: Supervisor) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await supervisor.watch(stop)
