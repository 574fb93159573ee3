"""The command line behind ``runner.py``: which commands there are, the options they all take,
and how a failure becomes an exit status.

Each command is a module of this package with ``HELP`` (its line in ``runner.py -h``),
``add(parser)`` (its arguments) and ``run(args, topology)`` (its exit status); :data:`COMMANDS`
lists them in the order ``-h`` shows them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Protocol

from orderflow import config
from orderflow.cli import (
    auth,
    cancel,
    compare,
    console,
    contract,
    demo,
    dlq,
    exporter,
    flowchart,
    pause,
    provision,
    record,
    replay,
    resume,
    run,
    status,
    stuck,
    trace,
    up,
)
from orderflow.config import MODES, ConfigError, Topology
from orderflow.ops.interventions import NoAnswer
from orderflow.ops.provision import LayoutRefused, ModeSwitchRefused
from orderflow.runtime import logs
from orderflow.runtime.connect import ConnectError

DESCRIPTION = "The commands behind ``runner.py``: argument parsing and the wiring of each command."


class Command(Protocol):
    """What a command module provides."""

    HELP: str

    def add(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace, topology: Topology) -> int: ...


COMMANDS: dict[str, Command] = {
    "provision": provision,
    "auth": auth,
    "run": run,
    "dlq": dlq,
    "cancel": cancel,
    "trace": trace,
    "stuck": stuck,
    "map": flowchart,
    "contract": contract,
    "status": status,
    "pause": pause,
    "resume": resume,
    "record": record,
    "console": console,
    "exporter": exporter,
    "replay": replay,
    "compare": compare,
    "up": up,
    "demo": demo,
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="runner.py", description=DESCRIPTION)
    p.add_argument("--config", type=Path, default=Path("streams.yaml"), help="topology file")
    p.add_argument("--log-level", default=os.environ.get("ORDERFLOW_LOG_LEVEL", "WARNING"))
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=os.environ.get("ORDERFLOW_LOG_FORMAT", "text"),
        help="json: one JSON object per line, for log shippers",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default=os.environ.get("ORDERFLOW_MODE") or None,
        help="choreography (functions react to events) or orchestration (a saga drives them); "
        "default: streams.yaml's mode, choreography",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        cmd = sub.add_parser(name, help=command.HELP)
        command.add(cmd)
        # --mode after the command too (`up --mode orchestration`), where it wins.
        cmd.add_argument(
            "--mode", choices=MODES, default=argparse.SUPPRESS, help="see runner.py -h"
        )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    # Function processes started by up/demo log the same way.
    os.environ["ORDERFLOW_LOG_FORMAT"] = args.log_format
    try:
        topology = config.load(args.config, args.mode)
        return COMMANDS[args.command].run(args, topology)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except (ModeSwitchRefused, LayoutRefused) as exc:
        print(f"provision: {exc}", file=sys.stderr)
        return 2
    except ConnectError as exc:
        print(f"cannot connect: {exc}", file=sys.stderr)
        return 1
    except NoAnswer as exc:
        print(f"no answer: {exc} (is the cancel function running?)", file=sys.stderr)
        return 3
