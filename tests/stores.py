"""A store for racing handlers against each other without a server."""

from __future__ import annotations

import asyncio

from functions.state import MemoryStore, T, Versioned, Write


class InterleavingStore(MemoryStore):
    """A MemoryStore whose reads yield to the event loop, so concurrent handlers interleave.

    ``conflicts`` counts lost compare-and-sets: a test can check the race happened.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conflicts = 0

    async def get(self, key: str, type: type[T]) -> Versioned[T] | None:
        found = await super().get(key, type)
        await asyncio.sleep(0)  # let the other handler read the same revision
        return found

    async def commit(self, *writes: Write) -> bool:
        ok = await super().commit(*writes)
        self.conflicts += not ok
        return ok
