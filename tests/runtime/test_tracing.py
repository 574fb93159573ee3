"""orderflow.runtime.tracing: spans only when the extra and the environment both ask, and
nothing of OpenTelemetry imported otherwise."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from orderflow.config import Topology
from orderflow.runtime import election, tracing
from tests.conftest import ROOT


@pytest.mark.parametrize(
    ("env", "wanted"),
    [
        ({}, []),
        ({"OTEL_SERVICE_NAME": "shop"}, []),  # naming a service asks for nothing
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp"]),  # the SDK's default endpoint
        ({"OTEL_TRACES_EXPORTER": "console,otlp"}, ["console", "otlp"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, []),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, []),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, []),  # not installed here: said, and ignored
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, []),
    ],
)
def test_the_standard_variables_decide(env: dict[str, str], wanted: list[str]) -> None:
    assert tracing.exporters_wanted(env) == wanted


async def test_off_every_hook_does_nothing_and_the_store_is_the_same_function(
    topology: Topology,
) -> None:
    tracer = tracing.tracer_for("payment", topology.functions["payment"], env={})
    assert tracer is tracing.OFF and not tracer.enabled
    assert tracer.storing(election.store) is election.store  # a publish costs nothing more
    with tracer.processing(None, topology.functions["payment"].consumers[0]):  # type: ignore[arg-type]
        tracer.retrying(1, 0.2, RuntimeError("x"))
        tracer.dead_lettered("invalid", None)
    tracer.shutdown()


def _imports(env: dict[str, str], before: str = "") -> str:
    """What a fresh interpreter says after building payment's worker with ``env``."""
    script = textwrap.dedent(f"""
        import sys
        {before}
        from orderflow import config
        from orderflow.runtime import service, tracing
        topology = config.load("streams.yaml")
        tracer = tracing.tracer_for("payment", topology.functions["payment"], env={env!r})
        loaded = sorted({{m.split(".")[0] + "." + m.split(".")[1] for m in sys.modules
                          if m.startswith("opentelemetry.")}})
        print(type(tracer).__name__, loaded)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, check=True, timeout=60)  # fmt: skip
    return done.stdout.strip() + "\n" + done.stderr


def test_without_the_environment_nothing_of_opentelemetry_is_imported() -> None:
    out = _imports({})
    assert out.startswith("Tracer []"), out


def test_with_it_the_sdk_is_loaded_and_spans_are_made() -> None:
    out = _imports({"OTEL_TRACES_EXPORTER": "console"})
    assert out.startswith("Spans ["), out
    assert "opentelemetry.sdk" in out


def test_asked_for_without_the_extra_the_process_says_so_and_runs_without() -> None:
    # As if opentelemetry were not installed: every import of it fails.
    out = _imports({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"},
                   before="sys.modules['opentelemetry'] = None")  # fmt: skip
    assert out.startswith("Tracer []"), out
    assert "the extra 'otel' is not installed" in out
