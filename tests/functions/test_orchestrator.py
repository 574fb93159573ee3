"""orchestrator: one command at a time, compensation in reverse, deadlines, redeliveries."""

from __future__ import annotations

from collections.abc import Sequence

from functions import orchestrator
from functions.events import (
    AlarmCleared,
    ChargePayment,
    DeliveryCancelled,
    DeliveryScheduled,
    Event,
    OrderCancelled,
    OrderCompleted,
    PaymentFailed,
    PaymentRefunded,
    PaymentSucceeded,
    RefundPayment,
    ReleaseStock,
    ReserveStock,
    ScheduleDelivery,
    Shortage,
    StepTimedOut,
    StockLine,
    StockReleased,
    StockReserved,
    StockUnavailable,
    subject_of,
)
from functions.orchestrator import Saga, StepPolicy, saga_key
from functions.state import MemoryStore
from tests.flowkit import order

POLICY: orchestrator.Policy = {
    "payment": StepPolicy(1000, "wait"),
    "stock": StepPolicy(1000, "compensate", attempts=2),
    "delivery": StepPolicy(1000, "retry", attempts=3),
    "release": StepPolicy(1000, "retry"),
    "refund": StepPolicy(1000, "retry"),
}
PLACED = order("o-1", BOOK_42=2)
SUCCEEDED = PaymentSucceeded("o-1", 3000, charge_id="ch_1")
RESERVED = StockReserved("o-1", [StockLine("BOOK-42", 2)])
UNAVAILABLE = StockUnavailable("o-1", [Shortage("BOOK-42", 2, 1)])


async def feed(store: MemoryStore, *events: Event) -> list[Event]:
    """Every event in turn; what the orchestrator sent for the last one.

    A ``delivery.cancelled`` it sends (closing a failed saga) comes back to it
    from the log, as it would live; then what it sent for that is returned.
    """
    sent: Sequence[Event] = []
    for event in events:
        sent = await orchestrator.handle(event, store, POLICY)
        while [type(e) for e in sent] == [DeliveryCancelled]:
            sent = await orchestrator.handle(sent[0], store, POLICY)
    return list(sent)


def alarm(step: str, attempt: int = 1) -> StepTimedOut:
    return StepTimedOut("o-1", step, attempt, delay_ms=1000)


async def test_happy_path_one_command_at_a_time() -> None:
    store = MemoryStore()
    assert await feed(store, PLACED) == [ChargePayment("o-1", 1, order=PLACED), alarm("payment")]
    assert await feed(store, SUCCEEDED) == [ReserveStock("o-1", 1, order=PLACED), alarm("stock")]
    assert await feed(store, RESERVED) == [
        ScheduleDelivery("o-1", 1, payment=SUCCEEDED, stock=RESERVED),
        alarm("delivery"),
    ]
    tracking = DeliveryScheduled("o-1", tracking_id="TRK-1", carrier="orderflow-post")
    assert await feed(store, tracking) == [
        OrderCompleted("o-1", tracking_id="TRK-1"),
        AlarmCleared("o-1"),
    ]


async def test_declined_payment_cancels_without_touching_stock() -> None:
    store = MemoryStore()
    sent = await feed(store, PLACED, PaymentFailed("o-1", 3000, reason="card_declined"))
    assert sent == [
        OrderCancelled("o-1", reason="payment failed: card_declined"),
        AlarmCleared("o-1"),
    ]


async def test_out_of_stock_refunds_then_cancels() -> None:
    store = MemoryStore()
    reason = "out of stock: BOOK-42 (wanted 2, 1 left)"
    sent = await feed(store, PLACED, SUCCEEDED, UNAVAILABLE)
    assert sent == [RefundPayment("o-1", 1, reason=reason), alarm("refund")]
    sent = await feed(store, PaymentRefunded("o-1", 3000, charge_id="ch_1"))
    assert sent == [OrderCancelled("o-1", reason=reason), AlarmCleared("o-1")]


async def test_a_silent_step_is_sent_again_then_compensated() -> None:
    store = MemoryStore()
    await feed(store, PLACED, SUCCEEDED)
    # Attempt 1 of stock times out: the same command again, as attempt 2.
    assert await feed(store, alarm("stock", 1)) == [
        ReserveStock("o-1", 2, order=PLACED),
        alarm("stock", 2),
    ]
    # Attempt 2 (the last) times out too: undo in reverse, stock first.
    problem = "stock did not answer 2 attempts of 1000 ms"
    assert await feed(store, alarm("stock", 2)) == [
        ReleaseStock("o-1", 1, reason=problem),
        alarm("release"),
    ]
    # Stock answers late with a reservation: the release already covers it.
    assert await feed(store, RESERVED) == []
    released = StockReleased("o-1", [StockLine("BOOK-42", 2)])
    assert await feed(store, released) == [RefundPayment("o-1", 1, reason=problem), alarm("refund")]
    refunded = PaymentRefunded("o-1", 3000, charge_id="ch_1")
    assert await feed(store, refunded) == [
        OrderCancelled("o-1", reason=problem),
        AlarmCleared("o-1"),
    ]


async def test_a_silent_payment_waits_and_a_late_answer_moves_the_saga_on() -> None:
    # An unknown charge (the gateway does not answer) is parked in payment's
    # dead letters: neither a second charge nor a refund could settle it, so
    # the step sends nothing more, however many deadlines pass.
    store = MemoryStore()
    await feed(store, PLACED)
    revision = store.data[saga_key("o-1")][1]
    for _ in range(3):
        assert await feed(store, alarm("payment", 1)) == []
    assert store.data[saga_key("o-1")][1] == revision  # nothing recorded either
    # The dead letter is redriven once the gateway answers: the saga goes on.
    assert await feed(store, SUCCEEDED) == [ReserveStock("o-1", 1, order=PLACED), alarm("stock")]


async def test_a_compensating_payment_policy_still_refunds_after_its_attempts() -> None:
    policy = {**POLICY, "payment": StepPolicy(1000, "compensate", attempts=2)}
    store = MemoryStore()
    await feed(store, PLACED)
    assert await orchestrator.handle(alarm("payment", 1), store, policy) == [
        ChargePayment("o-1", 2, order=PLACED),
        alarm("payment", 2),
    ]
    sent = await orchestrator.handle(alarm("payment", 2), store, policy)
    assert [subject_of(type(e)) for e in sent] == ["saga.payment.refund", "saga.timeout"]
    # The charge was declined after all: payment holds nothing, the order ends.
    sent = await orchestrator.handle(PaymentFailed("o-1", 3000, reason="late"), store, policy)
    assert [subject_of(type(e)) for e in sent] == ["delivery.cancelled"]  # closing first
    sent = await orchestrator.handle(sent[0], store, policy)
    assert [subject_of(type(e)) for e in sent] == ["orders.cancelled", "saga.alarms.cleared"]


async def test_retry_steps_are_sent_again_up_to_their_attempts_then_wait() -> None:
    store = MemoryStore()
    await feed(store, PLACED, SUCCEEDED, RESERVED)
    for attempt in (1, 2):
        sent = await feed(store, alarm("delivery", attempt))
        assert sent[0] == ScheduleDelivery("o-1", attempt + 1, payment=SUCCEEDED, stock=RESERVED)
    # The third attempt was the last: nothing more is sent, ever.
    assert await feed(store, alarm("delivery", 3)) == []
    assert await feed(store, alarm("delivery", 3)) == []
    # A late answer still ends the order.
    sent = await feed(
        store, DeliveryScheduled("o-1", tracking_id="TRK-1", carrier="orderflow-post")
    )
    assert [subject_of(type(e)) for e in sent] == ["orders.completed", "saga.alarms.cleared"]


async def test_stale_alarms_and_late_answers_send_nothing() -> None:
    store = MemoryStore()
    await feed(store, PLACED, SUCCEEDED)
    assert await feed(store, alarm("payment", 1)) == []  # payment answered already
    assert await feed(store, PaymentFailed("o-1", 3000, reason="late")) == []
    await feed(
        store, RESERVED, DeliveryScheduled("o-1", tracking_id="TRK-1", carrier="orderflow-post")
    )
    assert await feed(store, alarm("delivery", 1)) == []  # the saga is over


async def test_redelivery_of_the_last_input_sends_the_same_again() -> None:
    # The process may die between recording the step and sending its command:
    # the redelivered input must send it again (same message ids, so the
    # stream drops them if they did get out).
    store = MemoryStore()
    first = await feed(store, PLACED, SUCCEEDED)
    revision = store.data[saga_key("o-1")][1]
    assert await feed(store, SUCCEEDED) == first
    assert store.data[saga_key("o-1")][1] == revision  # nothing recorded twice
    # An older input, redelivered, sends nothing: its commands were answered.
    assert await feed(store, PLACED) == []


async def test_the_terminal_event_is_sent_again_only_for_its_own_input() -> None:
    store = MemoryStore()
    done = await feed(
        store,
        PLACED,
        SUCCEEDED,
        RESERVED,
        DeliveryScheduled("o-1", "TRK-1", carrier="orderflow-post"),
    )
    assert await feed(store, DeliveryScheduled("o-1", "TRK-1", carrier="orderflow-post")) == done
    assert await feed(store, RESERVED) == []


async def test_an_answer_without_a_saga_is_ignored() -> None:
    store = MemoryStore()
    assert await feed(store, SUCCEEDED) == []
    assert store.data == {}


async def test_state_records_the_step_before_commands_go_out() -> None:
    store = MemoryStore()
    await feed(store, PLACED, SUCCEEDED)
    saga = await store.get(saga_key("o-1"), Saga)
    assert saga is not None
    assert (saga.value.step, saga.value.attempt, saga.value.charge) == ("stock", 1, SUCCEEDED)


# --- cancellation on request -------------------------------------------------

REQUESTED = DeliveryCancelled("o-1", reason="changed my mind", request_id="r-1", requested_by="ann")
NAMED = OrderCancelled(
    "o-1",
    reason="cancelled on request r-1 by ann: changed my mind",
    request_id="r-1",
    requested_by="ann",
)


async def test_a_failed_saga_closes_its_delivery_decision_before_it_ends() -> None:
    store = MemoryStore()
    await feed(store, PLACED)
    sent = await orchestrator.handle(PaymentFailed("o-1", 3000, reason="declined"), store, POLICY)
    assert sent == [DeliveryCancelled("o-1", reason="payment failed: declined")]
    # A request's cancellation was stored first (ours was refused): it names the end.
    assert await orchestrator.handle(REQUESTED, store, POLICY) == [NAMED, AlarmCleared("o-1")]


async def test_cancelled_while_charging_refunds_once_the_charge_answers() -> None:
    store = MemoryStore()
    await feed(store, PLACED)
    assert await feed(store, REQUESTED) == []  # the charge is in flight: let it answer
    assert await feed(store, SUCCEEDED) == [
        RefundPayment("o-1", 1, reason="changed my mind"),
        alarm("refund"),
    ]
    refunded = PaymentRefunded("o-1", 3000, charge_id="ch_1")
    assert await feed(store, refunded) == [NAMED, AlarmCleared("o-1")]


async def test_cancelled_while_reserving_releases_then_refunds() -> None:
    store = MemoryStore()
    await feed(store, PLACED, SUCCEEDED, REQUESTED)
    assert await feed(store, RESERVED) == [
        ReleaseStock("o-1", 1, reason="changed my mind"),
        alarm("release"),
    ]
    assert await feed(store, StockReleased("o-1", [StockLine("BOOK-42", 2)])) == [
        RefundPayment("o-1", 1, reason="changed my mind"),
        alarm("refund"),
    ]
    refunded = PaymentRefunded("o-1", 3000, charge_id="ch_1")
    assert await feed(store, refunded) == [NAMED, AlarmCleared("o-1")]


async def test_cancelled_while_delivery_is_asked_undoes_at_once() -> None:
    # The stream refuses delivery.scheduled from now on: nothing to wait for.
    store = MemoryStore()
    await feed(store, PLACED, SUCCEEDED, RESERVED)
    assert await feed(store, REQUESTED) == [
        ReleaseStock("o-1", 1, reason="changed my mind"),
        alarm("release"),
    ]


async def test_a_cancellation_after_the_end_changes_nothing() -> None:
    store = MemoryStore()
    await feed(
        store,
        PLACED,
        SUCCEEDED,
        RESERVED,
        DeliveryScheduled("o-1", tracking_id="T", carrier="orderflow-post"),
    )
    revision = store.data[saga_key("o-1")][1]
    assert await feed(store, REQUESTED) == []
    assert store.data[saga_key("o-1")][1] == revision
