"""One exception type for mistakes a user can fix.

Everything a user can cause (a wrong path, a bad file, a bad shape) is raised as
``UserError`` with one line that names the file or value and says how to fix it.
The CLI (``segment.py``) prints that line and exits with code 2; library callers
can catch it.  Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; ``str(err)`` is a single, complete line."""

    exit_code = 2

    def __init__(self, message):
        message = " ".join(str(message).split())  # always one line
        super().__init__(message)
