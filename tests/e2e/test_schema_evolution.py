"""Changing the flow without breaking it (docs/contract.md): fields the contract does not know are
read past and never written on; a rolling deploy runs the old and the new code of a function
side by side on one consumer, the new one writing a field the old code does not know."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from functions.events import OrderCreated
from orderflow.config import Mode
from orderflow.runtime.context import FUNCTION
from orderflow.tools import contract
from orderflow.tools.demo import payload
from orderflow.tools.status import ask_all
from tests.conftest import ROOT, StartFlow
from tests.contract.writers import off_contract
from tests.flowkit import Flow, assert_every_effect_once, order
from tests.waiting import until

JSON = dict[str, object]


def _with_unknown_fields(data: bytes, i: int) -> bytes:
    body = msgspec.json.decode(data)
    body["coupon_code"] = f"SPRING-{i}"  # a storefront's new field, at the top
    body["items"][0]["gift_wrap"] = True  # and in an item
    return msgspec.json.encode(body)


@pytest.mark.parametrize("mode", ["choreography", "orchestration"])
async def test_fields_the_contract_does_not_know_are_read_past_and_never_written_on(
    start_flow: StartFlow, mode: Mode
) -> None:
    flow = await start_flow(mode=mode)
    orders = [order(f"tol-{mode[:5]}-{i}", token=("tok_visa", "tok_declined")[i % 2])
              for i in range(6)]  # fmt: skip
    for i, o in enumerate(orders):
        await flow.nc.publish("orders.created", _with_unknown_fields(payload(o), i))
    ids = [o.order_id for o in orders]
    seen = await flow.wait_finished(ids, timeout=30)
    assert {("orders.completed" in seen[o]) for o in ids} == {True, False}  # both outcomes
    assert await flow.dead_letters() == []
    # What the functions wrote is exactly the contract: the orchestrator's commands
    # carry the order without the storefront's fields; the log keeps them as sent.
    components = contract.document({mode: flow.topology})["components"]["schemas"]
    stored = await flow.events()
    written = [s for s in stored if FUNCTION in s.headers]
    for s in written:
        cls = type(s.event())
        ref = {"$ref": f"#/components/schemas/{cls.__name__}"}
        assert off_contract(msgspec.json.decode(s.data), ref, components) == [], s
    if mode == "orchestration":
        charges = [msgspec.json.decode(s.data) for s in written if s.kind == "saga.payment.charge"]
        assert len(charges) == len(orders)
        assert not any("coupon_code" in c["order"] for c in charges)
    sent = [msgspec.json.decode(s.data) for s in stored if s.kind == "orders.created"]
    assert {o["coupon_code"] for o in sent} == {f"SPRING-{i}" for i in range(len(orders))}


# --- a rolling deploy -------------------------------------------------------------

#: The field payment's next version adds to payments.succeeded, optional (docs/contract.md).
NEW_FIELD = "fee_cents"
PATCHES = {
    "functions/events.py": (
        'class PaymentSucceeded(Event, tag="payments.succeeded", frozen=True):\n'
        "    amount_cents: Cents\n"
        "    charge_id: str\n",
        f"    {NEW_FIELD}: Cents | None = None  # new in this release\n",
    ),
    "functions/payment.py": (
        "return PaymentSucceeded(order.order_id, order.total_cents, charge_id=result.charge_id",
        f", {NEW_FIELD}=order.total_cents // 100",
    ),
}


def next_release(at: Path) -> Path:
    """A checkout of this code whose payment writes the new field: the release being rolled out."""
    for package in ("functions", "orderflow"):
        shutil.copytree(ROOT / package, at / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("runner.py", "streams.yaml", "inventory.yaml"):
        shutil.copy(ROOT / name, at / name)
    for name, (anchor, added) in PATCHES.items():
        source = (at / name).read_text()
        assert source.count(anchor) == 1, f"{name} no longer contains {anchor!r}"
        (at / name).write_text(source.replace(anchor, anchor + added))
    return at


def test_the_next_release_checks_compatible_with_the_committed_contract(tmp_path: Path) -> None:
    release = next_release(tmp_path / "release")
    check = subprocess.run(
        [sys.executable, str(release / "runner.py"), "contract", "--check",
         str(ROOT / "contract" / "asyncapi.json")],
        cwd=release, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"payments.succeeded $.{NEW_FIELD}: added, optional" in check.stdout
    # Embedded in the orchestrator's command as well.
    assert f"saga.delivery.schedule $.payment.{NEW_FIELD}: added, optional" in check.stdout


class Payment:
    """One payment process of some release (``root``), on the flow's server and consumer."""

    def __init__(self, flow: Flow, root: Path, logs: Path) -> None:
        command = flow.supervisor.command("payment")
        command[1] = str(root / "runner.py")
        command[command.index("--config") + 1] = str(root / "streams.yaml")
        self.log = logs
        with logs.open("ab") as out:
            self.process = subprocess.Popen(
                command, cwd=root, env={**os.environ, "NATS_URL": flow.server.url},
                stdout=out, stderr=out,
            )  # fmt: skip

    def stop(self) -> int:
        """SIGTERM, as a rolling restart sends: it drains what it holds, then exits."""
        self.process.terminate()
        return self.process.wait(timeout=30)


@pytest.fixture
def payments(tmp_path: Path) -> Iterator[list[Payment]]:
    started: list[Payment] = []
    yield started
    for process in started:
        if process.process.poll() is None:
            process.process.kill()
            process.process.wait()


async def test_a_rolling_deploy_runs_old_and_new_payment_side_by_side(
    start_flow: StartFlow, tmp_path: Path, payments: list[Payment]
) -> None:
    release = next_release(tmp_path / "release")
    flow = await start_flow({"payment": 0})  # every function but payment, this code
    old = Payment(flow, ROOT, tmp_path / "payment-old.log")
    payments.append(old)

    def batch(name: str, n: int) -> list[OrderCreated]:
        # Paid, declined, out of stock (a refund: a join read from the history), flaky.
        def nth(i: int) -> OrderCreated:
            order_id = f"roll-{name}-{i}"
            match i % 5:
                case 1:
                    return order(order_id, token="tok_declined")
                case 2:
                    return order(order_id, BOOK_42=1, SOLD_OUT_1=1)
                case 3:
                    return order(order_id, token="tok_flaky")
            return order(order_id)

        return [nth(i) for i in range(n)]

    async def publish(orders: list[OrderCreated]) -> list[str]:
        for o in orders:
            await flow.publish(o)
            await asyncio.sleep(0.02)  # a steady stream, not one burst to one process
        return [o.order_id for o in orders]

    async def charged(ids: list[str]) -> dict[str, JSON]:
        found = {}
        for s in await flow.events():
            if s.kind in ("payments.succeeded", "payments.failed"):
                event = msgspec.json.decode(s.data)
                found[event["order_id"]] = event
        return {i: found[i] for i in ids if i in found}

    # 1. The old code alone.
    before = await publish(batch("before", 10))

    async def all_charged() -> bool:
        return set(await charged(before)) == set(before)

    await until(all_charged, 30, "the old payment charged")
    # 2. The new release starts beside it, on the same durable consumer.
    new = Payment(flow, release, tmp_path / "payment-new.log")
    payments.append(new)
    pids = {old.process.pid, new.process.pid}

    async def both_serving() -> bool:
        answers = await ask_all(flow.nc, "$SRV.PING.orderflow-payment")
        return {int(a["metadata"]["pid"]) for a in answers} == pids

    await until(both_serving, 30, "both payment processes answering")
    during = await publish(batch("during", 30))
    # 3. The old one stops (it drains first); the new one carries on alone.
    assert await asyncio.to_thread(old.stop) == 0, old.log.read_text()
    after = await publish(batch("after", 10))

    ids = before + during + after
    seen = await flow.wait_finished(ids, timeout=90)
    letters = await flow.dead_letters()
    assert letters == [], [(d.function, d.subject, d.reason) for d in letters]
    await assert_every_effect_once(flow, ids, seen)  # every order ended once, nothing doubled
    assert new.process.poll() is None, new.log.read_text()

    # Both versions wrote payments.succeeded, and the old code read the new one's (delivery
    # scheduled, refunds joined): the new field is where the new code wrote it.
    paid = {i: e for i, e in (await charged(ids)).items() if "charge_id" in e}
    by_new = {i for i, e in paid.items() if NEW_FIELD in e}
    assert by_new and by_new != set(paid)
    assert not by_new & set(before)  # the old code alone: none
    assert {i for i in after if i in paid} <= by_new  # the new code alone: all
    side_by_side = {i for i in during if i in paid}
    assert side_by_side & by_new and side_by_side - by_new, "one process took every order"
    delivered = {i for i in by_new if "delivery.scheduled" in seen[i]}
    assert delivered, "no delivery read a payment of the new version"
