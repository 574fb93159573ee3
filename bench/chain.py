"""The reference: one message forwarded along a 4-hop chain, on plain nats-py and JetStream.

No orderflow, no shared design: what a competent nats-py user writes for "a
message passes through three services, one of which joins on a KV key".

    driver --> chain.in.<n> --> [a] --> chain.a.<n> --> [b: KV get + put] --> chain.b.<n>
           --> [c] --> chain.out.<n> --> driver

Four hops, each a JetStream publish waiting for its stream ack (the driver's
and each stage's), stored in one file-backed stream (``CHAIN``); three stage
processes, each with a durable pull consumer (explicit acks) on its subject,
fetching batches and handling a batch's messages concurrently (publish the
next hop, wait for its ack, then ack the input). Stage ``b`` joins on the
message's key in a file-backed KV bucket: a get (nothing there yet) and a put.
The driver keeps ``--in-flight`` messages in the chain (a new one goes in as
one comes out) and counts what comes out of it.

Run by ``python -m bench.run`` (``--runs chain``), on its own fresh server;
by hand, against a running server:

    python bench/chain.py stage a nats://127.0.0.1:4222 &   # and b, c
    python bench/chain.py drive nats://127.0.0.1:4222 --messages 20000

Each stage and the driver first create the stream, the bucket and the
consumers if they are not there (``setup``); ``drive`` prints one JSON line:
messages through per second and latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    KeyValueConfig,
    StorageType,
    StreamConfig,
)

STREAM = "CHAIN"
BUCKET = "chain"
#: stage -> (the subject prefix it consumes, the prefix it publishes on)
STAGES: dict[str, tuple[str, str]] = {
    "a": ("chain.in", "chain.a"),
    "b": ("chain.a", "chain.b"),
    "c": ("chain.b", "chain.out"),
}
JOIN_STAGE = "b"
FIRST, LAST = "chain.in", "chain.out"

#: A payload the size of an order (~220 bytes of JSON).
PAYLOAD_PAD = "x" * 160

#: Per stage: concurrent fetch loops (each its own pull subscription on the
#: durable) and the batch each asks for.
WORKERS = 2
BATCH = 64


async def setup(js: JetStreamContext) -> None:
    """The stream, the KV bucket and one durable consumer per stage (idempotent)."""
    await js.add_stream(StreamConfig(name=STREAM, subjects=["chain.>"], storage=StorageType.FILE))
    await js.create_key_value(
        KeyValueConfig(bucket=BUCKET, history=1, storage=StorageType.FILE, direct=True)
    )
    for name, (source, _) in STAGES.items():
        await js.add_consumer(
            STREAM,
            ConsumerConfig(
                durable_name=name,
                filter_subject=f"{source}.*",
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=30.0,
                max_ack_pending=4096,
            ),
        )


# --- a stage -----------------------------------------------------------------------


async def stage(name: str, url: str, workers: int, batch: int) -> None:
    source, target = STAGES[name]
    nc = await nats.connect(url, name=f"chain-{name}")
    js = nc.jetstream()
    await setup(js)
    kv = await js.key_value(BUCKET) if name == JOIN_STAGE else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    async def handle(msg: Msg) -> None:
        key = msg.subject.rsplit(".", 1)[1]
        if kv is not None:
            with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                await kv.get(key)
            await kv.put(key, msg.data)
        await js.publish(f"{target}.{key}", msg.data)
        await msg.ack()

    async def work() -> None:
        sub = await js.pull_subscribe(f"{source}.*", durable=name, stream=STREAM)
        while not stop.is_set():
            try:
                msgs = await sub.fetch(batch=batch, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            await asyncio.gather(*(handle(m) for m in msgs))

    tasks = [asyncio.create_task(work()) for _ in range(workers)]
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await nc.close()


# --- the driver --------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def drive(
    nc: Client,
    messages: int,
    in_flight: int,
    timeout: float,
    prefix: str = "m",
    on_start: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, float]:
    """Send ``messages`` through the chain, ``in_flight`` at a time; what came out and when."""
    js = nc.jetstream()
    window = asyncio.Semaphore(in_flight)
    sent: dict[str, float] = {}
    took: list[float] = []
    finished = asyncio.Event()

    async def arrived(msg: Msg) -> None:
        key = msg.subject.rsplit(".", 1)[1]
        if key in sent:
            took.append(time.monotonic() - sent.pop(key))
            window.release()
            if len(took) == messages:
                finished.set()

    sub = await nc.subscribe(f"{LAST}.*", cb=arrived)
    publishes: set[asyncio.Task[object]] = set()
    try:
        if on_start is not None:
            await on_start()
        start = time.monotonic()
        for i in range(messages):
            await window.acquire()
            key = f"{prefix}{i:07d}"
            body = json.dumps({"id": key, "n": i, "pad": PAYLOAD_PAD}).encode()
            sent[key] = time.monotonic()
            task = asyncio.create_task(js.publish(f"{FIRST}.{key}", body))
            publishes.add(task)
            task.add_done_callback(publishes.discard)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(finished.wait(), timeout)
        end = time.monotonic()
        await asyncio.gather(*publishes)
    finally:
        await sub.unsubscribe()
    elapsed = end - start
    return {
        "messages": messages,
        "through": len(took),
        "elapsed_s": round(elapsed, 3),
        "msgs_per_s": round(len(took) / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": round(percentile(took, 50) * 1000, 1),
        "p99_ms": round(percentile(took, 99) * 1000, 1),
    }


async def drive_main(url: str, messages: int, in_flight: int, timeout: float) -> None:
    nc = await nats.connect(url, name="chain-driver")
    try:
        await setup(nc.jetstream())
        print(json.dumps(await drive(nc, messages, in_flight, timeout)))
    finally:
        await nc.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/chain.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    st = sub.add_parser("stage", help="run one stage (a, b or c) until SIGTERM")
    st.add_argument("name", choices=sorted(STAGES))
    st.add_argument("url")
    st.add_argument("--workers", type=int, default=WORKERS)
    st.add_argument("--batch", type=int, default=BATCH)
    dr = sub.add_parser("drive", help="send messages through the chain, print one JSON line")
    dr.add_argument("url")
    dr.add_argument("--messages", type=int, default=10_000)
    dr.add_argument("--in-flight", type=int, default=512)
    dr.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    if args.command == "stage":
        asyncio.run(stage(args.name, args.url, args.workers, args.batch))
    else:
        asyncio.run(drive_main(args.url, args.messages, args.in_flight, args.timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
