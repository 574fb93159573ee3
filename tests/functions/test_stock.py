"""stock: all-or-none reservations, releases after a failed payment, idempotent redelivery."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence

import pytest

from functions import stock
from functions.errors import Retry
from functions.events import (
    Event,
    OrderCreated,
    OrderItem,
    PaymentFailed,
    PaymentRefunded,
    Shortage,
    StockLine,
    StockReleased,
    StockReserved,
    StockUnavailable,
)
from functions.state import MemoryStore, Store, Versioned, Write
from functions.stock import (
    Level,
    Pending,
    Reservation,
    decide_release,
    decide_reservation,
    events_for,
    settle,
)
from tests.stores import Crashed, CrashingStore, HookedStore, InterleavingStore


def order(order_id: str, *lines: tuple[str, int]) -> OrderCreated:
    items = [OrderItem(sku, quantity, 100) for sku, quantity in lines]
    return OrderCreated(order_id, "c-1", items, payment_token="tok_visa")


def declined(order_id: str) -> PaymentFailed:
    return PaymentFailed(order_id, 100, reason="card_declined")


async def stocked(**levels: int) -> MemoryStore:
    store = MemoryStore()
    for sku, available in levels.items():
        assert await store.commit(Write(stock.level_key(sku), Level(available), 0))
    return store


async def level(store: Store, sku: str) -> int:
    """Units on the shelf; every change must be settled (no proof left pending)."""
    found = await store.get(stock.level_key(sku), Level)
    assert found is not None
    assert found.value.pending == {}, found
    return found.value.available


# --- pure decisions -----------------------------------------------------------


def versioned(revision: int = 1, **levels: int) -> dict[str, Versioned[Level] | None]:
    return {sku: Versioned(Level(units), revision) for sku, units in levels.items()}


def test_decide_reservation_takes_everything() -> None:
    lines = stock.wanted(order("o-1", ("A", 2), ("B", 1)))
    reservation, levels = decide_reservation("o-1", lines, versioned(7, A=5, B=1))
    assert reservation == Reservation("reserved", items=[StockLine("A", 2), StockLine("B", 1)])
    assert levels == {
        "A": Level(3, {"reserve:o-1": Pending(-2, based_on=7)}),
        "B": Level(0, {"reserve:o-1": Pending(-1, based_on=7)}),
    }


def test_decide_reservation_takes_nothing_when_one_sku_is_short() -> None:
    lines = stock.wanted(order("o-1", ("A", 2), ("B", 3)))
    reservation, levels = decide_reservation("o-1", lines, versioned(A=5, B=1))
    assert reservation == Reservation("unavailable", shortages=[Shortage("B", 3, 1)])
    assert levels == {}


def test_decide_reservation_unknown_sku_has_nothing() -> None:
    reservation, _ = decide_reservation("o-1", [StockLine("GHOST", 1)], {"GHOST": None})
    assert reservation.shortages == [Shortage("GHOST", 1, 0)]


def test_decide_reservation_aggregates_duplicate_skus() -> None:
    lines = stock.wanted(order("o-1", ("A", 2), ("A", 3)))
    reservation, levels = decide_reservation("o-1", lines, versioned(A=5))
    assert reservation.items == [StockLine("A", 5)]
    assert levels["A"].available == 0
    short, _ = decide_reservation("o-1", lines, versioned(A=4))
    assert short.shortages == [Shortage("A", 5, 4)]


def test_decide_reservation_counts_what_an_earlier_attempt_took() -> None:
    # A is already taken for o-1 (its proof is on the level): only B is left to take.
    taken = Level(0, {"reserve:o-1": Pending(-2, based_on=3)})
    levels = {"A": Versioned(taken, 4), "B": Versioned(Level(1), 5)}
    lines = [StockLine("A", 2), StockLine("B", 1)]
    reservation, changes = decide_reservation("o-1", lines, levels)
    assert reservation.status == "reserved"
    assert changes == {"B": Level(0, {"reserve:o-1": Pending(-1, based_on=5)})}


def test_settle_keeps_a_decided_reservation_and_drops_its_proof() -> None:
    level = Level(3, {"reserve:o-1": Pending(-2, based_on=4), "reserve:o-2": Pending(-1, 5)})
    reserved = Versioned(Reservation("reserved", items=[StockLine("A", 2)]), 9)
    assert settle(level, "o-1", reserved) == Level(3, {"reserve:o-2": Pending(-1, 5)})


def test_settle_gives_back_what_an_unavailable_reservation_took() -> None:
    level = Level(3, {"reserve:o-1": Pending(-2, based_on=4)})
    unavailable = Versioned(Reservation("unavailable", shortages=[Shortage("B", 1, 0)]), 9)
    assert settle(level, "o-1", unavailable) == Level(5)


def test_settle_gives_back_a_proof_written_after_the_decision() -> None:
    # Decided at revision 9: a proof decided on revision 12 was written by an
    # execution that had not seen the decision (the first proof was settled already).
    duplicate = Level(1, {"reserve:o-1": Pending(-2, based_on=12)})
    reserved = Versioned(Reservation("reserved", items=[StockLine("A", 2)]), 9)
    assert settle(duplicate, "o-1", reserved) == Level(3)
    released = Versioned(Reservation("released", [StockLine("A", 2)], reserved_at=9), 20)
    assert settle(duplicate, "o-1", released) == Level(3)


def test_settle_leaves_a_release_alone_until_it_is_decided() -> None:
    level = Level(5, {"release:o-1": Pending(2, based_on=14)})
    reserved = Versioned(Reservation("reserved", items=[StockLine("A", 2)]), 9)
    assert settle(level, "o-1", reserved) is level
    released = Versioned(Reservation("released", [StockLine("A", 2)], reserved_at=9), 20)
    assert settle(level, "o-1", released) == Level(5)
    late = Level(7, {"release:o-1": Pending(2, based_on=23)})
    assert settle(late, "o-1", released) == Level(5)


def test_decide_release_gives_back_each_sku_once() -> None:
    reserved = Versioned(Reservation("reserved", items=[StockLine("A", 2), StockLine("B", 1)]), 9)
    levels = {
        # A still carries the reservation's proof (not settled yet): settled on the way.
        "A": Versioned(Level(3, {"reserve:o-1": Pending(-2, based_on=4)}), 10),
        # B was given back by an earlier attempt.
        "B": Versioned(Level(6, {"release:o-1": Pending(1, based_on=11)}), 12),
    }
    assert decide_release("o-1", reserved, levels) == {
        "A": Level(5, {"release:o-1": Pending(2, based_on=10)})
    }


def test_events_for() -> None:
    lines = [StockLine("A", 2)]
    reserved, released = Reservation("reserved", lines), Reservation("released", lines)
    unavailable = Reservation("unavailable", shortages=[Shortage("A", 2, 0)])
    assert events_for("o-1", reserved, OrderCreated) == [StockReserved("o-1", lines)]
    assert events_for("o-1", released, OrderCreated) == [StockReserved("o-1", lines)]
    assert events_for("o-1", unavailable, OrderCreated) == [
        StockUnavailable("o-1", [Shortage("A", 2, 0)])
    ]
    assert events_for("o-1", released, PaymentFailed) == [StockReleased("o-1", lines)]
    assert events_for("o-1", unavailable, PaymentFailed) == []
    assert events_for("o-1", reserved, PaymentFailed) == []


# --- the handler ----------------------------------------------------------------


async def test_reserves_all_and_decrements_levels() -> None:
    store = await stocked(A=5, B=2)
    events = await stock.handle(order("o-1", ("A", 2), ("B", 2)), store)
    assert events == [StockReserved("o-1", [StockLine("A", 2), StockLine("B", 2)])]
    assert (await level(store, "A"), await level(store, "B")) == (3, 0)


async def test_one_short_sku_reserves_none() -> None:
    store = await stocked(A=5, B=1)
    events = await stock.handle(order("o-1", ("A", 2), ("B", 3)), store)
    assert events == [StockUnavailable("o-1", [Shortage("B", requested=3, available=1)])]
    assert (await level(store, "A"), await level(store, "B")) == (5, 1)


async def test_duplicate_sku_lines_are_aggregated() -> None:
    store = await stocked(A=5)
    events = await stock.handle(order("o-1", ("A", 2), ("A", 3)), store)
    assert events == [StockReserved("o-1", [StockLine("A", 5)])]
    assert await level(store, "A") == 0


async def test_redelivered_order_is_reserved_once() -> None:
    store = await stocked(A=5)
    created = order("o-1", ("A", 2))
    first = await stock.handle(created, store)
    again = await stock.handle(created, store)
    assert first == again == [StockReserved("o-1", [StockLine("A", 2)])]
    assert await level(store, "A") == 3


async def test_failed_payment_releases_the_reservation() -> None:
    store = await stocked(A=5, B=2)
    await stock.handle(order("o-1", ("A", 2), ("B", 1)), store)
    events = await stock.handle(declined("o-1"), store)
    assert events == [StockReleased("o-1", [StockLine("A", 2), StockLine("B", 1)])]
    assert (await level(store, "A"), await level(store, "B")) == (5, 2)


async def test_a_refund_releases_the_reservation_and_a_failure_after_it_nothing_more() -> None:
    # A cancellation after the charge: payment refunds, which asks for the stock back.
    store = await stocked(A=5)
    await stock.handle(order("o-1", ("A", 2)), store)
    refunded = PaymentRefunded("o-1", 100, charge_id="ch_1")
    assert await stock.handle(refunded, store) == [StockReleased("o-1", [StockLine("A", 2)])]
    assert await stock.handle(declined("o-1"), store) == [StockReleased("o-1", [StockLine("A", 2)])]
    assert await level(store, "A") == 5


async def test_a_refund_of_an_order_out_of_stock_gives_nothing_back() -> None:
    store = await stocked(A=1)
    assert [type(e) for e in await stock.handle(order("o-1", ("A", 2)), store)] == [
        StockUnavailable
    ]
    assert await stock.handle(PaymentRefunded("o-1", 100, charge_id="ch_1"), store) == []
    assert await level(store, "A") == 1


async def test_redelivered_failed_payment_releases_once() -> None:
    store = await stocked(A=5)
    await stock.handle(order("o-1", ("A", 2)), store)
    first = await stock.handle(declined("o-1"), store)
    again = await stock.handle(declined("o-1"), store)
    assert first == again == [StockReleased("o-1", [StockLine("A", 2)])]
    assert await level(store, "A") == 5


async def test_failed_payment_before_the_order_waits_for_it() -> None:
    store = await stocked(A=5)
    # Nothing decided yet for o-1: retry later rather than guess.
    with pytest.raises(Retry):
        await stock.handle(declined("o-1"), store)
    assert await level(store, "A") == 5
    # Once the order is handled, the retried failure releases it: the same
    # outcome as in the usual arrival order.
    assert await stock.handle(order("o-1", ("A", 2)), store) == [
        StockReserved("o-1", [StockLine("A", 2)])
    ]
    assert await stock.handle(declined("o-1"), store) == [StockReleased("o-1", [StockLine("A", 2)])]
    assert await level(store, "A") == 5


async def test_failed_payment_for_an_unavailable_order_emits_nothing() -> None:
    store = await stocked(A=1)
    await stock.handle(order("o-1", ("A", 2)), store)
    assert await stock.handle(declined("o-1"), store) == []
    assert await level(store, "A") == 1


async def test_concurrent_orders_for_the_last_units_reserve_once() -> None:
    store = InterleavingStore()
    assert await store.commit(Write(stock.level_key("A"), Level(3), 0))
    results = await asyncio.gather(
        stock.handle(order("o-1", ("A", 2)), store),
        stock.handle(order("o-2", ("A", 2)), store),
    )
    kinds = sorted(type(events[0]).__name__ for events in results)
    assert kinds == ["StockReserved", "StockUnavailable"]
    assert store.conflicts >= 1  # the two really raced
    assert await level(store, "A") == 1


async def test_redelivery_racing_the_original_reserves_once() -> None:
    store = InterleavingStore()
    assert await store.commit(Write(stock.level_key("A"), Level(5), 0))
    created = order("o-1", ("A", 2))
    first, second = await asyncio.gather(stock.handle(created, store), stock.handle(created, store))
    assert first == second == [StockReserved("o-1", [StockLine("A", 2)])]
    assert store.conflicts >= 1
    assert await level(store, "A") == 3


async def test_failed_payment_racing_the_order_leaves_the_shelf_whole() -> None:
    store = InterleavingStore()
    assert await store.commit(Write(stock.level_key("A"), Level(5), 0))
    results = await asyncio.gather(
        stock.handle(order("o-1", ("A", 2)), store),
        stock.handle(declined("o-1"), store),
        return_exceptions=True,
    )
    # The failure read before the reservation existed: it is handed back...
    assert isinstance(results[1], Retry)
    assert await level(store, "A") == 3
    # ...and its retry releases the reservation.
    assert await stock.handle(declined("o-1"), store) == [StockReleased("o-1", [StockLine("A", 2)])]
    assert await level(store, "A") == 5


# --- crashes and overlapping executions of the same order ----------------------
#
# No write spans two keys, so a process can die between any two of them. Each
# case below stops a handler after every possible write in turn and lets the
# redelivery (and, separately, two redeliveries at once) finish the job.

TWO_SKUS = order("o-1", ("A", 2), ("B", 1))


async def writes_of(
    run: Callable[[Store], Awaitable[object]], setup: Callable[[Store], Awaitable[None]]
) -> int:
    """How many writes ``run`` makes on a fresh store prepared by ``setup``."""
    store = CrashingStore(crash_after=10_000)
    await setup(store)
    before = store.written
    await run(store)
    return store.written - before


async def shelf(store: Store) -> None:
    assert await store.commit(Write(stock.level_key("A"), Level(5), 0))
    assert await store.commit(Write(stock.level_key("B"), Level(2), 0))


async def reserved_shelf(store: Store) -> None:
    await shelf(store)
    await stock.handle(TWO_SKUS, store)


@pytest.mark.parametrize("racing", [False, True], ids=["redelivered", "redelivered-twice-at-once"])
async def test_reservation_survives_a_crash_after_any_write(racing: bool) -> None:
    total = await writes_of(lambda s: stock.handle(TWO_SKUS, s), shelf)
    assert total == 5  # proof on A, proof on B, the decision, settling A and B
    for crash_after in range(1, total + 1):
        store = CrashingStore(crash_after=crash_after + 2)  # + the 2 writes of the shelf
        await shelf(store)
        with pytest.raises(Crashed):
            await stock.handle(TWO_SKUS, store)
        after = store.restarted()
        again = [stock.handle(TWO_SKUS, after) for _ in range(2 if racing else 1)]
        for events in await asyncio.gather(*again):
            assert events == [StockReserved("o-1", [StockLine("A", 2), StockLine("B", 1)])]
        assert (await level(after, "A"), await level(after, "B")) == (3, 1), crash_after


async def test_release_survives_a_crash_after_any_write() -> None:
    total = await writes_of(lambda s: stock.handle(declined("o-1"), s), reserved_shelf)
    assert total == 5  # given back on A and B, the decision, settling A and B
    for crash_after in range(1, total + 1):
        store = CrashingStore(crash_after=10_000)
        await reserved_shelf(store)
        store.crash_after = store.written + crash_after
        with pytest.raises(Crashed):
            await stock.handle(declined("o-1"), store)
        after = store.restarted()
        first, second = await asyncio.gather(
            stock.handle(declined("o-1"), after), stock.handle(declined("o-1"), after)
        )
        assert first == second == [StockReleased("o-1", [StockLine("A", 2), StockLine("B", 1)])]
        assert (await level(after, "A"), await level(after, "B")) == (5, 2), crash_after


async def test_an_execution_that_missed_the_decision_gives_back_its_duplicate() -> None:
    # Execution Y reads the record (none yet), then pauses; X reserves the same
    # order completely meanwhile, proof settled and all. Y then finds no proof
    # on A, takes A again, loses the decision to X and must give that back.
    store = await stocked(A=5)
    created = order("o-1", ("A", 2))
    x_answer: list[Sequence[Event]] = []

    async def x_runs_to_the_end() -> None:
        x_answer.append(await stock.handle(created, store))

    y = HookedStore(store, before_read={stock.level_key("A"): x_runs_to_the_end})
    assert await stock.handle(created, y) == [StockReserved("o-1", [StockLine("A", 2)])]
    assert x_answer == [[StockReserved("o-1", [StockLine("A", 2)])]]
    decided = await store.get(stock.order_key("o-1"), Reservation)
    assert decided is not None
    duplicates = [
        value
        for key, value, _ in y.writes
        if isinstance(value, Level) and "reserve:o-1" in value.pending
    ]
    assert duplicates, "Y really took A a second time"
    assert all(d.pending["reserve:o-1"].based_on > decided.revision for d in duplicates)
    assert await level(store, "A") == 3


async def test_an_execution_that_saw_a_shortage_can_decide_for_both() -> None:
    # Y reads A while it is empty and will decide "unavailable". Before Y
    # records that, 2 units come back to A and X, another execution of the same
    # order, takes them and B, stopping just before recording "reserved". Y
    # records first: X adopts Y's decision and what X took goes back.
    store = await stocked(A=0, B=5)
    created = order("o-1", ("A", 2), ("B", 1))
    x_took, y_decided = asyncio.Event(), asyncio.Event()

    async def x_pauses() -> None:
        x_took.set()
        await y_decided.wait()

    x = HookedStore(store, before_write={stock.order_key("o-1"): x_pauses})
    x_task: asyncio.Task[Sequence[Event]] | None = None

    async def restock_and_let_x_take() -> None:
        nonlocal x_task
        a = await store.get(stock.level_key("A"), Level)
        assert a is not None and await store.commit(
            Write(stock.level_key("A"), Level(2), a.revision)
        )
        x_task = asyncio.create_task(stock.handle(created, x))
        await x_took.wait()

    y = HookedStore(store, before_write={stock.order_key("o-1"): restock_and_let_x_take})
    unavailable = [StockUnavailable("o-1", [Shortage("A", requested=2, available=0)])]
    assert await stock.handle(created, y) == unavailable
    y_decided.set()
    assert x_task is not None and await x_task == unavailable
    assert (await level(store, "A"), await level(store, "B")) == (2, 5)


# --- batches --------------------------------------------------------------------
#
# stock decides the orders in hand together (orderflow/runtime/batch.py): one read of
# every record and level, one write per SKU changed, one per SKU settled.


def mix(seed: int, n: int) -> list[OrderCreated]:
    """``n`` orders over 3 SKUs, some ordered twice (a redelivery in the same batch)."""
    rng = random.Random(seed)
    orders = []
    for i in range(n):
        lines = [(sku, rng.randint(1, 3)) for sku in rng.sample("ABC", rng.randint(1, 3))]
        orders.append(order(f"o-{i}", *lines))
    for _ in range(n // 5):
        orders.insert(rng.randrange(len(orders)), rng.choice(orders))
    return orders


async def one_by_one(
    orders: Sequence[OrderCreated], **levels: int
) -> tuple[list[stock.Outcome], dict[str, int]]:
    store = await stocked(**levels)
    outcomes: list[stock.Outcome] = [await stock.handle(o, store) for o in orders]
    return outcomes, {sku: await level(store, sku) for sku in levels}


async def test_a_batch_writes_each_sku_once_however_many_orders_want_it() -> None:
    store = CrashingStore(crash_after=10_000)
    for sku, available in {"A": 10, "B": 10}.items():
        assert await store.commit(Write(stock.level_key(sku), Level(available), 0))
    before = store.written
    orders = [order(f"o-{i}", ("A", 1), ("B", 1)) for i in range(8)]
    outcomes = await stock.reserve(orders, store)
    assert all(isinstance(o, list) and isinstance(o[0], StockReserved) for o in outcomes)
    # A and B taken once each, 8 records, A and B settled once each.
    assert store.written - before == 2 + 8 + 2
    assert (await level(store, "A"), await level(store, "B")) == (2, 2)


@pytest.mark.parametrize("seed", range(5))
async def test_a_batch_decides_as_handling_its_orders_one_by_one_would(seed: int) -> None:
    orders = mix(seed, 20)
    expected, expected_levels = await one_by_one(orders, A=12, B=9, C=15)
    store = await stocked(A=12, B=9, C=15)
    assert await stock.reserve(orders, store) == expected
    assert {sku: await level(store, sku) for sku in "ABC"} == expected_levels


async def test_a_batch_survives_a_crash_after_any_write() -> None:
    orders = mix(7, 6)
    expected, expected_levels = await one_by_one(orders, A=6, B=5, C=4)
    await crash_after_each_write(orders, expected, expected_levels)


async def crash_after_each_write(
    batch: Sequence[Event], expected: Sequence[stock.Outcome], levels: dict[str, int]
) -> None:
    """Stop the batch after each of its writes in turn; its redelivery must finish it
    with the same outcomes and leave the shelves as an uninterrupted run does."""
    total = await writes_of(lambda s: stock.handle_batch(batch, s), batch_shelf)
    assert total > 6
    for crash_after in range(1, total + 1):
        store = CrashingStore(crash_after=10_000)
        await batch_shelf(store)
        store.crash_after = store.written + crash_after
        with pytest.raises(Crashed):
            await stock.handle_batch(batch, store)
        # The redelivery finds the batch's messages in hand again.
        after = store.restarted()
        assert shape(await stock.handle_batch(batch, after)) == shape(expected), crash_after
        assert {sku: await level(after, sku) for sku in "ABC"} == levels


def shape(outcomes: Sequence[stock.Outcome]) -> list[object]:
    """Outcomes, a shortage's figures left out: a redelivery after a crash finds the
    proofs of every order the batch had written, also those decided after the short
    one, so it may see a SKU shorter than the first attempt did. Short either way:
    it only ever sees less on the shelf, and what was taken counts as taken."""
    return [
        [("unavailable", e.order_id) if isinstance(e, StockUnavailable) else e for e in o]
        if isinstance(o, list)
        else repr(o)
        for o in outcomes
    ]


async def batch_shelf(store: Store) -> None:
    for sku, available in {"A": 6, "B": 5, "C": 4}.items():
        assert await store.commit(Write(stock.level_key(sku), Level(available), 0))


@pytest.mark.parametrize("seed", range(5))
async def test_two_replicas_batching_the_same_orders_agree_and_take_once(seed: int) -> None:
    # Two processes with overlapping batches (each order delivered to one and
    # redelivered to the other) race on every SKU.
    orders = mix(seed, 16)
    store = InterleavingStore()
    for sku, available in {"A": 10, "B": 8, "C": 12}.items():
        assert await store.commit(Write(stock.level_key(sku), Level(available), 0))
    left, right = orders[:12], orders[4:]
    first, second = await asyncio.gather(stock.reserve(left, store), stock.reserve(right, store))
    assert store.conflicts >= 1  # they really raced
    answers: dict[str, Sequence[Event]] = {}
    for created, outcome in [*zip(left, first, strict=True), *zip(right, second, strict=True)]:
        assert not isinstance(outcome, Exception), outcome
        assert answers.setdefault(created.order_id, outcome) == outcome, created.order_id
    taken = {sku: 0 for sku in "ABC"}
    for events in answers.values():
        if isinstance(events[0], StockReserved):
            for line in events[0].items:
                taken[line.sku] += line.quantity
    assert {sku: await level(store, sku) for sku in "ABC"} == {
        "A": 10 - taken["A"], "B": 8 - taken["B"], "C": 12 - taken["C"]
    }  # fmt: skip


async def test_a_batch_of_failed_payments_gives_back_each_sku_once() -> None:
    store = CrashingStore(crash_after=10_000)
    await batch_shelf(store)
    orders = [order(f"o-{i}", ("A", 1), ("B", 1)) for i in range(4)]
    await stock.reserve(orders, store)
    before = store.written
    outcomes = await stock.release([declined(o.order_id) for o in orders], store)
    assert outcomes == [[StockReleased(o.order_id, [StockLine("A", 1), StockLine("B", 1)])]
                        for o in orders]  # fmt: skip
    # A and B given back once each, 4 records, A and B settled once each.
    assert store.written - before == 2 + 4 + 2
    assert (await level(store, "A"), await level(store, "B")) == (6, 5)


async def test_a_failure_batched_with_its_order_finds_it_decided() -> None:
    # payment is quicker than stock: an order's payments.failed can be in hand
    # together with its orders.created. Reservations go first.
    store = await stocked(A=5)
    batch: list[Event] = [declined("o-1"), order("o-1", ("A", 2)), order("o-2", ("A", 2))]
    outcomes = await stock.handle_batch(batch, store)
    assert outcomes == [
        [StockReleased("o-1", [StockLine("A", 2)])],
        [StockReserved("o-1", [StockLine("A", 2)])],
        [StockReserved("o-2", [StockLine("A", 2)])],
    ]
    assert await level(store, "A") == 3


async def test_a_mixed_batch_survives_a_crash_after_any_write() -> None:
    orders = mix(11, 6)
    failures = [declined(o.order_id) for o in orders[::2]]
    batch: list[Event] = [*orders, *failures]
    expected = await stock.handle_batch(batch, reference := await stocked(A=6, B=5, C=4))
    expected_levels = {sku: await level(reference, sku) for sku in "ABC"}
    await crash_after_each_write(batch, expected, expected_levels)
