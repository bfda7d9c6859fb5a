"""Run folders, and files written so that nothing a user made is overwritten or half-written.

* ``new_run_dir(runs_dir, name)``  -> a fresh folder under ``runs/`` (never an existing one)
* ``refuse_existing(path, fix)`` -> the one "already exists, nothing is overwritten" refusal
* ``check_can_create(path, option)`` -> refuse an output whose place is a file or read-only,
  before anything is computed
* ``staged_file(path)`` / ``staged_dir(path)`` -> write under a hidden temporary name next
  to ``path``; it gets its final name only when complete, and is removed on any error
* ``write_errors_as_user_error(path)`` -> a full or read-only disk while writing ``path`` is
  one UserError line
* ``replaced_file(path)`` / ``write_json(path, value)`` -> a file's new version under a
  temporary name, replacing it when complete
* ``publish(tmp_path, out_path)``  -> a finished temporary file gets its final name,
  never replacing a file
* ``run_lock(run_dir)`` -> one process at a time in a folder (a training run, an output folder)
* ``read_json(path, fix)``, ``read_run_config(run_dir)``, ``run_checkpoint(run_dir)``,
  ``restore_checkpoint(saver, sess, ckpt)`` -> what a training run holds, a damaged file
  being one ``UserError`` line
"""
import contextlib
import errno
import fcntl
import glob
import json
import os
import posixpath
import re
import shutil
import time
import uuid

import tensorflow as tf

from roadseg.errors import WRITE_REASONS, UserError, reason
from roadseg.log import logger

RUN_CONFIG = "config.json"
# errno values that mean "this place cannot take the output": full, read-only, not allowed
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM,
                errno.ENOTDIR, errno.EISDIR}
WRITE_FIX = "free disk space or choose another place; nothing was written under that name"
WRITE_ERRORS = (OSError, tf.errors.OpError)   # what a failed write raises (then: is_write_error)


def is_write_error(err):
    """True for an error that says the disk is full, read-only or not ours to write on
    (an ``OSError`` with such an errno, or TensorFlow's message for one)."""
    if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
        return True
    text = str(getattr(err, "message", "") or err)
    return any(reason in text for reason in WRITE_REASONS)


def join_path(folder, *names):
    """``folder/names...`` on this machine or on any Beam filesystem (``gs://...``: '/')."""
    return posixpath.join(folder, *names) if "://" in folder else os.path.join(folder, *names)


def new_run_dir(runs_dir, name=None):
    """Create and return a new folder ``runs_dir/<name or YYYYmmdd-HHMMSS>``.

    An existing folder is never reused: ``-1``, ``-2``, ... is appended until ``os.mkdir``
    succeeds (mkdir is atomic, so two runs started at once still get different folders).
    """
    base = name or time.strftime("%Y%m%d-%H%M%S")
    if base in (".", "..") or os.sep in base or (os.altsep and os.altsep in base):
        raise UserError(f"run name '{base}' must be a plain folder name without '/'")
    make_dirs(runs_dir)
    candidate, n = base, 0
    while True:
        path = os.path.join(runs_dir, candidate)
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            n += 1
            candidate = f"{base}-{n}"
        except OSError as err:
            raise UserError(f"cannot create {path} ({reason(err)}); free disk space, fix the "
                            f"permissions of {runs_dir} or use another folder") from None


def _nearest_existing(path):
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def make_dirs(folder):
    """``os.makedirs(folder, exist_ok=True)``, a path that is a file or a read-only disk being
    one UserError line naming it."""
    if os.path.isdir(folder):
        return folder
    parent = _nearest_existing(folder)
    if not os.path.isdir(parent):
        same = os.path.abspath(parent) == os.path.abspath(folder)
        where = "" if same else f"cannot create folder {folder}: "
        raise UserError(f"{where}{parent} is a file, not a folder; choose another place (or move "
                        f"the file away)")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create folder {folder} ({reason(err)}); free disk space, fix "
                        f"the permissions or choose another place") from None
    return folder


def refuse_existing(path, fix, kind="", exists=os.path.lexists):
    """The one refusal of an output that is already there: if ``exists(path)`` (default: any
    file, folder or link; Beam's filesystems for batch-predict), one UserError line
    '[<kind> ]<path> already exists; <fix> (nothing is overwritten)'."""
    if exists(path):
        what = f"{kind} {path}" if kind else f"{path}"
        raise UserError(f"{what} already exists; {fix} (nothing is overwritten)")


def check_can_create(path, option):
    """Before anything is computed: UserError unless ``path`` (a new file or folder, given by
    ``option``) can be made -- its nearest existing parent must be a writable folder.
    Missing parent folders are fine: they are created when the output is written."""
    parent = _nearest_existing(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(parent):
        raise UserError(f"cannot write {path}: {parent} is a file, not a folder; choose another "
                        f"{option}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: {parent} is read-only (a read-only disk or no "
                        f"permission); choose another {option}")


@contextlib.contextmanager
def write_errors_as_user_error(out_path):
    """A full or read-only disk (or another ``is_write_error``) while ``out_path`` is being
    written becomes one UserError line naming it; every other error passes unchanged."""
    try:
        yield
    except WRITE_ERRORS as err:
        if not is_write_error(err):
            raise
        raise UserError(f"could not write {out_path} ({reason(err)}); {WRITE_FIX}") from None


@contextlib.contextmanager
def staged_file(out_path):
    """Yield a hidden temporary path next to ``out_path``; when the block ends without an
    error it gets the final name (``publish``, never replacing a file), on any error it is
    removed: nothing half-written under the final name.  A full or read-only disk is one
    UserError line."""
    folder = make_dirs(os.path.dirname(os.path.abspath(out_path)))
    tmp_path = os.path.join(folder, f".{os.path.basename(out_path)}.{uuid.uuid4().hex[:8]}.part")
    try:
        with write_errors_as_user_error(out_path):
            yield tmp_path
            publish(tmp_path, out_path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp_path)


@contextlib.contextmanager
def staged_dir(out_dir, create=True, replace_empty=False):
    """Yield a hidden temporary folder next to ``out_dir`` (made when ``create``); renamed to
    ``out_dir`` when the block ends without an error, removed (with everything in it) on any
    error, Ctrl-C included.  Only a SIGKILL or power cut can leave the hidden folder.
    ``replace_empty``: an empty folder at ``out_dir`` is taken over."""
    parent = make_dirs(os.path.dirname(os.path.abspath(out_dir)))
    tmp_dir = os.path.join(parent, f".{os.path.basename(out_dir)}.{uuid.uuid4().hex[:8]}.part")
    try:
        with write_errors_as_user_error(out_dir):
            if create:
                os.mkdir(tmp_dir)
            yield tmp_dir
            if replace_empty and os.path.isdir(out_dir) and not os.listdir(out_dir):
                os.rmdir(out_dir)
            if os.path.lexists(out_dir):    # rename() would replace an empty folder
                raise UserError(f"{out_dir} appeared while it was being written; choose another "
                                f"name")
            os.rename(tmp_dir, out_dir)
    except UserError as err:   # name files by the folder they were meant for, not the hidden one
        if tmp_dir not in str(err):
            raise
        raise UserError(err.base.replace(tmp_dir, out_dir), err.option,
                        err.hint.replace(tmp_dir, out_dir), err.otherwise) from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


@contextlib.contextmanager
def run_lock(run_dir, doing="trained"):
    """Hold the run folder's lock while training (``doing``: what the holder does to it, for
    the refusal; ``batch-predict`` locks its output folder too): a second ``train --resume``
    of the same run is refused instead of both overwriting each other.  An ``flock`` on
    ``.lock``: the system releases it when the process ends, however it ends, so a killed run
    never leaves a lock behind (the file itself stays, harmless)."""
    path = os.path.join(run_dir, ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"{run_dir} is being {doing} by {holder} right now; wait for it to "
                        f"finish (or stop it), then --resume") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()}".encode())
        yield
    finally:
        os.close(fd)   # releases the lock


@contextlib.contextmanager
def replaced_file(path):
    """Yield a hidden temporary path next to ``path``; when the block ends without an error
    it replaces ``path`` in one rename (the file's own new version: history.json, a patched
    saved_model.pb).  A failed write leaves the old file as it was and is one UserError line."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(f"could not write {path} ({reason(err)}); free disk space or fix the "
                        f"permissions (the previous version, if any, is kept)") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def write_json(path, value):
    """Write JSON atomically (``replaced_file``: an existing file is replaced)."""
    with replaced_file(path) as tmp, open(tmp, "w") as f:
        json.dump(value, f, indent=2)


def publish(tmp_path, out_path):
    """Give the finished temporary file its final name without replacing anything."""
    if not os.path.isfile(tmp_path) or os.path.getsize(tmp_path) == 0:
        raise RuntimeError(f"nothing was written to {tmp_path}")
    taken = UserError(f"{out_path} appeared while it was being written; choose another name")
    try:
        os.link(tmp_path, out_path)  # atomic, and fails instead of replacing a file
    except FileExistsError:
        raise taken from None
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
            raise
        if os.path.exists(out_path):  # a file system without hard links
            raise taken from None
        os.rename(tmp_path, out_path)


def read_json(path, fix, kind=dict, required=(), read_text=None):
    """The JSON value in ``path`` (of type ``kind``, holding the keys ``required``);
    unreadable, not JSON, of another type or without a required key is one UserError line
    ending in ``fix``.  ``read_text(path) -> str`` reads another file system (Beam's)."""
    try:
        if read_text is None:
            with open(path) as f:
                value = json.load(f)
        else:
            value = json.loads(read_text(path))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is damaged: not valid JSON ({err}); {fix}") from None
    except OSError as err:
        raise UserError(f"cannot read {path} ({reason(err)}); {fix}") from None
    if not isinstance(value, kind):
        raise UserError(f"{path} is damaged: it holds a JSON {type(value).__name__}, not "
                        f"{'an object' if kind is dict else kind.__name__}; {fix}")
    missing = [key for key in required if key not in value]
    if missing:
        raise UserError(f"{path} is damaged: it has no {', '.join(missing)}; {fix}")
    return value


def read_run_config(run_dir, required=()):
    """A run's config.json as a dict holding the keys ``required`` (``model.ModelSpec.from_run``
    reads it typed); a missing or damaged file is one UserError line."""
    path = os.path.join(run_dir, RUN_CONFIG)
    if not os.path.isfile(path):
        raise UserError(f"{run_dir} is not a training run (no {RUN_CONFIG}); pass a runs/<name> "
                        f"folder made by 'segment.py train'")
    fix = "restore it from a backup, or train a new run ('segment.py train')"
    return read_json(path, fix, required=required)


def _checkpoint_from_files(folder):
    """The newest ``*.index`` checkpoint in ``folder`` by step, for an unreadable index file."""
    found = []
    for index in glob.glob(os.path.join(glob.escape(folder), "*.index")):
        step = re.search(r"-(\d+)\.index$", index)
        found.append((int(step.group(1)) if step else -1, index[:-len(".index")]))
    return max(found)[1] if found else None


def run_checkpoint(run_dir, which="best"):
    """Checkpoint prefix of a run: its best-by-mIoU one if present (``which='best'``), else latest.

    A damaged ``checkpoint`` index (e.g. 0 bytes after a power cut) is not trusted: the
    newest checkpoint files in that folder are used instead, with a warning."""
    order = ["best", "checkpoints"] if which == "best" else ["checkpoints"]
    for sub in order:
        folder = os.path.join(run_dir, sub)
        try:
            ckpt = tf.compat.v1.train.latest_checkpoint(folder)
        except (ValueError, tf.errors.OpError):   # an index that does not parse
            ckpt = _checkpoint_from_files(folder)
            if ckpt:
                logger.warning(f"warning: {os.path.join(folder, 'checkpoint')} is damaged; using "
                               f"{ckpt}, found in that folder")
        if ckpt:
            return ckpt
    raise UserError(f"{run_dir} has no checkpoint yet; train it first ('segment.py train')")


def restore_checkpoint(saver, sess, ckpt):
    """``saver.restore``; a truncated or missing checkpoint file is one UserError line."""
    try:
        saver.restore(sess, ckpt)
    except (ValueError, tf.errors.OpError) as err:
        folder = os.path.dirname(ckpt)
        if os.path.basename(folder) == "best":
            fix = (f"restore it from a backup, or move {folder} away to use the latest "
                   f"checkpoint in {os.path.join(os.path.dirname(folder), 'checkpoints')}")
        else:
            fix = "restore it from a backup, or train again"
        raise UserError(f"checkpoint {ckpt} is damaged ({reason(err)}); {fix}") from None
