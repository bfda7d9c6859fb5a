"""One exception type for mistakes a user can fix.

Everything a user can cause (a wrong path, a bad file, a bad shape) is raised as
``UserError`` with one line that names the file or value and says how to fix it.
The CLI (``segment.py``) prints that line and exits with code 2; library callers
can catch it.  Everything else is a bug and keeps its traceback.

A fix that only some commands offer (``--skip-bad``) is given as ``option`` and ``hint``:
``str(err)`` holds it, and ``err.line(options)`` gives ``otherwise`` (default: nothing)
instead for a command that does not have that option, so no message sends the user to an
option that is not there.
"""


class UserError(Exception):
    """A problem the user can fix; ``str(err)`` is a single, complete line."""

    exit_code = 2

    def __init__(self, message, option=None, hint="", otherwise=""):
        self.base = " ".join(str(message).split())  # always one line
        self.option, self.hint = option, " ".join(str(hint).split())
        self.otherwise = " ".join(str(otherwise).split())
        super().__init__(self._join(self.hint))

    def _join(self, fix):
        return f"{self.base} {fix}" if fix else self.base

    def line(self, options=None):
        """The message for a command whose options are ``options`` (None: all of them)."""
        if self.hint and options is not None and self.option not in options:
            return self._join(self.otherwise)
        return str(self)
