"""stock: reserve every item of an order or none; give it back when the payment holds no money.

"Holds no money": the payment failed (or was never charged, the order
cancelled first), or it was refunded (the order cancelled after the charge).

State (the ``stock`` bucket):

* ``level.<SKU>``  -> :class:`Level`, units on the shelf;
* ``order.<ID>``   -> :class:`Reservation`, what this function decided for the order.

Each key is written on its own, with compare-and-set: no write spans two keys
(a multi-key atomic batch costs 3.5 ms and 3 fsyncs on a file-backed bucket,
a single-key write 0.23 ms; see bench/README.md). What makes that safe:

* **Every change to a level carries its proof.** Taking an order's units adds
  a :class:`Pending` entry ``reserve:<order>`` to the level in the same write,
  so an attempt that died halfway, a redelivery or a second execution of the
  same order running at the same time finds the SKUs already taken and takes
  them only once. Giving units back is the same with ``release:<order>``.
* **The order's record is the decision.** Once every SKU is taken (or one is
  short), ``order.<ID>`` is created, once: the first execution to create it
  decides, every other one adopts its decision.
* **Settling** then removes the proofs. A reservation that was decided
  unavailable gives back what was taken. A proof written *after* the decision
  it belongs to (by an execution that had not seen the decision yet, once the
  first one had already settled) is a duplicate: it was decided on a level
  revision later than the decision's, and is given back too. Revisions are
  stream sequences of one bucket, so "later" is exact, whatever any read saw.

Why the proof is in the level and not a ``Nats-Msg-Id`` on the write (the
bucket's duplicate window turning a repeat into a no-op): nats-server 2.15
checks the expected revision *before* the duplicate, so a repeat on a level
that moved is refused as a conflict and a repeat that finds the shelf short
(by its own first write) never learns it was applied; and after a server
restart the server remembers only the ids of messages it still stores, so a
level write superseded by a later one is forgotten (bench/README.md).

Orders are decided in batches (:func:`reserve`; the runner gathers the
orders in hand, ``orderflow/runtime/batch.py``): one read of every record and level
the batch needs, the orders decided one after the other in memory, then each
changed SKU written once and each settled once, so a popular SKU costs two
writes per batch, not two per order. Each order still carries its own proof
and its own record, so everything above holds order by order: an order is
all-or-none, and a crash between any two writes of a batch leaves what a
redelivery of any of its orders finishes.

A release needs a reservation decision: ``payments.failed`` that arrives
before this function has handled the order is retried later rather than
guessed at, so what stock emits for an order depends only on which events it
has seen, never on their order (what lets a recorded history replay exactly).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Literal

import msgspec

from functions.errors import Retry
from functions.events import (
    Event,
    OrderCreated,
    PaymentFailed,
    PaymentRefunded,
    Shortage,
    StockLine,
    StockReleased,
    StockReserved,
    StockUnavailable,
)
from functions.state import CONFLICT_ATTEMPTS, Store, Versioned, Write


class Pending(msgspec.Struct, frozen=True):
    """A change applied to a level for an order whose decision has not settled it yet."""

    delta: int  # units taken (negative) or given back (positive)
    based_on: int  # the level's revision this change was decided on


class Level(msgspec.Struct, frozen=True, omit_defaults=True):
    available: int
    # Changes in, keyed by operation (reserve_op, release_op); only until settled.
    pending: dict[str, Pending] = {}


class Reservation(msgspec.Struct, frozen=True):
    # reserved -> released; unavailable is final.
    status: Literal["reserved", "unavailable", "released"]
    items: list[StockLine] = []
    shortages: list[Shortage] = []
    # Once released: the revision at which the reservation had been decided
    # (until then, the record's own revision).
    reserved_at: int = 0


def level_key(sku: str) -> str:
    return f"level.{sku}"


def order_key(order_id: str) -> str:
    return f"order.{order_id}"


def reserve_op(order_id: str) -> str:
    return f"reserve:{order_id}"


def release_op(order_id: str) -> str:
    return f"release:{order_id}"


Levels = Mapping[str, Versioned[Level] | None]


# --- pure decisions -----------------------------------------------------------


def wanted(order: OrderCreated) -> list[StockLine]:
    """Quantities per SKU, a SKU listed twice counted once, in first-seen order."""
    totals: dict[str, int] = {}
    for item in order.items:
        totals[item.sku] = totals.get(item.sku, 0) + item.quantity
    return [StockLine(sku, quantity) for sku, quantity in totals.items()]


def decide_reservation(
    order_id: str, lines: Sequence[StockLine], levels: Levels
) -> tuple[Reservation, dict[str, Level]]:
    """All or nothing: the order's outcome, and the new level of each SKU still to take from.

    A SKU whose level already holds this order's reservation (an earlier or a
    concurrent attempt took it) counts as taken.
    """
    op = reserve_op(order_id)
    shortages, changes = [], {}
    for line in lines:
        entry = levels.get(line.sku)
        level = entry.value if entry else Level(0)
        if op in level.pending:
            continue
        if level.available < line.quantity:
            shortages.append(Shortage(line.sku, line.quantity, level.available))
            continue
        taken = Pending(-line.quantity, entry.revision if entry else 0)
        changes[line.sku] = Level(level.available - line.quantity, {**level.pending, op: taken})
    if shortages:
        return Reservation("unavailable", shortages=shortages), {}
    return Reservation("reserved", items=list(lines)), changes


def decide_release(
    order_id: str, reserved: Versioned[Reservation], levels: Levels
) -> dict[str, Level]:
    """After a failed payment: the new level of each reserved SKU not given back yet."""
    op = release_op(order_id)
    changes = {}
    for line in reserved.value.items:
        entry = levels.get(line.sku)
        level = settle(entry.value, order_id, reserved) if entry else Level(0)
        if op in level.pending:
            continue
        given = Pending(line.quantity, entry.revision if entry else 0)
        changes[line.sku] = Level(level.available + line.quantity, {**level.pending, op: given})
    return changes


def settle(level: Level, order_id: str, decided: Versioned[Reservation]) -> Level:
    """The level once the order's decided changes are final: their proofs go.

    What an unavailable reservation took goes back; so does a change decided on
    a revision later than the decision it belongs to: a duplicate, applied by an
    execution that had not seen the decision after the proof it looked for was
    already settled. A release not decided yet stays pending.
    """
    record, revision = decided.value, decided.revision
    reserved_at = record.reserved_at or revision
    available, pending = level.available, dict(level.pending)
    taken = pending.pop(reserve_op(order_id), None)
    if taken is not None and (record.status == "unavailable" or taken.based_on > reserved_at):
        available -= taken.delta
    if record.status == "released":
        given = pending.pop(release_op(order_id), None)
        if given is not None and given.based_on > revision:
            available -= given.delta
    settled = Level(available, pending)
    return level if settled == level else settled


def events_for(order_id: str, reservation: Reservation, trigger: type[Event]) -> list[Event]:
    """What the record says was emitted in answer to ``trigger``; the same on every redelivery."""
    if trigger is OrderCreated:
        if reservation.status in ("reserved", "released"):
            return [StockReserved(order_id, items=reservation.items)]
        return [StockUnavailable(order_id, shortages=reservation.shortages)]
    if reservation.status == "released":
        return [StockReleased(order_id, items=reservation.items)]
    return []  # unavailable: nothing is held, nothing to give back


# --- the handler ------------------------------------------------------------

#: What asks for an order's stock back: its payment holds no money.
GivesBack = PaymentFailed | PaymentRefunded

#: What a batch gives each order: its events, or why it has none yet.
Outcome = Sequence[Event] | Exception


async def handle(event: Event, store: Store) -> Sequence[Event]:
    """One event on its own: a batch of one."""
    (outcome,) = await handle_batch([event], store)
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


async def handle_batch(events: Sequence[Event], store: Store) -> list[Outcome]:
    """Each event's outcome: the orders reserved first, then the failed payments released
    (so a failure that came with its order in the same batch finds it decided)."""
    for event in events:
        if not isinstance(event, OrderCreated | GivesBack):
            raise TypeError(f"stock does not handle {type(event).__name__}")
    orders = [e for e in events if isinstance(e, OrderCreated)]
    failures = [e for e in events if isinstance(e, GivesBack)]
    reserved = iter(await reserve(orders, store) if orders else [])
    released = iter(await release(failures, store) if failures else [])
    return [next(reserved if isinstance(e, OrderCreated) else released) for e in events]


async def reserve(orders: Sequence[OrderCreated], store: Store) -> list[Outcome]:
    """Decide a batch of orders together: each SKU read once and written once per round.

    The orders are decided one after the other in memory (:func:`decide_batch`),
    as if handled in this order one by one; then every SKU they change is
    written once, with compare-and-set. An order whose SKUs were all written
    (or needed no write) records its decision; one whose SKU had moved under
    the batch (another replica wrote it) is decided again in the next round,
    against the level read again: what it took on its other SKUs stays, its
    proof says so. The same order twice in a batch is decided once.
    """
    lines: dict[str, list[StockLine]] = {}
    for order in orders:  # an order is decided where it first appears, as it asked first
        if order.order_id not in lines:
            lines[order.order_id] = wanted(order)
    decided: dict[str, Versioned[Reservation]] = {}
    latest: dict[str, Versioned[Level]] = {}  # the newest level of each SKU seen
    undecided = list(lines)
    for _ in range(CONFLICT_ATTEMPTS):
        if not undecided:
            break
        records, _ = await asyncio.gather(
            store.get_many([order_key(o) for o in undecided], Reservation),
            _read_levels(store, [sku for o in undecided for sku in _skus(lines[o])], latest),
        )
        # Decided already (a redelivery, or another execution won): adopt it.
        for order_id in undecided:
            if (record := records.get(order_key(order_id))) is not None:
                decided[order_id] = record
        todo = [o for o in undecided if o not in decided]
        read = {sku: latest.get(sku) for o in todo for sku in _skus(lines[o])}
        reservations, changes = decide_batch([(o, lines[o]) for o in todo], read)
        moved = await _write_changes(store, read, changes, latest)
        standing = [o for o in todo if not moved.intersection(_skus(lines[o]))]
        revisions = await asyncio.gather(
            *(store.commit(Write(order_key(o), reservations[o], 0)) for o in standing)
        )
        for order_id, revision in zip(standing, revisions, strict=True):
            if revision:
                decided[order_id] = Versioned(reservations[order_id], revision)
        # A lost record (another execution decided first) is adopted next round.
        undecided = [o for o in todo if o not in decided]
    unsettled = await _settle_all(store, decided, lines, latest)
    return [_outcome(o.order_id, decided, unsettled, OrderCreated) for o in orders]


def _outcome(
    order_id: str,
    decided: Mapping[str, Versioned[Reservation]],
    unsettled: Mapping[str, str],
    trigger: type[Event],
) -> Outcome:
    """What a batch gives one order: the events its decision calls for, or why not yet."""
    if order_id not in decided:
        return Retry(f"state kept changing under us ({CONFLICT_ATTEMPTS} compare-and-set rounds)")
    if (sku := unsettled.get(order_id)) is not None:
        # The decision stands; the redelivery settles what is left.
        return Retry(f"level of {sku} kept changing while settling order {order_id}")
    return events_for(order_id, decided[order_id].value, trigger)


def decide_batch(
    orders: Sequence[tuple[str, Sequence[StockLine]]], levels: Levels
) -> tuple[dict[str, Reservation], dict[str, Level]]:
    """Each order's decision, one after the other as the levels change in memory, and the
    new level of every SKU changed. Every change is based on the revision read."""
    current = dict(levels)
    decisions: dict[str, Reservation] = {}
    changes: dict[str, Level] = {}
    for order_id, lines in orders:
        decisions[order_id], changed = decide_reservation(order_id, lines, current)
        _apply(changed, levels, current, changes)
    return decisions, changes


def decide_releases(held: Mapping[str, Versioned[Reservation]], levels: Levels) -> dict[str, Level]:
    """The new level of every SKU the held reservations give back, one after the other."""
    current = dict(levels)
    changes: dict[str, Level] = {}
    for order_id, reserved in held.items():
        _apply(decide_release(order_id, reserved, current), levels, current, changes)
    return changes


def _apply(
    changed: Mapping[str, Level],
    read: Levels,
    current: dict[str, Versioned[Level] | None],
    changes: dict[str, Level],
) -> None:
    """One decision's changes, seen by the next decision; each based on the revision read."""
    for sku, new in changed.items():
        current[sku] = Versioned(new, _revision(read.get(sku)))
        changes[sku] = new


def _skus(lines: Sequence[StockLine]) -> list[str]:
    return [line.sku for line in lines]


async def _read_levels(
    store: Store, skus: Sequence[str], latest: dict[str, Versioned[Level]]
) -> None:
    """Read the levels of ``skus`` (one request) into ``latest``, the newest seen of each."""
    keys = {level_key(sku): sku for sku in skus}
    found = await store.get_many(list(keys), Level)
    latest.update((keys[key], entry) for key, entry in found.items())


async def _write_changes(
    store: Store,
    read: Levels,
    changes: Mapping[str, Level],
    latest: dict[str, Versioned[Level]],
) -> set[str]:
    """Write every changed level (each its own compare-and-set); the SKUs that had moved."""
    skus = list(changes)
    revisions = await asyncio.gather(
        *(
            store.commit(Write(level_key(sku), changes[sku], _revision(read.get(sku))))
            for sku in skus
        )
    )
    moved = set()
    for sku, revision in zip(skus, revisions, strict=True):
        if revision:
            latest[sku] = Versioned(changes[sku], revision)
        else:
            moved.add(sku)
    return moved


async def _settle_all(
    store: Store,
    decided: Mapping[str, Versioned[Reservation]],
    lines: Mapping[str, Sequence[StockLine]],
    latest: dict[str, Versioned[Level]],
) -> dict[str, str]:
    """Settle every decided order's proofs, one write per SKU; the orders left unsettled
    (with the SKU that kept moving)."""
    orders_of: dict[str, list[str]] = {}
    for order_id in decided:
        for sku in _skus(lines[order_id]):
            orders_of.setdefault(sku, []).append(order_id)
    skus = list(orders_of)
    done = await asyncio.gather(
        *(_settle_level(store, sku, latest.get(sku), orders_of[sku], decided) for sku in skus)
    )
    return {o: sku for sku, ok in zip(skus, done, strict=True) if not ok for o in orders_of[sku]}


async def release(failures: Sequence[GivesBack], store: Store) -> list[Outcome]:
    """Give back what a batch of failed payments' orders hold: each SKU written once per
    round, as :func:`reserve` takes it."""
    decided: dict[str, Versioned[Reservation]] = {}  # unavailable, or released
    undecided_yet: set[str] = set()
    lines: dict[str, list[StockLine]] = {}
    latest: dict[str, Versioned[Level]] = {}
    todo = list(dict.fromkeys(f.order_id for f in failures))
    for _ in range(CONFLICT_ATTEMPTS):
        if not todo:
            break
        records = await store.get_many([order_key(o) for o in todo], Reservation)
        held: dict[str, Versioned[Reservation]] = {}
        for order_id in todo:
            record = records.get(order_key(order_id))
            if record is None:
                undecided_yet.add(order_id)
                continue
            lines[order_id] = record.value.items
            if record.value.status == "reserved":
                held[order_id] = record
            else:
                decided[order_id] = record
        # The levels of released ones too: a redelivery settles what is left.
        holding = [o for o in todo if o in held or _status(decided.get(o)) == "released"]
        await _read_levels(store, [sku for o in holding for sku in _skus(lines[o])], latest)
        read = {sku: latest.get(sku) for o in held for sku in _skus(lines[o])}
        changes = decide_releases(held, read)
        moved = await _write_changes(store, read, changes, latest)
        standing = [o for o in held if not moved.intersection(_skus(lines[o]))]
        after = {
            o: msgspec.structs.replace(
                held[o].value, status="released", reserved_at=held[o].revision
            )
            for o in standing
        }
        revisions = await asyncio.gather(
            *(store.commit(Write(order_key(o), after[o], held[o].revision)) for o in standing)
        )
        for order_id, revision in zip(standing, revisions, strict=True):
            if revision:
                decided[order_id] = Versioned(after[order_id], revision)
        todo = [o for o in held if o not in decided]
    released = {o: r for o, r in decided.items() if r.value.status == "released"}
    unsettled = await _settle_all(store, released, lines, latest)
    return [_released_outcome(f.order_id, undecided_yet, decided, unsettled) for f in failures]


def _released_outcome(
    order_id: str,
    undecided_yet: set[str],
    decided: Mapping[str, Versioned[Reservation]],
    unsettled: Mapping[str, str],
) -> Outcome:
    if order_id in undecided_yet:
        # Ours to settle once we have decided the reservation (orders.created is
        # ahead of this message in our own consumer, so it is on its way).
        return Retry("no reservation decided for this order yet")
    return _outcome(order_id, decided, unsettled, PaymentFailed)


def _status(record: Versioned[Reservation] | None) -> str | None:
    return record.value.status if record else None


def _revision(entry: Versioned[Level] | None) -> int:
    return entry.revision if entry else 0


async def _settle_level(
    store: Store,
    sku: str,
    entry: Versioned[Level] | None,
    orders: Sequence[str],
    decided: Mapping[str, Versioned[Reservation]],
) -> bool:
    """Settle ``orders`` on one level in one write; ``False`` if it kept moving."""
    for _ in range(CONFLICT_ATTEMPTS):
        if entry is None:
            return True
        settled = entry.value
        for order_id in orders:
            settled = settle(settled, order_id, decided[order_id])
        if settled is entry.value:
            return True
        revision = await store.commit(Write(level_key(sku), settled, entry.revision))
        if revision:
            return True
        entry = await store.get(level_key(sku), Level)
    return False
