"""Checkpoints of a training run: weights, optimizer state and where training stands.

A run keeps its latest checkpoints in ``checkpoints/`` (weights, Adam moments and the
``Progress`` counters below, so that ``--resume`` continues exactly where it stopped) and
the best-on-validation weights in ``best/``.  ``tf.train.Saver`` replaces the
``checkpoint`` index file atomically only after the data files are complete, so a crash
while saving leaves the previous checkpoint usable.  ``Checkpointer.restore`` takes the
newest readable checkpoint -- from the index, or from the files themselves when the index
is missing, empty or damaged -- and falls back to older ones when the newest is unreadable.
Only finite weights are ever saved.
"""
import dataclasses
import glob
import os
import re

import numpy as np
import tensorflow as tf

from roadseg.errors import UserError, reason
from roadseg.log import channel

tf1 = tf.compat.v1
PREFIX = "model.ckpt"


@dataclasses.dataclass
class Progress:
    """Where training stands; saved in every checkpoint (variables ``train_state/*``).

    ``epochs_done`` epochs are complete; ``epoch_step`` steps of the next one are done.
    The loss sums and seconds belong to the current epoch (or, right after an epoch ends,
    to that epoch, until its record is written), so a resumed epoch reports the mean loss
    of all its steps.
    """
    step: int = 0
    epochs_done: int = 0
    epoch_step: int = 0
    loss_sum: float = 0.0
    data_loss_sum: float = 0.0
    loss_count: int = 0
    seconds: float = 0.0
    best_miou: float = -1.0

    def add_step(self, loss, data_loss):
        self.step += 1
        self.epoch_step += 1
        self.loss_sum += float(loss)
        self.data_loss_sum += float(data_loss)
        self.loss_count += 1

    def end_epoch(self):
        self.epochs_done += 1
        self.epoch_step = 0

    def start_epoch(self):
        """Reset the per-epoch sums at the first step of a new epoch."""
        if self.epoch_step == 0:
            self.loss_sum = self.data_loss_sum = self.seconds = 0.0
            self.loss_count = 0


def progress_variables():
    """The ``train_state/*`` variables (``step`` is the optimizer's global step) and one op
    that writes a ``Progress`` into them: ``(variables, placeholders, assign_op)``."""
    dtypes = {"step": tf.int64, "epochs_done": tf.int64, "epoch_step": tf.int64,
              "loss_sum": tf.float64, "data_loss_sum": tf.float64, "loss_count": tf.int64,
              "seconds": tf.float64, "best_miou": tf.float32}
    variables, feeds = {}, {}
    with tf1.variable_scope("train_state"):
        for name, dtype in dtypes.items():
            init = getattr(Progress, name)
            variables[name] = tf1.get_variable(name, [], dtype, tf1.constant_initializer(init),
                                               trainable=False)
            feeds[name] = tf1.placeholder(dtype, [], name=f"{name}_value")
    assign = tf.group(*[variables[k].assign(feeds[k]) for k in dtypes if k != "step"])
    return variables, feeds, assign


def checkpoint_step(prefix):
    found = re.search(r"-(\d+)$", prefix)
    return int(found.group(1)) if found else -1


def find_checkpoints(ckpt_dir, log=None):
    """Checkpoint prefixes in ``ckpt_dir``, oldest first: those the ``checkpoint`` index
    names or, when the index is missing, empty or damaged, those found as files (said so).
    A readable index wins over stray files: a save that never reached the index is not
    trusted."""
    log = channel(log)
    try:
        state = tf1.train.get_checkpoint_state(ckpt_dir)
    except Exception as err:  # a damaged index raises text_format's ParseError, among others
        log(f"warning: {os.path.join(ckpt_dir, 'checkpoint')} is unreadable ({reason(err)})")
        state = None
    if state and state.all_model_checkpoint_paths:
        return sorted(map(os.path.abspath, state.all_model_checkpoint_paths), key=checkpoint_step)
    files = [p[:-len(".index")] for p in glob.glob(os.path.join(ckpt_dir, PREFIX + "-*.index"))]
    if files:
        log(f"warning: no usable checkpoint index in {ckpt_dir}: found {len(files)} "
            f"checkpoint(s) from their files")
    return sorted(map(os.path.abspath, files), key=checkpoint_step)


class Checkpointer:
    """Saves and restores a run's latest checkpoints, its best one, and its ``Progress``."""

    def __init__(self, sess, run_dir, model_variables, progress_vars, keep, lr, log=None,
                 writes=True):
        self.sess, self.run_dir, self.lr, self.log = sess, run_dir, lr, channel(log)
        self.writes = writes   # False: a worker that is not the chief only checks and restores
        self.saved = None      # the Progress (a copy) of the newest checkpoint written or restored
        self.variables, self.feeds, self.assign = progress_vars
        self.dir = os.path.join(run_dir, "checkpoints")
        # Relative paths in the ``checkpoint`` index: a run folder can be moved or copied.
        self.saver = tf1.train.Saver(max_to_keep=keep, save_relative_paths=True)
        self.best_saver = tf1.train.Saver(model_variables + [self.variables["best_miou"]],
                                          max_to_keep=1, save_relative_paths=True)
        trainable = tf1.trainable_variables()
        self.finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in trainable])

    def restore(self):
        """Restore the newest readable checkpoint; returns ``(Progress, path)``, path None
        when there is none yet.  Older checkpoints stay managed (``max_to_keep``)."""
        paths = find_checkpoints(self.dir, self.log)
        for i in range(len(paths) - 1, -1, -1):
            try:
                self.saver.restore(self.sess, paths[i])
            except (tf.errors.OpError, ValueError) as err:
                self.log(f"warning: checkpoint {paths[i]} is unreadable ({reason(err)}); "
                         f"trying the one before")
                continue
            self.saver.recover_last_checkpoints(paths[:i + 1])
            best = find_checkpoints(os.path.join(self.run_dir, "best"), lambda *a: None)
            self.best_saver.recover_last_checkpoints(best)   # a better one replaces it
            progress = self.read()
            self.saved = dataclasses.replace(progress)
            return progress, paths[i]
        if paths:
            raise UserError(f"no readable checkpoint in {self.dir} (tried {len(paths)}); "
                            f"start a new --run")
        return self.read(), None

    def read(self):
        values = self.sess.run(self.variables)
        return Progress(**{k: v.item() if isinstance(v, np.generic) else v for k, v in values.items()})

    def latest(self):
        """The newest checkpoint the index names (the files, when there is no usable index)."""
        paths = find_checkpoints(self.dir, log=lambda *a: None)
        return paths[-1] if paths else None

    def save(self, progress, best=False):
        """Write ``progress`` into the graph and save a checkpoint (to ``best/`` too when
        ``best``) of finite weights; a failed write is a UserError keeping the last one."""
        if not self.sess.run(self.finite):
            raise self.stopped(f"weights became NaN or Inf at step {progress.step}",
                               progress.epochs_done)
        if not self.writes:
            return
        self.sess.run(self.assign, {self.feeds[k]: getattr(progress, k) for k in self.feeds
                                    if k != "step"})
        targets = [(self.saver, self.dir)]
        if best:
            targets.insert(0, (self.best_saver, os.path.join(self.run_dir, "best")))
        for saver, folder in targets:
            try:
                saver.save(self.sess, os.path.join(folder, PREFIX), global_step=progress.step)
            except (OSError, tf.errors.OpError) as err:
                raise UserError(f"could not write checkpoint {os.path.join(folder, PREFIX)}-"
                                f"{progress.step} ({reason(err)}); free disk space or fix "
                                f"permissions, then {self._kept()}") from None
        self.saved = dataclasses.replace(progress)

    def save_for_resume(self, progress):
        """Save ``progress`` unless the newest checkpoint holds it already (a stopped run)."""
        if self.saved != progress:
            self.save(progress)

    def stopped(self, problem, epoch):
        """The UserError for a NaN/Inf: nothing more is saved."""
        return UserError(f"{problem} (epoch {epoch + 1}); training stopped, {self._kept()}; "
                         f"try a lower --lr (now {self.lr})")

    def _kept(self):
        kept = self.latest()
        if kept:
            return f"continue with --resume (last good checkpoint kept: {kept})"
        return "start again (no checkpoint was written yet, so the new run folder is removed)"
