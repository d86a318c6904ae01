"""User errors: what the user can fix. The CLI prints them as one line with the fix and exits 2.

Anything else is a bug in tunesmith and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's input (file, config, data, model reference), with its fix."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        return f"{self.message} (fix: {self.hint})" if self.hint else self.message


class GateFailed(Exception):
    """An evaluation gate failed: exit code 3, so CI can tell it from a user error."""

    exit_code = 3
