"""``compare``: both modes on the same orders, measured side by side (``bench.compare``).

Exit status 1 when the modes' outcomes differ, or an order went unfinished or twice finished,
or a process died; 2 for numbers out of range.
"""

from __future__ import annotations

import argparse
import json
import sys

from orderflow.config import Topology, seconds

HELP = "both modes on the same orders, measured side by side"


def add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--orders", type=int, default=300, help="orders published at once")
    parser.add_argument("--outage", default="3s", metavar="DURATION",
                        help="how long each is down")  # fmt: skip
    parser.add_argument("--rate", type=float, default=20.0, help="orders/s around each outage")
    parser.add_argument("--stop", metavar="F,F", help="functions to stop (default: every one)")
    parser.add_argument("--repeat", type=int, default=1, help="speed runs per mode (median)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait per phase")
    parser.add_argument("--json", action="store_true", help="one JSON object")


def run(args: argparse.Namespace, topology: Topology) -> int:
    # Here, not at the top: bench is beside the package, not installed with it (and heavy).
    from bench import compare

    if args.orders < 1 or args.repeat < 1 or args.rate <= 0:
        print("compare: --orders and --repeat must be at least 1, --rate above 0", file=sys.stderr)
        return 2
    settings = compare.Settings(
        orders=args.orders,
        seed=args.seed,
        rate=args.rate,
        outage_s=seconds(args.outage),
        timeout=args.timeout,
        repeat=args.repeat,
        stop=compare.stops(args.config, args.stop),
    )
    progress = sys.stderr.isatty() and not args.json
    result = compare.run(args.config.resolve(), settings, progress=progress)
    print(json.dumps(compare.as_json(result)) if args.json else compare.render(result))
    return 0 if result.ok else 1
