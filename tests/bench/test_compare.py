"""``compare``: both modes on the same orders, on real servers; what it reports must hold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from bench import compare
from orderflow import config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "streams.yaml"


def expected_coupling(functions: dict[str, Any]) -> tuple[dict[str, int], list[str]]:
    """Straight from the YAML: event kinds each function knows, and who reads stock's outcomes."""
    consumes = {
        name: {kind for c in fn.get("consumers", []) for kind in c["events"]}
        for name, fn in functions.items()
    }
    known = {name: len(consumes[name] | set(fn["emits"])) for name, fn in functions.items()}
    stock_emits = set(functions["stock"]["emits"])
    readers = sorted(n for n in functions if n != "stock" and consumes[n] & stock_emits)
    return known, readers


def test_compare_both_modes() -> None:
    settings = compare.Settings(
        orders=30,
        paced=10,
        warmup=5,
        outage_s=1.5,
        lead_s=0.5,
        tail_s=0.5,
        timeout=45.0,
        # The function that announces outcomes in each mode: the seed's "single point of
        # failure" is the orchestrator; its counterpart in choreography is order.
        stop={"choreography": ["order"], "orchestration": ["orchestrator"]},
    )
    result = compare.run(CONFIG, settings)
    chor, orch = result.modes["choreography"], result.modes["orchestration"]

    # Every order finished once in both modes, with the same outcome per order id.
    for mode in (chor, orch):
        assert mode.unfinished == 0 and mode.duplicate_terminal_events == 0, mode.mode
        assert mode.completed + mode.cancelled == 30, mode.mode
        assert len(mode.outcomes) == 30 and mode.processes_died == 0, mode.mode
    assert chor.outcomes == orch.outcomes and not result.differences
    assert set(chor.outcomes.values()) == {"completed", "cancelled"}
    assert result.ok
    # The saga stops at the first failure, so its reason is the first of choreography's.
    for chor_reason, orch_reason in result.reasons_differ.values():
        assert chor_reason.startswith(orch_reason), (chor_reason, orch_reason)

    # The orchestrator's commands are extra messages: more in ORDERS per order.
    assert chor.commands_per_order == 0 < orch.commands_per_order
    events = config.load(CONFIG).events_stream
    assert orch.appended_per_order[events] > chor.appended_per_order[events]
    assert orch.hops_happy > chor.hops_happy

    # Coupling is what streams.yaml says.
    raw = yaml.safe_load(CONFIG.read_text())
    for mode, functions in (
        (chor, raw["functions"]),
        (orch, raw["orchestration"]["functions"]),
    ):
        assert mode.coupling is not None
        known, readers = expected_coupling(functions)
        assert {n: f.subjects for n, f in mode.coupling.functions.items()} == known
        assert mode.coupling.subjects_known == sum(known.values())
        assert mode.coupling.new_step_changes == readers
    assert orch.coupling is not None and orch.coupling.new_step_changes == ["orchestrator"]

    # Stopping the function that announces outcomes: nothing finishes while it is down,
    # everything caught by the outage waits and then finishes.
    for mode, stopped in ((chor, "order"), (orch, "orchestrator")):
        [outage] = mode.outages
        assert outage.function == stopped
        assert outage.affected > 0 and outage.finished_while_down == 0, outage
        assert outage.waited == outage.affected and outage.unfinished == 0, outage
    # In choreography the others keep working meanwhile; with the orchestrator down,
    # only what it had sent before the kill moves.
    assert chor.outages[0].progressed_while_down > 0
    assert orch.outages[0].progressed_while_down < orch.outages[0].waited

    table = compare.render(result)
    assert "stop order / orchestrator" in table
    assert json.loads(json.dumps(compare.as_json(result)))["ok"] is True
