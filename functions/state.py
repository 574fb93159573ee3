"""The one state interface handlers get: a typed key/value store with compare-and-set.

Functions keep nothing in their process. What they must remember (stock levels,
payments made, which half of a join has arrived) lives in a store the runner
hands them: in production a JetStream KV bucket (``orderflow.runtime.kv.KvStore``), in
unit tests and offline replays the :class:`MemoryStore` below. Both obey the
same rules, so a handler tested on one behaves the same on the other:

* ``get`` returns the value with its revision, or ``None``; ``get_many`` the
  same for many keys at once, as of one moment (one round trip on a bucket).
* ``commit`` writes one key. The write names the revision it was decided on
  (0: "the key must not exist yet"); if the key moved since, nothing is
  written and ``commit`` returns 0: read again, decide again. Otherwise it
  returns the new revision, so a handler can write the key again without
  reading it back. No write spans two keys (``functions/stock.py`` says why
  none needs to). This is what lets two
  replicas, or a redelivery racing the original, share state without
  double-counting.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import msgspec

from functions.errors import Retry

T = TypeVar("T", bound=msgspec.Struct)
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Versioned(Generic[T]):
    value: T
    revision: int


@dataclass(frozen=True, slots=True)
class Write:
    key: str
    value: msgspec.Struct
    revision: int  # the revision this write was decided on; 0 = create


class Store(Protocol):
    async def get(self, key: str, type: type[T]) -> Versioned[T] | None: ...

    async def get_many(self, keys: Sequence[str], type: type[T]) -> dict[str, Versioned[T]]:
        """Every key of ``keys`` that has a value (absent keys are left out)."""
        ...

    async def commit(self, write: Write) -> int:
        """The key's new revision; 0: it moved, nothing was written."""
        ...


class MemoryStore:
    """A Store in a dict, with the same revision semantics as JetStream KV."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[bytes, int]] = {}
        self._revision = 0

    async def get(self, key: str, type: type[T]) -> Versioned[T] | None:
        found = self.data.get(key)
        if found is None:
            return None
        raw, revision = found
        return Versioned(msgspec.json.decode(raw, type=type), revision)

    async def get_many(self, keys: Sequence[str], type: type[T]) -> dict[str, Versioned[T]]:
        # Through get, so a subclass that intercepts reads sees every key.
        found = {key: await self.get(key, type) for key in dict.fromkeys(keys)}
        return {key: entry for key, entry in found.items() if entry is not None}

    async def commit(self, write: Write) -> int:
        current = self.data.get(write.key)
        if (current[1] if current else 0) != write.revision:
            return 0
        # One counter for the whole store, like a KV bucket's stream sequence.
        self._revision += 1
        self.data[write.key] = (msgspec.json.encode(write.value), self._revision)
        return self._revision


#: How often a handler re-reads and re-decides after losing a compare-and-set
#: race before it hands the message back to the runner to retry later.
CONFLICT_ATTEMPTS = 25


async def optimistically(attempt: Callable[[], Awaitable[R | None]]) -> R:
    """Run read-decide-commit ``attempt`` until it commits (returns non-``None``)."""
    for _ in range(CONFLICT_ATTEMPTS):
        result = await attempt()
        if result is not None:
            return result
    raise Retry(f"state kept changing under us ({CONFLICT_ATTEMPTS} compare-and-set conflicts)")
