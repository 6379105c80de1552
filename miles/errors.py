"""The one exception type a user sees.

Anything the user can fix (a bad spec, a layout that does not fit, a cluster that
is down) raises :class:`UserError`; the CLI prints its message without a
traceback and exits with code 2. Everything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error in the user's input or environment, with a message that says what to change."""

    exit_code = 2
