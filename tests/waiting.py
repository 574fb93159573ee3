"""Waiting for a condition on a real server: polled, with a deadline, never a bare sleep."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

#: Seconds between looks.
EVERY = 0.02


async def until(
    condition: Callable[[], bool | Awaitable[bool]], timeout: float, what: str = "condition"
) -> float:
    """Poll ``condition`` until it holds; returns the seconds it took, fails after ``timeout``."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        outcome = condition()
        held = await outcome if not isinstance(outcome, bool) else outcome
        if held:
            return time.monotonic() - start
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true after {timeout}s")
        await asyncio.sleep(EVERY)


async def value_when(
    get: Callable[[], Awaitable[T]], ok: Callable[[T], bool], timeout: float, what: str
) -> T:
    """Poll ``get`` until its value passes ``ok``; that value, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = await get()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: last seen {value!r} after {timeout}s")
        await asyncio.sleep(EVERY)
