"""Import the official Cityscapes pixel-level evaluator safely under numpy 2.x.

cityscapesscripts 2.3.0 (``evaluation/evalPixelLevelSemanticLabeling.py``)
calls ``np.in1d``, which numpy 2.4 removed (``np.isin`` replaces it).  A grep
of the installed package for the other removed aliases (``np.int``,
``np.float``, ``np.bool``, ``np.object``, ``np.asscalar``, ``np.alltrue``, ...)
finds none, so ``np.in1d`` is the only shim needed.  The evaluator uses it for
its instance-level scores (iIoU) and for ``evalPixelAccuracy``.

The module also does things at import time that we keep away from the user:
it reads ``CITYSCAPES_DATASET`` (only to build default paths we never use) and
raises ``ValueError`` when ``CITYSCAPES_EXPORT_DIR`` names a missing folder
(only to build the JSON path we never write).  ``import_cityscapes_evaluator``
hides the latter variable during the import; ``evaluate.run_official_evaluator``
passes its own arguments (no JSON output, explicit prediction folder), so
neither the environment nor the current working directory is involved.

    >>> ev = import_cityscapes_evaluator()
    >>> callable(ev.evaluateImgLists)
    True
"""
import os

import numpy as np


def _in1d(ar1, ar2, assume_unique=False, invert=False, **kwargs):
    """numpy<2.4 ``np.in1d``: ``np.isin`` on the *flattened* first argument."""
    return np.isin(np.asarray(ar1).ravel(), ar2, assume_unique=assume_unique,
                   invert=invert, **kwargs)


def install_numpy_shims():
    """Give numpy back ``in1d`` if (and only if) this numpy version lacks it.

    Remove this function once cityscapesscripts stops calling ``np.in1d``
    (upstream still does in 2.3.0).  Returns the names of the shims installed.
    """
    if hasattr(np, "in1d"):
        return []
    np.in1d = _in1d
    return ["in1d"]


def import_cityscapes_evaluator():
    """The module ``cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling``.

    Installs the numpy shims first and imports with ``CITYSCAPES_EXPORT_DIR``
    temporarily unset, so a stale value in the user's shell cannot break it.
    """
    install_numpy_shims()
    saved = os.environ.pop("CITYSCAPES_EXPORT_DIR", None)
    try:
        from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling
    finally:
        if saved is not None:
            os.environ["CITYSCAPES_EXPORT_DIR"] = saved
    return evalPixelLevelSemanticLabeling
