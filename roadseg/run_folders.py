"""Run folders, and files written so that nothing a user made is overwritten or half-written.

* ``new_run_dir(runs_dir, name)``  -> a fresh folder under ``runs/`` (never an existing one)
* ``write_json(path, value)``      -> JSON under a temporary name, renamed when complete
* ``publish(tmp_path, out_path)``  -> a finished temporary file gets its final name,
  never replacing a file
* ``read_run_config(run_dir)``, ``run_checkpoint(run_dir)`` -> what a training run holds
"""
import contextlib
import fcntl
import json
import os
import time

import tensorflow as tf

from roadseg.errors import UserError

RUN_CONFIG = "config.json"


def new_run_dir(runs_dir, name=None):
    """Create and return a new folder ``runs_dir/<name or YYYYmmdd-HHMMSS>``.

    An existing folder is never reused: ``-1``, ``-2``, ... is appended until ``os.mkdir``
    succeeds (mkdir is atomic, so two runs started at once still get different folders).
    """
    base = name or time.strftime("%Y%m%d-%H%M%S")
    if base in (".", "..") or os.sep in base or (os.altsep and os.altsep in base):
        raise UserError(f"run name '{base}' must be a plain folder name without '/'")
    os.makedirs(runs_dir, exist_ok=True)
    candidate, n = base, 0
    while True:
        path = os.path.join(runs_dir, candidate)
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            n += 1
            candidate = f"{base}-{n}"


@contextlib.contextmanager
def run_lock(run_dir):
    """Hold the run folder's lock while training: a second ``train --resume`` of the same run
    is refused instead of both overwriting each other.  An ``flock`` on ``.lock``: the
    system releases it when the process ends, however it ends, so a killed run never leaves
    a lock behind (the file itself stays, harmless)."""
    path = os.path.join(run_dir, ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"{run_dir} is being trained by {holder} right now; wait for it to "
                        f"finish (or stop it), then --resume") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()}".encode())
        yield
    finally:
        os.close(fd)   # releases the lock


def write_json(path, value):
    """Write JSON atomically (temporary file, then rename)."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2)
    os.replace(path + ".tmp", path)


def publish(tmp_path, out_path):
    """Give the finished temporary file its final name without replacing anything."""
    if not os.path.isfile(tmp_path) or os.path.getsize(tmp_path) == 0:
        raise RuntimeError(f"ffmpeg wrote nothing to {tmp_path}")
    try:
        os.link(tmp_path, out_path)  # atomic, and fails instead of replacing a file
    except FileExistsError:
        raise UserError(f"{out_path} appeared while the video was processed; "
                        f"choose another output name") from None
    except OSError:  # a file system without hard links
        if os.path.exists(out_path):
            raise UserError(f"{out_path} appeared while the video was processed; "
                            f"choose another output name") from None
        os.rename(tmp_path, out_path)


def read_run_config(run_dir):
    path = os.path.join(run_dir, RUN_CONFIG)
    if not os.path.isfile(path):
        raise UserError(f"{run_dir} is not a training run (no {RUN_CONFIG}); pass a runs/<name> "
                        f"folder made by 'segment.py train' or an exported model")
    with open(path) as f:
        return json.load(f)


def run_checkpoint(run_dir, which="best"):
    """Checkpoint prefix of a run: its best-by-mIoU one if present (``which='best'``), else latest."""
    order = ["best", "checkpoints"] if which == "best" else ["checkpoints"]
    for sub in order:
        ckpt = tf.compat.v1.train.latest_checkpoint(os.path.join(run_dir, sub))
        if ckpt:
            return ckpt
    raise UserError(f"{run_dir} has no checkpoint yet; train it first ('segment.py train')")
