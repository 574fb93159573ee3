"""Connecting to NATS the same way from every command."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import nats
from nats.aio.client import Client

from orderflow.server import wait_for_port

DEFAULT_URL = "nats://127.0.0.1:4222"


def url_from_env() -> str | None:
    return os.environ.get("NATS_URL") or None


async def connect(url: str, name: str) -> Client:
    """Connect, reconnecting forever: a function must outlive a broker restart."""
    first = urlsplit(url.split(",")[0].strip())
    if first.hostname in ("127.0.0.1", "localhost", "::1") and first.port:
        # A failed first connect costs reconnect_time_wait (2 s); poll instead.
        wait_for_port(first.port, timeout=10.0, host=first.hostname)
    return await nats.connect(
        servers=[u.strip() for u in url.split(",")],
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
    )
