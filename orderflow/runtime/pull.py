"""Pulling from a durable consumer: messages asked for ahead, each handled the moment it arrives.

nats-py's ``fetch(batch=n)`` returns once n messages are in or its timeout
ends: a message that arrives alone waits for that timeout, and a short timeout
means asking again (a request and the server's timeout status) about once per
message when the load is light. Measured in this project: a 403 ms hop in a
trace with a 1 s timeout; with a 20 ms one, up to 20 ms added to a hop and two
pull requests per message at 50 orders/s.

Instead this keeps pull requests open on the server for up to ``window``
messages (the function's concurrency), each request expiring after
:data:`PULL_EXPIRES`, and hands every message over as it arrives. A request is
for at least half the window (or whatever is free when nothing is asked for),
so under load one request serves many messages, and while idle there is one
request per :data:`PULL_EXPIRES`.

The server answers a request it will not serve further with a status message:
408 when it expired (with the messages it still owed), 409 when it ended it
(consumer deleted, leadership change, too many waiting requests...), 503 when
nobody answers (no such stream or consumer). Requests are served and expire in
the order they were made, so the oldest one is the one answered. A request
whose answer never comes (the server restarted) is forgotten
:data:`PULL_GRACE` after it expired, and asked for again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from orderflow import subjects

log = logging.getLogger("orderflow.runtime.pull")

#: How long a pull request stays open on the server; also about how long the
#: loop takes to ask again after a server restart.
PULL_EXPIRES = 1.0
#: A request not answered this long after it expired was lost.
PULL_GRACE = 0.5
#: After a refusal other than an expiry (no such consumer...), wait this long.
REFUSED_BACKOFF = 1.0


@dataclass
class _Request:
    remaining: int
    expires_at: float


class Puller:
    def __init__(
        self, nc: Client, stream: str, durable: str, window: int, deliver: Callable[[Msg], None]
    ) -> None:
        self.nc = nc
        self.subject = subjects.consumer_next(stream, durable)
        self.durable = durable
        self.window = window
        self.deliver = deliver
        self.in_hand = 0
        self._requests: deque[_Request] = deque()
        self._wake = asyncio.Event()
        self._refused_until = 0.0
        #: False once stopped: nothing more is handed over (messages already
        #: on their way before that still are, and are seen through).
        self.listening = True

    def done(self) -> None:
        """A message handed over is settled: its slot is free."""
        self.in_hand -= 1
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Ask for messages and hand them over until ``stop`` is set; then stop listening
        and wait until every message handed over is done."""
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox, cb=self._arrived)
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                # Cleared before looking, so that a message finishing meanwhile
                # (during the publish) still wakes the next sleep.
                self._wake.clear()
                await self._ask(inbox)
                await self._sleep(self._until_next_check(), stopped)
            # No interest in the inbox any more: the server drops the requests
            # still open there instead of serving them, so what comes next goes
            # to another process. (Handing a late message back with a nak
            # instead sent it straight into those same requests, once per free
            # slot, until max_deliver was spent and the server dropped it:
            # tests/runtime/test_pull.py.)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            self.listening = False
            while self.in_hand:
                self._wake.clear()
                await self._sleep(PULL_EXPIRES)
        finally:
            stopped.cancel()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _sleep(self, timeout: float, *also: asyncio.Future[Any]) -> None:
        """Until a message is done or an answer came (or ``also``), at most ``timeout``."""
        woken = asyncio.ensure_future(self._wake.wait())
        await asyncio.wait({woken, *also}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        woken.cancel()

    async def _ask(self, inbox: str) -> None:
        now = time.monotonic()
        while self._requests and self._requests[0].expires_at + PULL_GRACE < now:
            self._requests.popleft()  # its answer never came: the server lost it
        if now < self._refused_until:
            return
        self._refused_until = 0.0
        asked = sum(r.remaining for r in self._requests)
        free = self.window - self.in_hand - asked
        if free <= 0 or (self._requests and free < (self.window + 1) // 2):
            return
        request = {"batch": free, "expires": int(PULL_EXPIRES * 1e9)}
        await self.nc.publish(self.subject, json.dumps(request).encode(), reply=inbox)
        self._requests.append(_Request(free, now + PULL_EXPIRES))

    def _until_next_check(self) -> float:
        if self._refused_until:
            return max(0.0, self._refused_until - time.monotonic())
        if not self._requests:
            return PULL_EXPIRES
        return max(0.0, self._requests[0].expires_at + PULL_GRACE - time.monotonic())

    async def _arrived(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers and not msg.data else None
        if status is not None:
            if status == "100":
                return  # an idle heartbeat (not asked for)
            if self._requests:
                self._requests.popleft()  # the oldest request is over
            if status != "408":
                description = msg.headers.get("Description", "") if msg.headers else ""
                log.warning("pulling from %s: %s %s", self.durable, status, description)
                self._refused_until = time.monotonic() + REFUSED_BACKOFF
            self._wake.set()
            return
        if self._requests:
            self._requests[0].remaining -= 1
            if self._requests[0].remaining == 0:
                self._requests.popleft()
        # More than the window can arrive (requests the loop gave up on as lost
        # were still served, e.g. around a cluster's leader change): take it
        # anyway. Handing it back would redeliver it at once into the same
        # open requests, burning one delivery each time: seen in the leader-kill
        # test, where messages ran out of max_deliver that way and the server
        # dropped them without the runner ever dead-lettering them.
        self.in_hand += 1
        self.deliver(msg)
