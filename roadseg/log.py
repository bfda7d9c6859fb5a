"""Messages: one channel, Python ``logging``, written so that progress bars stay whole.

Every module says what it does through ``logger`` (the ``roadseg`` logger): ``logger.info``
for progress and results, ``logger.warning`` for what the user should know, ``logger.debug``
for detail (``--verbose``).  Functions that take a ``log`` callback (tests and the notebook
pass their own) default to ``logger.info`` through ``channel(log)``.

The package logger writes through ``tqdm.write``: a line written while a bar is drawn
clears the bar, is written, and the bar is drawn again below it.  Info lines go to stdout
(where ``print`` put them), debug lines, warnings and errors to stderr.  ``configure(verbosity)`` sets
the level: the CLI's ``--quiet`` (warnings and errors only) and ``--verbose`` (debug too).
``--quiet`` also turns progress bars off (``show_progress_bars``).  The course facade
(``fcn.train_nn``, ``helper.py``) keeps ``print``: its users expect the course's lines exactly.
"""
import functools
import logging
import sys

from tqdm import tqdm

logger = logging.getLogger("roadseg")
LEVELS = {"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}


class TqdmHandler(logging.Handler):
    """Each record as one line through ``tqdm.write``: info on stdout, the rest on stderr.

    Written here rather than taken from ``tqdm.contrib.logging``: its handler is private,
    and it (and ``logging_redirect_tqdm``, which swaps it in for a while) keeps the stream it
    was given when made.  The streams are looked up at each record instead, so lines go to
    whatever ``sys.stdout`` / ``sys.stderr`` are then (a notebook's cell, pytest's capture).
    """

    def emit(self, record):
        try:
            stream = sys.stdout if record.levelno == logging.INFO else sys.stderr
            tqdm.write(self.format(record), file=stream)
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


_TQDM_INIT = tqdm.__init__


def show_progress_bars(on=True):
    """Draw progress bars (every tqdm bar made from now on, ``tqdm.auto``'s too) or not.

    A default for tqdm's ``disable``, tqdm's own documented way to switch bars off globally:
    its ``TQDM_DISABLE`` environment variable is read once, when tqdm is imported, so a flag
    given later (``--quiet``) cannot set it.  A bar that passes ``disable`` itself keeps it."""
    tqdm.__init__ = _TQDM_INIT if on else functools.partialmethod(_TQDM_INIT, disable=True)


def configure(verbosity="normal"):
    """The package logger at ``verbosity`` ('quiet', 'normal' or 'verbose') with one
    ``TqdmHandler`` (and progress bars only above 'quiet'); returns the logger.  Made at
    import with 'normal', so library use (the notebook, scripts) prints what ``print``
    printed before."""
    if not any(isinstance(h, TqdmHandler) for h in logger.handlers):
        handler = TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(LEVELS[verbosity])
    show_progress_bars(verbosity != "quiet")
    logger.propagate = False   # a root handler (absl's, Beam's) would print every line twice
    return logger


def channel(log=None):
    """The callback a function with a ``log=None`` parameter writes to: ``log`` if given,
    else the package logger's ``info``."""
    return log or logger.info


configure()
