"""How a handler tells the runner that something went wrong.

Business outcomes (a declined card, an empty shelf) are *events*, never
exceptions. An exception means the message could not be handled now:

* any exception, or an explicit :class:`Retry`, is a transient fault: the
  runner hands the message back with a delay and tries again, up to the
  function's attempt limit, then dead-letters it with the last error;
* :class:`Permanent` says retrying cannot help: dead-letter at once.
"""

from __future__ import annotations


class Retry(Exception):
    """Try this message again later, on the function's backoff schedule."""


class Permanent(Exception):
    """Retrying cannot help: dead-letter the message now, with this reason."""
