"""orderflow.runtime.batch: calls made while a batch runs are handled together, each answered."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from orderflow.runtime.batch import Batcher


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()

    async def __call__(self, items: Sequence[int]) -> list[int | Exception]:
        self.batches.append(list(items))
        await self.release.wait()
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]


async def test_calls_made_while_a_batch_runs_form_the_next_batch() -> None:
    handler = Recorder()
    batcher: Batcher[int, int] = Batcher(handler, limit=3)
    first = asyncio.ensure_future(batcher(0))
    await asyncio.sleep(0)  # the first batch starts with what is there: one call
    rest = [asyncio.ensure_future(batcher(i)) for i in range(2, 12, 2)]
    await asyncio.sleep(0)
    handler.release.set()
    assert await first == 0
    assert [await r for r in rest] == [20, 40, 60, 80, 100]
    assert handler.batches == [[0], [2, 4, 6], [8, 10]]  # at most limit each


async def test_each_caller_gets_its_own_outcome() -> None:
    handler = Recorder()
    handler.release.set()
    batcher: Batcher[int, int] = Batcher(handler, limit=10)
    results = await asyncio.gather(*(batcher(i) for i in range(4)), return_exceptions=True)
    assert results[0] == 0 and results[2] == 20
    assert isinstance(results[1], ValueError) and str(results[1]) == "odd 1"
    assert isinstance(results[3], ValueError) and str(results[3]) == "odd 3"


async def test_a_failing_batch_fails_every_caller_and_the_next_batch_still_runs() -> None:
    calls = 0

    async def flaky(items: Sequence[int]) -> list[int | Exception]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("server went away")
        return list(items)

    batcher: Batcher[int, int] = Batcher(flaky, limit=10)
    results = await asyncio.gather(batcher(1), batcher(2), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    assert await batcher(3) == 3


async def test_a_cancelled_caller_does_not_stop_the_others() -> None:
    handler = Recorder()
    batcher: Batcher[int, int] = Batcher(handler, limit=10)
    gone = asyncio.ensure_future(batcher(0))
    kept = asyncio.ensure_future(batcher(2))
    await asyncio.sleep(0)
    gone.cancel()
    handler.release.set()
    assert await kept == 20
    with pytest.raises(asyncio.CancelledError):
        await gone
