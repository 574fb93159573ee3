"""An embedded NATS cluster on loopback: N nats-servers with clustered JetStream, for development.

``up --cluster 3`` and the cluster test use it. Each node is a ``nats-server``
from the wheel with a small generated config file: a unique ``server_name``
(JetStream clustering needs one), a client port, a cluster (route) port, a
monitoring port, routes to every node, and its own store dir::

    <base>/node-1/nats.conf   <base>/node-1/jetstream/   <base>/node-1/nats-server.log

Everything listens on 127.0.0.1 only. A node can be SIGKILLed and started
again on the same ports and store, which is how the tests take a stream's
leader away. Readiness comes from the servers' monitoring port: a node is
ready once ``/healthz`` is happy (it knows the JetStream meta leader, its
streams and consumers have caught up) and ``/jsz`` shows a leader for every
stream and consumer it holds; the cluster is ready once, in addition, every
node has its whole pool of routes to every other (``/routez`` against the
``pool_size`` of ``/varz``: until a pool fills, the messages of the accounts
it carries are dropped between those two nodes, JetStream's answers to clients
included, while the meta group talks over the system account's own route), and
the meta leader's own ``/jsz`` counts every running node as a current peer (a
node's ``/healthz`` only speaks for that node). Even then the leader may not
place replicas on a peer for a moment (see ``orderflow.ops.provision``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.client import Client

from orderflow.config import BucketSpec, ConfigError, StreamSpec, Topology
from orderflow.ops.server import binary, port_is_free, stop_all, wait_for_port

log = logging.getLogger("orderflow.ops.cluster")

#: Sizes ``--cluster`` accepts: a JetStream stream has at most 5 replicas.
MAX_SIZE = 5


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all held open until every one is chosen)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
        return ports


@dataclass
class Node:
    """One server of the cluster; its ports and store stay the same across restarts."""

    name: str
    port: int
    cluster_port: int
    http_port: int
    dir: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def health(self) -> tuple[bool, str]:
        """(ready, why not): ``/healthz`` is happy and every stream and consumer has a leader.

        ``/healthz`` alone (let alone ``?js-server-only``, which answers before
        the routes are up) says yes once the node knows the meta leader; after
        a restart of the whole cluster the streams and consumers elect their
        own leaders later still, and until then requests to them time out.
        """
        try:
            with urllib.request.urlopen(self._monitor("/healthz"), timeout=1.0):
                pass
            jsz = self.jsz()
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")
            try:
                return False, str(json.loads(body).get("error", body))
            except ValueError:
                return False, body
        except (OSError, ValueError) as exc:
            return False, str(exc)
        leaderless = [
            name
            for account in jsz.get("account_details") or []
            for stream in account.get("stream_detail") or []
            for name, cluster in [
                (stream["name"], stream.get("cluster")),
                *(
                    (f"{stream['name']}/{c['name']}", c.get("cluster"))
                    for c in stream.get("consumer_detail") or []
                ),
            ]
            if cluster is not None and not cluster.get("leader")
        ]
        if leaderless:
            return False, f"no leader yet for {', '.join(leaderless)}"
        return True, ""

    def meta(self) -> dict[str, Any]:
        """The node's view of the JetStream meta group (``meta_cluster`` of ``/jsz``).

        ``leader`` is the meta leader's name; only the leader's own view of
        ``replicas`` (every other peer: ``name``, ``current``, ``offline``) says
        whether the peers follow it: a follower does not track the others.
        """
        with urllib.request.urlopen(self._monitor("/jsz"), timeout=1.0) as response:
            meta: dict[str, Any] = json.load(response).get("meta_cluster") or {}
            return meta

    def routes(self) -> tuple[int, Counter[str]]:
        """(routes wanted to each other server, routes it has to each, by name).

        Only the pool counts: a route pinned to one account (the system
        account's, which the meta group uses) is not part of it.
        """
        with urllib.request.urlopen(self._monitor("/varz"), timeout=1.0) as response:
            pool = int((json.load(response).get("cluster") or {}).get("pool_size") or 0)
        with urllib.request.urlopen(self._monitor("/routez"), timeout=1.0) as response:
            routes = json.load(response).get("routes") or []
        pooled = Counter(str(r.get("remote_name")) for r in routes if not r.get("account"))
        return max(pool, 1), pooled

    def jsz(self) -> dict[str, Any]:
        """The node's ``/jsz`` with every stream and consumer it holds (the monitoring port)."""
        url = self._monitor("/jsz?streams=true&consumers=true")
        with urllib.request.urlopen(url, timeout=1.0) as response:
            found: dict[str, Any] = json.load(response)
            return found

    def stream_state(self, stream: str) -> dict[str, Any] | None:
        """This node's copy of ``stream``: its ``state`` (messages, last_seq...), None if none."""
        for account in self.jsz().get("account_details") or []:
            for detail in account.get("stream_detail") or []:
                if detail["name"] == stream:
                    state: dict[str, Any] = detail["state"]
                    return state
        return None

    def _monitor(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"


class EmbeddedCluster:
    """``size`` nats-servers with JetStream, routed to each other on loopback.

    ``ports`` fixes the client ports (``up`` asks for 4222, 4223, ... when they
    are free); otherwise every port is picked free.
    """

    def __init__(
        self,
        base_dir: str | Path,
        size: int = 3,
        name: str = "orderflow",
        ports: list[int] | None = None,
    ) -> None:
        if not 1 <= size <= MAX_SIZE:
            raise ValueError(f"a cluster has 1 to {MAX_SIZE} servers, not {size}")
        self.base_dir = Path(base_dir)
        self.name = name
        fixed = list(ports or [])
        if fixed and len(fixed) != size:
            raise ValueError(f"{len(fixed)} client ports for {size} servers")
        free = iter(_free_ports(3 * size - len(fixed)))
        client = fixed or [next(free) for _ in range(size)]
        self.nodes = [
            Node(
                name=f"node-{i + 1}",
                port=client[i],
                cluster_port=next(free),
                http_port=next(free),
                dir=self.base_dir / f"node-{i + 1}",
            )
            for i in range(size)
        ]

    @property
    def size(self) -> int:
        return len(self.nodes)

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated: what ``NATS_URL`` takes."""
        return ",".join(node.url for node in self.nodes)

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node named {name!r} (nodes: {', '.join(n.name for n in self.nodes)})")

    def config(self, node: Node) -> str:
        """The node's nats-server config file (JSON strings are valid in its format)."""
        routes = [f"nats-route://127.0.0.1:{n.cluster_port}" for n in self.nodes if n is not node]
        return "\n".join(
            [
                f"server_name: {json.dumps(node.name)}",
                f"listen: {json.dumps(f'127.0.0.1:{node.port}')}",
                f"http: {json.dumps(f'127.0.0.1:{node.http_port}')}",
                f"jetstream {{ store_dir: {json.dumps(str(node.dir / 'jetstream'))} }}",
                "cluster {",
                f"  name: {json.dumps(self.name)}",
                f"  listen: {json.dumps(f'127.0.0.1:{node.cluster_port}')}",
                f"  routes: {json.dumps(routes)}",
                "}",
                "",
            ]
        )

    def _spawn(self, node: Node) -> None:
        node.dir.mkdir(parents=True, exist_ok=True)
        conf = node.dir / "nats.conf"
        conf.write_text(self.config(node))
        output = open(node.dir / "nats-server.log", "ab")  # noqa: SIM115 - owned by the child
        node.process = subprocess.Popen(
            [binary(), "-c", str(conf)],
            stdout=output,
            stderr=output,
            # Its own process group, like EmbeddedServer: we stop it last.
            start_new_session=True,
        )
        output.close()

    def start(self, timeout: float = 30.0) -> None:
        """Start every node; return once every node is ready (:meth:`wait_ready`)."""
        for node in self.nodes:
            self._spawn(node)
        try:
            for node in self.nodes:
                wait_for_port(node.port, timeout=10.0)
            self.wait_ready(timeout=timeout)
        except (TimeoutError, RuntimeError):
            self.stop()
            raise

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until every running node is healthy (see :meth:`Node.health`: the meta
        leader is known, the node's streams and consumers have caught up and each
        has a leader), each has all its routes to the others, and the meta leader
        counts every one of them as a current peer. What a fresh cluster needs
        before it can place R3 streams and answer every client, and a restarted
        node before the cluster is whole again.

        Raises TimeoutError after ``timeout`` seconds, naming what never became
        ready, and RuntimeError if one of the nodes exits meanwhile.
        """
        deadline = time.monotonic() + timeout
        nodes = [n for n in self.nodes if n.running]
        while True:
            why = self._not_ready(nodes)
            if not why:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not ready after {timeout}s: {why}")
            time.sleep(0.05)

    def _not_ready(self, nodes: list[Node]) -> str:
        """What keeps ``nodes`` from being a ready cluster, "" once they are."""
        for node in nodes:
            if not node.running:
                raise RuntimeError(f"{node.name} exited; see {node.dir / 'nats-server.log'}")
            healthy, why = node.health()
            if not healthy:
                return f"{node.name}: {why}"
        return (self._unrouted(nodes) or self._unformed(nodes)) if nodes else ""

    def _unrouted(self, nodes: list[Node]) -> str:
        """Which of ``nodes`` lacks routes to another ("" once every pool is full)."""
        for node in nodes:
            try:
                wanted, pooled = node.routes()
            except (OSError, ValueError) as exc:
                return f"{node.name}: {exc}"
            for other in nodes:
                have = pooled[other.name]
                if other is not node and have < wanted:
                    return f"{node.name} has {have} of {wanted} routes to {other.name}"
        return ""

    def _unformed(self, nodes: list[Node]) -> str:
        """Why the meta leader does not count every one of ``nodes`` as a current
        peer ("" once it does). Each node's ``/healthz`` speaks only for that node:
        it can be happy while the leader has yet to hear from another one."""
        try:
            name = nodes[0].meta().get("leader")
            leader = next((n for n in nodes if n.name == name), None)
            if leader is None:
                return f"{nodes[0].name} knows no running meta leader (leader: {name!r})"
            meta = leader.meta()
        except (OSError, ValueError) as exc:
            return f"meta group: {exc}"
        if meta.get("leader") != leader.name:
            return f"{leader.name} is no longer the meta leader ({meta.get('leader')!r} is)"
        peers = {p.get("name"): p for p in meta.get("replicas") or []}
        for node in nodes:
            peer = peers.get(node.name, {})
            if node is not leader and (not peer.get("current") or peer.get("offline")):
                state = (
                    f"current: {peer.get('current', False)}, offline: {peer.get('offline', False)}"
                    if peer
                    else "not in its peer list"
                )
                return f"{node.name} is not a current peer of meta leader {leader.name} ({state})"
        return ""

    def kill(self, node: Node) -> None:
        """SIGKILL: no flush, no goodbye to the cluster (a crash, a power cut)."""
        if node.process is not None and node.process.poll() is None:
            os.kill(node.process.pid, signal.SIGKILL)
            node.process.wait()

    def restart(self, node: Node, timeout: float = 30.0, wait: bool = True) -> None:
        """Start a stopped or killed node again on its ports and store; return once caught
        up (``wait``), or at once (a test catching the node while it rejoins)."""
        self.kill(node)
        self._spawn(node)
        if wait:
            wait_for_port(node.port, timeout=10.0)
            self.wait_ready(timeout=timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every node at once (one by one, the last ones would hold elections)."""
        stop_all([n.process for n in self.nodes if n.process is not None], timeout)


def default_ports(size: int, first: int = 4222) -> list[int] | None:
    """4222, 4223, ... when all are free (the nats CLI finds 4222 unasked); else None."""
    ports = list(range(first, first + size))
    return ports if all(port_is_free(p) for p in ports) else None


async def stream_leader(nc: Client, stream: str, timeout: float = 5.0) -> str | None:
    """The name of the server leading ``stream`` (``$JS.API.STREAM.INFO``), None in an election.

    Mid-election the request may also go unanswered (``TimeoutError``).
    """
    info = await nc.jetstream(timeout=timeout).stream_info(stream)
    return info.cluster.leader if info.cluster else None


def check_replicas(topology: Topology, servers: int, what: str) -> None:
    """Fail before provisioning if a stream or bucket wants more replicas than there are servers.

    ``what`` says how many there are, e.g. ``"`up` without --cluster runs one server"``.
    """
    named: list[tuple[str, StreamSpec | BucketSpec]] = [
        *((f"streams[{i}]", spec) for i, spec in enumerate(topology.streams)),
        *((f"buckets[{i}]", spec) for i, spec in enumerate(topology.buckets)),
    ]
    for key, spec in named:
        if spec.replicas is not None and spec.replicas > servers:
            raise ConfigError(
                f"{key}.replicas: {spec.name} asks for {spec.replicas} replicas, but {what}: "
                f"lower it, or start more servers (up --cluster {spec.replicas})"
            )


@contextlib.contextmanager
def running_cluster(data_dir: Path, size: int, url_file: Path) -> Iterator[EmbeddedCluster]:
    """``up --cluster N``: a cluster storing under ``data_dir/cluster-N``, its URL in ``url_file``.

    Client ports are 4222, 4223, ... when free. Each size has its own store:
    a node remembers its peers, so a 3-node store must not meet a 5-node one.
    """
    cluster = EmbeddedCluster(data_dir / f"cluster-{size}", size, ports=default_ports(size))
    cluster.start()
    url_file.write_text(cluster.url + "\n")
    log.warning("embedded %d-node cluster on %s (data in %s)", size, cluster.url, cluster.base_dir)
    try:
        yield cluster
    finally:
        url_file.unlink(missing_ok=True)
        cluster.stop()
