"""orderflow.runtime.pipeline: what becomes of one message, the same for the worker and replay."""

from __future__ import annotations

from collections.abc import Sequence

from functions.errors import Permanent
from functions.events import DeliveryScheduled, Event, OrderRejected, PaymentSucceeded
from functions.history import History, MemoryHistory
from orderflow.config import Topology
from orderflow.runtime import pipeline
from orderflow.tools.demo import payload
from tests.flowkit import order

PAID = PaymentSucceeded("o-1", 100, charge_id="ch_1")


def admit(
    topology: Topology, function: str, subject: str, data: bytes, attempt: int = 1
) -> Event | pipeline.DeadLetter:
    spec = topology.functions[function]
    return pipeline.admit(spec, subject, data, {}, attempt, 8, topology.limits, 65536)


def test_a_message_delivered_past_max_deliver_is_given_up_before_decoding(
    topology: Topology,
) -> None:
    letter = admit(topology, "payment", "orders.created", b"not json", attempt=9)
    assert isinstance(letter, pipeline.DeadLetter)
    assert letter.reason == "delivered 9 times (max_deliver 8) without an answer"


def test_an_invalid_order_is_answered_only_by_the_function_that_rejects(
    topology: Topology,
) -> None:
    bad = payload(order("o-1", BOOK_42=0))
    by_payment = admit(topology, "payment", "orders.created", bad)
    by_stock = admit(topology, "stock", "orders.created", bad)
    assert isinstance(by_payment, pipeline.DeadLetter) and isinstance(by_stock, pipeline.DeadLetter)
    assert "quantity" in by_payment.reason and by_payment.reason == by_stock.reason
    assert by_payment.rejection == OrderRejected("o-1", reason=by_payment.reason[:500])
    assert by_stock.rejection is None


def test_a_valid_message_is_decoded(topology: Topology) -> None:
    event = admit(topology, "payment", "orders.created", payload(order("o-1")))
    assert event == order("o-1")


async def outcome(
    topology: Topology, answer: Sequence[Event] | Exception, attempt: int = 1
) -> pipeline.Outcome:
    async def handler(event: Event, history: History) -> Sequence[Event]:
        if isinstance(answer, Exception):
            raise answer
        return answer

    spec = topology.functions["delivery"]
    return await pipeline.handle("delivery", spec, handler, PAID, MemoryHistory(), attempt, 8)


async def test_what_the_handler_returns_is_emitted(topology: Topology) -> None:
    scheduled = DeliveryScheduled("o-1", tracking_id="TRK-1", carrier="orderflow-post")
    assert await outcome(topology, [scheduled]) == pipeline.Emit(PAID, [scheduled])


async def test_an_undeclared_emit_is_a_permanent_failure(topology: Topology) -> None:
    letter = await outcome(topology, [PAID])  # delivery does not emit payments
    assert isinstance(letter, pipeline.DeadLetter)
    assert letter.reason.startswith("permanent failure: delivery emitted payments.succeeded")


async def test_a_fault_is_tried_again_until_the_last_attempt(topology: Topology) -> None:
    fault = ConnectionError("server went away")
    assert await outcome(topology, fault, attempt=7) == pipeline.Again(PAID, fault)
    letter = await outcome(topology, fault, attempt=8)
    assert isinstance(letter, pipeline.DeadLetter) and letter.error is fault
    assert letter.reason == "failed 8 attempts; last error: ConnectionError: server went away"


async def test_a_permanent_failure_is_given_up_at_once(topology: Topology) -> None:
    letter = await outcome(topology, Permanent("no such SKU"), attempt=1)
    assert isinstance(letter, pipeline.DeadLetter)
    assert letter.reason == "permanent failure: no such SKU"


async def test_every_kind_of_dead_letter_reason_has_its_class(topology: Topology) -> None:
    """The word the exporter's labels and the spans' error.type use, from the reasons made here."""
    too_often = admit(topology, "payment", "orders.created", b"{}", attempt=9)
    invalid = admit(topology, "payment", "orders.created", payload(order("o-1", BOOK_42=0)))
    garbage = admit(topology, "payment", "orders.created", b"not json")
    exhausted = await outcome(topology, ConnectionError("away"), attempt=8)
    permanent = await outcome(topology, Permanent("no such SKU"))
    undeclared = await outcome(topology, [PAID])
    letters = [too_often, invalid, garbage, exhausted, permanent, undeclared]
    assert all(isinstance(letter, pipeline.DeadLetter) for letter in letters)
    classes = [pipeline.reason_class(letter.reason) for letter in letters]  # type: ignore[union-attr]
    assert classes == ["max_deliver", "invalid", "invalid", "retries_exhausted", "permanent",
                       "permanent"]  # fmt: skip
