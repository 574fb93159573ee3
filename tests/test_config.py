"""streams.yaml: typed, checked before anything connects, errors name the key and its path."""

from __future__ import annotations

from pathlib import Path

import pytest

from orderflow.config import ConfigError, RetrySpec, load, seconds

STREAMS_YAML = Path(__file__).resolve().parent.parent / "streams.yaml"


def variant(tmp_path: Path, old: str, new: str) -> Path:
    """streams.yaml with the first ``old`` replaced by ``new``, written to a temp file."""
    text = STREAMS_YAML.read_text()
    assert old in text, f"streams.yaml no longer contains {old!r}"
    path = tmp_path / "streams.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load(path)
    return str(caught.value)


def test_streams_yaml_loads() -> None:
    topology = load(STREAMS_YAML)
    assert set(topology.functions) == {"payment", "stock", "delivery", "order", "cancel"}
    assert topology.stream("ORDERS").subjects
    for fn in topology.functions.values():
        assert all(c.stream == "ORDERS" for c in fn.consumers)
    assert topology.functions["stock"].consumers[0].events == [
        "orders.created",
        "payments.failed",
        "payments.refunded",
    ]


def test_an_event_kind_not_stored_by_the_stream(tmp_path: Path) -> None:
    message = load_error(variant(tmp_path, ', "order.>"]', "]"))
    assert "functions.payment.consumers[0].events" in message
    assert "'orders.created' is stored on order.*.orders.created" in message
    assert "ORDERS" in message


def test_a_misspelt_event_kind_names_its_key(tmp_path: Path) -> None:
    message = load_error(variant(tmp_path, "reads: [payments.succeeded, stock.reserved]",
                                 "reads: [payments.succeeded, stock.reserve]"))  # fmt: skip
    assert "functions.delivery.reads: 'stock.reserve' is not an event kind" in message


def test_missing_file() -> None:
    assert "no such file" in load_error(Path("/nonexistent/streams.yaml"))


def test_retry_delay_repeats_the_last_value() -> None:
    retry = RetrySpec(backoff=["200ms", "1s", "5s"])
    assert [retry.delay(attempt) for attempt in range(1, 7)] == [0.2, 1.0, 5.0, 5.0, 5.0, 5.0]
    assert RetrySpec().delay(1) == 1.0


@pytest.mark.parametrize(
    ("duration", "expected"),
    [
        ("250ms", 0.25),
        ("30s", 30.0),
        ("1.5s", 1.5),
        ("10m", 600.0),
        ("2h", 7200.0),
        ("7d", 604800.0),
    ],
)
def test_seconds(duration: str, expected: float) -> None:
    assert seconds(duration) == expected


def test_seconds_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="30 seconds"):
        seconds("30 seconds")


def test_both_wirings_load_from_one_file() -> None:
    orchestration = load(STREAMS_YAML, "orchestration")
    assert orchestration.mode == "orchestration"
    assert set(orchestration.functions) == {
        "orchestrator",
        "payment",
        "stock",
        "delivery",
        "cancel",
    }
    # The other wiring travels along, for provision to retire its consumers.
    assert set(orchestration.inactive) == set(load(STREAMS_YAML).functions)
    assert load(STREAMS_YAML).inactive == orchestration.functions


def test_an_orchestration_typo_names_its_path(tmp_path: Path) -> None:
    path = variant(
        tmp_path, "durable: payment-saga", "durable: payment-saga\n          ackwait: 1s"
    )
    message = load_error(path)
    assert "unknown field `ackwait`" in message
    assert "$.orchestration.functions.payment.consumers[0]" in message


def test_only_payment_and_stock_may_be_compensated(tmp_path: Path) -> None:
    path = variant(tmp_path, "delivery: {timeout: 30s, on_timeout: retry, attempts: 3}",
                   "delivery: {timeout: 30s, on_timeout: compensate, attempts: 3}")  # fmt: skip
    message = load_error(path)
    assert "orchestration.steps.delivery.on_timeout: 'compensate' is only for payment" in message


def test_an_unknown_step_is_refused(tmp_path: Path) -> None:
    message = load_error(variant(tmp_path, "    refund: {timeout", "    refnud: {timeout"))
    assert "unknown field `refnud` - at `$.orchestration.steps`" in message


def test_what_a_function_owes_must_be_what_it_emits(tmp_path: Path) -> None:
    message = load_error(variant(tmp_path, "then: [payments.refunded]", "then: [stock.released]"))
    assert message.endswith(
        ": functions.payment.owes[1].then: 'stock.released' is not in functions.payment.emits "
        "(payments.succeeded, payments.failed, payments.refunded, orders.rejected)"
    )


def test_what_a_function_owes_follows_what_it_sees(tmp_path: Path) -> None:
    message = load_error(
        variant(tmp_path, "after: [delivery.scheduled]", "after: [orders.created]")
    )
    assert message.endswith(
        ": functions.order.owes[0].after: order neither consumes, reads nor emits 'orders.created'"
    )
