"""The commands behind ``runner.py``: argument parsing and the wiring of each command."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from nats.aio.client import Client

from orderflow import config as config_mod
from orderflow.config import MODES, ConfigError, Topology
from orderflow.ops.provision import LayoutRefused, ModeSwitchRefused
from orderflow.ops.server import EmbeddedServer, port_is_free
from orderflow.runtime import logs
from orderflow.runtime.connect import DEFAULT_URL, ConnectError, connect, redact, url_from_env
from orderflow.tools.demo import STALL_S

if TYPE_CHECKING:
    from orderflow.tools.trace import Owed

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
        from orderflow.ops.cluster import running_cluster

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
    from orderflow.ops import auth
    from orderflow.runtime.connect import CREDENTIAL_VARS

    env = dict(os.environ)
    admin = data_dir / auth.AUTH_DIR / f"{auth.ADMIN}.env"
    if url_from_env() or any(env.get(v) for v in CREDENTIAL_VARS) or not admin.exists():
        return env
    return auth.identity(admin.parent, auth.ADMIN, env)


class Secured(NamedTuple):
    directory: Path  # what ``auth`` wrote
    admin: dict[str, str]  # the environment to connect as the admin

    @property
    def server_conf(self) -> Path:
        from orderflow.ops import auth

        return self.directory / auth.SERVER_CONF


def _secure(args: argparse.Namespace, topology: Topology) -> Secured | None:
    """``--secure``: the server configuration (written by ``auth`` when missing) and the admin.

    None when not asked for; raises ConfigError with ``NATS_URL`` set (the
    configuration is for the embedded server; bring your own server's users).
    """
    from orderflow.ops import auth

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


def cmd_auth(args: argparse.Namespace, topology: Topology) -> int:
    from orderflow.ops import auth

    directory = args.data_dir / auth.AUTH_DIR
    written = auth.generate(topology, directory)
    print(f"wrote {written[0]}: a nats-server configuration with users "
          f"{', '.join(p.stem for p in written[1:])}, new passwords, max_payload "
          f"{topology.limits.server_max_payload()}")  # fmt: skip
    print(f"and each user's NATS_USER/NATS_PASSWORD/NATS_INBOX_PREFIX in {directory}/<user>.env "
          "(mode 0600); restart a running `up --secure` to use them")  # fmt: skip
    return 0


def _replicas(values: list[str], topology: Topology) -> dict[str, int]:
    counts = dict.fromkeys(topology.functions, 1)
    for value in values:
        name, _, count = value.partition("=")
        if name not in counts or not count.isdigit() or int(count) < 1:
            raise ConfigError(f"--replicas {value!r}: expected FUNCTION=N with FUNCTION in "
                              f"{', '.join(counts)} and N >= 1")  # fmt: skip
        counts[name] = int(count)
    return counts


async def _provision(
    url: str,
    topology: Topology,
    base: Path,
    env: dict[str, str] | None = None,
    replicas: int = 1,
) -> list[str]:
    from orderflow.ops.provision import provision_at

    report = await provision_at(
        url, topology, base, env=env or command_env(), default_replicas=replicas
    )
    return report.lines


def _cluster_size(args: argparse.Namespace, topology: Topology) -> int:
    """``--cluster N`` (0 without), checked against NATS_URL and the replicas in streams.yaml."""
    from orderflow.ops.cluster import check_replicas

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


def cmd_provision(args: argparse.Namespace, topology: Topology) -> int:
    for line in asyncio.run(_provision(server_url(), topology, args.config.parent)):
        print(line)
    return 0


def cmd_run(args: argparse.Namespace, topology: Topology) -> int:
    from orderflow.runtime.service import serve

    if args.function not in topology.functions:
        print(f"unknown function {args.function!r}; streams.yaml defines: "
              f"{', '.join(topology.functions)}", file=sys.stderr)  # fmt: skip
        return 2
    asyncio.run(serve(server_url(), topology, args.function))
    return 0


async def _dlq(args: argparse.Namespace, topology: Topology) -> int:
    from orderflow.tools import dlq

    async with connected("dlq") as nc:
        letters = await dlq.dead_letters(nc, topology)
        if args.action == "list":
            if args.json:
                print(json.dumps([d.as_json() for d in letters]))
            else:
                print(dlq.render_table(letters))
            return 0
        by_id = {d.id: d for d in letters}
        missing = [i for i in args.ids if i not in by_id]
        if missing:
            print(f"no dead letter with id {', '.join(map(str, missing))}", file=sys.stderr)
            return 1
        if args.action == "show":
            for i in args.ids:
                print(dlq.render_one(by_id[i]))
            return 0
        chosen = letters if args.all else [by_id[i] for i in args.ids]
        if not chosen:
            print("nothing to redrive (give IDs or --all)", file=sys.stderr)
            return 1
        for line in await dlq.redrive(nc, topology, chosen):
            print(line)
        return 0


def cmd_dlq(args: argparse.Namespace, topology: Topology) -> int:
    return asyncio.run(_dlq(args, topology))


async def _record(args: argparse.Namespace) -> int:
    from datetime import datetime

    from orderflow.tools.recording import record

    since = datetime.fromisoformat(args.since) if args.since else None
    async with connected("record") as nc:
        count = await record(
            nc,
            args.stream,
            args.file,
            subjects=args.subjects.split(",") if args.subjects else None,
            since=since,
            from_seq=args.from_seq,
            progress=sys.stderr.isatty(),
        )
    print(f"recorded {count} messages of {args.stream} to {args.file}", file=sys.stderr)
    return 0


def cmd_record(args: argparse.Namespace, topology: Topology) -> int:
    return asyncio.run(_record(args))


async def _trace(args: argparse.Namespace, topology: Topology) -> int:
    from datetime import UTC, datetime

    from orderflow.tools import trace

    async with connected("trace") as nc:
        traces = await trace.load(nc, topology, {args.order_id})
    found = traces.get(args.order_id)
    if found is None:
        print(f"no events for order {args.order_id!r} in the log", file=sys.stderr)
        return 1
    now = datetime.now(UTC)
    if args.json:
        print(json.dumps(trace.as_json(found, now), default=str))
    elif args.mermaid:
        print(trace.mermaid_sequence(found, topology))
    else:
        print(trace.render(found, now))
    return 0


def cmd_trace(args: argparse.Namespace, topology: Topology) -> int:
    return asyncio.run(_trace(args, topology))


async def _stuck(args: argparse.Namespace, topology: Topology) -> int:
    from datetime import UTC, datetime

    from orderflow.config import seconds
    from orderflow.tools import trace

    now = datetime.now(UTC)
    async with connected("stuck") as nc:
        stuck = await trace.stuck(nc, topology, seconds(args.older_than), now)
    if args.json:
        print(json.dumps([trace.as_json(t, now) for t in stuck], default=str))
        return 0
    if not stuck:
        print(f"no unfinished order older than {args.older_than}")
        return 0
    print(f"{'ORDER':<28} {'AGE':>8}  WAITING FOR")
    for t in stuck:
        age = f"{(now - t.steps[0].time).total_seconds():.0f}s"
        owed = "; ".join(f"{o.function}: {o.what}{_held(o)}" for o in t.owed)
        print(f"{t.order_id:<28} {age:>8}  {owed}")
    print(f"\n{len(stuck)} unfinished orders older than {args.older_than}")
    return 0


def _held(owed: Owed) -> str:
    ids = ", ".join(str(d.fields.get("id")) for d in owed.held_by)
    return f" (held by dead letter {ids}: dlq show/redrive)" if ids else ""


def cmd_stuck(args: argparse.Namespace, topology: Topology) -> int:
    return asyncio.run(_stuck(args, topology))


async def _status(args: argparse.Namespace, topology: Topology) -> int:
    from orderflow.tools import status

    async with connected("status") as nc:
        while True:
            current = await status.collect(nc, topology)
            if args.json:
                print(json.dumps(current), flush=True)
            else:
                if args.watch and sys.stdout.isatty():
                    print("\x1b[2J\x1b[H", end="")  # clear the screen, cursor home
                print(status.render(current), flush=True)
            if not args.watch:
                return 0
            await asyncio.sleep(args.every)


def cmd_status(args: argparse.Namespace, topology: Topology) -> int:
    try:
        return asyncio.run(_status(args, topology))
    except KeyboardInterrupt:
        return 0


def cmd_map(args: argparse.Namespace, topology: Topology) -> int:
    from orderflow.tools.trace import mermaid_map

    print(mermaid_map(topology))
    return 0


def cmd_replay(args: argparse.Namespace, topology: Topology) -> int:
    from orderflow.tools import recording, replay

    try:
        records = recording.read(args.file)
    except recording.RecordingError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    if args.offline:
        result = asyncio.run(replay.replay_offline(records, topology, args.config.parent))
    else:
        result = asyncio.run(
            replay.replay_live(
                records,
                topology,
                args.config,
                into=args.into,
                original_speed=args.speed == "original",
                timeout=args.timeout,
                progress=sys.stderr.isatty(),
            )
        )
    print(result.render())
    return 0 if result.ok else 1


async def _until_signalled(supervisor: object) -> None:
    from orderflow.ops.supervisor import Supervisor

    assert isinstance(supervisor, Supervisor)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await supervisor.watch(stop)


def cmd_up(args: argparse.Namespace, topology: Topology) -> int:
    from orderflow.ops import auth
    from orderflow.ops.supervisor import Supervisor

    replicas = _replicas(args.replicas, topology)
    cluster = _cluster_size(args, topology)
    secure = _secure(args, topology)
    with nats_server(args.data_dir, secure.server_conf if secure else None, cluster) as url:
        admin = secure.admin if secure else None
        provisioning = _provision(url, topology, args.config.parent, admin, cluster or 1)
        for line in asyncio.run(provisioning):
            log.info("%s", line)
        supervisor = Supervisor(
            url,
            args.config,
            replicas,
            log_level=args.log_level,
            function_env=auth.function_env(secure.directory, topology) if secure else None,
            mode=topology.mode,
        )
        supervisor.start()
        how = f" (--secure: a user per function, from {secure.directory})" if secure else ""
        print(f"order flow up on {redact(url)} ({topology.mode}){how}: "
              f"{', '.join(f'{n} x{c}' for n, c in replicas.items())}. Ctrl-C stops.",
              file=sys.stderr)  # fmt: skip
        try:
            asyncio.run(_until_signalled(supervisor))
        finally:
            supervisor.stop()
    return 0


async def _demo(
    url: str, args: argparse.Namespace, supervisor: object, env: dict[str, str] | None = None
) -> dict[str, object]:
    from orderflow.ops.supervisor import Supervisor
    from orderflow.tools import demo

    assert isinstance(supervisor, Supervisor)
    stop = asyncio.Event()
    watcher = asyncio.create_task(supervisor.watch(stop))
    nc = await connect(url, name="orderflow-demo", env=env)
    try:
        orders = demo.make_orders(
            args.orders, run_id=f"demo-{uuid.uuid4().hex[:8]}", seed=args.seed
        )
        progress = sys.stderr.isatty() and not args.json
        return await demo.run_orders(nc, orders, timeout=args.timeout, progress=progress)
    finally:
        await nc.close()
        stop.set()
        await watcher


def cmd_demo(args: argparse.Namespace, topology: Topology) -> int:
    from orderflow.ops import auth
    from orderflow.ops.supervisor import Supervisor
    from orderflow.tools import demo

    cluster = _cluster_size(args, topology)
    secure = _secure(args, topology)
    with nats_server(args.data_dir, secure.server_conf if secure else None, cluster) as url:
        admin = secure.admin if secure else None
        asyncio.run(_provision(url, topology, args.config.parent, admin, cluster or 1))
        # The functions' own logs (retries of flaky cards...) go to files, so
        # the terminal shows progress and the summary.
        supervisor = Supervisor(
            url,
            args.config,
            _replicas(args.replicas, topology),
            log_level=args.log_level,
            log_dir=args.data_dir / "logs",
            mode=topology.mode,
            function_env=auth.function_env(secure.directory, topology) if secure else None,
        )
        supervisor.start()
        # --secure: orders come from the client user, who may publish them and
        # read their outcomes, nothing else.
        client = auth.identity(secure.directory, auth.CLIENT, dict(os.environ)) if secure else None
        try:
            started = time.monotonic()
            summary = asyncio.run(_demo(url, args, supervisor, client))
        finally:
            supervisor.stop()
    if args.json:
        print(json.dumps(summary))
    else:
        print(demo.render(summary))
        print(f"\nfunction logs: {args.data_dir / 'logs'}/", file=sys.stderr)
        log.info("demo took %.1fs in all", time.monotonic() - started)
    return 1 if summary["unfinished"] else 0


def cmd_compare(args: argparse.Namespace, topology: Topology) -> int:
    from bench import compare
    from orderflow.config import seconds

    if args.orders < 1 or args.repeat < 1 or args.rate <= 0:
        print("compare: --orders and --repeat must be at least 1, --rate above 0", file=sys.stderr)
        return 2
    settings = compare.Settings(
        orders=args.orders,
        seed=args.seed,
        rate=args.rate,
        outage_s=seconds(args.outage),
        timeout=args.timeout,
        repeat=args.repeat,
        stop=compare.stops(args.config, args.stop),
    )
    progress = sys.stderr.isatty() and not args.json
    result = compare.run(args.config.resolve(), settings, progress=progress)
    print(json.dumps(compare.as_json(result)) if args.json else compare.render(result))
    return 0 if result.ok else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="runner.py", description=__doc__)
    p.add_argument("--config", type=Path, default=Path("streams.yaml"), help="topology file")
    p.add_argument("--log-level", default=os.environ.get("ORDERFLOW_LOG_LEVEL", "WARNING"))
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=os.environ.get("ORDERFLOW_LOG_FORMAT", "text"),
        help="json: one JSON object per line, for log shippers",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default=os.environ.get("ORDERFLOW_MODE") or None,
        help="choreography (functions react to events) or orchestration (a saga drives them); "
        "default: streams.yaml's mode, choreography",
    )
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("provision", help="create or update streams, consumers and buckets (NATS_URL)")

    au = sub.add_parser("auth", help="a nats-server config: a user per function, least privilege")
    au.add_argument("--data-dir", type=Path, default=DATA_DIR, help="writes DATA_DIR/auth/")

    run = sub.add_parser("run", help="run one function as this process")
    run.add_argument("function")

    dlq = sub.add_parser("dlq", help="list, show and redrive dead letters")
    dlq_actions = dlq.add_subparsers(dest="action", required=True)
    dlq_list = dlq_actions.add_parser("list", help="a table of every dead letter")
    dlq_list.add_argument("--json", action="store_true")
    dlq_show = dlq_actions.add_parser("show", help="one dead letter: reason, headers, payload")
    dlq_show.add_argument("ids", type=int, nargs="+", metavar="ID")
    dlq_redrive = dlq_actions.add_parser("redrive", help="republish to the original subject")
    dlq_redrive.add_argument("ids", type=int, nargs="*", metavar="ID")
    dlq_redrive.add_argument("--all", action="store_true")

    tr = sub.add_parser("trace", help="an order's causal timeline, and who owes the next step")
    tr.add_argument("order_id")
    how = tr.add_mutually_exclusive_group()
    how.add_argument("--json", action="store_true")
    how.add_argument("--mermaid", action="store_true", help="a Mermaid sequence diagram")

    st = sub.add_parser("stuck", help="unfinished orders older than a duration")
    st.add_argument("--older-than", default="30s", metavar="DURATION", help="e.g. 30s, 5m")
    st.add_argument("--json", action="store_true")

    sub.add_parser("map", help="the topology as a Mermaid flowchart")

    stat = sub.add_parser("status", help="instances, counters, backlog, dead letters, streams")
    stat.add_argument("--json", action="store_true")
    stat.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    stat.add_argument("--every", type=float, default=2.0, help="seconds between refreshes")

    rec = sub.add_parser("record", help="write a stream's messages to JSON Lines")
    rec.add_argument("file", type=Path)
    rec.add_argument("--stream", default="ORDERS")
    rec.add_argument("--subjects", help="comma-separated filter, e.g. orders.created,orders.>")
    start = rec.add_mutually_exclusive_group()
    start.add_argument("--since", help="ISO time, e.g. 2026-11-26T05:00:00+00:00")
    start.add_argument("--from-seq", type=int, default=1)

    rep = sub.add_parser("replay", help="replay a recording's inputs and compare the outputs")
    rep.add_argument("file", type=Path)
    rep.add_argument("--offline", action="store_true", help="handlers in-process, no server")
    rep.add_argument("--into", metavar="NATS_URL", help="a fresh server to replay into")
    rep.add_argument("--speed", choices=["max", "original"], default="max")
    rep.add_argument("--timeout", type=float, default=120.0)

    cmp = sub.add_parser("compare", help="both modes on the same orders, measured side by side")
    cmp.add_argument("--orders", type=int, default=300, help="orders published at once")
    cmp.add_argument("--outage", default="3s", metavar="DURATION", help="how long each is down")
    cmp.add_argument("--rate", type=float, default=20.0, help="orders/s around each outage")
    cmp.add_argument("--stop", metavar="F,F", help="functions to stop (default: every one)")
    cmp.add_argument("--repeat", type=int, default=1, help="speed runs per mode (median)")
    cmp.add_argument("--seed", type=int, default=42)
    cmp.add_argument("--timeout", type=float, default=60.0, help="seconds to wait per phase")
    cmp.add_argument("--json", action="store_true", help="one JSON object")

    for name, text in (
        ("up", "start a server (unless NATS_URL) and every function"),
        ("demo", "up, publish orders, wait for every outcome, summarise"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--data-dir", type=Path, default=DATA_DIR, help="embedded server's store")
        cmd.add_argument("--replicas", action="append", default=[], metavar="FUNCTION=N")
        cmd.add_argument(
            "--secure", action="store_true", help="embedded server with the users of `auth`"
        )
        cmd.add_argument("--cluster", type=int, choices=range(1, 6), default=0, metavar="N",
                         help="an embedded N-server cluster (1-5) instead of one server; "
                         "streams and buckets get N replicas unless streams.yaml says")  # fmt: skip
        if name == "demo":
            cmd.add_argument("--orders", type=int, default=1000)
            cmd.add_argument("--timeout", type=float, default=None, metavar="S",
                             help="give up S seconds after the start (default: no deadline; "
                             "wait while orders keep finishing, give up once none has "
                             f"finished for {STALL_S:g} s)")  # fmt: skip
            cmd.add_argument("--seed", type=int, default=42)
            cmd.add_argument("--json", action="store_true", help="summary as JSON on the last line")
    # --mode after the command too (`up --mode orchestration`), where it wins.
    for cmd in sub.choices.values():
        cmd.add_argument(
            "--mode", choices=MODES, default=argparse.SUPPRESS, help="see runner.py -h"
        )
    return p


COMMANDS = {
    "provision": cmd_provision,
    "auth": cmd_auth,
    "run": cmd_run,
    "up": cmd_up,
    "demo": cmd_demo,
    "dlq": cmd_dlq,
    "record": cmd_record,
    "trace": cmd_trace,
    "stuck": cmd_stuck,
    "map": cmd_map,
    "status": cmd_status,
    "replay": cmd_replay,
    "compare": cmd_compare,
}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    # Function processes started by up/demo log the same way.
    os.environ["ORDERFLOW_LOG_FORMAT"] = args.log_format
    try:
        topology = config_mod.load(args.config, args.mode)
        return COMMANDS[args.command](args, topology)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except (ModeSwitchRefused, LayoutRefused) as exc:
        print(f"provision: {exc}", file=sys.stderr)
        return 2
    except ConnectError as exc:
        print(f"cannot connect: {exc}", file=sys.stderr)
        return 1
