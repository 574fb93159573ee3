"""Connecting with the standard NATS options, against real servers; secrets never shown."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orderflow.ops.server import EmbeddedServer, free_port
from orderflow.runtime.connect import ConnectError, connect, redact

PASSWORD = "s3cret-Pa55word"
TOKEN = "tok-s3cret-T0ken"


def _server(tmp_path: Path, conf: dict[str, object]) -> EmbeddedServer:
    path = tmp_path / "server.conf"
    path.write_text(json.dumps(conf))
    server = EmbeddedServer(tmp_path / "nats", config=path)
    server.start()
    return server


@pytest.fixture
def password_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    server = _server(
        tmp_path, {"authorization": {"users": [{"user": "app", "password": PASSWORD}]}}
    )
    yield server
    server.stop()


@pytest.fixture
def token_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    server = _server(tmp_path, {"authorization": {"token": TOKEN}})
    yield server
    server.stop()


def test_redact() -> None:
    assert redact("nats://app:pw@h:4222") == "nats://app:***@h:4222"
    assert redact("nats://tok@h:4222") == "nats://***@h:4222"
    assert redact("nats://h:4222") == "nats://h:4222"
    assert redact("tls://a:p@w@h1:4222, nats://h2:4222,nats://t@h3") == (
        "tls://a:***@h1:4222, nats://h2:4222,nats://***@h3"
    )
    assert redact("app:pw@h:4222") == "app:***@h:4222"


async def _roundtrip(url: str, env: dict[str, str]) -> None:
    nc = await connect(url, "tests", env=env)
    try:
        sub = await nc.subscribe("ping")
        await nc.publish("ping", b"pong")
        assert (await sub.next_msg(timeout=2)).data == b"pong"
    finally:
        await nc.close()


async def test_credentials_in_the_url_or_the_environment(
    password_server: EmbeddedServer, tmp_path: Path
) -> None:
    url = password_server.url
    await _roundtrip(url.replace("nats://", f"nats://app:{PASSWORD}@"), env={})
    await _roundtrip(url, env={"NATS_USER": "app", "NATS_PASSWORD": PASSWORD})
    # Several servers, comma-separated (the first one down): the next one is used.
    dead = f"nats://app:{PASSWORD}@127.0.0.2:{free_port()}"
    await _roundtrip(f"{dead},{url.replace('nats://', f'nats://app:{PASSWORD}@')}", env={})


async def test_token_in_the_url_or_the_environment(token_server: EmbeddedServer) -> None:
    await _roundtrip(token_server.url.replace("nats://", f"nats://{TOKEN}@"), env={})
    await _roundtrip(token_server.url, env={"NATS_TOKEN": TOKEN})


async def test_refused_credentials_fail_at_once_and_are_never_shown(
    password_server: EmbeddedServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wr0ng-" + PASSWORD
    attempts: list[tuple[str, dict[str, str]]] = [
        (password_server.url.replace("nats://", f"nats://app:{wrong}@"), {}),
        (password_server.url, {"NATS_USER": "app", "NATS_PASSWORD": wrong}),
        (password_server.url, {}),
    ]
    for url, env in attempts:
        with pytest.raises(ConnectError) as caught:
            await asyncio.wait_for(connect(url, "tests", env=env), 5)
        message = str(caught.value)
        assert "authorization violation" in message
        assert wrong not in message and PASSWORD not in message
    assert "Authorization Violation" in caplog.text  # the server's answer was logged...
    assert wrong not in caplog.text  # ...without the secret
    assert f"app:***@127.0.0.1:{password_server.port}" in caplog.text


async def test_an_unreachable_server_is_logged_without_the_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    port = free_port()  # nothing listens; 127.0.0.2 skips the loopback port polling
    for url in (f"nats://app:{PASSWORD}@127.0.0.2:{port}", f"nats://{TOKEN}@127.0.0.2:{port}"):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(connect(url, "tests", env={}), 1.5)
    assert "Connection refused" in caplog.text or "Connect call failed" in caplog.text
    assert f"nats://app:***@127.0.0.2:{port}" in caplog.text
    assert f"nats://***@127.0.0.2:{port}" in caplog.text
    assert PASSWORD not in caplog.text and TOKEN not in caplog.text


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _certificates(folder: Path) -> None:
    """A CA, and a server and a client certificate it signed (EC keys: quick to make)."""
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=orderflow test CA", cwd=folder)  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=folder)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
                 "-extfile", "san.ext", cwd=folder)  # fmt: skip


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_mutual_tls(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    _certificates(certs)
    tls = {
        "cert_file": str(certs / "server.pem"),
        "key_file": str(certs / "server.key"),
        "ca_file": str(certs / "ca.pem"),
        "verify": True,  # a client must show a certificate the CA signed
    }
    server = _server(tmp_path, {"tls": tls})
    try:
        env = {
            "NATS_CA": str(certs / "ca.pem"),
            "NATS_CERT": str(certs / "client.pem"),
            "NATS_KEY": str(certs / "client.key"),
        }
        await _roundtrip(server.url, env)
        # Without a client certificate the server refuses the handshake.
        without = {"NATS_CA": str(certs / "ca.pem")}
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(connect(server.url, "tests", env=without), 2)
        assert "nats://127.0.0.1" in caplog.text  # the failures were reported
    finally:
        server.stop()


def test_a_client_certificate_needs_its_key() -> None:
    from orderflow.runtime.connect import tls_context

    with pytest.raises(ValueError, match="NATS_CERT and NATS_KEY go together"):
        tls_context({"NATS_CERT": "client.pem"})
    assert tls_context({}) is None


async def test_waiting_for_the_port_leaves_the_event_loop_running(tmp_path: Path) -> None:
    """connect() waits for a loopback server that is not listening yet without
    blocking the loop: a task beside it (the supervisor's watcher in ``up``) goes on."""
    server = EmbeddedServer(tmp_path / "nats")
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.05)

    # The server starts 1.5 s from now, in a thread: starting it must not need the loop.
    starter = threading.Timer(1.5, server.start)
    starter.start()
    ticking = asyncio.create_task(ticker())
    began = time.monotonic()
    try:
        nc = await asyncio.wait_for(connect(server.url, "tests", env={}), 10)
        waited = time.monotonic() - began
        await nc.close()
    finally:
        ticking.cancel()
        starter.join()
        server.stop()
    assert waited >= 1.0  # connect did wait for the port...
    during = [t for t in ticks if t <= began + waited]
    gaps = [b - a for a, b in itertools.pairwise([began, *during])]
    # ...while the ticker kept ticking (a blocking poll would leave one gap of ~1.5 s).
    assert max(gaps) < 0.5, f"the loop stalled for {max(gaps):.2f}s"
    assert len(during) >= 10


async def test_waiting_for_the_port_is_bounded() -> None:
    from orderflow.runtime.connect import _wait_for_loopback

    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens
    began = time.monotonic()
    with pytest.raises(TimeoutError, match="nothing listening"):
        await _wait_for_loopback(url, timeout=0.3)
    assert time.monotonic() - began < 2
