"""The flow's topology as an SVG picture, drawn from ``streams.yaml`` on the server.

Three columns: the kinds of event a function consumes, the functions, the
kinds they emit. Each arrow is a consumer's filter (event -> function) or a
declared emit (function -> event), as ``runner.py map`` lists them; a kind
both emitted and consumed stands in both outer columns. No script and no
library draw it, so the page needs nothing from the network.
"""

from __future__ import annotations

from html import escape

from orderflow.config import Topology
from orderflow.tools.console.reads import edges

ROW = 28
BOX_W, BOX_H = 150, 22
COLUMNS = (10, 300, 560)  # x of inputs, functions, outputs
WIDTH = COLUMNS[2] + BOX_W + 10


def _box(x: int, y: int, label: str, kind: str) -> str:
    return (
        f'<g class="{kind}" data-name="{escape(label)}"><rect x="{x}" y="{y}" width="{BOX_W}" '
        f'height="{BOX_H}" rx="{11 if kind == "event" else 3}"/>'
        f'<text x="{x + BOX_W / 2}" y="{y + 15}" text-anchor="middle">{escape(label)}</text></g>'
    )


def svg(topology: Topology) -> str:
    functions = list(topology.functions)
    consumed = edges(topology)  # (kind, function), as the flow page counts them
    inputs = sorted({kind for kind, _ in consumed})
    outputs = sorted({k for fn in topology.functions.values() for k in fn.emits})
    rows = max(len(inputs), len(outputs), len(functions) * 2)
    height = rows * ROW + 20

    def y_of(index: int, count: int) -> int:
        gap = (rows * ROW) / max(count, 1)
        return int(10 + index * gap + (gap - BOX_H) / 2)

    at_in = {k: y_of(i, len(inputs)) for i, k in enumerate(inputs)}
    at_fn = {f: y_of(i, len(functions)) for i, f in enumerate(functions)}
    at_out = {k: y_of(i, len(outputs)) for i, k in enumerate(outputs)}
    lines = [
        (COLUMNS[0] + BOX_W, at_in[kind], COLUMNS[1], at_fn[name], f"{kind} -> {name}")
        for kind, name in consumed
    ]
    for name, fn in topology.functions.items():
        for kind in fn.emits:
            lines.append(
                (COLUMNS[1] + BOX_W, at_fn[name], COLUMNS[2], at_out[kind], f"{name} -> {kind}")
            )
    arrows = "".join(
        f'<line data-edge="{escape(edge)}" x1="{x1}" y1="{y1 + BOX_H / 2}" x2="{x2}" '
        f'y2="{y2 + BOX_H / 2}" marker-end="url(#head)"/>'
        for x1, y1, x2, y2, edge in lines
    )
    boxes = "".join(
        [_box(COLUMNS[0], y, k, "event") for k, y in at_in.items()]
        + [_box(COLUMNS[1], y, f, "function") for f, y in at_fn.items()]
        + [_box(COLUMNS[2], y, k, "event") for k, y in at_out.items()]
    )
    return (
        f'<svg id="topology-drawing" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} '
        f'{height}" width="{WIDTH}" height="{height}" role="img" '
        f'aria-label="the {escape(topology.mode)} topology of streams.yaml">'
        '<defs><marker id="head" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z"/>'
        f'</marker></defs><g class="arrows">{arrows}</g>{boxes}</svg>'
    )
