"""A store for racing handlers against each other without a server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import msgspec

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

    async def commit(self, write: Write) -> int:
        revision = await super().commit(write)
        self.conflicts += not revision
        return revision


Hook = Callable[[], Awaitable[None]]


class HookedStore:
    """A view of a shared MemoryStore that runs a hook (once) around a given key.

    ``before_read[key]`` runs just before this view reads ``key``,
    ``before_write[key]`` just before it writes it: a test pauses one execution
    at an exact point and runs another one to completion there. ``writes``
    logs what this view wrote (key, value, new revision).
    """

    def __init__(
        self,
        base: MemoryStore,
        before_read: dict[str, Hook] | None = None,
        before_write: dict[str, Hook] | None = None,
    ) -> None:
        self.base = base
        self.before_read = dict(before_read or {})
        self.before_write = dict(before_write or {})
        self.writes: list[tuple[str, msgspec.Struct, int]] = []

    async def get(self, key: str, type: type[T]) -> Versioned[T] | None:
        if hook := self.before_read.pop(key, None):
            await hook()
        return await self.base.get(key, type)

    async def get_many(self, keys: Sequence[str], type: type[T]) -> dict[str, Versioned[T]]:
        found = {key: await self.get(key, type) for key in dict.fromkeys(keys)}
        return {key: entry for key, entry in found.items() if entry is not None}

    async def commit(self, write: Write) -> int:
        if hook := self.before_write.pop(write.key, None):
            await hook()
        revision = await self.base.commit(write)
        if revision:
            self.writes.append((write.key, write.value, revision))
        return revision


class Crashed(Exception):
    """The process died here (in a test: the handler stops, its writes so far stay)."""


class CrashingStore(MemoryStore):
    """A MemoryStore whose ``crash_after``-th successful write is its last: right after
    it, every call raises :class:`Crashed`, as if the process had been killed."""

    def __init__(self, crash_after: int) -> None:
        super().__init__()
        self.crash_after = crash_after
        self.written = 0

    async def get(self, key: str, type: type[T]) -> Versioned[T] | None:
        if self.written >= self.crash_after:
            raise Crashed
        return await super().get(key, type)

    async def commit(self, write: Write) -> int:
        if self.written >= self.crash_after:
            raise Crashed
        revision = await super().commit(write)
        self.written += bool(revision)
        if self.written >= self.crash_after:
            raise Crashed
        return revision

    def restarted(self) -> MemoryStore:
        """The same data, as the next process sees it."""
        store = MemoryStore()
        store.data, store._revision = self.data, self._revision
        return store
