"""Recorded histories replay unchanged, offline and on a real server; a changed handler shows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from functions import delivery
from functions.events import DeliveryScheduled
from functions.upcasters import UPCASTERS
from orderflow import config
from orderflow.config import Topology
from orderflow.runtime.context import SCHEMA_VERSION
from orderflow.tools import recording
from orderflow.tools.replay import (
    external_inputs,
    outcomes,
    recorded_outcomes,
    replay_live,
    replay_offline,
    run_offline,
)
from tests.conftest import ROOT
from tests.recordings.make_recordings import mode_of

RECORDINGS = sorted((ROOT / "tests" / "recordings").glob("*.jsonl"))
SCENARIOS = {"happy", "declined", "flaky", "out_of_stock", "both_failures", "mixed_300",
             "orchestration_mixed_100"}  # fmt: skip
#: Recorded with version 1 of delivery.scheduled (no carrier), before events said their version.
OLD_SCHEMA = ROOT / "tests" / "recordings" / "mixed_300_schema_v1.jsonl"


def wired(path: Path) -> Topology:
    """The topology a recording was made with (make_recordings.py: by its name)."""
    return config.load(ROOT / "streams.yaml", mode_of(path.stem))


def test_every_scenario_has_a_recording() -> None:
    assert {p.stem for p in RECORDINGS} >= SCENARIOS


@pytest.mark.parametrize("path", RECORDINGS, ids=[p.stem for p in RECORDINGS])
async def test_offline_replay_matches_the_recording(path: Path) -> None:
    records = recording.read(path)
    result = await replay_offline(records, wired(path), ROOT)
    assert result.ok, result.render()
    assert result.orders == result.same == len(external_inputs(records))


@pytest.mark.parametrize("path", RECORDINGS, ids=[p.stem for p in RECORDINGS])
async def test_live_replay_on_a_fresh_server_matches_the_recording(path: Path) -> None:
    # Recorded on another server (tests/recordings/make_recordings.py), replayed on a new one.
    records = recording.read(path)
    result = await replay_live(records, wired(path), ROOT / "streams.yaml", timeout=90)
    assert result.ok, result.render()
    assert result.orders == len(external_inputs(records))


async def test_a_changed_handler_fails_the_replay_with_a_readable_diff(
    topology: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery, "tracking_id", lambda order_id: f"TRK-NEW-{order_id}")
    records = recording.read(ROOT / "tests" / "recordings" / "happy.jsonl")
    result = await replay_offline(records, topology, ROOT)
    assert not result.ok
    [diff] = result.diffs.values()
    removed = [line for line in diff if line.startswith("-delivery.scheduled")]
    added = [line for line in diff if line.startswith("+delivery.scheduled")]
    assert removed and "TRK-NEW" not in removed[0]
    assert added and "TRK-NEW-rec-happy" in added[0]
    assert "1 orders replayed: 0 identical, 1 differ" in result.render()


def test_replay_command_exits_non_zero_on_a_difference(tmp_path: Path) -> None:
    original = (ROOT / "tests" / "recordings" / "declined.jsonl").read_text()
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text(original.replace("card_declined", "insufficient_funds"))
    run = [sys.executable, str(ROOT / "runner.py"), "replay", "--offline"]
    same = subprocess.run([*run, str(ROOT / "tests" / "recordings" / "declined.jsonl")],
                          cwd=ROOT, capture_output=True, text=True, check=False)  # fmt: skip
    assert same.returncode == 0, same.stdout + same.stderr
    changed = subprocess.run([*run, str(tampered)], cwd=ROOT, capture_output=True, text=True,
                             check=False, env={**os.environ})  # fmt: skip
    assert changed.returncode == 1
    assert "-payments.failed" in changed.stdout and "insufficient_funds" in changed.stdout


async def test_a_choreography_recording_ends_the_same_way_orchestrated() -> None:
    # The same inputs through the other wiring: different events on the way,
    # the same terminal outcome for every order.
    records = recording.read(ROOT / "tests" / "recordings" / "mixed_300.jsonl")
    orchestrated = await run_offline(
        external_inputs(records), config.load(ROOT / "streams.yaml", "orchestration"), ROOT
    )
    recorded = recorded_outcomes(records)
    replayed = outcomes(orchestrated.emitted)
    assert recorded.keys() == replayed.keys()

    def ends(lines: list[str]) -> list[str]:
        return [line.split(" ", 1)[0] for line in lines if line.startswith("orders.")]

    assert {o: ends(lines) for o, lines in replayed.items()} == {
        o: ends(lines) for o, lines in recorded.items()
    }
    assert any("saga.payment.charge" in "".join(lines) for lines in replayed.values())


def test_a_recording_of_the_old_layout_is_refused_with_what_to_do(tmp_path: Path) -> None:
    # Made before every event was filed under its order: payments.succeeded
    # and the like, no format line.
    legacy = ROOT / "tests" / "recordings" / "legacy" / "happy_v1.jsonl"
    with pytest.raises(recording.RecordingError) as raised:
        recording.read(legacy)
    message = str(raised.value)
    assert "no format line" in message and "format 2" in message
    assert "runner.py record" in message
    out = subprocess.run(
        [sys.executable, str(ROOT / "runner.py"), "replay", str(legacy), "--offline"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "no format line" in out.stderr and "Traceback" not in out.stderr


async def test_a_recording_of_an_older_schema_replays_through_the_upcasters(
    topology: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = recording.read(OLD_SCHEMA)
    # Really made with version 1: no event says its version, no delivery names its carrier.
    assert not any(SCHEMA_VERSION in r.headers for r in records)
    scheduled = [r for r in records if r.subject.endswith(".delivery.scheduled")]
    assert len(scheduled) > 100
    assert not any("carrier" in msgspec.json.decode(r.data) for r in scheduled)
    assert DeliveryScheduled.schema_version == 2
    result = await replay_offline(records, topology, ROOT)
    assert result.ok and result.same == 300, result.render()
    # It is the upcaster that makes them agree: one that forgets the carrier, and every
    # delivered order differs, on its delivery.scheduled alone.
    monkeypatch.setitem(UPCASTERS, ("delivery.scheduled", 1), dict)
    result = await replay_offline(records, topology, ROOT)
    assert len(result.diffs) == len(scheduled)
    for diff in result.diffs.values():
        changed = [line for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---")]
        assert [line[:19] for line in changed] == ["-delivery.scheduled", "+delivery.scheduled"]
        assert '"carrier":"orderflow-post"' in changed[1] and "carrier" not in changed[0]
