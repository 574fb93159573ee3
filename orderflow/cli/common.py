"""What several commands share: where the server is and how a command connects to it; for
``up`` and ``demo``, the embedded server(s), ``--secure``, ``--replicas`` and ``--cluster``.

A command finds the server in ``NATS_URL``, else in the URL file a running ``up`` leaves in
the data dir, else at the default URL; against that embedded server it connects as the admin
``auth`` wrote, when there is one.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

from nats.aio.client import Client

from orderflow.config import ConfigError, Topology
from orderflow.ops import auth
from orderflow.ops.cluster import check_replicas, running_cluster
from orderflow.ops.provision import provision_at
from orderflow.ops.server import EmbeddedServer, port_is_free
from orderflow.runtime.connect import CREDENTIAL_VARS, DEFAULT_URL, connect, url_from_env

log = logging.getLogger("orderflow")

DATA_DIR = Path(".orderflow")


URL_FILE = "nats.url"


@contextmanager
def nats_server(data_dir: Path, config: Path | None = None, cluster: int = 0) -> Iterator[str]:
    """``NATS_URL`` when set; otherwise an embedded server storing under ``data_dir``.

    The embedded server takes port 4222 when it is free (so the nats CLI finds
    it without flags) and leaves its URL in ``data_dir/nats.url`` for the
    other commands (``dlq``, ``provision``) while it runs. ``config``: a
    nats-server configuration for it (``up --secure``). ``cluster``: an
    embedded cluster of that many servers instead (``orderflow.ops.cluster``).
    """
    url = url_from_env()
    if url:
        yield url
        return
    if cluster:
        with running_cluster(data_dir, cluster, data_dir / URL_FILE) as servers:
            yield servers.url
        return
    server = EmbeddedServer(
        data_dir / "nats", port=4222 if port_is_free(4222) else None, config=config
    )
    server.start()
    url_file = data_dir / URL_FILE
    url_file.write_text(server.url + "\n")
    log.warning("embedded nats-server on %s (data in %s)", server.url, server.store_dir)
    try:
        yield server.url
    finally:
        url_file.unlink(missing_ok=True)
        server.stop()


#: Hosts that keep a listening command on this machine.
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def with_extra(module: str, extra: str, what: str) -> ModuleType:
    """``module``, imported only by the command that needs it, which needs the optional
    extra ``extra``: without it, a clear exit saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise SystemExit(
            f"the {what} needs its extra: pip install -e '.[{extra}]' ({exc})"
        ) from None


def announce(line: str, host: str) -> None:
    """Say where a listening command serves, and warn when it is beyond loopback."""
    print(line, file=sys.stderr, flush=True)
    if host not in LOOPBACK:
        print(f"warning: listening on {host}, reachable beyond this machine", file=sys.stderr)


def stop_on_signals() -> asyncio.Event:
    """An event SIGTERM and SIGINT (Ctrl-C) set: a long-running command's cue to stop cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


@asynccontextmanager
async def connected(
    name: str, url: str | None = None, env: dict[str, str] | None = None
) -> AsyncIterator[Client]:
    """A connection for one command, closed when it is done.

    ``env``: the connection's variables (default: ours, see :func:`command_env`).
    """
    nc = await connect(url or server_url(), name=f"orderflow-{name}", env=env or command_env())
    try:
        yield nc
    finally:
        await nc.close()


def server_url(data_dir: Path = DATA_DIR) -> str:
    """``NATS_URL``, else the embedded server of a running ``up``, else the default."""
    url_file = data_dir / URL_FILE
    if url := url_from_env():
        return url
    if url_file.exists():
        return url_file.read_text().strip()
    return DEFAULT_URL


def command_env(data_dir: Path = DATA_DIR) -> dict[str, str]:
    """Our environment; against the embedded server of ``up --secure``, as its admin.

    With no ``NATS_URL`` and no credentials of its own, a command (``status``,
    ``dlq``...) talks to the embedded server, and uses the admin credentials
    that ``auth`` left in the data dir (mode 0600: only their owner can) when
    there are any. A server without authorization ignores them.
    """
    env = dict(os.environ)
    admin = data_dir / auth.AUTH_DIR / f"{auth.ADMIN}.env"
    if url_from_env() or any(env.get(v) for v in CREDENTIAL_VARS) or not admin.exists():
        return env
    return auth.identity(admin.parent, auth.ADMIN, env)


def add_system_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``up`` and ``demo``: where the server stores, how many of each, how."""
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="embedded server's store")
    parser.add_argument("--replicas", action="append", default=[], metavar="FUNCTION=N")
    parser.add_argument(
        "--secure", action="store_true", help="embedded server with the users of `auth`"
    )
    parser.add_argument("--cluster", type=int, choices=range(1, 6), default=0, metavar="N",
                        help="an embedded N-server cluster (1-5) instead of one server; "
                        "streams and buckets get N replicas unless streams.yaml says")  # fmt: skip


class Secured(NamedTuple):
    directory: Path  # what ``auth`` wrote
    admin: dict[str, str]  # the environment to connect as the admin

    @property
    def server_conf(self) -> Path:
        return self.directory / auth.SERVER_CONF


def secure(args: argparse.Namespace, topology: Topology) -> Secured | None:
    """``--secure``: the server configuration (written by ``auth`` when missing) and the admin.

    None when not asked for; raises ConfigError with ``NATS_URL`` set (the
    configuration is for the embedded server; bring your own server's users).
    """
    if not args.secure:
        return None
    if url_from_env():
        raise ConfigError(
            "--secure runs the embedded server with the users of `runner.py auth`; with "
            "NATS_URL set, give the credentials in NATS_USER/NATS_PASSWORD (or NATS_CREDS) instead"
        )
    directory = args.data_dir / auth.AUTH_DIR
    if auth.written_for(directory) != topology.mode:
        auth.generate(topology, directory)
        log.warning("wrote users and permissions of the %s wiring to %s (python runner.py auth)",
                    topology.mode, directory)  # fmt: skip
    return Secured(directory, auth.identity(directory, auth.ADMIN, dict(os.environ)))


def replicas(values: list[str], topology: Topology) -> dict[str, int]:
    """``--replicas FUNCTION=N`` (repeated): how many processes of each function, 1 unless said."""
    counts = dict.fromkeys(topology.functions, 1)
    for value in values:
        name, _, count = value.partition("=")
        if name not in counts or not count.isdigit() or int(count) < 1:
            raise ConfigError(f"--replicas {value!r}: expected FUNCTION=N with FUNCTION in "
                              f"{', '.join(counts)} and N >= 1")  # fmt: skip
        counts[name] = int(count)
    return counts


async def provision(
    url: str,
    topology: Topology,
    base: Path,
    env: dict[str, str] | None = None,
    replicas: int = 1,
) -> list[str]:
    """Make the server at ``url`` match the topology; what was done, a line each."""
    report = await provision_at(
        url, topology, base, env=env or command_env(), default_replicas=replicas
    )
    return report.lines


def cluster_size(args: argparse.Namespace, topology: Topology) -> int:
    """``--cluster N`` (0 without), checked against NATS_URL and the replicas in streams.yaml."""
    if url_from_env():
        if args.cluster:
            raise ConfigError(
                "--cluster starts its own servers, but NATS_URL is set: unset it, "
                "or leave out --cluster to use the servers NATS_URL names"
            )
        return 0
    what = (
        f"the embedded cluster has {args.cluster} servers"
        if args.cluster
        else "`up` without --cluster runs one server"
    )
    check_replicas(topology, args.cluster or 1, what)
    if args.cluster and args.secure:
        # The generated configuration has no route authorization yet.
        raise ConfigError("--secure and --cluster together are not supported yet: pick one")
    return int(args.cluster)
