"""Handlers with state in KV under a cluster's two ways of not knowing: lost answers, lagging reads.

While a clustered stream changes leader, a compare-and-set can be applied and
its answer lost (the request times out), and a direct get may be served by a
replica that has not applied the latest write yet. The handlers' design is
that neither matters: a timed-out commit fails the attempt, the message is
delivered again, and the handler reads again and decides again; a stale read
at worst loses a compare-and-set. These tests check it rather than assume it,
without a server: for every scenario, every commit in turn is applied and then
answered with a timeout, with reads lagging and without, and each run must
emit exactly what the undisturbed run emits and leave exactly its state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import msgspec
import pytest

from functions import payment, stock
from functions.errors import Retry
from functions.events import (
    Event,
    OrderCreated,
    OrderItem,
    PaymentFailed,
    PaymentSucceeded,
    Shortage,
    StockLine,
    StockReserved,
    StockUnavailable,
)
from functions.history import MemoryHistory
from functions.payment import GatewayUnavailable
from functions.state import MemoryStore, T, Versioned, Write
from functions.stock import Level, level_key
from orderflow.runtime.gateway import FLAKY_TOKEN, SimulatedGateway


class UncertainStore(MemoryStore):
    """A MemoryStore that can lose one commit's answer and serve stale reads.

    ``lose``: the commit (numbered from 0) that is applied, then answered with
    ``TimeoutError``. ``lagging``: after each applied commit, the next read of
    every key it wrote still returns what the key held before.
    """

    def __init__(self, lose: int | None = None, lagging: bool = False) -> None:
        super().__init__()
        self.lose = lose
        self.lagging = lagging
        self.commits = 0
        self._stale: dict[str, tuple[bytes, int] | None] = {}

    async def get(self, key: str, type: type[T]) -> Versioned[T] | None:
        if key in self._stale:
            old = self._stale.pop(key)
            if old is None:
                return None
            return Versioned(msgspec.json.decode(old[0], type=type), old[1])
        return await super().get(key, type)

    async def commit(self, write: Write) -> int:
        number, self.commits = self.commits, self.commits + 1
        before = {write.key: self.data.get(write.key)}
        applied = await super().commit(write)
        if applied and self.lagging:
            self._stale.update(before)
        if number == self.lose:
            raise TimeoutError("nats: timeout (the write was applied, its answer lost)")
        return applied

    def state(self) -> dict[str, object]:
        return {key: msgspec.json.decode(raw) for key, (raw, _) in self.data.items()}


Handle = Callable[[Event, UncertainStore, MemoryHistory], Awaitable[Sequence[Event]]]

#: What the runner does with these: hand the message back, deliver it again.
REDELIVERED = (TimeoutError, Retry, GatewayUnavailable)


async def deliver(
    handle: Handle, store: UncertainStore, events: list[Event], history: MemoryHistory | None = None
) -> list[list[Event]]:
    """Each event until its handler returns, as the worker's nak-and-redeliver does;
    the inputs and answers stored in ``history`` as the log would."""
    history = history or MemoryHistory()
    answers = []
    for event in events:
        history.record(event)
        for _ in range(10):
            try:
                answer = list(await handle(event, store, history))
                for out in answer:
                    history.record(out)
                answers.append(answer)
                break
            except REDELIVERED:
                continue
        else:
            raise AssertionError(f"{event} never handled")
    return answers


def _payment(
    event: Event, store: UncertainStore, history: MemoryHistory
) -> Awaitable[Sequence[Event]]:
    # The gateway's memory is the store: every commit of it can lose its answer.
    return payment.handle(event, history, SimulatedGateway(store))


def _stock(
    event: Event, store: UncertainStore, history: MemoryHistory
) -> Awaitable[Sequence[Event]]:
    return stock.handle(event, store)


ITEMS = [OrderItem("BOOK-42", 2, 1500), OrderItem("MUG-7", 1, 899)]
LINES = [StockLine("BOOK-42", 2), StockLine("MUG-7", 1)]
SHORT = [Shortage("MUG-7", 1, 0)]


def created(token: str = "tok_visa", items: list[OrderItem] = ITEMS) -> OrderCreated:
    return OrderCreated("o-1", "c-7", items, payment_token=token)


PAID = PaymentSucceeded("o-1", 3899, charge_id="ch_1")
DECLINED = PaymentFailed("o-1", 3899, reason="card_declined")
RESERVED = StockReserved("o-1", LINES)
UNAVAILABLE = StockUnavailable("o-1", SHORT)

SCENARIOS: dict[str, tuple[Handle, dict[str, int], list[Event]]] = {
    "payment charges": (_payment, {}, [created()]),
    "payment retries a flaky gateway": (_payment, {}, [created(FLAKY_TOKEN)]),
    "payment declines": (_payment, {}, [created("tok_declined")]),
    "payment refunds": (_payment, {}, [created(), UNAVAILABLE]),
    "stock reserves": (_stock, {"BOOK-42": 5, "MUG-7": 3}, [created()]),
    "stock is short": (_stock, {"BOOK-42": 5, "MUG-7": 0}, [created()]),
    "stock releases": (_stock, {"BOOK-42": 5, "MUG-7": 3}, [created(), DECLINED]),
}
# delivery and order keep no state but the order's history: a lost answer
# there is a publish whose ack was lost, which the log settles (a repeat is
# refused as stored already; tests/e2e/test_crash.py kills them at that moment).


async def run(
    scenario: str, lose: int | None, lagging: bool
) -> tuple[list[list[Event]], dict[str, object], int]:
    handle, levels, events = SCENARIOS[scenario]
    store = UncertainStore()
    for sku, available in levels.items():
        assert await store.commit(Write(level_key(sku), Level(available), 0))
    # The seeding is not under test (provisioning is done before orders come).
    store.commits, store.lose, store.lagging = 0, lose, lagging
    answers = await deliver(handle, store, events)
    return answers, store.state(), store.commits


@pytest.mark.parametrize("lagging", [False, True], ids=["fresh reads", "lagging reads"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_every_lost_answer_changes_nothing(scenario: str, lagging: bool) -> None:
    expected, final, commits = await run(scenario, lose=None, lagging=False)
    assert commits > 0
    for lose in [None, *range(commits)]:
        answers, state = (await run(scenario, lose, lagging))[:2]
        assert answers == expected, (lose, answers)
        assert state == final, lose


@pytest.mark.xfail(
    strict=True,
    reason="stock decides 'unavailable' on levels it read but does not guard in its commit: "
    "a read lagging behind a release makes the shelf look short "
    "(docs/deployment.md, 'Known limit')",
)
async def test_a_read_lagging_behind_a_release_does_not_make_stock_short() -> None:
    store = UncertainStore()
    assert await store.commit(Write(level_key("MUG-7"), Level(1), 0))
    first = OrderCreated("o-1", "c-7", [OrderItem("MUG-7", 1, 899)], payment_token="tok_visa")
    second = OrderCreated("o-2", "c-8", [OrderItem("MUG-7", 1, 899)], payment_token="tok_visa")
    await deliver(_stock, store, [first])
    taken = store.data[level_key("MUG-7")]  # the shelf empty, as o-1 left it
    await deliver(_stock, store, [PaymentFailed("o-1", 899, reason="card_declined")])
    # The release is applied (the shelf holds 1 again); a replica that has not
    # applied it (nor the writes that settled it) yet still says 0.
    store._stale[level_key("MUG-7")] = taken
    answers = await deliver(_stock, store, [second])
    assert answers == [[StockReserved("o-2", [StockLine("MUG-7", 1)])]]
