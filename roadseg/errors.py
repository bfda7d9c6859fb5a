"""One exception type for mistakes a user can fix.

Everything a user can cause (a wrong path, a bad file, a bad shape) is raised as
``UserError`` with one line that names the file or value and says how to fix it.
The CLI (``segment.py``) prints that line and exits with code 2; library callers
can catch it.  Everything else is a bug and keeps its traceback.

A fix that only some commands offer (``--skip-bad``) is given as ``option`` and ``hint``:
``str(err)`` holds it, and ``err.line(options)`` gives ``otherwise`` (default: nothing)
instead for a command that does not have that option, so no message sends the user to an
option that is not there.

``reason(err)`` is the one-line reason of an exception or a tool's log, for such lines.
"""
import re


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


# What a full, read-only or forbidden disk says; TensorFlow and ffmpeg bury it among other lines.
WRITE_REASONS = ("No space left on device", "Read-only file system", "Permission denied",
                 "Disk quota exceeded")
# Lines that are not the reason: TensorFlow's preamble, node lists and hints; OpenVINO's.
_NOT_THE_REASON = ("Graph execution error", "Detected at node", "<stack traces", "[[", "Node:",
                   "Hint:",
                   "Exception from src/", "Check '")   # OpenVINO's: where, and which check, failed
_ABORT_REASONS = (re.compile(r"aborted by: *(.+)"),          # a collective op's abort
                  re.compile(r'grpc_message:"([^"]+)"'))     # gRPC's status detail
_REMOTE_USER_ERROR = re.compile(r"UserError: *(.+)")         # a worker's traceback (Beam)
_BEAM_STEP = re.compile(r" \[while running '[^']*'\]")
_LOG_PREFIX = re.compile(r"^\[[^]]*\]\s*")                   # ffmpeg's "[mp4 @ 0x55d0...] "
# urllib3 starts its errors with the connection object or pool: "<...HTTPSConnection ...>: "
_CONNECTION_PREFIX = re.compile(r"^(<[^>]*>|\w+ConnectionPool\([^)]*\)): ")
REASON_CHARS = 200


def reason(err, default=None):
    """What went wrong, in a few words, for a UserError line -- the one home of this job.

    ``err`` is an exception, or a tool's log: ``str``, ``bytes`` or an open file (read from
    its start).  The first rule that applies gives the reason (cut at 200 characters but for 2):

    1. an ``OSError`` with a ``strerror``: it ('No space left on device');
    2. a ``UserError``, or one raised elsewhere and wrapped (Beam's worker traceback): its
       line, without the step Beam adds;
    3. a write reason (``WRITE_REASONS``) anywhere in the text: it (TensorFlow buries it under
       its preamble and hints);
    4. an abort reason, ``aborted by: X`` or ``grpc_message:"X"``: X ('Socket closed');
    5. of the lines left after dropping blank and indented lines (tracebacks), TensorFlow's
       'Graph execution error:' preamble, node lists and hints, and a log line's
       ``[mp4 @ 0x...]`` prefix: an exception's first line; a log's last (a tool's last
       word is why it stopped);
    6. else ``default``, or the exception's type name ('unknown error' for a log).
    """
    is_log = not isinstance(err, BaseException)
    if isinstance(err, OSError) and err.strerror:
        return err.strerror[:REASON_CHARS]
    text = _text(err)
    remote = _REMOTE_USER_ERROR.search(text)
    if isinstance(err, UserError):   # re-raised by Beam with its step added
        return _BEAM_STEP.sub("", text.splitlines()[0]).strip()
    if remote:
        # a whole UserError line, never cut; without Beam's " [while running 'step']"
        return _BEAM_STEP.sub("", remote.group(1)).strip()
    written = [known for known in WRITE_REASONS if known in text]
    if written:
        return written[0]
    for pattern in _ABORT_REASONS:
        found = pattern.search(text)
        if found:
            return found.group(1).strip()[:REASON_CHARS]
    lines = [_LOG_PREFIX.sub("", line).strip() if is_log else _CONNECTION_PREFIX.sub("", line.strip())
             for line in text.splitlines()
             if line.strip() and not line[:1].isspace() and not line.startswith(_NOT_THE_REASON)]
    lines = [line for line in lines if line]
    if lines:
        return (lines[-1] if is_log else lines[0])[:REASON_CHARS]
    return default or ("unknown error" if is_log else type(err).__name__)


def _text(err):
    """The text of an exception (TensorFlow's ``.message``) or of a log (str, bytes, file)."""
    if isinstance(err, BaseException):
        return str(getattr(err, "message", None) or err)
    if hasattr(err, "read"):
        err.seek(0)
        err = err.read()
    return err.decode("utf-8", "replace") if isinstance(err, bytes) else str(err or "")
