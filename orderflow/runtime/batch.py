"""Group commit: the calls made while one batch is being handled are handled together as the next.

A handler that can decide many messages at once for the price of one (stock:
one read and one write per SKU however many orders want it) is bound through
a :class:`Batcher`. The worker still calls it once per message, with as many
messages in hand as the function's concurrency allows; the first call starts
a batch at once, and every call that arrives while it runs waits for the next
one. Nothing waits for a batch to fill: under light load a batch is one
message, under heavy load as many as are in hand. Each caller gets its own
outcome, so every message is still acked, retried or dead-lettered on its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

I = TypeVar("I")  # noqa: E741 - what is asked
O = TypeVar("O")  # noqa: E741 - what each gets back

BatchHandler = Callable[[Sequence[I]], Awaitable[Sequence[O | Exception]]]


class Batcher(Generic[I, O]):
    def __init__(self, handle: BatchHandler[I, O], limit: int) -> None:
        self.handle = handle
        self.limit = limit
        self._waiting: list[tuple[I, asyncio.Future[O]]] = []
        self._running: asyncio.Task[None] | None = None

    async def __call__(self, item: I) -> O:
        future: asyncio.Future[O] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._running is None:
            self._running = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[: self.limit]
                del self._waiting[: self.limit]
                try:
                    outcomes = await self.handle([item for item, _ in batch])
                except Exception as exc:  # every caller of this batch gets it
                    outcomes = [exc] * len(batch)
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():
                        continue  # its caller was cancelled
                    if isinstance(outcome, Exception):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        finally:
            self._running = None
