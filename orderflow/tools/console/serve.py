"""Serving the console: uvicorn on a loopback port, beside whatever else the process runs.

``serve`` runs until ``stop`` is set. The server does not take over the
process's signals (``up`` has its own: Ctrl-C stops the functions, then the
console); the caller sets ``stop`` from its handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Generator

import uvicorn
from nats.aio.client import Client

from orderflow.config import Topology
from orderflow.ops.server import free_port
from orderflow.tools.console import DEFAULT_HOST, DEFAULT_PORT
from orderflow.tools.console.app import build


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the caller owns the signals


async def serve(
    nc: Client,
    topology: Topology,
    stop: asyncio.Event,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    read_only: bool = False,
    started: Callable[[str], None] | None = None,
) -> None:
    """Serve the console until ``stop`` is set; ``started(url)`` once it listens."""
    port = port or free_port()
    config = uvicorn.Config(build(nc, topology, read_only), host=host, port=port,
                            log_level="warning", lifespan="on")  # fmt: skip
    server = _Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task  # it could not start (the port is taken...): say why
            raise RuntimeError(f"the console could not listen on {host}:{port}")
        await asyncio.sleep(0.05)
    if started is not None:
        started(f"http://{host}:{port}/")
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({stopped, task}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    stopped.cancel()
    await task
