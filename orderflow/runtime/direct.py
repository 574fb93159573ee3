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


# --- batch direct gets ------------------------------------------------------------
#
# A batch direct get (a body on ``$JS.API.DIRECT.GET.<stream>``) answers with
# the messages it found, then an empty message with status 204 (end of batch,
# with ``Nats-Num-Pending``: how many more match after them); 404 when none
# matches. With ``multi_last`` it returns the last message of each subject
# named (those that have one, in stream order), all resolved as of one
# sequence (``Nats-UpTo-Sequence``): one snapshot, not reads spread over time.

#: Subjects asked for in one ``multi_last``: the server refuses an answer of
#: more than 1024 messages.
MULTI_LAST_MAX = 256


class BatchGet:
    """Batch direct gets of one stream, their answers on one subscription (``close`` ends it)."""

    def __init__(self, nc: Client, stream: str, timeout: float) -> None:
        self.nc = nc
        self.subject = subjects.direct_get(stream)
        self.timeout = timeout
        self._prefix = ""
        self._waiting: dict[str, tuple[list[Msg], asyncio.Future[int]]] = {}
        self._next = 0
        self._sub: Subscription | None = None

    async def last_of(self, subjects: Sequence[str]) -> list[Msg]:
        """The last message of each of ``subjects`` that has one."""
        unique = list(dict.fromkeys(subjects))
        chunks = [unique[i : i + MULTI_LAST_MAX] for i in range(0, len(unique), MULTI_LAST_MAX)]
        answers = await asyncio.gather(*(self.ask({"multi_last": chunk}) for chunk in chunks))
        return [msg for found, _ in answers for msg in found]

    async def ask(self, request: dict[str, object]) -> tuple[list[Msg], int]:
        """The messages one batch direct get returns, and how many more match after them."""
        if self._sub is None:
            self._prefix = self.nc.new_inbox()
            self._sub = await self.nc.subscribe(f"{self._prefix}.*", cb=self._arrived)
        self._next += 1
        token = str(self._next)
        got: list[Msg] = []
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting[token] = (got, done)
        try:
            body = msgspec.json.encode(request)
            await self.nc.publish(self.subject, body, reply=f"{self._prefix}.{token}")
            pending = await asyncio.wait_for(done, self.timeout)
        finally:
            del self._waiting[token]
        return got, pending

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

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
        elif status == "204":
            done.set_result(int(headers.get("Nats-Num-Pending", "0")))
        elif status == "404":
            done.set_result(0)
        elif status == "503":
            done.set_exception(nats.errors.NoRespondersError())
        else:
            description = headers.get("Description", "")
            done.set_exception(DirectGetError(f"{self.subject}: {status} {description}".rstrip()))
