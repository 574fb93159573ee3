"""Which handler each function name runs, and with which state.

An explicit table, no registration magic: ``streams.yaml`` names functions and
the buckets each may use, this table says how to build each handler from
those buckets. A function asking for a bucket it did not declare fails at
start, so ``streams.yaml`` stays a true list of what every function touches.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from functions import delivery, order, payment, stock
from functions.events import Event
from functions.state import Store
from orderflow.config import ConfigError, Topology
from orderflow.gateway import SimulatedGateway
from orderflow.worker import Handler

Buckets = Callable[[str], Store]


StoreHandler = Callable[[Event, Store], Awaitable[Sequence[Event]]]


def _payment(buckets: Buckets) -> Handler:
    store, gateway = buckets("payments"), SimulatedGateway(buckets("gateway"))
    return lambda event: payment.handle(event, store, gateway)


def _with_store(handle: StoreHandler, bucket: str) -> Callable[[Buckets], Handler]:
    def build(buckets: Buckets) -> Handler:
        store = buckets(bucket)
        return lambda event: handle(event, store)

    return build


BINDINGS: dict[str, Callable[[Buckets], Handler]] = {
    "payment": _payment,
    "stock": _with_store(stock.handle, "stock"),
    "delivery": _with_store(delivery.handle, "deliveries"),
    "order": _with_store(order.handle, "orders"),
}


def build_handler(topology: Topology, function: str, store_for: Buckets) -> Handler:
    """The handler of ``function``, its state in the buckets ``store_for`` opens.

    The runner opens KV buckets (``KvStore``); the offline replayer, memory.
    """
    if function not in BINDINGS:
        raise ConfigError(
            f"functions.{function}: no handler is bound to this name (known: {', '.join(BINDINGS)})"
        )
    allowed = set(topology.functions[function].buckets)

    def buckets(name: str) -> Store:
        if name not in allowed:
            raise ConfigError(
                f"functions.{function}.buckets: the handler needs bucket {name!r}, "
                f"which is not declared (declared: {', '.join(sorted(allowed)) or 'none'})"
            )
        return store_for(name)

    return BINDINGS[function](buckets)
