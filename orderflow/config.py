"""``streams.yaml`` as typed Structs: the topology, checked before anything connects.

msgspec decodes the file straight into these Structs, so an unknown key, a
missing one or a value of the wrong type fails with the path to it
(``unknown field `ack_wiat` - at `$.functions.payment.consumers[0]```). The
checks msgspec cannot express (a consumer naming a stream that does not
exist, a duration that does not parse) run right after, and name the key and
the value too.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from functions.events import EVENT_TYPES, REQUEST_TYPES
from orderflow import subjects
from orderflow.limits import Limits, config_problems

Name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]+$")]
Duration = Annotated[str, Meta(pattern=r"^\d+(\.\d+)?(ms|s|m|h|d)$")]
# Copies of a stream or bucket across a cluster's servers (JetStream allows 1 to 5).
Replicas = Annotated[int, Meta(ge=1, le=5)]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def seconds(duration: str) -> float:
    """``"250ms"`` -> 0.25; the pattern on :data:`Duration` already vetted the form."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", duration)
    if match is None:
        raise ValueError(f"not a duration: {duration!r} (use e.g. 250ms, 30s, 10m, 7d)")
    return float(match[1]) * _UNITS[match[2]]


class _Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    pass


class StreamSpec(_Config, frozen=True):
    name: Name
    subjects: Annotated[list[str], Meta(min_length=1)]
    storage: Literal["file", "memory"] = "file"
    # Unset: created with 1 (N under `up --cluster N`), then left as it is.
    replicas: Replicas | None = None
    duplicate_window: Duration = "2m"
    max_age: Duration = "30d"
    # Timers (nats-server 2.12+): a publisher may have the server publish a
    # message later, withdraw it with a rollup, and let a message expire.
    # Never on a stream the public may publish to: a rollup deletes history.
    allow_msg_schedules: bool = False
    allow_rollup: bool = False
    allow_msg_ttl: bool = False


class BucketSpec(_Config, frozen=True):
    name: Name
    storage: Literal["file", "memory"] = "file"
    replicas: Replicas | None = None  # as for streams
    history: Annotated[int, Meta(ge=1, le=64)] = 1


class ConsumerSpec(_Config, frozen=True):
    durable: Name
    stream: Name
    # Event kinds (functions/events.py); the consumer filters on their subjects,
    # every order's (orderflow/subjects.py).
    events: Annotated[list[str], Meta(min_length=1)]
    ack_wait: Duration = "30s"
    # Deliveries the runner allows before it dead-letters a message.
    max_deliver: Annotated[int, Meta(ge=1, le=100)] = 8
    max_ack_pending: Annotated[int, Meta(ge=1)] = 1000


class RetrySpec(_Config, frozen=True):
    # Delay before attempt 2, 3, ...; the last one repeats.
    backoff: Annotated[list[Duration], Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["1s", "5s", "30s"]
    )

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return seconds(self.backoff[min(attempt, len(self.backoff)) - 1])


class OwesSpec(_Config, frozen=True):
    """Once every kind in ``after`` is in an order's history, one of ``then`` must follow.

    An item of ``after`` may name alternatives, ``a|b``: either is enough.
    """

    after: Annotated[list[str], Meta(min_length=1)]
    then: Annotated[list[str], Meta(min_length=1)]
    # ...unless one of these is in the history (then nothing is owed).
    unless: list[str] = []

    def due(self, logged: set[str]) -> bool:
        """Whether ``after`` is all in ``logged`` (the kinds in an order's history)."""
        return all(not logged.isdisjoint(item.split("|")) for item in self.after)

    def owing(self, logged: set[str]) -> bool:
        """Due, and neither a ``then`` nor an ``unless`` has followed."""
        return self.due(logged) and logged.isdisjoint([*self.then, *self.unless])


class FunctionSpec(_Config, frozen=True):
    # The durable consumers that feed it, and the request subjects it answers
    # (functions/events.py REQUEST_TYPES); at least one of the two.
    consumers: list[ConsumerSpec] = []
    serves: list[str] = []
    # Every event kind the function may publish; anything else is a bug, dead-lettered.
    emits: list[str] = []
    # The kinds it may read from an order's history (functions/history.py).
    reads: list[str] = []
    buckets: list[Name] = []
    # Messages one process handles at once.
    concurrency: Annotated[int, Meta(ge=1, le=1024)] = 16
    # Subjects on which an invalid message is also answered with an
    # orders.rejected event (when its order id can be read).
    reject_invalid: list[str] = []
    retry: RetrySpec = msgspec.field(default_factory=RetrySpec)
    # What it owes an order, for trace and stuck (choreography: the flow read
    # backwards; orchestration waits on the saga's last word instead).
    owes: list[OwesSpec] = []


class InventorySpec(_Config, frozen=True):
    bucket: Name
    file: str


class DeadLetterSpec(_Config, frozen=True):
    stream: Name
    subject_prefix: Name = "dlq"
    # Larger payloads are dead-lettered unread.
    max_payload: Annotated[int, Meta(ge=1)] = 64 * 1024


class RetryLogSpec(_Config, frozen=True):
    stream: Name
    subject_prefix: Name = "retries"


class InterventionLogSpec(_Config, frozen=True):
    stream: Name
    subject_prefix: Name = "interventions"


class StepSpec(_Config, frozen=True):
    # How long the orchestrator waits for a step's answer before acting.
    timeout: Duration = "30s"
    # retry: send the command again every timeout until `attempts` went
    # unanswered, then wait. compensate: the same, then undo what is done.
    # wait: send nothing again (the command stays with its consumer, which
    # redelivers it until it is answered or dead-lettered). Never unbounded:
    # a command sent again and again to a function that cannot answer only
    # multiplies its dead letters (issue 12).
    on_timeout: Literal["retry", "compensate", "wait"] = "retry"
    attempts: Annotated[int, Meta(ge=1, le=100)] = 3


class StepsSpec(_Config, frozen=True):
    payment: StepSpec = StepSpec(on_timeout="wait")
    stock: StepSpec = StepSpec(on_timeout="compensate")
    delivery: StepSpec = StepSpec()
    release: StepSpec = StepSpec()
    refund: StepSpec = StepSpec()


Mode = Literal["choreography", "orchestration"]
MODES: tuple[Mode, ...] = ("choreography", "orchestration")


class OrchestrationSpec(_Config, frozen=True):
    """The same functions wired as a saga: what ``--mode orchestration`` runs."""

    functions: dict[Name, FunctionSpec]
    steps: StepsSpec = msgspec.field(default_factory=StepsSpec)


class Topology(_Config, frozen=True):
    streams: Annotated[list[StreamSpec], Meta(min_length=1)]
    buckets: list[BucketSpec]
    # The choreography wiring (the default mode); `orchestration` holds the other.
    functions: dict[Name, FunctionSpec]
    dead_letters: DeadLetterSpec
    # Where every retry is noted, so a trace can show it; none: not noted.
    retry_log: RetryLogSpec | None = None
    # Where every operator's intervention (pause, resume...) is recorded.
    interventions: InterventionLogSpec | None = None
    inventory: InventorySpec | None = None
    orchestration: OrchestrationSpec | None = None
    # Which wiring `functions` is once loaded. In streams.yaml: the mode of
    # commands run without --mode.
    mode: Mode = "choreography"
    # Set by load(), not in the file: the functions of the wiring that is not
    # running, whose consumers provision retires.
    inactive: dict[Name, FunctionSpec] = {}
    # Bounds on input, tighter than the contract's (orderflow/limits.py).
    limits: Limits = msgspec.field(default_factory=Limits)

    def stream(self, name: str) -> StreamSpec:
        return next(s for s in self.streams if s.name == name)

    def storing(self, subject: str) -> str | None:
        """The stream that stores ``subject``, if any."""
        return next(
            (s.name for s in self.streams if any(subject_matches(p, subject) for p in s.subjects)),
            None,
        )

    def stream_of(self, subject: str) -> str:
        """The stream that stores ``subject`` (the checks at load make sure there is one)."""
        name = self.storing(subject)
        assert name is not None, subject
        return name

    @property
    def events_stream(self) -> str:
        """Where the orders' histories are: the stream of ``orders.created``."""
        return self.stream_of(subjects.INGRESS)

    @property
    def timers_stream(self) -> str | None:
        """Where the orchestrator's alarms are, if anywhere."""
        return self.storing(subjects.alarm("x"))


class ConfigError(Exception):
    pass


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard match: ``*`` one token, ``>`` the rest."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def _check(topology: Topology) -> None:
    if topology.inactive:
        raise ConfigError("inactive: set by --mode, not written in streams.yaml")
    _check_functions(topology, topology.functions, "functions")
    if topology.orchestration is not None:
        _check_functions(topology, topology.orchestration.functions, "orchestration.functions")
        steps = topology.orchestration.steps
        for step in ("delivery", "release", "refund"):
            if getattr(steps, step).on_timeout == "compensate":
                raise ConfigError(
                    f"orchestration.steps.{step}.on_timeout: 'compensate' is only for payment "
                    f"and stock ({step} has nothing after it to undo: use 'retry')"
                )
    streams = {s.name for s in topology.streams}
    if topology.retry_log and topology.retry_log.stream not in streams:
        raise ConfigError(f"retry_log.stream: no stream named {topology.retry_log.stream!r}")
    if topology.interventions and topology.interventions.stream not in streams:
        raise ConfigError(
            f"interventions.stream: no stream named {topology.interventions.stream!r}"
        )
    if topology.dead_letters.stream not in streams:
        raise ConfigError(f"dead_letters.stream: no stream named {topology.dead_letters.stream!r}")
    buckets = {b.name for b in topology.buckets}
    if topology.inventory and topology.inventory.bucket not in buckets:
        raise ConfigError(f"inventory.bucket: no bucket named {topology.inventory.bucket!r}")
    if problems := config_problems(topology.limits, topology.dead_letters.max_payload):
        raise ConfigError("; ".join(problems))


def _check_functions(topology: Topology, functions: dict[str, FunctionSpec], at: str) -> None:
    streams = {s.name: s for s in topology.streams}
    buckets = {b.name for b in topology.buckets}
    for name, fn in functions.items():
        if not fn.consumers and not fn.serves:
            raise ConfigError(f"{at}.{name}: neither consumers nor serves: nothing would feed it")
        for i, request in enumerate(fn.serves):
            where = f"{at}.{name}.serves[{i}]"
            if request not in REQUEST_TYPES:
                raise ConfigError(
                    f"{where}: {request!r} is not a request subject (functions/events.py: "
                    f"{', '.join(sorted(REQUEST_TYPES))})"
                )
            # A stream would answer the request first, with its publish ack.
            if stored := [s.name for s in streams.values() if any(
                subject_matches(p, request) for p in s.subjects
            )]:  # fmt: skip
                raise ConfigError(f"{where}: {request!r} is stored by stream {stored[0]}; "
                                  "a request subject must not be")  # fmt: skip
        for i, consumer in enumerate(fn.consumers):
            where = f"{at}.{name}.consumers[{i}]"
            stream = streams.get(consumer.stream)
            if stream is None:
                raise ConfigError(
                    f"{where}.stream: no stream named {consumer.stream!r} "
                    f"(streams: {', '.join(streams)})"
                )
            for kind in consumer.events:
                _check_kind(kind, f"{where}.events")
                for subject in subjects.filters(kind):
                    if not any(subject_matches(p, subject) for p in stream.subjects):
                        raise ConfigError(
                            f"{where}.events: {kind!r} is stored on {subject}, which stream "
                            f"{stream.name} does not store (subjects: {', '.join(stream.subjects)})"
                        )
        consumed = {s for c in fn.consumers for s in c.events}
        for kind in fn.reject_invalid:
            if kind not in consumed:
                raise ConfigError(
                    f"{at}.{name}.reject_invalid: {kind!r} is not one of its "
                    f"events ({', '.join(sorted(consumed))})"
                )
        for bucket in fn.buckets:
            if bucket not in buckets:
                raise ConfigError(f"{at}.{name}.buckets: no bucket named {bucket!r}")
    for name, fn in functions.items():
        known = {k for c in fn.consumers for k in c.events} | set(fn.reads) | set(fn.emits)
        for i, rule in enumerate(fn.owes):
            where = f"{at}.{name}.owes[{i}]"
            for kind in (k for item in rule.after for k in item.split("|")):
                _check_kind(kind, f"{where}.after")
                if kind not in known:
                    raise ConfigError(
                        f"{where}.after: {name} neither consumes, reads nor emits {kind!r}"
                    )
            for kind in rule.unless:
                _check_kind(kind, f"{where}.unless")
            for kind in rule.then:
                _check_kind(kind, f"{where}.then")
                if kind not in fn.emits:
                    raise ConfigError(
                        f"{where}.then: {kind!r} is not in {at}.{name}.emits "
                        f"({', '.join(fn.emits)})"
                    )
        for kind in fn.reads:
            _check_kind(kind, f"{at}.{name}.reads")
        for kind in fn.emits:
            _check_kind(kind, f"{at}.{name}.emits")
            subject = subjects.published_on(kind, "*")
            if not any(subject_matches(p, subject) for s in streams.values() for p in s.subjects):
                raise ConfigError(f"{at}.{name}.emits: no stream stores {kind!r} ({subject})")


def _check_kind(kind: str, where: str) -> None:
    if kind not in EVENT_TYPES:
        raise ConfigError(
            f"{where}: {kind!r} is not an event kind (functions/events.py: "
            f"{', '.join(sorted(EVENT_TYPES))})"
        )


def _convert(raw: object) -> Topology:
    """Raw YAML -> Topology, with errors inside ``functions`` naming the function.

    msgspec writes a dict key in an error path as ``[...]``; converting each
    function on its own first lets the message say ``$.functions.payment``.
    """
    orchestration = raw.get("orchestration") if isinstance(raw, dict) else None
    for at, functions in (
        ("functions", raw.get("functions") if isinstance(raw, dict) else None),
        (
            "orchestration.functions",
            orchestration.get("functions") if isinstance(orchestration, dict) else None,
        ),
    ):
        for name, spec in functions.items() if isinstance(functions, dict) else ():
            try:
                msgspec.convert(spec, FunctionSpec)
            except msgspec.ValidationError as exc:
                raise msgspec.ValidationError(
                    str(exc).replace("`$", f"`$.{at}.{name}", 1)
                    if "`$" in str(exc)
                    else f"{exc} - at `$.{at}.{name}`"
                ) from None
    return msgspec.convert(raw, Topology)


def load(path: str | Path = "streams.yaml", mode: Mode | None = None) -> Topology:
    """The topology in ``path``, wired for ``mode`` (default: the file's ``mode``)."""
    path = Path(path)
    try:
        topology = _convert(msgspec.yaml.decode(path.read_bytes()))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        _check(topology)
        topology = _resolve(topology, mode or topology.mode)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return topology


def _resolve(topology: Topology, mode: Mode) -> Topology:
    if mode == "choreography" or topology.orchestration is None:
        if mode == "orchestration":
            raise ConfigError("mode 'orchestration': there is no orchestration section")
        return msgspec.structs.replace(
            topology,
            mode="choreography",
            inactive=topology.orchestration.functions if topology.orchestration else {},
        )
    return msgspec.structs.replace(
        topology,
        functions=topology.orchestration.functions,
        mode="orchestration",
        inactive=topology.functions,
    )


class Inventory(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    stock: dict[str, Annotated[int, Meta(ge=0)]]


def load_inventory(path: str | Path) -> dict[str, int]:
    path = Path(path)
    try:
        return msgspec.yaml.decode(path.read_bytes(), type=Inventory).stock
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
