#!/usr/bin/env python
"""Order flow runner: provision, run one function, bring the system up, demo.

    python runner.py up                  # embedded nats-server unless NATS_URL is set
    python runner.py demo --orders 1000  # up, publish, wait for every outcome, summarise
    python runner.py run payment         # one function, one OS process
    python runner.py provision           # make the server match streams.yaml

All the work happens in the ``orderflow`` package; this file only hands over.
"""

import sys

from orderflow.cli import main

if __name__ == "__main__":
    sys.exit(main())
