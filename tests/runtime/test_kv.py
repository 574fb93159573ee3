"""orderflow.runtime.kv on a real server: reads of one key and of many, compare-and-set."""

from __future__ import annotations

import msgspec
from nats.aio.client import Client
from nats.js.api import KeyValueConfig

from functions.state import Write
from orderflow.runtime import direct
from orderflow.runtime.kv import KvStore


class Value(msgspec.Struct):
    n: int


async def bucket(nc: Client) -> KvStore:
    await nc.jetstream().create_key_value(KeyValueConfig(bucket="test", direct=True))
    return KvStore(nc, "test")


async def test_get_many_reads_present_keys_and_leaves_out_absent_and_deleted(nc: Client) -> None:
    store = await bucket(nc)
    first = await store.commit(Write("a", Value(1), 0))
    second = await store.commit(Write("a", Value(2), first))
    await store.commit(Write("b", Value(3), 0))
    await store.commit(Write("gone", Value(4), 0))
    kv = await nc.jetstream().key_value("test")
    await kv.delete("gone")
    found = await store.get_many(["a", "b", "missing", "gone", "a"], Value)
    assert {k: (v.value.n, v.revision) for k, v in found.items()} == {
        "a": (2, second),
        "b": (3, second + 1),
    }
    assert await store.get_many(["missing"], Value) == {}
    assert await store.get_many([], Value) == {}


async def test_get_many_asks_in_chunks_the_server_accepts(nc: Client) -> None:
    store = await bucket(nc)
    keys = [f"k{i}" for i in range(direct.MULTI_LAST_MAX * 2 + 7)]
    for i, key in enumerate(keys):
        await store.commit(Write(key, Value(i), 0))
    found = await store.get_many(keys, Value)
    assert [found[k].value.n for k in keys] == list(range(len(keys)))


async def test_compare_and_set_refuses_a_stale_revision(nc: Client) -> None:
    store = await bucket(nc)
    revision = await store.commit(Write("a", Value(1), 0))
    assert await store.commit(Write("a", Value(2), 0)) == 0  # exists already
    assert await store.commit(Write("a", Value(2), revision + 5)) == 0
    assert await store.commit(Write("a", Value(2), revision)) > revision
    got = await store.get("a", Value)
    assert got is not None and got.value.n == 2
