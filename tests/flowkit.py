"""What end-to-end tests share: the running flow, publishing like `nats pub`, reading the log."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from pathlib import Path

import msgspec
import nats.errors
from nats.aio.client import Client

from functions.events import TERMINAL_SUBJECTS, AnyOrderId, OrderCreated, OrderItem
from functions.stock import Level, level_key
from orderflow.config import Topology, load_inventory
from orderflow.ops.server import EmbeddedServer
from orderflow.ops.supervisor import Supervisor
from orderflow.runtime.kv import KvStore
from orderflow.tools.demo import payload
from orderflow.tools.dlq import DeadLetter, dead_letters
from orderflow.tools.replay import wait_until_quiet
from orderflow.tools.streamlog import Stored, read_stream


def order(order_id: str, token: str = "tok_visa", **skus: int) -> OrderCreated:
    """An order of ``skus`` (SKU=quantity; underscores stand for dashes) at 1500 cents a unit."""
    lines = skus or {"BOOK_42": 2}
    items = [OrderItem(sku.replace("_", "-"), qty, 1500) for sku, qty in lines.items()]
    return OrderCreated(order_id, customer_id="c-7", items=items, payment_token=token)


class BaseFlow:
    """Every function as its own OS process on the servers ``url`` names, and what tests read."""

    def __init__(
        self,
        url: str,
        nc: Client,
        topology: Topology,
        config: Path,
        replicas: dict[str, int],
        env: dict[str, str],
        log_dir: Path | None = None,
        function_env: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.nc = nc
        self.topology = topology
        counts = {name: replicas.get(name, 1) for name in topology.functions}
        self.supervisor = Supervisor(
            url,
            config,
            counts,
            log_level="WARNING",
            env=env,
            function_env=function_env,
            log_dir=log_dir,
            mode=topology.mode,
        )
        self._stop = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None
        self.root = config.parent
        self.config = config

    def start(self) -> None:
        self.supervisor.start()
        self._watch = asyncio.create_task(self.supervisor.watch(self._stop, every=0.1))

    async def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            await self._watch
        await asyncio.to_thread(self.supervisor.stop)

    async def publish(self, *orders: OrderCreated) -> None:
        """Plain core publishes with no headers, exactly as `nats pub orders.created` sends."""
        for o in orders:
            await self.nc.publish("orders.created", payload(o))
        await self.nc.flush()

    async def events(self) -> list[Stored]:
        return await read_stream(self.nc, "ORDERS")

    async def read(self, stream: str) -> list[Stored]:
        return await read_stream(self.nc, stream)

    async def by_order(self) -> dict[str, list[str]]:
        """order id -> kinds of its events, in stream order."""
        out: dict[str, list[str]] = defaultdict(list)
        for stored in await self.events():
            try:
                order_id = msgspec.json.decode(stored.data, type=AnyOrderId).order_id
            except (msgspec.DecodeError, UnicodeDecodeError):
                continue  # a malformed message some test published on purpose
            out[order_id].append(stored.kind)
        return out

    async def wait_finished(
        self, order_ids: list[str], timeout: float = 60.0
    ) -> dict[str, list[str]]:
        """Poll the log until every order has a terminal event; return ``by_order()``."""
        deadline = time.monotonic() + timeout
        while True:
            seen = await self.by_order()
            missing = [o for o in order_ids if not TERMINAL_SUBJECTS & set(seen.get(o, []))]
            if not missing:
                return seen
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{len(missing)} of {len(order_ids)} orders unfinished after {timeout}s, "
                    f"e.g. {missing[:3]}: {[seen.get(o) for o in missing[:3]]}"
                )
            await asyncio.sleep(0.25)

    async def wait_quiet(self, timeout: float = 30.0) -> None:
        """Until every consumer has nothing pending and nothing unacked.

        A terminal event can be out while a redelivery (after a crash) is still
        due: effects are only final once every input has been acked.
        """
        await wait_until_quiet(self.nc, self.topology, timeout=timeout, settle=0.2)

    async def levels(self) -> dict[str, int]:
        store = KvStore(self.nc, "stock")
        out = {}
        for sku in self.initial_stock():
            entry = await store.get(level_key(sku), Level)
            out[sku] = entry.value.available if entry else 0
        return out

    def initial_stock(self) -> dict[str, int]:
        assert self.topology.inventory is not None
        return load_inventory(self.root / self.topology.inventory.file)

    async def dead_letters(self) -> list[DeadLetter]:
        return await dead_letters(self.nc, self.topology)

    async def assert_stock_conserved(self) -> None:
        """initial = available + what completed orders took, SKU by SKU, once all is acked."""
        await self.wait_quiet()
        taken: dict[str, int] = defaultdict(int)
        completed = set()
        created: dict[str, OrderCreated] = {}
        for stored in await self.events():
            if stored.kind == "orders.completed":
                completed.add(msgspec.json.decode(stored.data)["order_id"])
            elif stored.kind == "orders.created":
                try:
                    o = msgspec.json.decode(stored.data, type=OrderCreated)
                except (msgspec.DecodeError, UnicodeDecodeError):
                    continue  # never accepted, so it took nothing
                created[o.order_id] = o
        for order_id in completed:
            for item in created[order_id].items:
                taken[item.sku] += item.quantity
        levels = await self.levels()
        for sku, initial in self.initial_stock().items():
            assert levels[sku] + taken[sku] == initial, (sku, initial, levels[sku], taken[sku])


class Flow(BaseFlow):
    """The flow on one embedded server (``server``), which tests may kill and restart."""

    def __init__(
        self,
        server: EmbeddedServer,
        nc: Client,
        topology: Topology,
        config: Path,
        replicas: dict[str, int],
        env: dict[str, str],
        function_env: dict[str, dict[str, str]] | None = None,
    ) -> None:
        super().__init__(server.url, nc, topology, config, replicas, env, function_env=function_env)
        self.server = server


def terminal_counts(seen: dict[str, list[str]], order_ids: list[str]) -> dict[str, int]:
    return {o: sum(s in TERMINAL_SUBJECTS for s in seen.get(o, [])) for o in order_ids}


async def publish_carefully(flow: BaseFlow, orders: list[OrderCreated], over: float) -> list[float]:
    """Publish at a steady pace over ``over`` seconds, each order retried until the stream
    acks it (its message id makes a retry harmless); returns when each ack came
    (``time.monotonic()``)."""
    js = flow.nc.jetstream()
    acked = []
    for o in orders:
        for _ in range(200):
            try:
                await js.publish(
                    "orders.created", payload(o), headers={"Nats-Msg-Id": f"client:{o.order_id}"}
                )
                acked.append(time.monotonic())
                break
            except (TimeoutError, nats.errors.Error):
                await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"could not publish {o.order_id}")
        await asyncio.sleep(over / len(orders))
    return acked


async def gateway_records(flow: BaseFlow, prefix: str) -> dict[str, int]:
    """The simulated gateway's own records (``charge`` or ``refund``), by key."""
    js = flow.nc.jetstream()
    info = await js.stream_info("KV_gateway", subjects_filter=f"$KV.gateway.{prefix}.>")
    return dict(info.state.subjects or {})


async def assert_every_effect_once(
    flow: BaseFlow, ids: list[str], seen: dict[str, list[str]]
) -> None:
    """Every order ended once; no order was charged, reserved, delivered or compensated
    twice; every compensation matches what was taken; the gateway charged each
    decided payment once and refunded each refund once; stock is conserved."""
    assert terminal_counts(seen, ids) == dict.fromkeys(ids, 1)
    events = await flow.events()
    succeeded = {
        msgspec.json.decode(s.data)["order_id"] for s in events if s.kind == "payments.succeeded"
    }
    # Asked of the gateway: every charge but one never made (cancelled before payment saw it).
    decided = succeeded | {
        failed["order_id"]
        for s in events
        if s.kind == "payments.failed"
        and not (failed := msgspec.json.decode(s.data))["reason"].startswith("not charged")
    }
    for order_id in ids:
        subjects = seen[order_id]
        # A command may go out again if its deadline passed; every answer
        # and every outcome exactly once.
        for subject in {s for s in subjects if not s.startswith("saga.")} - {"orders.created"}:
            assert subjects.count(subject) == 1, (order_id, subjects)
        if "orders.completed" in subjects:
            assert {"payments.succeeded", "stock.reserved", "delivery.scheduled"} <= set(subjects)
            assert not {"payments.refunded", "stock.released"} & set(subjects)
        else:
            assert "delivery.scheduled" not in subjects
            if "payments.succeeded" in subjects:
                assert "payments.refunded" in subjects, (order_id, subjects)
            if "stock.reserved" in subjects:
                assert "stock.released" in subjects, (order_id, subjects)

    # One gateway record per decided charge, one per real refund: nothing doubled.
    assert len(await gateway_records(flow, "charge")) == len(decided)
    refunded = [
        s
        for s in events
        if s.kind == "payments.refunded" and msgspec.json.decode(s.data)["charge_id"]
    ]
    assert len(await gateway_records(flow, "refund")) == len(refunded)
    await flow.assert_stock_conserved()
