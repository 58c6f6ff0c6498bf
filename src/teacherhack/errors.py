"""Mistakes a user can make, as opposed to bugs.

The command line prints a :class:`UserError`'s message on one line and exits with status 2: a wrong config key,
unreadable data, a busy or inconsistent run folder, a run whose loss diverged. Any other exception is a bug in
teacherhack and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message names the problem and the fix."""
