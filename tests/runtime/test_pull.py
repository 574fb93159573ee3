"""orderflow.runtime.pull.Puller on a real server: messages handed over as they arrive, the
window kept, and every way a pull request ends (408, 503, 409, a restart, a stop) survived.

A spy (a second connection) sees what the puller asks for ($JS.API.CONSUMER.MSG.NEXT...)
and the statuses the server answers on the puller's inbox.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from orderflow import subjects
from orderflow.ops.server import EmbeddedServer
from orderflow.runtime import pull
from orderflow.runtime.connect import connect
from orderflow.runtime.pull import Puller
from tests.waiting import until, value_when

STREAM = "PULL"
DURABLE = "c"


async def make_stream(nc: Client) -> None:
    await nc.jetstream().add_stream(StreamConfig(name=STREAM, subjects=["p.>"]))


async def make_consumer(nc: Client, durable: str = DURABLE, ack_wait: float = 30.0) -> None:
    # A long ack_wait: any redelivery seen within a test came from a nak, not a timeout.
    config = ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT, ack_wait=ack_wait)
    await nc.jetstream().add_consumer(STREAM, config)


@dataclass
class Spy:
    """What pullers ask for, and what the server answers them with a status."""

    requests: list[tuple[float, int, str]] = field(default_factory=list)  # when, batch, inbox
    statuses: list[tuple[float, str, str]] = field(default_factory=list)  # when, status, inbox

    def count(self, status: str) -> int:
        return sum(1 for _, s, _ in self.statuses if s == status)


Spying = Callable[[], Awaitable[Spy]]


@pytest.fixture
async def spying(server: EmbeddedServer) -> AsyncIterator[Spying]:
    """Factory: a spy on its own connection. (A subscriber on the request subject is a
    responder: with one, the server no longer answers 503 for a missing consumer.)"""
    clients: list[Client] = []

    async def make() -> Spy:
        found = Spy()
        client = await connect(server.url, name="spy")
        clients.append(client)
        inboxes: set[str] = set()

        async def request(msg: Msg) -> None:
            inboxes.add(msg.reply)
            found.requests.append((time.monotonic(), json.loads(msg.data)["batch"], msg.reply))

        async def reply(msg: Msg) -> None:
            status = (msg.headers or {}).get("Status") if not msg.data else None
            if status is not None and msg.subject in inboxes:
                found.statuses.append((time.monotonic(), status, msg.subject))

        await client.subscribe(subjects.consumer_next(STREAM, ">"), cb=request)
        await client.subscribe("_INBOX.>", cb=reply)
        await client.flush()
        return found

    yield make
    for client in clients:
        await client.close()


@dataclass
class Hand:
    """The deliver callback: what was handed over, and when."""

    got: list[Msg] = field(default_factory=list)
    at: list[float] = field(default_factory=list)

    def __call__(self, msg: Msg) -> None:
        self.got.append(msg)
        self.at.append(time.monotonic())

    def seqs(self) -> list[int]:
        return [m.metadata.sequence.stream for m in self.got]


@dataclass
class Running:
    puller: Puller
    hand: Hand
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def finish(self) -> None:
        self.stop.set()
        while self.puller.in_hand:
            self.puller.done()
        await asyncio.wait_for(self.task, 5.0)


def start(nc: Client, window: int, durable: str = DURABLE) -> Running:
    hand = Hand()
    puller = Puller(nc, STREAM, durable, window, deliver=hand)
    stop = asyncio.Event()
    return Running(puller, hand, stop, asyncio.create_task(puller.run(stop)))


async def publish(nc: Client, n: int, subject: str = "p.x") -> list[int]:
    js = nc.jetstream()
    return [(await js.publish(subject, f"m{i}".encode())).seq for i in range(n)]


async def test_a_message_published_alone_is_handed_over_as_it_arrives(
    nc: Client, spying: Spying
) -> None:
    await make_stream(nc)
    spy = await spying()
    await make_consumer(nc)
    running = start(nc, window=4)
    await until(lambda: len(spy.requests) == 1, 2.0, "the first pull request")
    await value_when(
        lambda: nc.jetstream().consumer_info(STREAM, DURABLE),
        lambda info: info.num_waiting == 1,
        2.0,
        "the request open on the server",
    )
    sent = time.monotonic()
    [seq] = await publish(nc, 1)
    await until(lambda: len(running.hand.got) == 1, 2.0, "the message handed over")
    latency = running.hand.at[0] - sent
    assert running.hand.seqs() == [seq]
    # Well before the request expires: it did not wait for a batch to fill up.
    assert latency < pull.PULL_EXPIRES / 2, latency
    assert spy.requests[0][1] == 4 and spy.count("408") == 0
    await running.hand.got[0].ack()
    await running.finish()


async def test_at_most_the_window_is_in_hand_and_freeing_slots_asks_for_more(
    nc: Client, spying: Spying
) -> None:
    await make_stream(nc)
    spy = await spying()
    await make_consumer(nc)
    seqs = await publish(nc, 10)
    running = start(nc, window=3)
    hand = running.hand
    await until(lambda: len(hand.got) == 3, 2.0, "the first window")
    # An observation window longer than a request's life and its grace: nothing
    # freed, so nothing more is asked for, however often the loop looks.
    await asyncio.sleep(pull.PULL_EXPIRES + pull.PULL_GRACE + 0.2)
    info = await nc.jetstream().consumer_info(STREAM, DURABLE)
    assert len(hand.got) == 3 and running.puller.in_hand == 3
    assert [batch for _, batch, _ in spy.requests] == [3]
    assert (info.num_ack_pending, info.num_pending, info.num_waiting) == (3, 7, 0)

    # Two slots freed together (no await in between): two more asked for, and handed over.
    for msg in hand.got[:2]:
        await msg.ack()
    running.puller.done()
    running.puller.done()
    await until(lambda: len(hand.got) == 5, 2.0, "two more")
    assert [batch for _, batch, _ in spy.requests] == [3, 2]
    assert running.puller.in_hand == 3

    # Freed as they come: the rest drain, each once, in order.
    done = 2
    deadline = time.monotonic() + 5.0
    while len(hand.got) < 10 or done < 10:
        assert time.monotonic() < deadline, hand.seqs()
        while done < len(hand.got):
            await hand.got[done].ack()
            running.puller.done()
            done += 1
        await asyncio.sleep(0.02)
    assert hand.seqs() == seqs
    assert running.puller.in_hand == 0
    info = await value_when(
        lambda: nc.jetstream().consumer_info(STREAM, DURABLE),
        lambda i: i.num_ack_pending == 0,
        2.0,
        "every ack applied",
    )
    assert (info.num_pending, info.num_redelivered, info.ack_floor.stream_seq) == (0, 0, seqs[-1])
    await running.finish()


async def test_an_expired_request_is_asked_again_and_later_messages_arrive(
    nc: Client, spying: Spying
) -> None:
    await make_stream(nc)
    spy = await spying()
    await make_consumer(nc)
    running = start(nc, window=2)
    started = time.monotonic()
    await until(lambda: spy.count("408") >= 2 and len(spy.requests) >= 3, 5.0, "two expiries")
    took = time.monotonic() - started
    # One request per PULL_EXPIRES while idle, each asked again on its 408: not a spin.
    assert took >= 2 * pull.PULL_EXPIRES - 0.1, took
    assert len(spy.requests) == spy.count("408") + 1, (spy.requests, spy.statuses)
    assert all(batch == 2 for _, batch, _ in spy.requests)
    assert {inbox for _, _, inbox in spy.statuses} == {spy.requests[0][2]}

    sent = time.monotonic()
    [seq] = await publish(nc, 1)
    await until(lambda: len(running.hand.got) == 1, 2.0, "a message after the expiries")
    assert running.hand.seqs() == [seq]
    assert running.hand.at[0] - sent < pull.PULL_EXPIRES / 2
    await running.hand.got[0].ack()
    await running.finish()


def refusals(caplog: pytest.LogCaptureFixture) -> list[tuple[float, str]]:
    """The statuses the puller was refused with, as it logged them: (when, message).
    A 503 goes to the requesting connection only, so a spy cannot see it."""
    return [
        (r.created, r.getMessage())
        for r in caplog.records
        if r.name == "orderflow.runtime.pull" and r.getMessage().startswith("pulling from")
    ]


async def test_a_consumer_that_does_not_exist_yet_is_backed_off_then_picked_up(
    nc: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "orderflow.runtime.pull")
    await make_stream(nc)
    running = start(nc, window=2)
    await until(lambda: len(refusals(caplog)) >= 2, 2 * pull.REFUSED_BACKOFF + 1, "2 refusals")
    (first, said), (second, said_again) = refusals(caplog)[:2]
    assert said.startswith(f"pulling from {DURABLE}: 503"), said
    assert said_again.startswith(f"pulling from {DURABLE}: 503"), said_again
    # Each refusal is immediate, so the gap is the puller's: one backoff.
    assert pull.REFUSED_BACKOFF - 0.05 <= second - first <= pull.REFUSED_BACKOFF + 0.5

    await make_consumer(nc)
    created = time.monotonic()
    [seq] = await publish(nc, 1)
    await until(lambda: len(running.hand.got) == 1, pull.REFUSED_BACKOFF + 2.0, "picked up")
    assert running.hand.seqs() == [seq]
    # Within one backoff (and a request's round trip) of the consumer appearing.
    assert running.hand.at[0] - created <= pull.REFUSED_BACKOFF + 0.5
    await running.hand.got[0].ack()
    await running.finish()


async def test_a_deleted_consumer_ends_the_request_and_is_picked_up_once_created_again(
    nc: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "orderflow.runtime.pull")
    await make_stream(nc)
    await make_consumer(nc)
    running = start(nc, window=2)
    await value_when(
        lambda: nc.jetstream().consumer_info(STREAM, DURABLE),
        lambda info: info.num_waiting == 1,
        2.0,
        "the request open on the server",
    )
    await nc.jetstream().delete_consumer(STREAM, DURABLE)
    await until(lambda: len(refusals(caplog)) >= 2, pull.REFUSED_BACKOFF + 2.0, "409, then 503")
    (ended, first), (refused, second) = refusals(caplog)[:2]
    assert "409 Consumer Deleted" in first and ": 503" in second
    assert refused - ended >= pull.REFUSED_BACKOFF - 0.05  # backed off after the 409 too
    await make_consumer(nc)
    [seq] = await publish(nc, 1)
    await until(lambda: len(running.hand.got) == 1, pull.REFUSED_BACKOFF + 2.0, "picked up")
    assert running.hand.seqs() == [seq]
    await running.hand.got[0].ack()
    await running.finish()


async def open_request(nc: Client, timeout: float) -> None:
    """Until the server holds a request of the consumer; asked in short requests, since
    the first ones after a restart may go into the dead connection."""

    async def waiting() -> bool:
        try:
            info = await nc.jetstream().consumer_info(STREAM, DURABLE, timeout=0.5)
        except (TimeoutError, nats.errors.Error):
            return False
        return bool(info.num_waiting >= 1)

    await until(waiting, timeout, "a request open on the server")


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_a_server_restart_ends_the_requests_and_they_are_asked_again(
    server: EmbeddedServer, nc: Client, spying: Spying, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """stop: the server ends every open request (409 Server Shutdown) on its way out;
    kill: no answer ever comes, and the request is forgotten PULL_GRACE after it expired."""
    caplog.set_level(logging.WARNING, "orderflow.runtime.pull")
    await make_stream(nc)
    spy = await spying()
    await make_consumer(nc)
    running = start(nc, window=2)
    await open_request(nc, 2.0)
    asked = len(spy.requests)
    reconnects = nc.stats["reconnects"]

    if how == "stop":
        server.stop()
    else:
        server.kill()
    gone = time.monotonic()
    server.start()  # same port, same store: the stream and the consumer are still there
    await until(lambda: nc.stats["reconnects"] > reconnects, 10.0, "reconnected")
    await open_request(nc, pull.PULL_EXPIRES + pull.PULL_GRACE + pull.REFUSED_BACKOFF + 2.0)
    asked_again = time.monotonic() - gone
    # ...and the spy, reconnected too, saw the new request.
    await until(lambda: len(spy.requests) > asked, 2.0, "the spy seeing the new request")
    said = [message for _, message in refusals(caplog)]
    if how == "stop":
        assert said == [f"pulling from {DURABLE}: 409 Server Shutdown"], said
        assert asked_again <= pull.REFUSED_BACKOFF + 1.5, asked_again
    else:
        assert said == [], said
        assert asked_again <= pull.PULL_EXPIRES + pull.PULL_GRACE + 1.5, asked_again

    [seq] = await publish(nc, 1)
    await until(lambda: len(running.hand.got) == 1, 2.0, "a message after the restart")
    assert running.hand.seqs() == [seq]
    await running.hand.got[0].ack()
    await running.finish()


async def test_after_stop_a_message_goes_to_the_next_puller_while_one_is_still_in_hand(
    nc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopping, the puller stops listening on its inbox at once, though it still sees
    through what it holds: the server drops its open request (no interest) instead of
    serving it, so a message published meanwhile is never handed to it, and reaches the
    next puller at once as its first delivery: no delivery is spent, none bounces."""
    # Requests that stay open long enough that the one asked before the stop is
    # still there when the message comes.
    monkeypatch.setattr(pull, "PULL_EXPIRES", 10.0)
    await make_stream(nc)
    await make_consumer(nc, ack_wait=30.0)
    naks: list[Msg] = []

    async def naked(msg: Msg) -> None:
        naks.append(msg)

    await nc.subscribe(f"$JS.EVENT.ADVISORY.CONSUMER.MSG_NAKED.{STREAM}.{DURABLE}", cb=naked)
    first = start(nc, window=16)
    await value_when(
        lambda: nc.jetstream().consumer_info(STREAM, DURABLE),
        lambda info: info.num_waiting == 1,
        2.0,
        "the request open on the server",
    )
    [held] = await publish(nc, 1)
    await until(lambda: len(first.hand.got) == 1, 2.0, "one message in hand")
    first.stop.set()  # one in hand: its request (15 slots free) is still open on the server
    # Once it has stopped listening (a message already on its way before that is
    # handed over and seen through, as any other it holds).
    await until(lambda: not first.puller.listening, 2.0, "the puller stopped listening")
    [late] = await publish(nc, 1)
    published = time.monotonic()

    second = start(nc, window=2)
    await until(lambda: len(second.hand.got) == 1, 3.0, "delivered to the next puller")
    msg = second.hand.got[0]
    assert (msg.metadata.sequence.stream, msg.metadata.num_delivered) == (late, 1)
    assert second.hand.at[0] - published < 2.0
    assert first.hand.seqs() == [held]  # never handed to the stopping puller
    assert naks == []

    # The first one still sees its message through, then ends.
    assert not first.task.done()
    await first.hand.got[0].ack()
    first.puller.done()
    await asyncio.wait_for(first.task, 5.0)
    await msg.ack()
    await second.finish()


async def test_after_stop_with_nothing_in_hand_its_open_request_takes_nothing_more(
    nc: Client,
) -> None:
    """The puller ends at once and unsubscribes; the request it left open on the server
    (for up to PULL_EXPIRES) is dropped by the server for want of interest, so a message
    published meanwhile goes to the next puller at once, not to a dead inbox until
    ack_wait. (No spy here: its wildcard on every inbox would be that interest.)"""
    await make_stream(nc)
    await make_consumer(nc, ack_wait=30.0)
    first = start(nc, window=2)
    await value_when(
        lambda: nc.jetstream().consumer_info(STREAM, DURABLE),
        lambda info: info.num_waiting == 1,
        2.0,
        "the request open on the server",
    )
    first.stop.set()
    await asyncio.wait_for(first.task, 5.0)  # nothing in hand: it ends at once
    [late] = await publish(nc, 1)
    published = time.monotonic()
    second = start(nc, window=2)
    await until(lambda: len(second.hand.got) == 1, 5.0, "delivered to the next puller")
    msg = second.hand.got[0]
    assert (msg.metadata.sequence.stream, msg.metadata.num_delivered) == (late, 1)
    assert second.hand.at[0] - published < 1.0
    assert first.hand.got == []
    await msg.ack()
    await second.finish()


async def test_after_stop_a_message_handed_back_is_not_bounced_into_the_stopping_request(
    nc: Client,
) -> None:
    await make_stream(nc)
    config = ConsumerConfig(
        durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT, ack_wait=30.0, max_deliver=9
    )
    await nc.jetstream().add_consumer(STREAM, config)
    naks: list[int] = []

    async def naked(msg: Msg) -> None:
        naks.append(json.loads(msg.data)["deliveries"])

    await nc.subscribe(f"$JS.EVENT.ADVISORY.CONSUMER.MSG_NAKED.{STREAM}.{DURABLE}", cb=naked)
    first = start(nc, window=16)
    await value_when(
        lambda: nc.jetstream().consumer_info(STREAM, DURABLE),
        lambda info: info.num_waiting == 1,
        2.0,
        "the request open on the server",
    )
    await publish(nc, 1)
    await until(lambda: len(first.hand.got) == 1, 2.0, "one message in hand")
    first.stop.set()  # one in hand: its request (15 slots free) stays open meanwhile
    await until(lambda: not first.puller.listening, 2.0, "the puller stopped listening")
    [late] = await publish(nc, 1)
    await asyncio.sleep(0.5)  # where a nak would have bounced it round the request
    await first.hand.got[0].ack()
    first.puller.done()
    await asyncio.wait_for(first.task, 5.0)

    second = start(nc, window=2)
    try:
        await until(lambda: len(second.hand.got) == 1, 3.0, "redelivered to the next puller")
        msg = second.hand.got[0]
        # Its first delivery: never handed to the stopping puller, never bounced (a
        # nak into its own open request once spent all 9 deliveries in milliseconds
        # and the server dropped the message).
        assert (msg.metadata.sequence.stream, msg.metadata.num_delivered) == (late, 1)
        assert naks == []
        await msg.ack()
    finally:
        await second.finish()
