"""The order flow written directly on nats-py: the reference orderflow is measured against.

One function per OS process, as orderflow deploys them:

    python bench/bare.py FUNCTION URL CONCURRENCY     # FUNCTION: payment, stock, delivery, order

It does the NATS work orderflow does for each message, and nothing more:

* the same durable pull consumers (``bench/run.py`` provisions them from
  ``streams.yaml``), pulled the way orderflow's worker pulls
  (``orderflow/pull.py``: up to CONCURRENCY messages asked for ahead, each
  handled in its own task the moment it arrives);
* every event published to JetStream with a ``Nats-Msg-Id`` of
  ``<subject>:<order id>``, the input acked only after every publish ack;
* the same KV traffic: a direct get per key read, a compare-and-set publish
  (``Nats-Expected-Last-Subject-Sequence``) per key written, the revision of
  a write taken from its publish ack, and the same reads and writes per
  message as ``functions/`` (a stock reservation: each SKU's level with its
  proof, the order's record, the proofs settled). Losing a compare-and-set
  means reading again and deciding again.

It hands a message back (a nak with a delay) exactly where orderflow's
handlers retry: a flaky card's first attempt, and a compensation that outruns
the order (``stock.unavailable`` before payment decided the charge,
``payments.failed`` before stock decided the reservation). The delay comes
from the same schedule, ``retry.backoff`` in ``streams.yaml``, by delivery count.

What it leaves out, because the happy path and the compensations do not need
it: validation of incoming events (they are plain dicts), dead letters, the
retry log, context headers, ``in_progress`` keep-alives, failpoints, logging.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import signal
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

STREAM = "ORDERS"
PULL_EXPIRES = 1.0  # seconds a pull request stays open on the server
PULL_GRACE = 0.5  # a request unanswered this long after it expired was lost
EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
WRONG_LAST_SEQUENCE = 10071  # the server's err_code for a compare-and-set that lost

# The simulated payment gateway's test tokens (orderflow/gateway.py).
DECLINED_TOKEN = "tok_declined"
FLAKY_TOKEN = "tok_flaky"

Event = dict[str, Any]
Emitted = list[tuple[str, Event]]  # (subject, body) of each event to publish
Handler = Callable[[str, Event], Awaitable[Emitted]]


#: Seconds before delivery 2, 3, 4, 5 and later of a message handed back
#: (``retry.backoff`` of every function in ``streams.yaml``).
BACKOFF = [0.2, 1.0, 5.0, 15.0]


class TryLater(Exception):
    """Hand the message back to the server, to be delivered again after a backoff."""


def event(subject: str, order_id: str, **fields: Any) -> tuple[str, Event]:
    return subject, {"type": subject, "order_id": order_id, **fields}


# --- KV: a bucket is the stream KV_<bucket>, a key is the subject $KV.<bucket>.<key> ---


class Bucket:
    def __init__(self, nc: Client, name: str) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.name = name

    def subject(self, key: str) -> str:
        return f"$KV.{self.name}.{key}"

    async def get(self, key: str) -> tuple[Any, int]:
        """The value and its revision (the stream sequence of its last write); (None, 0): unset."""
        try:
            msg = await self.js.get_msg(f"KV_{self.name}", subject=self.subject(key), direct=True)
        except nats.js.errors.NotFoundError:
            return None, 0
        assert msg.data is not None and msg.seq is not None
        return msgspec.json.decode(msg.data), msg.seq

    async def put(self, key: str, value: Any, revision: int) -> int:
        """Write ``key`` if its revision is still ``revision`` (0: if it does not exist yet).

        Returns the new revision, or 0 if the key had moved (nothing written).
        """
        headers = {EXPECTED_LAST_SUBJECT_SEQUENCE: str(revision)}
        data = msgspec.json.encode(value)
        reply = await self.nc.request(self.subject(key), data, timeout=5.0, headers=headers)
        answer = msgspec.json.decode(reply.data)
        error = answer.get("error")
        if error is None:
            return int(answer["seq"])
        if error.get("err_code") == WRONG_LAST_SEQUENCE:
            return 0
        raise RuntimeError(f"writing {key} to {self.name} failed: {error}")


# --- payment: orders.created -> charge; stock.unavailable -> refund ---


async def payment(subject: str, body: Event, payments: Bucket, gateway: Bucket) -> Emitted:
    if subject == "orders.created":
        return await charge(body, payments, gateway)
    return await refund(body, payments, gateway)  # stock.unavailable


async def charge(order: Event, payments: Bucket, gateway: Bucket) -> Emitted:
    order_id = order["order_id"]
    key = f"payment.{order_id}"
    total = sum(item["quantity"] * item["unit_price_cents"] for item in order["items"])
    claim = {"status": "charging", "amount_cents": total, "charge_id": None, "reason": ""}
    while True:
        # Claim the order before calling the gateway (a refund arriving first
        # must find the claim); read only when a claim is there already.
        record, revision = claim, await payments.put(key, claim, 0)
        if not revision:
            record, revision = await payments.get(key)
        if record["status"] != "charging":
            return charged_events(order_id, record)  # decided before: say the same again
        outcome = await gateway_charge(
            gateway, f"charge-{order_id}", order["payment_token"], record["amount_cents"]
        )
        if outcome["charge_id"] is not None:
            record = {**record, "status": "charged", "charge_id": outcome["charge_id"]}
        else:
            record = {**record, "status": "declined", "reason": outcome["declined"]}
        if await payments.put(key, record, revision):
            return charged_events(order_id, record)


def charged_events(order_id: str, record: Event) -> Emitted:
    amount = record["amount_cents"]
    if record["status"] in ("charged", "refunded"):
        return [event("payments.succeeded", order_id, amount_cents=amount,
                      charge_id=record["charge_id"])]  # fmt: skip
    return [event("payments.failed", order_id, amount_cents=amount, reason=record["reason"])]


async def refund(unavailable: Event, payments: Bucket, gateway: Bucket) -> Emitted:
    order_id = unavailable["order_id"]
    key = f"payment.{order_id}"
    while True:
        record, revision = await payments.get(key)
        if record is None or record["status"] == "charging":
            # The charge is not decided yet (orders.created is ahead of this
            # message in our consumer): refund once it is.
            raise TryLater
        if record["status"] == "declined":
            return []  # no money was taken
        if record["status"] == "refunded":
            return [event("payments.refunded", order_id, amount_cents=record["amount_cents"],
                          charge_id=record["charge_id"])]  # fmt: skip
        # Creating the refund record is the gateway's refund; a second try changes nothing.
        refund_record = {"charge_id": record["charge_id"], "amount_cents": record["amount_cents"]}
        await gateway.put(f"refund.refund-{order_id}", refund_record, 0)
        record = {**record, "status": "refunded"}
        if await payments.put(key, record, revision):
            return [event("payments.refunded", order_id, amount_cents=record["amount_cents"],
                          charge_id=record["charge_id"])]  # fmt: skip


async def gateway_charge(gateway: Bucket, idempotency_key: str, token: str, amount: int) -> Event:
    """The simulated gateway of orderflow/gateway.py: its memory is the ``gateway`` bucket."""
    key = f"charge.{idempotency_key}"
    if token == FLAKY_TOKEN and await gateway.put(f"attempt.{idempotency_key}", {}, 0):
        raise TryLater  # the gateway "timed out" on the first attempt
    record: Event = {"token": token, "amount_cents": amount, "charge_id": None, "declined": None}
    if token == DECLINED_TOKEN:
        record["declined"] = "card_declined"
    else:
        record["charge_id"] = "ch_" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:16]
    if not await gateway.put(key, record, 0):
        seen, _ = await gateway.get(key)  # asked before: the first answer stands
        return dict(seen)
    return record


# --- stock: orders.created -> reserve every item or none; payments.failed -> release ---
#
# The protocol of functions/stock.py: each level change carries its proof
# ("reserve:<order>" or "release:<order>" in the level's "pending"), the
# order's record is the decision, settling removes the proofs and gives back
# what an unavailable reservation or a duplicate took.

Levels = dict[str, tuple[Any, int]]  # sku -> (level or None, revision)


async def stock(subject: str, body: Event, shelf: Bucket) -> Emitted:
    if subject == "orders.created":
        return await reserve(body, shelf)
    return await release(body, shelf)  # payments.failed


async def reserve(order: Event, shelf: Bucket) -> Emitted:
    order_id = order["order_id"]
    key, op = f"order.{order_id}", f"reserve:{order_id}"
    wanted: dict[str, int] = {}
    for item in order["items"]:
        wanted[item["sku"]] = wanted.get(item["sku"], 0) + item["quantity"]
    while True:
        (record, revision), levels = await asyncio.gather(
            shelf.get(key), read_levels(shelf, list(wanted))
        )
        if record is not None:
            await settle_all(shelf, order_id, record, revision, levels)
            return reservation_events(order_id, record)
        shortages, changes = [], {}
        for sku, quantity in wanted.items():
            level, level_revision = levels[sku]
            level = level or {"available": 0}
            pending = level.get("pending", {})
            if op in pending:
                continue  # taken by an earlier attempt
            if level["available"] < quantity:
                shortages.append(
                    {"sku": sku, "requested": quantity, "available": level["available"]}
                )
                continue
            taken = {"delta": -quantity, "based_on": level_revision}
            changes[sku] = {"available": level["available"] - quantity,
                            "pending": {**pending, op: taken}}  # fmt: skip
        if shortages:
            record, changes = {"status": "unavailable", "items": [], "shortages": shortages}, {}
        else:
            items = [{"sku": sku, "quantity": quantity} for sku, quantity in wanted.items()]
            record = {"status": "reserved", "items": items, "shortages": []}
        written = await write_levels(shelf, levels, changes)
        if written is None:
            continue
        revision = await shelf.put(key, record, 0)
        if revision:
            await settle_all(shelf, order_id, record, revision, written)
            return reservation_events(order_id, record)


def reservation_events(order_id: str, record: Event) -> Emitted:
    if record["status"] in ("reserved", "released"):
        return [event("stock.reserved", order_id, items=record["items"])]
    return [event("stock.unavailable", order_id, shortages=record["shortages"])]


async def release(failed: Event, shelf: Bucket) -> Emitted:
    order_id = failed["order_id"]
    key, op = f"order.{order_id}", f"release:{order_id}"
    while True:
        record, revision = await shelf.get(key)
        if record is None:
            # The reservation is not decided yet (orders.created is ahead of
            # this message in our consumer): release once it is.
            raise TryLater
        if record["status"] == "unavailable":
            return []  # nothing is held
        items = record["items"]
        levels = await read_levels(shelf, [i["sku"] for i in items])
        if record["status"] == "released":
            await settle_all(shelf, order_id, record, revision, levels)
            return [event("stock.released", order_id, items=items)]  # said before
        changes = {}
        for item in items:
            level, level_revision = levels[item["sku"]]
            level = settled(level or {"available": 0}, order_id, record, revision)
            pending = level.get("pending", {})
            if op in pending:
                continue  # given back by an earlier attempt
            given = {"delta": item["quantity"], "based_on": level_revision}
            changes[item["sku"]] = {"available": level["available"] + item["quantity"],
                                    "pending": {**pending, op: given}}  # fmt: skip
        written = await write_levels(shelf, levels, changes)
        if written is None:
            continue
        released = {**record, "status": "released", "reserved_at": revision}
        new_revision = await shelf.put(key, released, revision)
        if new_revision:
            await settle_all(shelf, order_id, released, new_revision, written)
            return [event("stock.released", order_id, items=items)]


async def read_levels(shelf: Bucket, skus: list[str]) -> Levels:
    found = await asyncio.gather(*(shelf.get(f"level.{sku}") for sku in skus))
    return dict(zip(skus, found, strict=True))


async def write_levels(shelf: Bucket, levels: Levels, changes: dict[str, Any]) -> Levels | None:
    """Each change its own compare-and-set; the levels after, or None if one had moved."""
    skus = list(changes)
    revisions = await asyncio.gather(
        *(shelf.put(f"level.{sku}", changes[sku], levels[sku][1]) for sku in skus)
    )
    if not all(revisions):
        return None
    return {**levels, **{sku: (changes[sku], r) for sku, r in zip(skus, revisions, strict=True)}}


def settled(level: Event, order_id: str, record: Event, revision: int) -> Event:
    """The level with the order's decided proofs gone (the rules of functions/stock.py)."""
    reserved_at = record.get("reserved_at") or revision
    available, pending = level["available"], dict(level.get("pending", {}))
    taken = pending.pop(f"reserve:{order_id}", None)
    if taken and (record["status"] == "unavailable" or taken["based_on"] > reserved_at):
        available -= taken["delta"]
    if record["status"] == "released":
        given = pending.pop(f"release:{order_id}", None)
        if given and given["based_on"] > revision:
            available -= given["delta"]
    return {"available": available, "pending": pending} if pending else {"available": available}


async def settle_all(shelf: Bucket, order_id: str, record: Event, revision: int,
                     levels: Levels) -> None:  # fmt: skip
    async def one(sku: str, level: Any, level_revision: int) -> None:
        while level is not None:
            after = settled(level, order_id, record, revision)
            if after == level or await shelf.put(f"level.{sku}", after, level_revision):
                return
            level, level_revision = await shelf.get(f"level.{sku}")

    await asyncio.gather(*(one(sku, level, r) for sku, (level, r) in levels.items()))


# --- delivery: payments.succeeded + stock.reserved, in any order -> delivery.scheduled ---


async def delivery(subject: str, body: Event, deliveries: Bucket) -> Emitted:
    order_id = body["order_id"]
    key = f"join.{order_id}"
    half = "paid" if subject == "payments.succeeded" else "reserved"
    while True:
        join, revision = await deliveries.get(key)
        before = join or {"paid": False, "reserved": False}
        after = {**before, half: True}
        emitted = []
        if after["paid"] and after["reserved"]:
            tracking_id = "TRK-" + hashlib.sha256(order_id.encode()).hexdigest()[:12].upper()
            emitted = [event("delivery.scheduled", order_id, tracking_id=tracking_id)]
        if join is not None and after == join:
            return emitted  # a redelivery: nothing new to remember
        if await deliveries.put(key, after, revision):
            return emitted


# --- order: every outcome -> exactly one orders.completed or orders.cancelled ---

NEW_ORDER = {
    "payment": "pending",
    "stock": "pending",
    "payment_problem": "",
    "stock_problem": "",
    "tracking_id": "",
    "outcome": "open",
    "decided_by": "",  # the subject of the event that finished the order
}


def observe(state: Event, subject: str, body: Event) -> Event:
    """The order's summary after one event (the rules of functions/order.py)."""
    state = dict(state)
    if subject == "payments.succeeded" and state["payment"] != "refunded":
        state["payment"] = "succeeded"
    elif subject == "payments.failed":
        state["payment"] = "failed"
        state["payment_problem"] = f"payment failed: {body['reason']}"
    elif subject == "payments.refunded":
        state["payment"] = "refunded"
    elif subject == "stock.reserved" and state["stock"] != "released":
        state["stock"] = "reserved"
    elif subject == "stock.unavailable":
        short = ", ".join(
            f"{s['sku']} (wanted {s['requested']}, {s['available']} left)"
            for s in body["shortages"]
        )
        state["stock"] = "unavailable"
        state["stock_problem"] = f"out of stock: {short}"
    elif subject == "stock.released":
        state["stock"] = "released"
    elif subject == "delivery.scheduled":
        state["tracking_id"] = body["tracking_id"]
    if state["tracking_id"]:
        state["outcome"], state["decided_by"] = "completed", subject
    elif state["payment"] in ("failed", "refunded") and state["stock"] in (
        "unavailable",
        "released",
    ):
        state["outcome"], state["decided_by"] = "cancelled", subject
    return state


def terminal_events(order_id: str, state: Event) -> Emitted:
    if state["outcome"] == "completed":
        return [event("orders.completed", order_id, tracking_id=state["tracking_id"])]
    reason = "; ".join(p for p in (state["payment_problem"], state["stock_problem"]) if p)
    return [event("orders.cancelled", order_id, reason=reason)]


async def order(subject: str, body: Event, orders: Bucket) -> Emitted:
    order_id = body["order_id"]
    key = f"order.{order_id}"
    while True:
        state, revision = await orders.get(key)
        before = state or NEW_ORDER
        if before["outcome"] != "open":
            # Announce again only to the event that decided it (a redelivery).
            return terminal_events(order_id, before) if before["decided_by"] == subject else []
        after = observe(before, subject, body)
        if after == before:
            return []
        if await orders.put(key, after, revision):
            return terminal_events(order_id, after) if after["outcome"] != "open" else []


# --- the pull loop ---


def handler_for(function: str, nc: Client) -> Handler:
    if function == "payment":
        payments, gateway = Bucket(nc, "payments"), Bucket(nc, "gateway")
        return lambda subject, body: payment(subject, body, payments, gateway)
    if function == "stock":
        shelf = Bucket(nc, "stock")
        return lambda subject, body: stock(subject, body, shelf)
    if function == "delivery":
        deliveries = Bucket(nc, "deliveries")
        return lambda subject, body: delivery(subject, body, deliveries)
    if function == "order":
        orders = Bucket(nc, "orders")
        return lambda subject, body: order(subject, body, orders)
    raise SystemExit(f"unknown function {function!r}: payment, stock, delivery or order")


async def settle(js: JetStreamContext, msg: Msg, handle: Handler) -> None:
    try:
        emitted = await handle(msg.subject, msgspec.json.decode(msg.data))
        await asyncio.gather(
            *(
                js.publish(subject, msgspec.json.encode(body),
                           headers={"Nats-Msg-Id": f"{subject}:{body['order_id']}"})
                for subject, body in emitted
            )
        )  # fmt: skip
        await msg.ack()
    except TryLater:
        attempt = msg.metadata.num_delivered
        await msg.nak(delay=BACKOFF[min(attempt, len(BACKOFF)) - 1])
    except Exception as exc:
        # Left unacked, the message comes back after the consumer's ack_wait.
        print(f"{msg.subject}: {exc!r}", file=sys.stderr)


async def consume(nc: Client, function: str, concurrency: int, stop: asyncio.Event) -> None:
    """Pull as orderflow/pull.py does: keep up to ``concurrency`` messages asked for (each
    request for at least half of that, open PULL_EXPIRES on the server), start each
    message as it arrives, ask again as they finish or requests expire."""
    js = nc.jetstream()
    handle = handler_for(function, nc)
    inbox, next_subject = nc.new_inbox(), f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{function}"
    requests: deque[list[float]] = deque()  # [messages still owed, expiry], oldest first
    in_hand: set[asyncio.Task[None]] = set()
    wake = asyncio.Event()

    async def arrived(msg: Msg) -> None:
        if not msg.data and msg.headers and "Status" in msg.headers:
            if requests:
                requests.popleft()  # expired (408) or ended: the oldest request is over
            wake.set()
            return
        if requests:
            requests[0][0] -= 1
            if requests[0][0] == 0:
                requests.popleft()
        if stop.is_set():
            await msg.nak()
            return
        # More than concurrency may arrive: taken anyway, as orderflow/pull.py does.
        task = asyncio.create_task(settle(js, msg, handle))
        in_hand.add(task)
        task.add_done_callback(finished)

    def finished(task: asyncio.Task[None]) -> None:
        in_hand.discard(task)
        wake.set()

    sub = await nc.subscribe(inbox, cb=arrived)
    while not stop.is_set():
        wake.clear()  # before looking: a message finishing during the publish still wakes us
        now = time.monotonic()
        while requests and requests[0][1] + PULL_GRACE < now:
            requests.popleft()  # never answered: lost
        free = concurrency - len(in_hand) - int(sum(r[0] for r in requests))
        if free > 0 and (not requests or free >= (concurrency + 1) // 2):
            request = {"batch": free, "expires": int(PULL_EXPIRES * 1e9)}
            await nc.publish(next_subject, json.dumps(request).encode(), reply=inbox)
            requests.append([free, now + PULL_EXPIRES])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), PULL_EXPIRES)
    while in_hand:
        await asyncio.wait(set(in_hand))
    await sub.unsubscribe()


async def main(function: str, url: str, concurrency: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    nc = await nats.connect(url, name=f"bare-{function}")
    try:
        await consume(nc, function, concurrency, stop)
    finally:
        await nc.close()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit("usage: python bench/bare.py FUNCTION URL CONCURRENCY")
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
