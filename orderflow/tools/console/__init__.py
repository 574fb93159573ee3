"""The console: the flow, every order and what it waits on, live in a browser.

``runner.py console`` (and ``up --console``) serves it on loopback. Every
page reads through the same modules as the command line (``trace``,
``status``, ``dlq``), so there is one trace, not two: :mod:`.reads` adds only
what a page needs beyond them (counts over the last minute, recent orders),
:mod:`.pages` renders HTML, :mod:`.app` wires routes, the live snapshot and
the protection of the actions.
"""

#: Where the console listens unless told otherwise: this machine only.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8470
