"""Which handler each function name runs, and with which state.

An explicit table, no registration magic: ``streams.yaml`` names functions and
the buckets each may use, this table says how to build each handler from
those buckets. A function asking for a bucket it did not declare fails at
start, so ``streams.yaml`` stays a true list of what every function touches.

In orchestration mode payment, stock and delivery run the *same* handlers;
only what feeds them changes. A command is handed over as the event it stands
for in choreography (:func:`as_events`): ``saga.payment.charge`` is the order,
``saga.payment.refund`` is what ``stock.unavailable`` asks of payment, and so
on. The orchestrator is the one function of its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from functions import cancel, delivery, orchestrator, order, payment, stock
from functions.events import (
    ChargePayment,
    Event,
    PaymentFailed,
    RefundPayment,
    ReleaseStock,
    ReserveStock,
    ScheduleDelivery,
    StockUnavailable,
    event_id,
)
from functions.history import History
from functions.state import Store
from orderflow.config import ConfigError, Topology, seconds
from orderflow.runtime.batch import Batcher
from orderflow.runtime.gateway import SimulatedGateway
from orderflow.runtime.pipeline import Handler
from orderflow.runtime.requests import RequestHandler

Buckets = Callable[[str], Store]


def _payment(buckets: Buckets) -> Handler:
    gateway = SimulatedGateway(buckets("gateway"))
    return lambda event, history: payment.handle(event, history, gateway)


def _payment_commanded(buckets: Buckets) -> Handler:
    # The orchestrator asks for refunds itself: payment does not watch for cancellations.
    gateway = SimulatedGateway(buckets("gateway"))
    return lambda event, history: payment.handle(event, history, gateway, cancellable=False)


#: Orders stock decides in one batch at most (orderflow/runtime/batch.py).
STOCK_BATCH = 64


def _stock(buckets: Buckets) -> Handler:
    store = buckets("stock")
    decide: Batcher[Event, Sequence[Event]] = Batcher(
        lambda events: stock.handle_batch(events, store), STOCK_BATCH
    )
    return lambda event, history: decide(event)


def _from_history(
    handle: Callable[[Event, History], Awaitable[Sequence[Event]]],
) -> Callable[[Buckets], Handler]:
    """A handler whose only state is the order's history: no bucket at all."""
    return lambda buckets: handle


BINDINGS: dict[str, Callable[[Buckets], Handler]] = {
    "payment": _payment,
    "stock": _stock,
    "delivery": _from_history(delivery.handle),
    "order": _from_history(order.handle),
}


def as_events(command: Event) -> list[Event]:
    """A command as the events that ask the same of a function in choreography."""
    match command:
        case ChargePayment(order=placed) | ReserveStock(order=placed):
            return [placed]
        case RefundPayment(order_id=order_id):
            return [StockUnavailable(order_id, shortages=[])]
        case ReleaseStock(order_id=order_id, reason=reason):
            return [PaymentFailed(order_id, amount_cents=0, reason=reason)]
        case ScheduleDelivery(payment=paid, stock=reserved):
            # delivery's join, given both halves at once.
            return [paid, reserved]
    return [command]


def _commanded(build: Callable[[Buckets], Handler]) -> Callable[[Buckets], Handler]:
    def build_commanded(buckets: Buckets) -> Handler:
        handler = build(buckets)

        async def handle(command: Event, history: History) -> Sequence[Event]:
            emitted: dict[str, Event] = {}
            for event in as_events(command):
                # Both halves of a ScheduleDelivery answer with the same
                # event: send it once.
                emitted.update((event_id(e), e) for e in await handler(event, history))
            return list(emitted.values())

        return handle

    return build_commanded


def _orchestrator(topology: Topology) -> Callable[[Buckets], Handler]:
    assert topology.orchestration is not None  # mode orchestration is loaded only with it
    steps = topology.orchestration.steps

    def rule(step: str) -> orchestrator.StepPolicy:
        spec = getattr(steps, step)
        timeout_ms = round(seconds(spec.timeout) * 1000)
        return orchestrator.StepPolicy(timeout_ms, spec.on_timeout, spec.attempts)

    policy: orchestrator.Policy = {step: rule(step) for step in orchestrator.STEPS}

    def build(buckets: Buckets) -> Handler:
        store = buckets("sagas")
        return lambda event, history: orchestrator.handle(event, store, policy)

    return build


def bindings(topology: Topology) -> dict[str, Callable[[Buckets], Handler]]:
    """The table for the topology's mode."""
    if topology.mode == "choreography":
        return BINDINGS
    return {
        "orchestrator": _orchestrator(topology),
        "payment": _commanded(_payment_commanded),
        "stock": _commanded(_stock),
        "delivery": _commanded(BINDINGS["delivery"]),
    }


#: The functions that answer requests (``serves`` in streams.yaml), in both modes.
RESPONDERS: dict[str, RequestHandler] = {"cancel": cancel.handle}


def build_responder(topology: Topology, function: str) -> RequestHandler:
    if function not in RESPONDERS:
        raise ConfigError(
            f"functions.{function}.serves: no request handler is bound to this name "
            f"(known: {', '.join(RESPONDERS)})"
        )
    return RESPONDERS[function]


def build_handler(topology: Topology, function: str, store_for: Buckets) -> Handler:
    """The handler of ``function``, its state in the buckets ``store_for`` opens.

    The runner opens KV buckets (``KvStore``); the offline replayer, memory.
    """
    table = bindings(topology)
    if function not in table:
        raise ConfigError(
            f"functions.{function}: no handler is bound to this name in {topology.mode} mode "
            f"(known: {', '.join(table)})"
        )
    allowed = set(topology.functions[function].buckets)

    def buckets(name: str) -> Store:
        if name not in allowed:
            raise ConfigError(
                f"functions.{function}.buckets: the handler needs bucket {name!r}, "
                f"which is not declared (declared: {', '.join(sorted(allowed)) or 'none'})"
            )
        return store_for(name)

    return table[function](buckets)
