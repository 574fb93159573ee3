"""The console's pages as HTML: plain server-rendered markup, every value escaped.

Each page is a function of what was read (a snapshot, a trace, dead letters)
to a string. The markup names what it shows with ``id`` and ``data-*``
attributes (``data-function``, ``data-field``, ``data-kind``...): the live
script updates cells by them, and the browser tests find them the same way.
An action (a redrive, a cancellation) is a form posting to the console with its CSRF token;
``read_only`` leaves every form out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from html import escape
from typing import Any

from orderflow.tools.dlq import DeadLetter
from orderflow.tools.trace import Aside, Trace

#: Columns of the flow page's function table: (field in the snapshot, heading).
FUNCTION_FIELDS = (
    ("instances", "instances"),
    ("processed", "processed"),
    ("failed", "failed"),
    ("retried", "retried"),
    ("dead_lettered", "dead-lettered"),
    ("pending", "backlog"),
    ("unacked", "in hand"),
    ("redelivered", "redelivered"),
    ("dead_letters", "dead letters kept"),
)


def e(value: object) -> str:
    return escape(str(value), quote=True)


def layout(title: str, body: str, mode: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)} · orderflow</title>
<link rel="stylesheet" href="/static/console.css">
</head><body>
<header>
  <a class="brand" href="/">orderflow</a> <span class="mode">{e(mode)}</span>
  <nav><a href="/">Flow</a> <a href="/orders">Orders</a> <a href="/stuck">Stuck</a>
  <a href="/dead-letters">Dead letters</a></nav>
  <form id="find" action="/find" method="get">
    <input name="order_id" placeholder="order id" aria-label="order id" required>
    <button type="submit">Find</button>
  </form>
</header>
<main>
{body}
</main>
<script src="/static/console.js"></script>
</body></html>
"""


def _cell(value: object) -> str:
    return "&ndash;" if value is None else e(value)


# --- flow ----------------------------------------------------------------------


def flow(snapshot: dict[str, Any], mermaid: str, drawing: str) -> str:
    rows = []
    for name, figures in snapshot["functions"].items():
        cells = "".join(
            f'<td data-field="{field}">{_cell(figures.get(field))}</td>'
            for field, _ in FUNCTION_FIELDS
        )
        error = figures.get("paused") or figures.get("last_error") or ""
        rows.append(
            f'<tr data-function="{e(name)}"><th>{e(name)}</th>{cells}'
            f'<td data-field="last_error" class="error">{e(error)}</td></tr>'
        )
    heads = "".join(f"<th>{e(h)}</th>" for _, h in FUNCTION_FIELDS)
    edges = "".join(
        f'<tr data-edge="{e(edge)}"><td>{e(edge)}</td><td data-field="events">{count}</td></tr>'
        for edge, count in snapshot["edges"].items()
    )
    return f"""<h1>Flow</h1>
<p class="live">Live: updated <time id="taken">{e(snapshot["taken"])}</time></p>
<table id="functions"><thead><tr><th>function</th>{heads}<th>last error</th></tr></thead>
<tbody>{"".join(rows)}</tbody></table>
<h2>Events over the last minute</h2>
<table id="edges"><thead><tr><th>event -&gt; function</th><th>events</th></tr></thead>
<tbody>{edges}</tbody></table>
<h2>Topology</h2>
<p>Drawn from <code>streams.yaml</code>: each event a function consumes, and each it emits.</p>
<div class="drawing">{drawing}</div>
<details><summary>As Mermaid (<code>runner.py map</code>)</summary>
<pre id="topology">{e(mermaid)}</pre></details>
<script id="snapshot" type="application/json">{_json(snapshot)}</script>
"""


def _json(value: object) -> str:
    # Inside <script>: no "</" may end it early.
    return json.dumps(value, default=str).replace("</", "<\\/")


# --- orders --------------------------------------------------------------------


def order_list(title: str, rows: Sequence[tuple[str, str, str]], note: str) -> str:
    """``rows``: (order id, what, when)."""
    body = "".join(
        f'<tr data-order="{e(o)}"><td><a href="/orders/{e(o)}">{e(o)}</a></td>'
        f"<td>{e(what)}</td><td>{e(when)}</td></tr>"
        for o, what, when in rows
    )
    return f"""<h1>Orders</h1>
<p class="filters">Recent: <a href="/orders?status=completed">completed</a>
<a href="/orders?status=cancelled">cancelled</a>
<a href="/orders?status=unfinished">unfinished</a>
<form action="/orders" method="get" class="inline">
  <input name="customer" placeholder="customer id" aria-label="customer id">
  <button type="submit">By customer</button></form></p>
<h2>{e(title)}</h2>
<p class="note">{e(note)}</p>
<table id="orders"><thead><tr><th>order</th><th>status</th><th>when</th></tr></thead>
<tbody>{body}</tbody></table>
"""


def order(
    trace: Trace,
    now: datetime,
    saga: dict[str, Any] | None,
    csrf: str | None = None,
    message: str = "",
) -> str:
    steps = "".join(
        f'<tr class="step" data-kind="{e(s.kind)}" data-sequence="{s.sequence}">'
        f"<td>{e(s.time.strftime('%H:%M:%S.%f')[:-3])}</td><td>{e(s.kind)}</td>"
        f"<td>{e(s.by)}</td><td>{e(s.caused_by or '')}</td>"
        f"<td>{'' if s.hop_ms is None else f'{s.hop_ms:.1f}'}</td>"
        f"<td><details><summary>payload</summary><pre>{e(_pretty(s.payload))}</pre>"
        f"</details></td></tr>"
        for s in trace.steps
    )
    owed = "".join(
        f'<li class="owing" data-function="{e(o.function)}"><strong>{e(o.function)}</strong>'
        f" owes {e(o.what)}, due for {(now - o.since).total_seconds():.1f} s; its consumer: "
        f"{e(_consumer(o.consumer))}"
        + (f' <span class="paused">{e(o.function)} is {e(o.paused)}</span>' if o.paused else "")
        + "".join(
            f' — held by <a href="/dead-letters/{e(d.fields.get("id"))}">dead letter '
            f"{e(d.fields.get('id'))}</a>"
            for d in o.held_by
        )
        + "</li>"
        for o in trace.owed
    )
    asides = "".join(
        f'<tr class="{e(a.kind.replace(" ", "-"))}">'
        f"<td>{e(a.time.strftime('%H:%M:%S.%f')[:-3])}</td><td>{e(a.kind)}</td>"
        f"<td>{e(a.function)}</td><td>{e(a.subject)}</td><td>{_aside_detail(a)}</td></tr>"
        for a in sorted(
            [*trace.retries, *trace.dead_letters, *trace.interventions], key=lambda a: a.time
        )
    )
    outcome = trace.outcome or "unfinished"
    waiting = f'<h2>Waiting on</h2><ul id="owed">{owed}</ul>' if trace.owed else ""
    note = f'<p id="message" class="message">{e(message)}</p>' if message else ""
    action = ""
    if csrf is not None and trace.outcome is None:
        # Answered at once: accepted (it will end cancelled) or too late (delivery scheduled).
        action = f"""<form method="post" action="/orders/{e(trace.order_id)}/cancel" id="cancel">
<input type="hidden" name="csrf" value="{e(csrf)}">
<input type="text" name="reason" id="cancel-reason" placeholder="why" maxlength="500">
<button type="submit" id="cancel-order">Cancel this order</button></form>"""
    return f"""<h1 data-order="{e(trace.order_id)}">Order {e(trace.order_id)}</h1>
<p id="outcome" data-outcome="{e(outcome)}" class="outcome {e(outcome)}">{e(outcome)}</p>
{note}{action}
{waiting}
{_saga(saga)}
<h2>Timeline</h2>
<table id="timeline"><thead><tr><th>time</th><th>event</th><th>by</th><th>caused by</th>
<th>hop ms</th><th></th></tr></thead><tbody>{steps}</tbody></table>
<h2>Retries, dead letters and interventions on its path</h2>
<table id="asides"><thead><tr><th>time</th><th>what</th><th>function</th><th>subject</th>
<th>detail</th></tr></thead><tbody>{asides}</tbody></table>
"""


def _aside_detail(aside: Aside) -> str:
    if aside.kind != "dead letter":
        return e(aside.detail)
    ident = aside.fields.get("id")
    return f'<a href="/dead-letters/{e(ident)}">{e(aside.detail)}</a>'


def _saga(saga: dict[str, Any] | None) -> str:
    if saga is None:
        return ""
    rows = "".join(
        f'<tr data-field="{e(k)}"><th>{e(k)}</th><td>{e(v)}</td></tr>' for k, v in saga.items()
    )
    return f'<h2>Saga</h2><table id="saga"><tbody>{rows}</tbody></table>'


def _consumer(state: dict[str, int]) -> str:
    if not state:
        return "no answer"
    return ", ".join(f"{k} {v}" for k, v in state.items())


def _pretty(payload: object) -> str:
    return json.dumps(payload, indent=2, default=str) if not isinstance(payload, str) else payload


# --- stuck ---------------------------------------------------------------------


def stuck(groups: dict[tuple[str, str], list[tuple[str, float]]], older_than: float) -> str:
    sections = "".join(
        f'<section class="waiting" data-function="{e(fn)}"><h2>{e(fn)} owes {e(what)}</h2>'
        f"<ul>"
        + "".join(
            f'<li data-order="{e(o)}"><a href="/orders/{e(o)}">{e(o)}</a> '
            f"(started {age:.0f} s ago)</li>"
            for o, age in orders
        )
        + "</ul></section>"
        for (fn, what), orders in groups.items()
    )
    count = sum(len(v) for v in groups.values())
    return f"""<h1>Stuck</h1>
<form action="/stuck" method="get" class="inline">Unfinished orders older than
<input name="older_than" value="{older_than:g}" size="5" aria-label="seconds"> s
<button type="submit">Show</button></form>
<p id="stuck-count" data-count="{count}">{count} unfinished, by the step they wait on.</p>
{sections}
"""


# --- dead letters ----------------------------------------------------------------


def dead_letters(
    letters: Sequence[DeadLetter], csrf: str | None, message: str = "", matched: int | None = None,
    filters: dict[str, str] | None = None,
) -> str:  # fmt: skip
    rows = "".join(
        f'<tr data-id="{d.id}"><td><a href="/dead-letters/{d.id}">{d.id}</a></td>'
        f"<td>{e(d.function)}</td><td>{e(d.subject)}</td><td>{e(d.time)}</td>"
        f"<td>{e(d.reason[:120])}</td></tr>"
        for d in letters
    )
    f = filters or {}
    form = ""
    if csrf is not None:
        form = f"""<form id="redrive-matching" method="post" action="/dead-letters/redrive">
<input type="hidden" name="csrf" value="{e(csrf)}">
function <input name="function" value="{e(f.get("function", ""))}" size="10">
reason contains <input name="reason" value="{e(f.get("reason", ""))}" size="20">
since <input name="since" value="{e(f.get("since", ""))}" placeholder="2026-12-01T10:00" size="16">
<button type="submit" name="action" value="dry-run" id="dry-run">Dry run</button>
<button type="submit" name="action" value="redrive" id="redrive-all">Redrive all that match</button>
</form>"""
    shown = ""
    if matched is not None:
        shown = f'<p id="matched" data-count="{matched}">{matched} dead letters match.</p>'
    note = f'<p id="message" class="message">{e(message)}</p>' if message else ""
    return f"""<h1>Dead letters</h1>
{note}{shown}{form}
<table id="dead-letters"><thead><tr><th>id</th><th>function</th><th>subject</th><th>when</th>
<th>reason</th></tr></thead><tbody>{rows}</tbody></table>
"""


def dead_letter(letter: DeadLetter, csrf: str | None) -> str:
    headers = "".join(
        f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in sorted(letter.headers.items())
    )
    action = ""
    if csrf is not None:
        action = f"""<form method="post" action="/dead-letters/{letter.id}/redrive">
<input type="hidden" name="csrf" value="{e(csrf)}">
<button type="submit" id="redrive">Redrive to {e(letter.subject)}</button></form>"""
    return f"""<h1 data-id="{letter.id}">Dead letter {letter.id}</h1>
<p class="reason" id="reason">{e(letter.reason)}</p>
<p>{e(letter.function)} gave up on {e(letter.subject)} ({e(letter.stream)}
{letter.sequence}) after {letter.deliveries} deliveries, at {e(letter.time)}.</p>
{action}
<h2>Headers</h2><table id="headers"><tbody>{headers}</tbody></table>
<h2>Payload</h2><pre id="payload">{e(letter.data.decode(errors="replace"))}</pre>
"""


def problem(title: str, detail: str) -> str:
    return f'<h1>{e(title)}</h1><p class="problem">{e(detail)}</p>'
