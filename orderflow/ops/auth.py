"""Least privilege, generated from the topology: ``runner.py auth`` and ``up --secure``.

``streams.yaml`` already says everything a function touches: the consumers
that feed it, the buckets it may use, the subjects it emits, plus the dead
letters and the retry log every function writes to. :func:`permissions`
turns exactly that into nats-server permissions, one user per function:

* its own consumers: ``$JS.API.CONSUMER.INFO`` (a process checks its
  consumer's config on start), ``$JS.API.CONSUMER.MSG.NEXT`` (fetch) and
  ``$JS.ACK.<stream>.<durable>.>`` (ack, nak, in progress: ``allow_responses``
  alone allows one answer per message, so an ack after ``in_progress()`` was
  refused, measured); never
  ``CONSUMER.CREATE``: a function that could change its own consumer could
  widen its filter to any subject of the stream, so consumers are the admin's
  (``provision``; ``up`` provisions as admin before it starts the functions);
* its own buckets: writes (``$KV.<bucket>.>``), direct gets of their keys
  (``$JS.API.DIRECT.GET.KV_<bucket>.$KV.<bucket>.>``) and batch direct gets
  of many keys at once (``$JS.API.DIRECT.GET.KV_<bucket>``, the subjects in
  the body: any key of the function's own bucket), which is all
  ``orderflow/runtime/kv.py`` sends;
* the subjects of the kinds it ``emits`` (``order.*.<kind>``), its dead
  letters and retry notes (``<prefix>.*.<function>``);
* if it ``reads`` the orders' histories: batch direct gets of the stream
  (``$JS.API.DIRECT.GET.<stream>``, reads made together, orderflow/runtime/history.py)
  and, on a cluster, the leader's ``STREAM.MSG.GET``. Both take the subjects
  in the body, so no permission can narrow them to the kinds it reads: a
  function that reads may read any order's events (never write them); one
  that reads nothing (stock) cannot read them at all;
* replies only in its own inbox, ``_INBOX_<function>.>`` (``NATS_INBOX_PREFIX``):
  with the shared ``_INBOX.>`` any user could read the replies of every other,
  the admin's stream reads included;
* its micro service (``$SRV.PING|INFO|STATS`` and its own ``$SRV.*.orderflow-<name>``
  subjects, its endpoint), and answering requests (``allow_responses``),
  including the request subjects it ``serves`` (which no function may ask).

The ``client`` user may publish the flow's external inputs, the subjects some
function consumes and none emits (``orders.created``, and
``order.*.orders.created``), and read an order's status by subscribing to its
outcomes, the kinds some function emits and none consumes
(``order.*.orders.completed``, ``order.*.orders.cancelled``,
``order.*.orders.rejected``), and ask what some function answers
(``orders.cancel``: a customer's cancellation, which the operator may ask too);
publish-with-ack needs ``NATS_INBOX_PREFIX=_INBOX_client``. The ``admin`` user
may do anything: provisioning and the operator commands (``status``, ``dlq``,
``trace``...).

Why random passwords and not nkeys: a password needs nothing beyond nats-py
and fits the ``NATS_USER``/``NATS_PASSWORD`` variables a systemd unit or a
child process already gets, where nkeys would add the ``nkeys`` package (and
its crypto dependency) to every function. The secrets stay as safe as the
files: every file is written with mode 0600 in a 0700 directory, and the
passwords change with every ``auth`` run (restart the server and the
functions after one). Operators who run their own NATS with nkeys or JWTs use
``NATS_NKEY``/``NATS_CREDS`` and the same permission lists.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from functions.events import EVENT_TYPES
from orderflow import subjects
from orderflow.config import ConfigError, Topology
from orderflow.runtime.connect import CREDENTIAL_VARS

ADMIN = "admin"
CLIENT = "client"
OPERATOR = "operator"
#: where ``auth`` writes, under the data dir
AUTH_DIR = "auth"
SERVER_CONF = "server.conf"


def inbox_prefix(user: str) -> str:
    return f"_INBOX_{user}"


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    #: may publish one answer to the reply subject of a request it received
    responses: bool = False

    def as_conf(self) -> dict[str, object]:
        conf: dict[str, object] = {
            "publish": {"allow": list(self.publish)},
            "subscribe": {"allow": list(self.subscribe)},
        }
        if self.responses:
            conf["allow_responses"] = True
        return conf


MODE_FILE = "mode"


def _unique(subjects: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(subjects))


def function_permissions(topology: Topology, name: str) -> Permissions:
    fn = topology.functions[name]
    publish: list[str] = []
    for c in fn.consumers:
        publish += [
            subjects.consumer_info(c.stream, c.durable),
            subjects.consumer_next(c.stream, c.durable),
            subjects.acks(c.stream, c.durable),
        ]
    for bucket in fn.buckets:
        publish += [
            subjects.kv_key(bucket, ">"),
            f"{subjects.direct_get(subjects.kv_stream(bucket))}.{subjects.kv_key(bucket, '>')}",
            subjects.direct_get(subjects.kv_stream(bucket)),
        ]
    # What it reads of the orders' histories (see the module's docstring).
    events = topology.events_stream
    if fn.reads:
        publish += [subjects.direct_get(events), subjects.leader_get(events)]
    # Alarms are published on the order's alarm subject (orderflow/subjects.py).
    publish += [subjects.published_on(kind, "*") for kind in fn.emits]
    publish.append(subjects.dead_letter(topology.dead_letters.subject_prefix, "*", name))
    if topology.retry_log is not None:
        publish.append(subjects.retry_note(topology.retry_log.subject_prefix, "*", name))
    if fn.serves and topology.interventions is not None:
        # The record of each request it answers (orderflow/runtime/requests.py).
        publish.append(subjects.intervention_on_order(topology.interventions.subject_prefix, "*"))
    subscribe = [
        f"{inbox_prefix(name)}.>",
        "$SRV.PING",
        "$SRV.INFO",
        "$SRV.STATS",
        subjects.service_api("*", name),  # orderflow/runtime/metrics.py
        f"{subjects.service_api('*', name)}.*",
        subjects.service_endpoint(name),
        *fn.serves,  # the requests it answers (orderflow/runtime/requests.py)
    ]
    return Permissions(_unique(publish), _unique(subscribe), responses=True)


def _requests(topology: Topology) -> list[str]:
    """The request subjects some function answers (``orders.cancel``): clients and
    operators may ask; no function may."""
    return [s for fn in topology.functions.values() for s in fn.serves]


def _consumed(topology: Topology) -> list[str]:
    return [k for fn in topology.functions.values() for c in fn.consumers for k in c.events]


def _emitted(topology: Topology) -> list[str]:
    return [k for fn in topology.functions.values() for k in fn.emits]


def external_inputs(topology: Topology) -> tuple[str, ...]:
    """Subjects of the kinds some function consumes and none emits: what the outside
    world publishes (``orders.created``, payload-only or under its order id)."""
    emitted = set(_emitted(topology))
    return _unique(
        [s for k in _consumed(topology) if k not in emitted for s in subjects.filters(k)]
    )


def outcomes(topology: Topology) -> tuple[str, ...]:
    """Subjects of the kinds some function emits and none consumes: the answers to the
    outside world (every order's ``orders.completed``...)."""
    consumed = set(_consumed(topology))
    return _unique(
        [
            subjects.published_on(k, "*")
            for k in _emitted(topology)
            if k not in consumed and k in EVENT_TYPES
        ]
    )


def client_permissions(topology: Topology) -> Permissions:
    return Permissions(
        publish=_unique([*external_inputs(topology), *_requests(topology)]),
        subscribe=(*outcomes(topology), f"{inbox_prefix(CLIENT)}.>"),
    )


def operator_permissions(topology: Topology) -> Permissions:
    """The role that may intervene (``pause``, ``resume``, ``dlq redrive``) and read what the
    commands and the console read. It may republish what some function consumes (a redrive
    sends a dead letter back where it came from), never an order's end, and it may not
    create or change a consumer. No function may pause a consumer or delete a dead letter."""
    publish: list[str] = []
    # Both wirings' consumers: either may be the running one.
    wirings = [*topology.functions.items(), *topology.inactive.items()]
    for _, fn in wirings:
        for c in fn.consumers:
            publish += [
                subjects.consumer_pause(c.stream, c.durable),
                subjects.consumer_info(c.stream, c.durable),
            ]
    for stream in topology.streams:
        publish += [
            subjects.direct_get(stream.name),
            f"{subjects.direct_get(stream.name)}.>",
            f"$JS.API.STREAM.INFO.{stream.name}",
            subjects.leader_get(stream.name),
        ]
    # status and the exporter read the buckets' streams too (their size, their replicas).
    publish += [f"$JS.API.STREAM.INFO.{subjects.kv_stream(b.name)}" for b in topology.buckets]
    if topology.interventions is not None:
        publish.append(f"{topology.interventions.subject_prefix}.>")
    # A redrive: the dead letter's original bytes back to the original subject
    # (the inputs some function consumes), then the dead letter deleted.
    publish += [s for kind in _consumed(topology) for s in subjects.filters(kind)]
    publish.append(f"$JS.API.STREAM.MSG.DELETE.{topology.dead_letters.stream}")
    publish += _requests(topology)  # cancel an order
    publish += [subjects.service_api(verb, name)
                for name, _ in wirings for verb in ("PING", "STATS")]  # fmt: skip
    return Permissions(_unique(publish), (f"{inbox_prefix(OPERATOR)}.>",))


def permissions(topology: Topology) -> dict[str, Permissions]:
    """Every user but the admin (who may do anything), by name."""
    for reserved in (ADMIN, CLIENT, OPERATOR):
        if reserved in topology.functions:
            raise ConfigError(f"functions.{reserved}: the name is taken by the {reserved} user")
    users = {name: function_permissions(topology, name) for name in topology.functions}
    users[CLIENT] = client_permissions(topology)
    users[OPERATOR] = operator_permissions(topology)
    return users


def server_config(topology: Topology, passwords: dict[str, str]) -> str:
    """A nats-server configuration (JSON, which its parser reads) with every user."""
    users: list[dict[str, object]] = [{"user": ADMIN, "password": passwords[ADMIN]}]
    for name, allowed in permissions(topology).items():
        users.append({"user": name, "password": passwords[name], "permissions": allowed.as_conf()})
    conf = {
        # Larger messages are refused at the publisher, before any stream sees them.
        "max_payload": topology.limits.server_max_payload(),
        "authorization": {"users": users},
    }
    when = datetime.now(UTC).isoformat(timespec="seconds")
    return (
        f"# Written by `python runner.py auth` from streams.yaml at {when}.\n"
        "# Every function's user may do what its bindings need and nothing else.\n"
        "# Do not edit: change streams.yaml and run `auth` again.\n"
        + json.dumps(conf, indent=2)
        + "\n"
    )


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` readable by this user only, replacing ``path`` atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)  # whatever the umask, or an earlier file, said
        f.write(text)
    os.replace(tmp, path)


def user_env(user: str, password: str) -> dict[str, str]:
    env = {"NATS_USER": user, "NATS_PASSWORD": password}
    if user != ADMIN:
        env["NATS_INBOX_PREFIX"] = inbox_prefix(user)
    return env


def generate(topology: Topology, directory: Path) -> list[Path]:
    """Write ``server.conf`` and one ``<user>.env`` per user, all mode 0600; new passwords."""
    users = [ADMIN, *permissions(topology)]
    passwords = {user: secrets.token_urlsafe(24) for user in users}
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    written = []
    for user in users:
        path = directory / f"{user}.env"
        env = user_env(user, passwords[user])
        _write_private(path, "".join(f"{k}={v}\n" for k, v in env.items()))
        written.append(path)
    conf = directory / SERVER_CONF
    _write_private(conf, server_config(topology, passwords))
    # The users are those of one wiring: `up --secure` in the other mode writes anew.
    _write_private(directory / MODE_FILE, topology.mode + "\n")
    return [conf, *written]


def written_for(directory: Path) -> str | None:
    """The mode whose users ``directory`` holds; None if none were written."""
    if not (directory / SERVER_CONF).exists() or not (directory / MODE_FILE).exists():
        return None
    return (directory / MODE_FILE).read_text().strip()


def read_env(path: Path) -> dict[str, str]:
    """A ``KEY=VALUE`` file, as ``generate`` writes it (and systemd's EnvironmentFile reads)."""
    env = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.lstrip().startswith("#"):
            env[key.strip()] = value.strip()
    return env


def identity(directory: Path, user: str, base: dict[str, str]) -> dict[str, str]:
    """``base`` (an environment) with ``user``'s credentials instead of any others."""
    env = {k: v for k, v in base.items() if k not in (*CREDENTIAL_VARS, "NATS_INBOX_PREFIX")}
    env.update(read_env(directory / f"{user}.env"))
    return env


def function_env(directory: Path, topology: Topology) -> dict[str, dict[str, str]]:
    """function -> the variables that make its process connect as its own user."""
    return {name: read_env(directory / f"{name}.env") for name in topology.functions}
