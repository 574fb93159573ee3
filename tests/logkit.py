"""Handlers on a history without a server: every way their inputs and reactions interleave.

In the log, an input is stored before its handler reads for anything, and
handlers run at any moment after that, concurrently, in any order. A join is
correct when *every* such schedule ends with the right events stored, once:
:func:`schedules` plays them all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import permutations

from functions.events import Event
from functions.history import History, MemoryHistory

Handle = Callable[[Event, History], Awaitable[Sequence[Event]]]


@dataclass
class Played:
    schedule: list[str]
    #: What each handled input answered, in handling order.
    answers: list[list[Event]]
    #: The log afterwards: inputs and reactions, one per order and kind.
    history: MemoryHistory

    @property
    def reactions(self) -> list[Event]:
        """What the log took of the handlers' answers, repeats left out."""
        answered = {id(e) for answer in self.answers for e in answer}
        return [e for e in self.history.appended if id(e) in answered]


def _orders(n: int) -> Iterator[list[tuple[str, int]]]:
    """Every sequence of store(i) and handle(i), each handle after its store."""
    ops = [("store", i) for i in range(n)] + [("handle", i) for i in range(n)]
    seen = set()
    for perm in permutations(ops):
        if perm in seen:
            continue
        seen.add(perm)
        stored: set[int] = set()
        ok = True
        for op, i in perm:
            if op == "store":
                stored.add(i)
            elif i not in stored:
                ok = False
                break
        if ok:
            yield list(perm)


async def play(handle: Handle, inputs: Sequence[Event], order: list[tuple[str, int]],
               before: Sequence[Event] = ()) -> Played:  # fmt: skip
    history = MemoryHistory()
    for event in before:
        history.record(event)
    answers = []
    for op, i in order:
        if op == "store":
            history.record(inputs[i])
        else:
            answer = list(await handle(inputs[i], history))
            for event in answer:
                history.record(event)
            answers.append(answer)
    return Played([f"{op} {type(inputs[i]).__name__}" for op, i in order], answers, history)


async def schedules(
    handle: Handle, inputs: Sequence[Event], before: Sequence[Event] = ()
) -> list[Played]:
    """The handlers of ``inputs`` played in every schedule (``before``: stored first)."""
    return [await play(handle, inputs, order, before) for order in _orders(len(inputs))]
