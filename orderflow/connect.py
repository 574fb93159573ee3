"""Connecting to NATS the same way from every command."""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import nats
from nats.aio.client import Client

DEFAULT_URL = "nats://127.0.0.1:4222"

log = logging.getLogger("orderflow.connect")


def url_from_env() -> str | None:
    return os.environ.get("NATS_URL") or None


async def connect(url: str, name: str) -> Client:
    """Connect, reconnecting forever: a function must outlive a broker restart."""
    _wait_for_loopback(url)
    return await nats.connect(
        servers=[u.strip() for u in url.split(",")],
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        **_log_connection_events(name),
    )


def _wait_for_loopback(url: str, timeout: float = 10.0) -> None:
    """Poll until one of the loopback servers in ``url`` listens (any one: a node of a
    cluster may be down); a failed first connect would cost reconnect_time_wait (2 s)."""
    local = [
        (part.hostname, part.port)
        for part in (urlsplit(u.strip()) for u in url.split(","))
        if part.hostname in ("127.0.0.1", "localhost", "::1") and part.port
    ]
    deadline = time.monotonic() + timeout
    while local and not any(_listening(host, port) for host, port in local):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listening on {url} after {timeout}s")
        time.sleep(0.02)


def _listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.2).close()
    except OSError:
        return False
    return True


def _log_connection_events(name: str) -> dict[str, Any]:
    """Callbacks that log one warning line per connection error and per reconnect.

    nats-py's default logs every failed reconnect attempt as an error with a
    traceback: dozens of them for one server of a cluster going away, which
    the client rides out by moving to another.
    """

    async def error(exc: Exception) -> None:
        log.warning("%s: connection: %r", name, exc)

    async def reconnected() -> None:
        log.warning("%s: reconnected", name)

    return {"error_cb": error, "reconnected_cb": reconnected}
