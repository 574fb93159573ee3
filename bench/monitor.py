"""A fresh nats-server for one benchmark row, with its monitoring endpoint on loopback.

``orderflow.ops.server.EmbeddedServer`` takes a configuration file; the one
written here only adds ``http: 127.0.0.1:<port>`` (the command-line flags it
starts with keep JetStream, the client port and the store dir). ``/varz``
gives the server's message counters, ``/connz`` the same per connection (by
its name), so a row can say how many messages went into and out of the server
per order, and whose they were.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orderflow.ops.server import EmbeddedServer, free_port


class MonitoredServer(EmbeddedServer):
    """An EmbeddedServer whose HTTP monitoring listens on 127.0.0.1 (a free port)."""

    def __init__(self, store_dir: Path) -> None:
        self.http_port = free_port()
        config = store_dir.parent / f"{store_dir.name}-monitor.conf"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(f'http: "127.0.0.1:{self.http_port}"\n')
        super().__init__(store_dir, config=config)

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def get(self, endpoint: str) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.http_port}/{endpoint}"
        with urllib.request.urlopen(url, timeout=10) as response:
            found: dict[str, Any] = json.load(response)
        return found

    async def traffic(self) -> Traffic:
        """The server's message counters, and each connection's, now."""
        varz, connz = await asyncio.gather(
            asyncio.to_thread(self.get, "varz"), asyncio.to_thread(self.get, "connz?limit=4096")
        )
        by_name: dict[str, list[int]] = {}
        for conn in connz.get("connections", []):
            counts = by_name.setdefault(conn.get("name") or f"cid-{conn['cid']}", [0, 0])
            counts[0] += int(conn.get("in_msgs", 0))
            counts[1] += int(conn.get("out_msgs", 0))
        return Traffic(int(varz["in_msgs"]), int(varz["out_msgs"]), by_name)


@dataclass
class Traffic:
    """Messages into and out of the server (``/varz``), and per connection name (``/connz``):
    ``in`` is what a client sent to the server, ``out`` what the server sent it."""

    in_msgs: int
    out_msgs: int
    by_name: dict[str, list[int]] = field(default_factory=dict)

    def since(self, before: Traffic) -> Traffic:
        names = set(self.by_name) | set(before.by_name)
        return Traffic(
            self.in_msgs - before.in_msgs,
            self.out_msgs - before.out_msgs,
            {
                name: [
                    self.by_name.get(name, [0, 0])[i] - before.by_name.get(name, [0, 0])[i]
                    for i in (0, 1)
                ]
                for name in sorted(names)
            },
        )
