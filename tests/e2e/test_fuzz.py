"""Fuzzing the boundary: malformed payloads are dead-lettered, good orders still complete.

Hypothesis is used only as a generator of malformed payloads (random bytes,
arbitrary JSON, valid events with exactly one thing wrong, oversized ones) on
every subject a function consumes. They are all published, with well-formed
orders in between, to one running flow. Each malformed message must end up in
the dead letters exactly once per function that reads its subject, at once
(first delivery), with its original bytes; an invalid ``orders.created`` whose
order id can be read is also answered, once, on ``orders.rejected``; the good
orders complete; no function process dies and no consumer is left behind.
A field the contract does not know is not a malformation (tolerant readers,
docs/contract.md): the well-formed orders carry one, and still complete.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter, defaultdict
from typing import Any

import msgspec
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from functions.events import EVENT_TYPES, TERMINAL_SUBJECTS, OrderRejected
from orderflow import subjects
from orderflow.runtime import decoding
from orderflow.runtime.decoding import claimed_order_id
from orderflow.tools.demo import payload
from tests.conftest import StartFlow
from tests.flowkit import Flow, order, terminal_counts

#: dead_letters.max_payload in streams.yaml (checked against the running topology).
MAX_PAYLOAD = 65536
STREAM = "ORDERS"
EXAMPLES = 1500
MAX_OVERSIZED = 100  # ~65 KiB each, stored once in ORDERS and once per reader in DEAD_LETTERS
GOOD_EVERY = 100  # one well-formed order per this many malformed messages
OTHER_SUBJECTS = [
    "payments.succeeded",
    "payments.failed",
    "payments.refunded",
    "stock.reserved",
    "stock.unavailable",
    "stock.released",
    "delivery.scheduled",
    "delivery.cancelled",
]
# About 70% orders.created (Hypothesis leans to the deck's start), the rest spread evenly.
SUBJECT_DECK = ["orders.created"] * 14 + OTHER_SUBJECTS
HAPPY = {"orders.created", "payments.succeeded", "stock.reserved", "delivery.scheduled",
         "orders.completed"}  # fmt: skip
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")

# --- strategies ---------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)


def _dumps(value: object, ascii_only: bool = True) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode()


random_bytes = st.binary(max_size=512)
random_json = st.builds(_dumps, json_values, st.booleans())

order_ids = st.from_regex(r"fz-[A-Za-z0-9_-]{0,20}", fullmatch=True)
bad_order_ids = st.one_of(
    st.sampled_from(["o 1", "o.1", "o>", "o*", "o/1", "-o1", "_o1", "", "x" * 65, "ö1", "o\n1"]),
    st.text(max_size=80).filter(lambda s: len(s) > 64 or ID_PATTERN.fullmatch(s) is None),
)
skus = st.sampled_from(["BOOK-42", "MUG-7", "PEN-3", "SOLD-OUT-1", "NO-SUCH-SKU"])
bad_skus = st.sampled_from(["", "a b", "a.b", "-a", "s" * 33, "BOOK-42\n"])
cents = st.integers(0, 100_000_000)
short_text = st.text(max_size=20)

order_items = st.fixed_dictionaries(
    {"sku": skus, "quantity": st.integers(1, 1000), "unit_price_cents": cents}
)
valid_order = st.fixed_dictionaries(
    {
        "order_id": order_ids,
        "customer_id": st.text(min_size=1, max_size=64),
        "items": st.lists(order_items, min_size=1, max_size=3),
        "payment_token": st.sampled_from(["tok_visa", "tok_declined", "tok_flaky"]),
    }
)
stock_lines = st.lists(
    st.fixed_dictionaries({"sku": skus, "quantity": st.integers(0, 1000)}), max_size=3
)
#: A valid event of every other consumed subject, as the dict a client would publish.
valid_events: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "orders.created": valid_order,
    "payments.succeeded": st.fixed_dictionaries(
        {"order_id": order_ids, "amount_cents": cents, "charge_id": short_text}
    ),
    "payments.failed": st.fixed_dictionaries(
        {"order_id": order_ids, "amount_cents": cents, "reason": short_text}
    ),
    "payments.refunded": st.fixed_dictionaries(
        {"order_id": order_ids, "amount_cents": cents, "charge_id": st.none() | short_text}
    ),
    "stock.reserved": st.fixed_dictionaries({"order_id": order_ids, "items": stock_lines}),
    "stock.unavailable": st.fixed_dictionaries(
        {
            "order_id": order_ids,
            "shortages": st.lists(
                st.fixed_dictionaries(
                    {"sku": skus, "requested": st.integers(1, 9), "available": st.integers(0, 9)}
                ),
                max_size=3,
            ),
        }
    ),
    "stock.released": st.fixed_dictionaries({"order_id": order_ids, "items": stock_lines}),
    "delivery.scheduled": st.fixed_dictionaries({"order_id": order_ids, "tracking_id": short_text}),
    "delivery.cancelled": st.fixed_dictionaries({"order_id": order_ids, "reason": short_text}),
}
WRONG_TYPED: list[object] = [None, True, 0, -1, 1.5, "1", [], {}, ["x"], {"a": 1}]


def _wrong_type(draw: st.DrawFn, original: object) -> object:
    return draw(st.sampled_from([v for v in WRONG_TYPED if type(v) is not type(original)]))


@st.composite
def mutated_event(draw: st.DrawFn, subject: str) -> bytes:
    """A valid event of ``subject`` with exactly one thing wrong."""
    event = draw(valid_events[subject])
    nested = [k for k, v in event.items() if isinstance(v, list) and v]
    kinds = ["drop", "wrong_type", "order_id", "tag", "not_object", "bytes"]
    kinds += ["nested"] if nested else []
    kinds += ["amount"] if "amount_cents" in event else []
    kinds += ["reason"] if "reason" in event else []
    if subject == "orders.created":
        kinds += ["quantity", "quantity", "price", "no_items", "too_many_items", "token",
                  "customer", "sku"]  # fmt: skip
    kind = draw(st.sampled_from(kinds))
    out: object = event
    if kind == "drop":
        del event[draw(st.sampled_from(sorted(event)))]
    elif kind == "wrong_type":
        key = draw(st.sampled_from(sorted(event)))
        event[key] = _wrong_type(draw, event[key])
    elif kind == "order_id":
        event["order_id"] = draw(bad_order_ids)
    elif kind == "tag":
        event["type"] = draw(st.sampled_from([s for s in EVENT_TYPES if s != subject]))
    elif kind == "not_object":
        out = [event]
    elif kind == "bytes":  # truncated or one byte changed
        body = _dumps(event)
        at = draw(st.integers(0, len(body) - 1))
        if draw(st.booleans()):
            return body[:at]
        return body[:at] + bytes([draw(st.integers(0, 255))]) + body[at + 1 :]
    elif kind == "nested":
        line = event[draw(st.sampled_from(nested))][0]
        how = draw(st.sampled_from(["drop", "wrong_type", "sku"]))
        if how == "drop":
            del line[draw(st.sampled_from(sorted(line)))]
        elif how == "wrong_type":
            key = draw(st.sampled_from(sorted(line)))
            line[key] = _wrong_type(draw, line[key])
        else:
            line["sku"] = draw(bad_skus)
    elif kind == "amount":
        event["amount_cents"] = draw(st.integers(max_value=-1) | st.integers(100_000_001))
    elif kind == "reason":
        event["reason"] = "r" * draw(st.integers(501, 2000))
    elif kind == "quantity":
        item = draw(st.sampled_from(event["items"]))
        item["quantity"] = draw(st.just(0) | st.integers(max_value=-1) | st.integers(1001))
    elif kind == "price":
        item = draw(st.sampled_from(event["items"]))
        item["unit_price_cents"] = draw(st.integers(max_value=-1) | st.integers(100_000_001))
    elif kind == "no_items":
        event["items"] = []
    elif kind == "too_many_items":
        event["items"] = event["items"][:1] * draw(st.integers(101, 150))
    elif kind == "token":
        event["payment_token"] = draw(st.sampled_from(["", "t" * 65]))
    elif kind == "customer":
        event["customer_id"] = draw(st.sampled_from(["", "c" * 65]))
    else:
        assert kind == "sku", kind
        draw(st.sampled_from(event["items"]))["sku"] = draw(bad_skus)
    return _dumps(out, draw(st.booleans()))


@st.composite
def oversized_event(draw: st.DrawFn, subject: str) -> bytes:
    """More than MAX_PAYLOAD bytes: a valid event padded with JSON whitespace (its size is
    the only problem), or an order with a huge customer_id (too long as well)."""
    event = draw(valid_events[subject])
    if subject == "orders.created" and draw(st.booleans()):
        event["customer_id"] = "c" * draw(st.integers(MAX_PAYLOAD, MAX_PAYLOAD + 4096))
        return _dumps(event)
    body = _dumps(event)
    pad = draw(st.integers(MAX_PAYLOAD + 1 - len(body), MAX_PAYLOAD + 4096 - len(body)))
    before = draw(st.integers(0, pad))
    return b" " * before + body + b"\n" * (pad - before)


#: How often each kind of payload is drawn, out of 20. (Weights come from a deck for
#: sampled_from: st.one_of drops repeated branches, so listing one twice weighs nothing.)
DECKS = {
    "orders.created": ["bytes"] * 2 + ["json"] * 3 + ["mutated"] * 14 + ["oversized"],
    "other": ["bytes"] * 3 + ["json"] * 3 + ["mutated"] * 13 + ["oversized"],
}


def payloads_for(subject: str) -> st.SearchStrategy[tuple[str, bytes]]:
    kinds: dict[str, st.SearchStrategy[bytes]] = {
        "bytes": random_bytes,
        "json": random_json,
        "mutated": mutated_event(subject),
        "oversized": oversized_event(subject),
    }
    deck = DECKS.get(subject, DECKS["other"])
    return st.sampled_from(deck).flatmap(kinds.__getitem__).map(lambda data: (subject, data))


# msgspec raises UnicodeDecodeError, not DecodeError, for invalid UTF-8 inside a
# string it decodes: such bytes are not JSON (RFC 8259 requires UTF-8) and are
# as malformed as any other.
UNDECODABLE = (msgspec.DecodeError, UnicodeDecodeError)


def _decodes(subject: str, data: bytes) -> bool:
    # As the runner reads it: published with no headers, so schema version 1, upgraded.
    try:
        decoding.read(subject, data, 1)
    except UNDECODABLE:
        return False
    return True


def _readable_order_id(data: bytes) -> str | None:
    """What payment answers a rejection to: any order id the payload claims, valid or not."""
    return claimed_order_id(data)


_VALID_ORDER = (
    b'{"order_id": "fz-edge", "customer_id": "c-7", "payment_token": "tok_visa",'
    b' "items": [{"sku": "BOOK-42", "quantity": 2, "unit_price_cents": 1500}]}'
)
#: Always sent besides what Hypothesis draws: the corners it may or may not reach.
EDGE_CASES: list[tuple[str, bytes]] = [
    ("orders.created", b""),
    ("payments.failed", b""),
    ("orders.created", b"null"),
    # Nothing wrong with it but its size.
    ("orders.created", _VALID_ORDER + b" " * (MAX_PAYLOAD + 1 - len(_VALID_ORDER))),
    # Not UTF-8: in a value the decoder reads (the order id itself is fine) ...
    ("orders.created", _VALID_ORDER.replace(b'"c-7"', b'"c-\xff"')),
    (
        "stock.unavailable",
        b'{"order_id": "fz-edge", "shortages": [{"sku": "\xff", "requested": 1, "available": 0}]}',
    ),
    # ... in the order id, after a field that already makes the order invalid ...
    ("orders.created", b'{"x": 1, "order_id": "\xff"}'),
    # ... and in the order id of an oversized order.
    ("orders.created", b'{"order_id": "\xff"}' + b" " * MAX_PAYLOAD),
]


def malformed_payloads() -> list[tuple[str, bytes]]:
    """About EXAMPLES distinct (subject, payload) pairs that no function can accept."""
    found: list[tuple[str, bytes]] = []
    seen: set[tuple[str, bytes]] = set()
    oversized = 0

    @settings(
        max_examples=EXAMPLES,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate],
    )
    @given(st.sampled_from(SUBJECT_DECK).flatmap(payloads_for))
    def collect(message: tuple[str, bytes]) -> None:
        nonlocal oversized
        subject, data = message
        too_large = len(data) > MAX_PAYLOAD
        assume(too_large or not _decodes(subject, data))
        assume(message not in seen)
        assume(not too_large or oversized < MAX_OVERSIZED)  # keep the volume in check
        seen.add(message)
        found.append(message)
        oversized += too_large

    collect()
    for subject, data in EDGE_CASES:
        assert len(data) > MAX_PAYLOAD or not _decodes(subject, data), (subject, data)
    return found + [edge for edge in EDGE_CASES if edge not in seen]


# --- the flow -------------------------------------------------------------------


async def _by_order(flow: Flow, skip: set[int]) -> dict[str, list[str]]:
    """Like ``Flow.by_order``, past the malformed messages (``skip``) it cannot decode."""
    out: dict[str, list[str]] = defaultdict(list)
    for stored in await flow.events():
        if stored.sequence not in skip and (order_id := claimed_order_id(stored.data)):
            out[order_id].append(stored.kind)  # (a rejection names the id as it was sent)
    return out


async def _wait_finished(
    flow: Flow, order_ids: list[str], skip: set[int], timeout: float
) -> dict[str, list[str]]:
    deadline = time.monotonic() + timeout
    while True:
        seen = await _by_order(flow, skip)
        missing = [o for o in order_ids if not TERMINAL_SUBJECTS & set(seen.get(o, []))]
        if not missing or time.monotonic() > deadline:
            return seen
        await asyncio.sleep(0.25)


async def _backlog(flow: Flow) -> dict[str, tuple[int, int]]:
    """durable -> (num_pending, num_ack_pending), for every consumer not yet drained."""
    js = flow.nc.jetstream()
    out = {}
    for spec in flow.topology.functions.values():
        for consumer in spec.consumers:
            info = await js.consumer_info(consumer.stream, consumer.durable)
            if info.num_pending or info.num_ack_pending:
                out[consumer.durable] = (info.num_pending, info.num_ack_pending)
    return out


def _show(data: bytes) -> str:
    return repr(data) if len(data) <= 200 else f"{data[:160]!r}... ({len(data)} bytes)"


async def test_malformed_payloads_are_dead_lettered_and_good_orders_still_complete(
    start_flow: StartFlow,
) -> None:
    malformed = malformed_payloads()
    assert len(malformed) >= 1000, f"only {len(malformed)} malformed payloads generated"

    flow = await start_flow()
    topology = flow.topology
    assert topology.dead_letters.max_payload == MAX_PAYLOAD
    readers: dict[str, list[str]] = defaultdict(list)  # subject -> functions consuming it
    rejecting: set[str] = set()  # subjects whose invalid messages are answered on orders.rejected
    for name, spec in topology.functions.items():
        if not spec.consumers:
            continue  # answers requests (cancel): fed by no stream
        rejecting.update(spec.reject_invalid)
        # One consumer per subject (orderflow/config.py): a function reads a kind once.
        kinds = {kind for consumer in spec.consumers for kind in consumer.events}
        assert {consumer.stream for consumer in spec.consumers} == {STREAM}
        for kind in sorted(kinds):
            readers[kind].append(name)
    # Every consumed subject is fuzzed.
    assert set(readers) == {"orders.created", *OTHER_SUBJECTS}, sorted(readers)
    pids = sorted(flow.supervisor.pids())
    assert len(pids) == len(topology.functions), pids

    # Publish, with a well-formed order before every GOOD_EVERY malformed ones.
    js = flow.nc.jetstream()
    plan: list[tuple[str, bytes, str | None]] = []
    for i, (kind, data) in enumerate(malformed):
        if i % GOOD_EVERY == 0:
            good = order(f"fuzz-good-{i // GOOD_EVERY}")
            # With fields the contract does not know, at the top and in an item.
            body = msgspec.json.decode(payload(good))
            body["coupon_code"], body["items"][0]["gift_wrap"] = f"FZ{i}", True
            plan.append(("orders.created", msgspec.json.encode(body), good.order_id))
        # Ingress as `nats pub` sends it; every other kind on some order's subject.
        subject = kind if kind == "orders.created" else subjects.subject(kind, f"fuzz-{i}")
        plan.append((subject, data, None))
    sent: dict[int, tuple[str, bytes]] = {}  # stream sequence -> malformed (subject, data)
    good_ids: list[str] = []
    started = time.monotonic()
    for at in range(0, len(plan), 100):
        chunk = plan[at : at + 100]
        acks = await asyncio.gather(*(js.publish(s, d, timeout=30) for s, d, _ in chunk))
        for ack, (subject, data, good_id) in zip(acks, chunk, strict=True):
            assert ack.stream == STREAM and not ack.duplicate, ack
            if good_id is None:
                sent[ack.seq] = (subject, data)
            else:
                good_ids.append(good_id)
    published = time.monotonic()

    # The good orders, published among the malformed ones, complete.
    seen = await _wait_finished(flow, good_ids, set(sent), timeout=120)
    assert terminal_counts(seen, good_ids) == dict.fromkeys(good_ids, 1)
    assert {o: set(seen[o]) for o in good_ids} == dict.fromkeys(good_ids, HAPPY)

    # What must come out: a dead letter per reader of each malformed message, and an
    # orders.rejected for each invalid order whose id can be read.
    expected = Counter(
        (function, seq)
        for seq, (subject, _) in sent.items()
        for function in readers[subjects.kind_of(subject)]
    )
    rejected_ids = {
        seq: order_id
        for seq, (subject, data) in sent.items()
        if subjects.kind_of(subject) in rejecting
        and (order_id := _readable_order_id(data)) is not None
    }
    deadline = time.monotonic() + 60
    while True:
        letters = await flow.dead_letters()
        got = Counter((d.function, d.sequence) for d in letters if d.stream == STREAM)
        if got >= expected or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    deadline = time.monotonic() + 15
    while True:
        backlog = await _backlog(flow)
        if not backlog or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.25)
    drained = time.monotonic()
    # Read everything again once nothing moves, so late duplicates are counted too.
    letters = await flow.dead_letters()
    events = await flow.events()

    counts = Counter(subject for subject, _ in malformed)
    print(
        f"\nfuzz: {len(malformed)} malformed ("
        + ", ".join(f"{s} {n}" for s, n in counts.most_common())
        + f"; {sum(len(d) > MAX_PAYLOAD for _, d in malformed)} oversized, "
        f"{len(rejected_ids)} with a readable order id) + {len(good_ids)} good orders; "
        f"dead letters {len(letters)} of {sum(expected.values())} expected; "
        f"published in {published - started:.1f} s, drained in {drained - published:.1f} s"
    )

    # Every malformed message is dead-lettered once per reader, at once, bytes intact.
    ours = [d for d in letters if d.stream == STREAM and d.sequence in sent]
    got = Counter((d.function, d.sequence) for d in ours)
    missing = expected - got
    assert not missing, f"{sum(missing.values())} dead letters missing, e.g. " + "; ".join(
        f"{f} seq {seq} {sent[seq][0]} {_show(sent[seq][1])}" for f, seq in list(missing)[:5]
    )
    extra = got - expected
    assert not extra, f"unexpected or duplicate dead letters: {sorted(extra.items())[:10]}"
    wrong = [
        d
        for d in ours
        if (d.subject, d.data) != sent[d.sequence] or d.deliveries != 1 or not d.reason.strip()
    ]
    assert not wrong, f"{len(wrong)} dead letters with wrong fields, e.g. " + "; ".join(
        f"{d.function} seq {d.sequence} subject {d.subject} deliveries {d.deliveries} "
        f"reason {d.reason!r} data {_show(d.data)}"
        for d in wrong[:5]
    )
    oversized_reasons = [
        d.reason for d in ours if len(d.data) > MAX_PAYLOAD and "max_payload" not in d.reason
    ]
    assert not oversized_reasons, f"oversized, but the reason says: {oversized_reasons[:3]}"
    ours_ids = {d.id for d in ours}
    others = [(d.function, d.stream, d.sequence, d.reason) for d in letters if d.id not in ours_ids]
    assert not others, f"dead letters of messages that were not malformed: {others[:5]}"

    # Each invalid order with a readable id is answered once on orders.rejected.
    prefix = f"orders.rejected:{STREAM}:"
    rejections = [e for e in events if e.kind == "orders.rejected"]
    by_msg_id = Counter(e.headers.get("Nats-Msg-Id", "") for e in rejections)
    assert by_msg_id == Counter(f"{prefix}{seq}" for seq in rejected_ids), (
        f"missing: {sorted(Counter(f'{prefix}{s}' for s in rejected_ids) - by_msg_id)[:5]}, "
        f"unexpected: {sorted(by_msg_id - Counter(f'{prefix}{s}' for s in rejected_ids))[:5]}"
    )
    for e in rejections:
        rejection = msgspec.json.decode(e.data, type=OrderRejected)
        seq = int(e.headers["Nats-Msg-Id"].removeprefix(prefix))
        assert rejection.order_id == rejected_ids[seq], (rejection, _show(sent[seq][1]))
        assert rejection.reason.strip(), rejection

    # Nothing crashed (same processes as at the start), nothing is left behind, and no
    # malformed order took stock.
    assert sorted(flow.supervisor.pids()) == pids, "a function process died and was restarted"
    assert not backlog, f"consumers not drained (num_pending, num_ack_pending): {backlog}"
    initial = flow.initial_stock()
    taken = 2 * len(good_ids)  # each good order is 2 x BOOK-42
    assert await flow.levels() == {
        sku: n - (taken if sku == "BOOK-42" else 0) for sku, n in initial.items()
    }
