"""A 3-node cluster on loopback: replicas from streams.yaml, and losing a stream leader mid-flow.

The main test runs the real flow (every function its own OS process) against
three nats-servers with every stream and bucket at R3, SIGKILLs the server
that leads ``ORDERS`` while a few hundred orders are being published, and
brings it back on its store. A hard kill leaves the stream without acks for
several seconds (the survivors must notice the loss, then elect): publishes
fail or time out meanwhile, and are retried. Afterwards every order has
exactly one terminal event, nothing was charged, reserved or delivered twice,
stock is conserved, nothing was dead-lettered, no function process died, and
the three copies of every stream agree.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from orderflow.config import ConfigError, Topology
from orderflow.config import load as load_config
from orderflow.ops.cluster import EmbeddedCluster, Node, stream_leader
from orderflow.ops.provision import provision
from orderflow.runtime.connect import connect
from orderflow.runtime.kv import stream_name
from orderflow.tools import status
from orderflow.tools.demo import make_orders
from tests.flowkit import BaseFlow, assert_every_effect_once, publish_carefully

ROOT = Path(__file__).resolve().parents[2]

ORDERS = 300
PUBLISH_OVER = 6.0  # seconds
KILL_AT = 2.0  # seconds into publishing


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EmbeddedCluster]:
    servers = EmbeddedCluster(tmp_path / "cluster", size=3)
    servers.start()
    yield servers
    servers.stop()


@pytest.fixture
async def cluster_nc(cluster: EmbeddedCluster) -> AsyncIterator[Client]:
    client = await connect(cluster.url, name="tests")
    yield client
    await client.close()


def _names(topology: Topology) -> list[str]:
    return [s.name for s in topology.streams] + [stream_name(b.name) for b in topology.buckets]


async def test_a_ready_cluster_carries_messages_between_every_two_nodes(
    cluster: EmbeddedCluster,
) -> None:
    # Right after start, two nodes may still lack the route pool between them
    # (about 1 start in 10 here, until their routes are retried a second or
    # two later): the meta group, on the system account's own route, is happy,
    # while every message between clients of those two is dropped.
    clients = {n.name: await connect(n.url, name=f"tests-{n.name}") for n in cluster.nodes}
    try:
        for (sub_on, a), (pub_on, b) in itertools.permutations(clients.items(), 2):
            subject = f"probe.{sub_on}.{pub_on}"
            sub = await a.subscribe(subject)
            await a.flush()
            # Interest crosses the route a moment after the flush.
            await asyncio.sleep(0.05)
            await b.publish(subject, b"x")
            await b.flush()
            try:
                await sub.next_msg(timeout=2)
            except TimeoutError:
                pytest.fail(f"a message published on {pub_on} never reached {sub_on}")
            await sub.unsubscribe()
    finally:
        for client in clients.values():
            await client.close()


async def test_replicas_come_from_streams_yaml(
    cluster: EmbeddedCluster,
    cluster_nc: Client,
    topology: Topology,
    variant_config: Callable[..., Path],
) -> None:
    js = cluster_nc.jetstream()
    # Unset in streams.yaml: created with the default (what `up --cluster 3` passes).
    await provision(cluster_nc, topology, ROOT, default_replicas=3)
    for name in _names(topology):
        info = await js.stream_info(name)
        assert info.config.num_replicas == 3, name
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2, name
    for durable in ("payment", "stock", "delivery", "order"):
        consumer = await js.consumer_info("ORDERS", durable)
        assert consumer.cluster is not None and len(consumer.cluster.replicas or []) == 2
    shown = (await status.collect(cluster_nc, topology))["streams"]["ORDERS"]
    assert shown["replicas"] == 3 and shown["leader"] in {n.name for n in cluster.nodes}

    # ... and then left alone: provisioning with another default changes nothing.
    report = await provision(cluster_nc, topology, ROOT)
    assert [line for line in report.lines if "unchanged" not in line] == [
        "inventory: 0 SKUs seeded, 9 already had a level (from inventory.yaml)"
    ]

    # Set: reconciled, both ways, and reported as drift.
    cfg = variant_config(
        ("  - name: RETRIES\n", "  - name: RETRIES\n    replicas: 1\n"),
        ("  - name: sagas       # saga.<ID>", "  - name: sagas\n    replicas: 1\n    #"),
    )
    report = await provision(cluster_nc, load_config(cfg), cfg.parent)
    changed = [line for line in report.lines if "updated" in line]
    assert changed == [
        "stream RETRIES: updated (num_replicas: 3 -> 1)",
        "stream KV_sagas: updated (num_replicas: 3 -> 1)",
    ]
    assert (await js.stream_info("KV_sagas")).config.num_replicas == 1
    cfg = variant_config(("  - name: RETRIES\n", "  - name: RETRIES\n    replicas: 3\n"))
    report = await provision(cluster_nc, load_config(cfg), cfg.parent)
    assert "stream RETRIES: updated (num_replicas: 1 -> 3)" in report.lines

    # More than there are servers: the key that asked for it.
    cfg = variant_config(("  - name: ORDERS\n", "  - name: ORDERS\n    replicas: 5\n"))
    with pytest.raises(ConfigError, match=r"^streams\[0\]\.replicas: .*5 replicas of ORDERS"):
        await provision(cluster_nc, load_config(cfg), cfg.parent)


def _has_route(node: Node, to: Node) -> bool:
    """Whether ``node``'s ``/routez`` lists a route to ``to``."""
    url = f"http://127.0.0.1:{node.http_port}/routez"
    with urllib.request.urlopen(url, timeout=1.0) as response:
        routes = json.load(response).get("routes") or []
    return any(r.get("remote_name") == to.name for r in routes)


def _until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} after {timeout}s"
        time.sleep(0.002)


def _rejoin_stopped(cluster: EmbeddedCluster, victim: Node, leader: Node) -> None:
    """SIGKILL ``victim``, start it again and SIGSTOP it as soon as ``leader`` has its route
    back. A route that (re)connects leaves the meta leader without the peer's statistics
    until the peer's next STATSZ, 0.25 s after its start: stopped before then, the peer
    stays offline to placement (10005) while it is stopped. A cluster forming, held still."""
    cluster.kill(victim)
    _until(lambda: not _has_route(leader, victim), f"{leader.name} still routes to {victim.name}")
    cluster.restart(victim, wait=False)
    assert victim.process is not None
    _until(lambda: _has_route(leader, victim), f"no route from {leader.name} to {victim.name}")
    os.kill(victim.process.pid, signal.SIGSTOP)


def _resume(node: Node) -> None:
    if node.process is not None and node.running:
        os.kill(node.process.pid, signal.SIGCONT)


async def _catch_offline(
    cluster: EmbeddedCluster, js: JetStreamContext, victim: Node, leader: Node
) -> None:
    """:func:`_rejoin_stopped`, checked: the leader refuses an R3 stream as the issue saw.
    Tried again if the peer's first STATSZ slipped out before the SIGSTOP."""
    probe = StreamConfig(name="PROBE", subjects=["probe.>"], num_replicas=3)
    for _ in range(3):
        await asyncio.to_thread(_rejoin_stopped, cluster, victim, leader)
        try:
            await js.add_stream(probe)
        except nats.js.errors.APIError as exc:
            assert (exc.err_code, exc.description) == (
                10005,
                "no suitable peers for placement, peer offline",
            )
            return
        await js.delete_stream("PROBE")
        _resume(victim)
    pytest.fail(f"{victim.name} was never caught offline to placement: test the test")


async def test_provisioning_waits_for_a_forming_cluster(
    cluster: EmbeddedCluster, cluster_nc: Client, topology: Topology
) -> None:
    js = cluster_nc.jetstream()
    leader = cluster.node(cluster.nodes[0].meta()["leader"])
    assert cluster_nc.connected_url is not None
    # Neither the leader nor the node the client talks through: both must answer.
    victim = next(
        n for n in cluster.nodes if n is not leader and n.port != cluster_nc.connected_url.port
    )
    try:
        # It comes late: provisioning waits for it, then places every replica.
        await _catch_offline(cluster, js, victim, leader)
        provisioning = asyncio.create_task(
            provision(cluster_nc, topology, ROOT, default_replicas=3)
        )
        await asyncio.wait([provisioning], timeout=1.0)
        assert not provisioning.done(), provisioning.exception()
        _resume(victim)
        await asyncio.wait_for(provisioning, 30)
        for name in _names(topology):
            info = await js.stream_info(name)
            assert info.config.num_replicas == 3, name

        # It never comes: a clear error once the bound has passed, not before.
        await js.delete_stream("ORDERS")
        await _catch_offline(cluster, js, victim, leader)
        with pytest.raises(TimeoutError, match=rf"^cluster not ready after 1.0s: {victim.name}: "):
            await asyncio.to_thread(cluster.wait_ready, 1.0)
        started = time.monotonic()
        with pytest.raises(
            ConfigError,
            match=r"^the default replica count: the server cannot place 3 replicas of ORDERS "
            r"\(no suitable peers for placement, peer offline\): the cluster never formed, "
            r"a server was still offline to the meta leader after 2s",
        ):
            await provision(cluster_nc, topology, ROOT, default_replicas=3, placement_timeout=2)
        assert 2.0 <= time.monotonic() - started < 5.0
    finally:
        _resume(victim)


async def test_replicas_on_a_single_server_name_the_key(
    nc: Client, variant_config: Callable[..., Path]
) -> None:
    gateway = "  - name: gateway     # the simulated"
    cfg = variant_config((gateway, "  - name: gateway\n    replicas: 3\n    # the simulated"))
    with pytest.raises(ConfigError, match=r"^buckets\[1\]\.replicas: .*non-clustered"):
        await provision(nc, load_config(cfg), cfg.parent)


def _runner(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "runner.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_up_cluster_refuses_what_it_cannot_do(variant_config: Callable[..., Path]) -> None:
    cfg = variant_config(("  - name: ORDERS\n", "  - name: ORDERS\n    replicas: 5\n"))
    without_url = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "runner.py"), "--config", str(cfg), "up", "--cluster", "3"],
        capture_output=True, text=True, cwd=ROOT, env=without_url, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "streams[0].replicas: ORDERS asks for 5 replicas" in done.stderr
    assert "the embedded cluster has 3 servers" in done.stderr

    done = _runner("up", "--cluster", "3", env={"NATS_URL": "nats://127.0.0.1:1"})
    assert done.returncode == 2 and "NATS_URL is set" in done.stderr


def test_demo_on_a_cluster(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "runner.py"), "demo", "--cluster", "3", "--orders", "30",
         "--json", "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["completed"] + summary["cancelled"] == 30 and summary["unfinished"] == 0
    assert "embedded 3-node cluster" in done.stderr
    assert not (tmp_path / "data" / "nats.url").exists()  # gone with the cluster


_RETRIED = re.compile(r"orderflow\.worker: (\w+): .* failed \(attempt \d+\), retrying .*?: (\w+)")


def _tails(logs: Path, lines: int = 40) -> str:
    """The end of every function's log, for a failure message."""
    return "\n".join(
        f"--- {path.name}\n" + "\n".join(path.read_text().splitlines()[-lines:])
        for path in sorted(logs.glob("*.log"))
    )


def _wait_until_copies_agree(cluster: EmbeddedCluster, streams: list[str]) -> None:
    """Until every node holds every stream up to the same last sequence (replication
    trails the leader's ack by a moment)."""
    deadline = time.monotonic() + 10.0
    for name in streams:
        while True:
            lasts = {n.name: (n.stream_state(name) or {}).get("last_seq") for n in cluster.nodes}
            if len(set(lasts.values())) == 1:
                break
            assert time.monotonic() < deadline, (name, lasts)
            time.sleep(0.1)


async def _watch_election(nc: Client, killed: str, since: float) -> float:
    """Seconds from ``since`` until ORDERS answers with a leader other than ``killed``."""
    while True:
        try:
            leader = await stream_leader(nc, "ORDERS", timeout=0.5)
        except Exception:
            leader = None
        if leader and leader != killed:
            return time.monotonic() - since
        await asyncio.sleep(0.05)


async def test_stream_leader_killed_mid_flow(
    cluster: EmbeddedCluster, cluster_nc: Client, topology: Topology, tmp_path: Path
) -> None:
    started = time.monotonic()
    await provision(cluster_nc, topology, ROOT, default_replicas=3)
    logs = tmp_path / "logs"
    flow = BaseFlow(cluster.url, cluster_nc, topology, ROOT / "streams.yaml", {}, {}, logs)
    flow.start()
    try:
        orders = [o for _, o in make_orders(ORDERS, run_id="cluster", seed=2027)]
        ids = [o.order_id for o in orders]
        publisher = asyncio.create_task(publish_carefully(flow, orders, PUBLISH_OVER))
        await asyncio.sleep(KILL_AT)
        pids = sorted(flow.supervisor.pids())

        leader = await stream_leader(cluster_nc, "ORDERS")
        assert leader is not None
        victim = cluster.node(leader)
        cluster.kill(victim)
        killed_at = time.monotonic()
        election = asyncio.create_task(_watch_election(cluster_nc, victim.name, killed_at))

        # Every command connects through any node: the dead one first in the list.
        others = [n.url for n in cluster.nodes if n is not victim]
        probe = await connect(",".join([victim.url, *others]), name="probe")
        assert probe.connected_url is not None and probe.connected_url.port != victim.port
        await probe.close()

        # Down until the other two have elected a new leader, then back on its
        # store: it has missed writes and must catch up before it counts again.
        elected_after = await asyncio.wait_for(election, 30)
        await asyncio.to_thread(cluster.restart, victim)
        back_at = time.monotonic()
        acks = await publisher
        gaps = [b - a for a, b in itertools.pairwise(acks) if b > killed_at]
        assert max(gaps) > 1.0, "the kill did not interrupt publishing: test the test"

        seen = await flow.wait_finished(ids, timeout=60)
        await flow.wait_quiet(timeout=30)
        await assert_every_effect_once(flow, ids, seen)
        assert await flow.dead_letters() == []
        # Requests that found no leader were asked again (orderflow.runtime.election)
        # or handed back to be retried: no function process died meanwhile.
        assert sorted(flow.supervisor.pids()) == pids, _tails(logs)
        finished_at = time.monotonic()
    finally:
        await flow.stop()

    # The three copies of every stream agree, the one that was killed included.
    await asyncio.to_thread(_wait_until_copies_agree, cluster, _names(topology))

    lines = [line for path in logs.glob("*.log") for line in path.read_text().splitlines()]
    fetch_errors = Counter(line.rsplit(": ", 1)[-1] for line in lines if "fetch from" in line)
    retries = Counter(
        f"{m[1]}: {m[2]}" for line in lines if (m := _RETRIED.search(line)) is not None
    )
    print(
        f"\nkilled {victim.name} (ORDERS leader) at {killed_at - started:.1f}s; "
        f"a new leader answering after {elected_after:.1f}s; longest wait for a publish ack "
        f"{max(gaps):.1f}s; node back and caught up {back_at - killed_at:.1f}s after the kill; "
        f"all {ORDERS} orders finished and settled {finished_at - started:.1f}s after start; "
        f"attempts retried: {dict(retries) or 'none'}; "
        f"failed fetches: {dict(fetch_errors) or 'none'}"
    )
