"""orderflow.runtime.election on a real server: a publish's answer decoded, never raised;
no responders asked again until the timeout, and only then raised."""

from __future__ import annotations

import asyncio
import time

import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import StreamConfig

from orderflow.runtime import election
from orderflow.runtime.election import Ack

STREAM = "ELECTION"


async def stream(nc: Client) -> None:
    await nc.jetstream().add_stream(
        StreamConfig(name=STREAM, subjects=["e.>"], duplicate_window=60.0)
    )


async def test_store_returns_the_sequence_it_was_stored_at(nc: Client) -> None:
    await stream(nc)
    first = await election.store(nc, "e.a", b"one")
    second = await election.store(nc, "e.b", b"two", headers={"X-Any": "1"})
    assert first == Ack(seq=1, duplicate=False, error=None)
    assert second == Ack(seq=2, duplicate=False, error=None)
    stored = await nc.jetstream().get_msg(STREAM, 2)
    assert (stored.subject, stored.data) == ("e.b", b"two")


async def test_a_guarded_publish_on_a_subject_with_a_message_is_an_error_not_a_raise(
    nc: Client,
) -> None:
    await stream(nc)
    guard = {"Nats-Expected-Last-Subject-Sequence": "0"}
    # The guard holds on an empty subject...
    assert (await election.store(nc, "e.a", b"first", headers=guard)).seq == 1
    await election.store(nc, "e.other", b"elsewhere")
    # ...and refuses a second message on it, as an answer.
    refused = await election.store(nc, "e.a", b"second", headers=guard)
    assert refused.error is not None, refused
    assert refused.error.err_code == election.WRONG_LAST_SEQUENCE == 10071
    assert "wrong last sequence" in refused.error.description
    assert refused.seq == 0 and not refused.duplicate
    info = await nc.jetstream().stream_info(STREAM)
    assert info.state.messages == 2  # nothing stored for the refused one


async def test_a_repeated_message_id_is_acked_as_a_duplicate_of_the_first(nc: Client) -> None:
    await stream(nc)
    first = await election.store(nc, "e.a", b"x", headers={"Nats-Msg-Id": "m-1"})
    await election.store(nc, "e.a", b"y", headers={"Nats-Msg-Id": "m-2"})
    again = await election.store(nc, "e.a", b"x", headers={"Nats-Msg-Id": "m-1"})
    assert first == Ack(seq=1)
    assert again == Ack(seq=1, duplicate=True, error=None)
    info = await nc.jetstream().stream_info(STREAM)
    assert info.state.messages == 2


async def test_no_responders_is_asked_again_and_raised_only_at_the_timeout(nc: Client) -> None:
    timeout = 1.0
    sent = nc.stats["out_msgs"]
    start = time.monotonic()
    with pytest.raises(nats.errors.NoRespondersError):
        await election.request(nc, "nobody.listens", b"hello?", timeout)
    took = time.monotonic() - start
    asked = nc.stats["out_msgs"] - sent
    # It gives up when less than one POLL is left, not at the first refusal.
    assert timeout - election.POLL - 0.05 <= took <= timeout + 1.0, took
    # One attempt per POLL: 1.0 s / 0.25 s is 4 (3 at the very least on a slow machine).
    assert 3 <= asked <= timeout / election.POLL + 1, asked


async def test_a_responder_that_appears_before_the_timeout_answers(nc: Client) -> None:
    async def answer(msg: Msg) -> None:
        await msg.respond(b"pong:" + msg.data)

    async def late_responder() -> None:
        await asyncio.sleep(0.6)  # the delay before someone listens, not a check
        await nc.subscribe("late.service", cb=answer)
        await nc.flush()

    started = time.monotonic()
    appearing = asyncio.create_task(late_responder())
    reply = await election.request(nc, "late.service", b"ping", timeout=5.0)
    took = time.monotonic() - started
    await appearing
    assert reply.data == b"pong:ping"
    # Answered by the late one, soon after it appeared (within a POLL or so).
    assert 0.6 <= took <= 0.6 + election.POLL + 0.75, took


async def test_store_waits_for_a_stream_that_appears_before_the_timeout(nc: Client) -> None:
    async def create_later() -> None:
        await asyncio.sleep(0.5)  # the delay before a stream answers, not a check
        await stream(nc)

    creating = asyncio.create_task(create_later())
    ack = await election.store(nc, "e.late", b"x", timeout=5.0)
    await creating
    assert ack == Ack(seq=1)


async def test_store_on_a_subject_no_stream_stores_raises_no_responders_at_its_timeout(
    nc: Client,
) -> None:
    start = time.monotonic()
    with pytest.raises(nats.errors.NoRespondersError):
        await election.store(nc, "nowhere.stored", b"x", timeout=0.8)
    took = time.monotonic() - start
    assert 0.8 - election.POLL - 0.05 <= took <= 0.8 + 1.0, took
