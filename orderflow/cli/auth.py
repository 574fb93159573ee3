"""``auth``: write a nats-server configuration with a least-privilege user per function.

It writes into ``DATA_DIR/auth/``, where ``up --secure`` and the other commands find it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from orderflow.cli.common import DATA_DIR
from orderflow.config import Topology
from orderflow.ops import auth

HELP = "a nats-server config: a user per function, least privilege"


def add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="writes DATA_DIR/auth/")


def run(args: argparse.Namespace, topology: Topology) -> int:
    directory = args.data_dir / auth.AUTH_DIR
    written = auth.generate(topology, directory)
    print(f"wrote {written[0]}: a nats-server configuration with users "
          f"{', '.join(p.stem for p in written[1:])}, new passwords, max_payload "
          f"{topology.limits.server_max_payload()}")  # fmt: skip
    print(f"and each user's NATS_USER/NATS_PASSWORD/NATS_INBOX_PREFIX in {directory}/<user>.env "
          "(mode 0600); restart a running `up --secure` to use them")  # fmt: skip
    return 0
