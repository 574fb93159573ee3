"""A direct get's answer: the message, nothing (404), or an error that says what was asked.

``$JS.API.DIRECT.GET.<stream>.<subject>`` answers with the subject's last
message as it is stored (headers and payload, no JSON around it), or with an
empty message whose ``Status`` header says why not. KV reads and an order's
history both ask this way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from orderflow import subjects


class DirectGetError(Exception):
    pass


def found(msg: Msg, what: str) -> Msg | None:
    """``msg`` if it is a stored message; ``None`` if there is none; else raise."""
    headers = msg.headers or {}
    if msg.data or "Status" not in headers:
        return msg
    if headers["Status"] == "404":
        return None
    raise DirectGetError(f"{what}: {headers['Status']} {headers.get('Description', '')}".rstrip())


# --- many subjects' last messages in one request --------------------------------
#
# A batch direct get with ``multi_last`` answers with the last message of
# each subject named (those that have one, in stream order), then an empty
# message with status 204 (end of batch); 404 when none has one. The server
# resolves them all as of one sequence (``Nats-UpTo-Sequence``), so the
# answer is one snapshot, not reads spread over time.

#: Subjects asked for in one request: the server refuses an answer of more
#: than 1024 messages.
MULTI_LAST_MAX = 256


class MultiLast:
    """Batch direct gets of one stream, their answers on one long-lived subscription."""

    def __init__(self, nc: Client, stream: str, timeout: float) -> None:
        self.nc = nc
        self.subject = subjects.direct_get(stream)
        self.timeout = timeout
        self._prefix = ""
        self._waiting: dict[str, tuple[list[Msg], asyncio.Future[None]]] = {}
        self._next = 0
        self._sub: Subscription | None = None

    async def get(self, subjects: Sequence[str]) -> list[Msg]:
        """The last message of each of ``subjects`` that has one."""
        unique = list(dict.fromkeys(subjects))
        chunks = [unique[i : i + MULTI_LAST_MAX] for i in range(0, len(unique), MULTI_LAST_MAX)]
        answers = await asyncio.gather(*(self._ask(chunk) for chunk in chunks))
        return [msg for answer in answers for msg in answer]

    async def _ask(self, subjects: list[str]) -> list[Msg]:
        if self._sub is None:
            self._prefix = self.nc.new_inbox()
            self._sub = await self.nc.subscribe(f"{self._prefix}.*", cb=self._arrived)
        self._next += 1
        token = str(self._next)
        got: list[Msg] = []
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[token] = (got, done)
        try:
            body = msgspec.json.encode({"multi_last": subjects})
            await self.nc.publish(self.subject, body, reply=f"{self._prefix}.{token}")
            await asyncio.wait_for(done, self.timeout)
        finally:
            del self._waiting[token]
        return got

    async def _arrived(self, msg: Msg) -> None:
        waiting = self._waiting.get(msg.subject.rpartition(".")[2])
        if waiting is None:
            return  # an answer to a request that timed out
        got, done = waiting
        headers = msg.headers or {}
        status = headers.get("Status") if not msg.data else None
        if status is None:
            got.append(msg)
        elif done.done():
            pass
        elif status in ("204", "404"):
            done.set_result(None)
        elif status == "503":
            done.set_exception(nats.errors.NoRespondersError())
        else:
            description = headers.get("Description", "")
            done.set_exception(DirectGetError(f"{self.subject}: {status} {description}".rstrip()))
