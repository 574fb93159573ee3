"""The console as an ASGI app (Starlette): routes, the live snapshot, and what guards the actions.

One snapshot of the flow is taken every :data:`SNAPSHOT_EVERY` seconds by one
task, whoever watches: the flow page renders the latest, and ``/live``
streams each new one as a server-sent event to every open page. A viewer
costs the flow nothing more than the snapshot task does (measured in
bench/README.md).

Safe by default: the CLI binds it to loopback; every action (a redrive, a cancellation) is a
POST whose form carries this process's CSRF token (a secret drawn at start,
compared in constant time) and whose ``Origin``, when the browser sends one,
must be this console; ``read_only`` renders no form and refuses every POST.
Every answer says how long the server took (``Server-Timing``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from nats.aio.client import Client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from functions.events import CancelRequest
from functions.orchestrator import Saga, saga_key
from orderflow import subjects
from orderflow.config import Topology
from orderflow.ops import interventions
from orderflow.runtime.kv import KvStore
from orderflow.tools import dlq, trace
from orderflow.tools.console import drawing, pages, reads
from orderflow.tools.streamlog import read_subject

log = logging.getLogger("orderflow.console")

#: Seconds between two snapshots of the flow.
SNAPSHOT_EVERY = 1.0
#: The stuck page's default age, seconds.
STUCK_AFTER_S = 30.0
STATIC = Path(__file__).parent / "static"


class Console:
    """What every request shares: the connection, the topology, the latest snapshot."""

    def __init__(self, nc: Client, topology: Topology, read_only: bool) -> None:
        self.nc = nc
        self.topology = topology
        self.read_only = read_only
        self.csrf = None if read_only else secrets.token_urlsafe(32)
        self.latest: reads.Snapshot | None = None
        self._changed = asyncio.Condition()
        self.mermaid = trace.mermaid_map(topology)
        self.drawing = drawing.svg(topology)
        self.counts = reads.EdgeCounts(topology)

    async def snapshot(self) -> reads.Snapshot:
        if self.latest is None:
            await self._take()
        assert self.latest is not None
        return self.latest

    async def instances(self) -> dict[str, int]:
        """Processes answering per function, from the latest snapshot (no wait for a PING)."""
        functions = (await self.snapshot()).functions
        return {name: int(row.get("instances") or 0) for name, row in functions.items()}

    async def _take(self) -> None:
        self.latest = await reads.snapshot(self.nc, self.topology, datetime.now(UTC), self.counts)
        async with self._changed:
            self._changed.notify_all()

    async def keep_taking(self) -> None:
        while True:
            try:
                await self._take()
            except Exception as exc:  # the server away: the page shows the last one
                log.warning("console: no snapshot of the flow: %r", exc)
            await asyncio.sleep(SNAPSHOT_EVERY)

    async def next_snapshot(self) -> reads.Snapshot:
        async with self._changed:
            await self._changed.wait()
        assert self.latest is not None
        return self.latest


def build(nc: Client, topology: Topology, read_only: bool = False) -> Starlette:
    console = Console(nc, topology, read_only)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(console.keep_taking())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def page(handler: Callable[[Request], Awaitable[tuple[str, str] | Response]]) -> Any:
        """A GET page: the handler gives (title, body), or a whole response."""

        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            got = await handler(request)
            if isinstance(got, Response):
                response = got
            else:
                title, body = got
                response = HTMLResponse(pages.layout(title, body, topology.mode))
            took = (time.perf_counter() - started) * 1000
            response.headers["Server-Timing"] = f"app;dur={took:.1f}"
            return response

        return endpoint

    async def flow(request: Request) -> tuple[str, str]:
        snap = await console.snapshot()
        return "Flow", pages.flow(snap.as_json(), console.mermaid, console.drawing)

    async def flow_json(request: Request) -> Response:
        return JSONResponse((await console.snapshot()).as_json())

    async def live(request: Request) -> Response:
        async def events() -> AsyncIterator[str]:
            yield _event((await console.snapshot()).as_json())
            while not await request.is_disconnected():
                try:
                    snap = await asyncio.wait_for(console.next_snapshot(), 15)
                except TimeoutError:
                    yield ": still here\n\n"  # keeps proxies from closing an idle stream
                    continue
                yield _event(snap.as_json())

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})  # fmt: skip

    async def find(request: Request) -> Response:
        order_id = request.query_params.get("order_id", "").strip()
        if not subjects.safe(order_id):
            body = pages.problem("No such order", f"{order_id!r} cannot be an order id")
            return HTMLResponse(pages.layout("Find", body, topology.mode), status_code=400)
        return RedirectResponse(f"/orders/{order_id}", status_code=303)

    async def orders(request: Request) -> tuple[str, str]:
        status = request.query_params.get("status", "completed")
        customer = request.query_params.get("customer", "").strip()
        if customer:
            ids, among = await reads.by_customer(console.nc, topology, customer)
            rows = [(o, "", "") for o in ids]
            note = f"Orders of customer {customer} among the newest {among} orders."
            return "Orders", pages.order_list(f"Customer {customer}", rows, note)
        if status == "unfinished":
            found = sorted(await trace.in_flight(console.nc, topology))[: reads.LIST_LIMIT]
            rows = [(o, "unfinished", "") for o in found]
            note = "Orders with a message not yet settled by its function, or a dead letter."
            return "Orders", pages.order_list("Unfinished", rows, note)
        kind = "orders.cancelled" if status == "cancelled" else "orders.completed"
        stored = await reads.recent(console.nc, topology, kind)
        rows = [(reads.order_id_of(s), kind.split(".")[1], s.time.isoformat()) for s in stored]
        note = f"The newest {len(rows)} (at most {reads.LIST_LIMIT})."
        return "Orders", pages.order_list(kind.split(".")[1].capitalize(), rows, note)

    async def order(request: Request) -> tuple[str, str] | Response:
        order_id = request.path_params["order_id"]
        traces = (
            await trace.load(console.nc, topology, [order_id]) if subjects.safe(order_id) else {}
        )
        found = traces.get(order_id)
        if found is None:
            body = pages.problem("No such order", f"No events for order {order_id!r} in the log.")
            return HTMLResponse(pages.layout("Order", body, topology.mode), status_code=404)
        saga = await _saga(console, order_id) if topology.mode == "orchestration" else None
        message = request.query_params.get("message", "")
        return f"Order {order_id}", pages.order(
            found, datetime.now(UTC), saga, console.csrf, message
        )

    async def cancel(request: Request) -> Response:
        form = await _form(request)
        if (refused := await _guard(request, console, form)) is not None:
            return refused
        order_id = request.path_params["order_id"]
        if not subjects.safe(order_id):
            return Response(f"no order {order_id!r}", status_code=404)
        asked = CancelRequest(order_id, reason=form.get("reason", "").strip()[:500],
                              requested_by=f"{interventions.who()} (console)"[:64])  # fmt: skip
        try:
            answer = await interventions.cancel(console.nc, topology, asked)
            said = f"{answer.answer}: {answer.rule}"
        except interventions.NoAnswer as exc:
            said = f"no answer: {exc}"
        log.warning("console: cancel %s: %s", order_id, said)
        return RedirectResponse(f"/orders/{order_id}?{urlencode({'message': said})}", 303)

    async def stuck(request: Request) -> tuple[str, str]:
        try:
            older_than = float(request.query_params.get("older_than", STUCK_AFTER_S))
        except ValueError:
            older_than = STUCK_AFTER_S
        now = datetime.now(UTC)
        late = await trace.stuck(console.nc, topology, older_than, now, await console.instances())
        groups: dict[tuple[str, str], list[tuple[str, float]]] = {}
        for t in late:
            age = (now - t.steps[0].time).total_seconds()
            for owed in t.owed or [trace.Owed("?", "nothing known", t.steps[0].time)]:
                groups.setdefault((owed.function, owed.what), []).append((t.order_id, age))
        return "Stuck", pages.stuck(groups, older_than)

    async def letters(request: Request) -> tuple[str, str]:
        found = await dlq.dead_letters(console.nc, topology)
        message = request.query_params.get("message", "")
        return "Dead letters", pages.dead_letters(found, console.csrf, message)

    async def letter(request: Request) -> tuple[str, str] | Response:
        ident = request.path_params["ident"]
        found = [d for d in await dlq.dead_letters(console.nc, topology) if d.id == ident]
        if not found:
            body = pages.problem("No such dead letter", f"Dead letter {ident} is not kept.")
            return HTMLResponse(pages.layout("Dead letter", body, topology.mode), status_code=404)
        return f"Dead letter {ident}", pages.dead_letter(found[0], console.csrf)

    async def redrive_one(request: Request) -> Response:
        if (refused := await _guard(request, console)) is not None:
            return refused
        ident = request.path_params["ident"]
        found = [d for d in await dlq.dead_letters(console.nc, topology) if d.id == ident]
        if not found:
            return RedirectResponse(f"/dead-letters?message=no dead letter {ident}", 303)
        said = await dlq.redrive(console.nc, topology, found)
        log.warning("console: redrove dead letter %d: %s", ident, "; ".join(said))
        return RedirectResponse(f"/dead-letters?message={'; '.join(said)}", status_code=303)

    async def redrive_matching(request: Request) -> Response:
        form = await _form(request)
        if (refused := await _guard(request, console, form)) is not None:
            return refused
        filters = {k: form.get(k, "").strip() for k in ("function", "reason", "since")}
        try:
            since = dlq.since_of(filters["since"])
            found = await dlq.dead_letters(console.nc, topology)
            matched = dlq.matching(found, filters["function"], filters["reason"], since)
        except ValueError as exc:
            body = pages.problem("Cannot redrive", str(exc))
            return HTMLResponse(pages.layout("Dead letters", body, topology.mode), 400)
        if form.get("action") != "redrive":
            all_letters = await dlq.dead_letters(console.nc, topology)
            body = pages.dead_letters(all_letters, console.csrf, "", len(matched), filters)
            return HTMLResponse(pages.layout("Dead letters", body, topology.mode))
        said = await dlq.redrive(console.nc, topology, matched) if matched else []
        log.warning("console: redrove %d dead letters matching %s", len(matched), filters)
        message = f"redrove {len(matched)} dead letters" + (f": {'; '.join(said)}" if said else "")
        return RedirectResponse(f"/dead-letters?message={message}", status_code=303)

    routes = [
        Route("/", page(flow)),
        Route("/api/flow", flow_json),
        Route("/live", live),
        Route("/find", find),
        Route("/orders", page(orders)),
        Route("/orders/{order_id}", page(order)),
        Route("/orders/{order_id}/cancel", cancel, methods=["POST"]),
        Route("/stuck", page(stuck)),
        Route("/dead-letters", page(letters)),
        Route("/dead-letters/{ident:int}", page(letter)),
        Route("/dead-letters/{ident:int}/redrive", redrive_one, methods=["POST"]),
        Route("/dead-letters/redrive", redrive_matching, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def _event(data: dict[str, Any]) -> str:
    return f"event: flow\ndata: {json.dumps(data, default=str)}\n\n"


async def _form(request: Request) -> dict[str, str]:
    # urlencoded forms only; parsed here so no multipart package is needed.
    body = (await request.body()).decode(errors="replace")
    return {k: v[-1] for k, v in parse_qs(body, keep_blank_values=True).items()}


async def _guard(
    request: Request, console: Console, form: dict[str, str] | None = None
) -> Response | None:
    """Refuse an action unless it is allowed, came from this console, and carries its token."""
    if console.read_only or console.csrf is None:
        return Response("read-only console: no actions", status_code=403)
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
        return Response(f"refused: the request came from {origin}", status_code=403)
    form = form if form is not None else await _form(request)
    if not hmac.compare_digest(form.get("csrf", ""), console.csrf):
        return Response("refused: missing or wrong CSRF token", status_code=403)
    return None


async def _saga(console: Console, order_id: str) -> dict[str, Any] | None:
    """The orchestrated order's saga (its step, attempt, outcome) and its next deadline."""
    # The orchestrator's own bucket, as streams.yaml names it.
    bucket = console.topology.functions["orchestrator"].buckets[0]
    found = await KvStore(console.nc, bucket).get(saga_key(order_id), Saga)
    if found is None:
        return None
    saga = found.value
    shown: dict[str, Any] = {"step": saga.step, "attempt": saga.attempt,
                             "outcome": saga.outcome, "problem": saga.problem or "-"}  # fmt: skip
    timers = console.topology.timers_stream
    if timers is not None and saga.outcome == "open":
        alarms = await read_subject(console.nc, timers, subjects.alarm(order_id))
        schedule = alarms[-1].headers.get("Nats-Schedule", "") if alarms else ""
        shown["deadline"] = schedule.removeprefix("@at ") or "none pending"
    return shown
