"""Connecting to NATS the same way from every command.

Every command takes the standard NATS options from the environment:

==================  ===============================================================
``NATS_URL``        one URL, or several comma-separated (a cluster); may carry
                    ``user:password@`` or ``token@``
``NATS_USER``,      user and password (``up --secure`` hands each function its own,
``NATS_PASSWORD``   here rather than in the URL)
``NATS_TOKEN``      an authentication token
``NATS_CREDS``      a credentials file (JWT and nkey seed; needs the ``nkeys`` package)
``NATS_NKEY``       an nkey seed file (needs the ``nkeys`` package)
``NATS_CA``         CA certificate(s) that sign the server's (TLS)
``NATS_CERT``,      client certificate and key (mutual TLS)
``NATS_KEY``
``NATS_INBOX_PREFIX``  prefix of reply subjects (default ``_INBOX``); a user allowed
                    to subscribe only to its own inbox needs it
==================  ===============================================================

Secrets stay out of logs and error messages: anything that shows a URL shows
:func:`redact` of it, and nats-py's own errors are logged here, scrubbed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import nats
from nats.aio.client import Client

DEFAULT_URL = "nats://127.0.0.1:4222"

#: The variables that say who we are; a process given its own identity drops any others.
CREDENTIAL_VARS = ("NATS_USER", "NATS_PASSWORD", "NATS_TOKEN", "NATS_CREDS", "NATS_NKEY")

log = logging.getLogger("orderflow.runtime.connect")

ErrorCallback = Callable[[Exception], Awaitable[None]]


def url_from_env() -> str | None:
    return os.environ.get("NATS_URL") or None


def _redact_one(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    # user:password -> user:***; a lone token is all secret.
    return f"{scheme}{sep}{user + ':***' if colon else '***'}@{host}"


def redact(url: str) -> str:
    """``nats://app:s3cret@h:4222,nats://tok@h2`` -> ``nats://app:***@h:4222,nats://***@h2``."""
    return ",".join(_redact_one(part) for part in url.split(","))


def secrets(url: str, env: Mapping[str, str]) -> list[str]:
    """Every secret in the URL and the environment, to scrub from messages."""
    found = [env[k] for k in ("NATS_PASSWORD", "NATS_TOKEN") if env.get(k)]
    for part in url.split(","):
        parsed = urlsplit(part.strip())
        if parsed.password:
            found.append(parsed.password)
        elif parsed.username:
            found.append(parsed.username)  # a token
    return found


def scrub(text: str, hidden: list[str]) -> str:
    for secret in hidden:
        text = text.replace(secret, "***")
    return text


def tls_context(env: Mapping[str, str]) -> ssl.SSLContext | None:
    """A client TLS context from ``NATS_CA`` / ``NATS_CERT`` / ``NATS_KEY``; None when unset."""
    ca, cert, key = env.get("NATS_CA"), env.get("NATS_CERT"), env.get("NATS_KEY")
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise ValueError("NATS_CERT and NATS_KEY go together (a client certificate and its key)")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca or None)
    if cert and key:
        context.load_cert_chain(cert, key)
    return context


def options_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """nats-py ``connect`` keyword arguments for the variables in ``env`` that are set."""
    options: dict[str, Any] = {}
    if env.get("NATS_USER"):
        options["user"] = env["NATS_USER"]
        options["password"] = env.get("NATS_PASSWORD", "")
    if env.get("NATS_TOKEN"):
        options["token"] = env["NATS_TOKEN"]
    if env.get("NATS_CREDS"):
        options["user_credentials"] = env["NATS_CREDS"]
    if env.get("NATS_NKEY"):
        options["nkeys_seed"] = env["NATS_NKEY"]
    if env.get("NATS_INBOX_PREFIX"):
        options["inbox_prefix"] = env["NATS_INBOX_PREFIX"]
    tls = tls_context(env)
    if tls is not None:
        options["tls"] = tls
    return options


def _logging_errors(name: str, url: str, hidden: list[str]) -> ErrorCallback:
    shown = redact(url)

    async def error_cb(exc: Exception) -> None:
        # nats-py's default logs a traceback per failed attempt; one scrubbed line is enough.
        log.warning("%s: nats %s: %s: %s", name, shown, type(exc).__name__,
                    scrub(str(exc), hidden) or "(no detail)")  # fmt: skip

    return error_cb


class ConnectError(Exception):
    """A connection that retrying cannot fix (refused credentials); the message is safe to show."""


def _refused_credentials(exc: Exception) -> bool:
    return "authorization violation" in str(exc).lower()


async def connect(
    url: str,
    name: str,
    env: Mapping[str, str] | None = None,
    error_cb: ErrorCallback | None = None,
) -> Client:
    """Connect, reconnecting forever: a function must outlive a broker restart.

    Options come from ``env`` (default: this process's environment); see the
    module docstring. ``error_cb`` replaces the default, which logs each
    asynchronous error (a refused connection, a permissions violation) as one
    line with the URL redacted and any secret scrubbed. Credentials the server
    refuses on the first connect raise :class:`ConnectError` at once: waiting
    would not make them right.
    """
    env = os.environ if env is None else env
    await _wait_for_loopback(url)
    report = error_cb or _logging_errors(name, url, secrets(url, env))
    refused = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        if _refused_credentials(exc):
            refused.set()
        await report(exc)

    connecting = asyncio.ensure_future(
        nats.connect(
            servers=[u.strip() for u in url.split(",")],
            name=name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=5,
            error_cb=on_error,
            reconnected_cb=_log_reconnect(name),
            **options_from_env(env),
        )
    )
    gave_up = asyncio.ensure_future(refused.wait())
    try:
        await asyncio.wait({connecting, gave_up}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Also when we are cancelled: nats-py would go on retrying, unowned.
        gave_up.cancel()
        given_up = not connecting.done()
        if given_up:
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
    if not given_up:
        return connecting.result()
    who = f"user {env['NATS_USER']!r}" if env.get("NATS_USER") else "these credentials"
    raise ConnectError(
        f"{redact(url)} refused {who} (authorization violation): check NATS_USER and "
        "NATS_PASSWORD, NATS_TOKEN, NATS_CREDS or the credentials in NATS_URL"
    )


async def _wait_for_loopback(url: str, timeout: float = 10.0) -> None:
    """Poll until one of the loopback servers in ``url`` listens (any one: a node of a
    cluster may be down); a failed first connect would cost reconnect_time_wait (2 s).

    Asynchronous: the caller's loop goes on meanwhile (``demo`` watches its function
    processes while it connects)."""
    local = [
        (part.hostname, part.port)
        for part in (urlsplit(u.strip()) for u in url.split(","))
        if part.hostname in ("127.0.0.1", "localhost", "::1") and part.port
    ]
    if not local:
        return
    deadline = time.monotonic() + timeout
    while not any(await asyncio.gather(*(_listening(host, port) for host, port in local))):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listening on {redact(url)} after {timeout}s")
        await asyncio.sleep(0.02)


async def _listening(host: str, port: int) -> bool:
    try:
        async with asyncio.timeout(0.2):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _log_reconnect(name: str) -> Callable[[], Awaitable[None]]:
    async def reconnected() -> None:
        # One line: a cluster node going away is ridden out by moving to another.
        log.warning("%s: reconnected", name)

    return reconnected
