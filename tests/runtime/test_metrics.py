"""orderflow.runtime.metrics: the counters a process answers in its NATS micro stats."""

from __future__ import annotations

import json

from orderflow.runtime.metrics import DURATION_BOUNDS_S, Counters


def test_each_duration_lands_in_the_first_bucket_whose_bound_it_does_not_exceed() -> None:
    counters = Counters()
    for took_s in (0.0001, 0.0005, 0.0006, 0.003, 10.0, 11.0, 120.0):
        counters.handled(round(took_s * 1e9))
    by_bound = dict(zip([*DURATION_BOUNDS_S, "+Inf"], counters.durations, strict=True))
    # A value equal to a bound belongs to it (Prometheus's `le`); past the last, +Inf.
    assert by_bound[0.0005] == 2 and by_bound[0.001] == 1 and by_bound[0.005] == 1
    assert by_bound[10.0] == 1 and by_bound["+Inf"] == 2
    assert sum(counters.durations) == counters.processed == 7
    assert counters.processing_ns == round(sum((0.0001, 0.0005, 0.0006, 0.003, 10, 11, 120)) * 1e9)


def test_the_stats_data_carries_the_histogram_and_its_bounds_as_json() -> None:
    counters = Counters()
    counters.handled(2_000_000)
    data = json.loads(json.dumps(counters.as_dict()))
    assert data["duration_bounds_s"] == list(DURATION_BOUNDS_S)
    assert len(data["durations"]) == len(DURATION_BOUNDS_S) + 1
    assert data["durations"][DURATION_BOUNDS_S.index(0.0025)] == 1
    assert data["processed"] == 1 and data["processing_ns"] == 2_000_000
