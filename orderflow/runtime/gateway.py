"""The built-in simulated payment gateway.

It behaves like a real provider where it matters to the flow:

* ``tok_declined`` is declined (a business outcome, not an error);
* ``tok_flaky`` times out (:class:`GatewayUnavailable`) on the first attempt
  for an idempotency key, then succeeds, so retries are exercised;
* ``tok_unavailable`` times out while the gateway is down for it, which is
  until its memory holds :data:`RESTORED_KEY` (``restore`` writes it, as a
  test or an operator trying this out would: ``nats kv put gateway restored
  '{}'``), so retries run out and the charge is parked in a dead letter, to be
  redriven once the gateway answers;
* every other token is charged;
* the same idempotency key always gets the first answer back, across
  processes and restarts, because the gateway's memory is a KV bucket
  (``gateway``), not this process.
"""

from __future__ import annotations

import hashlib

import msgspec

from functions.payment import Charged, Declined, GatewayUnavailable
from functions.state import Store, Write
from orderflow.runtime.failpoints import crash_point

DECLINED_TOKEN = "tok_declined"
FLAKY_TOKEN = "tok_flaky"
DOWN_TOKEN = "tok_unavailable"  # the gateway does not answer for it until restored
#: Present in the gateway's memory: the outage for DOWN_TOKEN is over.
RESTORED_KEY = "restored"


class ChargeRecord(msgspec.Struct, frozen=True):
    token: str
    amount_cents: int
    charge_id: str | None = None
    declined: str | None = None


class RefundRecord(msgspec.Struct, frozen=True):
    charge_id: str
    amount_cents: int


class Attempt(msgspec.Struct, frozen=True):
    pass


class SimulatedGateway:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def charge(
        self, *, idempotency_key: str, token: str, amount_cents: int
    ) -> Charged | Declined:
        # The answer is decided once per idempotency key and kept: create it
        # first, and read the kept one only when that finds it there (one
        # request instead of two in the usual case).
        key = f"charge.{idempotency_key}"
        # Read only for this token: the others cost nothing extra.
        if token == DOWN_TOKEN and await self.store.get(RESTORED_KEY, Attempt) is None:
            raise GatewayUnavailable(f"gateway unreachable charging {idempotency_key}")
        if token == FLAKY_TOKEN and await self.store.commit(
            Write(f"attempt.{idempotency_key}", Attempt(), 0)
        ):
            raise GatewayUnavailable(f"gateway timed out charging {idempotency_key}")
        if token == DECLINED_TOKEN:
            record = ChargeRecord(token, amount_cents, declined="card_declined")
        else:
            digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:16]
            record = ChargeRecord(token, amount_cents, charge_id=f"ch_{digest}")
        if not await self.store.commit(Write(key, record, 0)):
            seen = await self.store.get(key, ChargeRecord)  # asked before: the first answer
            if seen is None:
                # A replica behind the one that refused the create (a cluster's
                # read may lag a write): ask again later, never guess.
                raise GatewayUnavailable(f"the answer for {idempotency_key} is not readable yet")
            record = seen.value
        crash_point("after-charge", "payment", idempotency_key)
        if record.charge_id is not None:
            return Charged(record.charge_id)
        return Declined(record.declined or "declined")

    async def restore(self) -> None:
        """End the outage: DOWN_TOKEN is charged like any other from now on."""
        await self.store.commit(Write(RESTORED_KEY, Attempt(), 0))

    async def refund(self, *, idempotency_key: str, charge_id: str, amount_cents: int) -> None:
        # Creating the record is the refund; a second call finds it and does nothing.
        await self.store.commit(
            Write(f"refund.{idempotency_key}", RefundRecord(charge_id, amount_cents), 0)
        )
