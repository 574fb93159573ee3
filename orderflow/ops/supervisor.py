"""``up``: every function as its own OS process, restarted when it dies.

Each function runs as ``python runner.py run NAME`` (as it would in
production, under systemd or a Procfile). A child that exits on its own is
started again, with a growing pause if it keeps crashing. Stopping sends
SIGTERM, which the children answer by draining; whoever ignores it for
``grace`` seconds is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from orderflow.ops.server import stop_all
from orderflow.runtime.connect import CREDENTIAL_VARS

log = logging.getLogger("orderflow.ops.supervisor")

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Child:
    function: str
    replica: int
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)

    @property
    def label(self) -> str:
        return f"{self.function}#{self.replica}"


class Supervisor:
    def __init__(
        self,
        url: str,
        config: Path,
        functions: dict[str, int],
        log_level: str = "WARNING",
        grace: float = 10.0,
        log_dir: Path | None = None,
        env: dict[str, str] | None = None,
        mode: str = "choreography",
        function_env: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.url = url
        self.mode = mode
        self.config = config
        self.log_level = log_level
        self.grace = grace
        self.log_dir = log_dir
        self.env = env or {}
        # Per function: its own identity (``up --secure``: its user and password,
        # in the environment, never on the command line where ``ps`` shows it).
        self.function_env = function_env or {}
        self.children = [
            Child(name, replica) for name, count in functions.items() for replica in range(count)
        ]
        self.stopping = False

    def command(self, function: str) -> list[str]:
        return [sys.executable, str(ROOT / "runner.py"), "--config", str(self.config),
                "--log-level", self.log_level, "--mode", self.mode, "run", function]  # fmt: skip

    def _spawn(self, child: Child) -> None:
        env = {**os.environ, **self.env, "NATS_URL": self.url}
        if child.function in self.function_env:
            for name in (*CREDENTIAL_VARS, "NATS_INBOX_PREFIX"):
                env.pop(name, None)
            env.update(self.function_env[child.function])
        output = None
        if self.log_dir is not None:
            # Each child appends to its own file; closing our handle is safe.
            self.log_dir.mkdir(parents=True, exist_ok=True)
            output = open(self.log_dir / f"{child.label}.log", "ab")  # noqa: SIM115
        child.process = subprocess.Popen(
            self.command(child.function), env=env, cwd=ROOT, stdout=output, stderr=output
        )
        if output is not None:
            output.close()
        child.started_at = time.monotonic()
        log.info("started %s (pid %d)", child.label, child.process.pid)

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)

    def check(self) -> None:
        """Restart children that died; call it often."""
        if self.stopping:
            return
        now = time.monotonic()
        for child in self.children:
            if child.process is None or child.process.poll() is None:
                if child.process is None and now >= child.next_start:
                    self._spawn(child)
                continue
            code = child.process.returncode
            # Back off only when it keeps dying young: a crash loop must not spin.
            quick = now - child.started_at < 5.0
            child.restarts = child.restarts + 1 if quick else 0
            pause = min(0.2 * 2**child.restarts, 10.0) if quick else 0.0
            log.warning("%s exited with %s; restarting in %.1fs", child.label, code, pause)
            child.process = None
            child.next_start = now + pause

    async def watch(self, stop: asyncio.Event, every: float = 0.25) -> None:
        while not stop.is_set():
            self.check()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)

    def pids(self, function: str | None = None) -> list[int]:
        return [
            c.process.pid
            for c in self.children
            if c.process is not None
            and c.process.poll() is None
            and (function is None or c.function == function)
        ]

    def stop(self) -> None:
        self.stopping = True
        running = [c.process for c in self.children if c.process is not None]
        for pid in stop_all(running, self.grace):
            log.warning("pid %d ignored SIGTERM for %.0fs; killed it", pid, self.grace)
