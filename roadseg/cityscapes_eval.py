"""Cityscapes submission format, and the official evaluator run safely under numpy 2.x.

``write_cityscapes_predictions`` writes full-size labelIds PNGs named as the official
evaluator finds them; ``run_official_evaluator`` scores them with cityscapesscripts, in
process.  Importing that evaluator needs the shim below.

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
import contextlib
import copy
import glob
import io
import os

import numpy as np
from PIL import Image

from roadseg.errors import UserError, reason
from roadseg.metrics import predictions
from roadseg.schemes import IGNORE


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
        # imported here: the numpy shim must be in place and the variable unset first
        from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling
    finally:
        if saved is not None:
            os.environ["CITYSCAPES_EXPORT_DIR"] = saved
    return evalPixelLevelSemanticLabeling


# ---------------------------------------------------------------------------------
def export_label_ids(class_map, scheme):
    """Class map (H, W) -> uint8 Cityscapes labelIds image.

    Each class becomes ``scheme.export_label_ids[class]``; ``IGNORE`` becomes 0
    (``unlabeled``).
    """
    class_map = np.asarray(class_map)
    bad = (class_map >= scheme.num_classes) & (class_map != IGNORE)
    if bad.any():
        raise ValueError(f"class map has values outside [0, {scheme.num_classes}) and {IGNORE}")
    table = np.zeros(256, np.uint8)
    table[:scheme.num_classes] = scheme.export_label_ids
    return table[class_map.astype(np.uint8)]


def prediction_name(image_path):
    """File name for the prediction of an image, as the official evaluator finds it.

    cityscapesscripts' ``getPrediction`` matches a ground truth
    ``<city>_<seq>_<frame>_gtFine_labelIds.png`` to the one file named
    ``<city>_<seq>_<frame>*.png`` under the prediction folder, so
    ``aachen_000000_000019_leftImg8bit.png`` -> ``aachen_000000_000019_pred_labelIds.png``.
    Other names keep their stem: ``0001TP_006690.png`` -> ``0001TP_006690_pred_labelIds.png``.
    """
    stem = os.path.splitext(os.path.basename(str(image_path)))[0]
    if stem.endswith("_leftImg8bit"):
        stem = stem[: -len("_leftImg8bit")]
    return stem + "_pred_labelIds.png"


def write_cityscapes_predictions(predict_fn, samples, scheme, out_dir, batch_size=4,
                                 progress=True):
    """Write one full-size labelIds PNG per sample into ``out_dir``; returns the paths.

    Samples need no labels.  ``out_dir`` must be new or empty, so stale files
    can never be mistaken for predictions (the official evaluator refuses two
    matches for one image).
    """
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise UserError(f"prediction folder {out_dir} is not empty; choose a new folder")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{out_dir} is a file; choose a folder name for the predictions")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for sample, _, pred in predictions(predict_fn, samples, scheme, batch_size,
                                        progress, "write predictions"):
        path = os.path.join(out_dir, prediction_name(sample.image))
        if os.path.exists(path):
            raise UserError(f"two samples would both write {path}; their image names clash")
        Image.fromarray(export_label_ids(pred, scheme)).save(path)
        paths.append(path)
    return paths


def _ground_truth_files(gt_root_or_files):
    if isinstance(gt_root_or_files, (str, os.PathLike)):
        root = str(gt_root_or_files)
        if not os.path.isdir(root):
            raise UserError(f"ground-truth folder {root} does not exist")
        files = sorted(glob.glob(os.path.join(root, "**", "*_gtFine_labelIds.png"),
                                 recursive=True))
        if not files:
            raise UserError(f"no *_gtFine_labelIds.png files under {root}")
        return files
    files = [str(f) for f in gt_root_or_files]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise UserError(f"ground-truth file {missing[0]} does not exist")
    if not files:
        raise UserError("no ground-truth files given")
    return files


def run_official_evaluator(gt_root_or_files, pred_dir):
    """Score the labelIds PNGs in ``pred_dir`` with cityscapesscripts, in process.

    ``gt_root_or_files`` is a folder searched recursively for
    ``*_gtFine_labelIds.png`` or a list of such files.  Predictions are matched
    by the evaluator's own ``getPrediction``.  The instance-level score (iIoU)
    is computed when every ``*_gtFine_instanceIds.png`` exists.

    Returns a dict: ``class_iou`` {class name: IoU} for the 19 evaluated
    classes (NaN where undefined), ``mean_iou``, ``class_iiou``, ``mean_iiou``
    (NaN without instance files), ``category_iou`` {category: IoU} for the 7
    evaluated categories, and
    ``pixel_accuracy`` (from the evaluator's confusion matrix over
    non-ignored ground-truth pixels).
    """
    ev = import_cityscapes_evaluator()
    gt_files = _ground_truth_files(gt_root_or_files)
    if not os.path.isdir(pred_dir):
        raise UserError(f"prediction folder {pred_dir} does not exist")

    args = copy.copy(ev.args)               # never touch the module's global args
    args.predictionPath = str(pred_dir)     # so getPrediction ignores CITYSCAPES_* vars
    args.predictionWalk = None
    args.quiet = True
    args.JSONOutput = False                 # nothing written into CITYSCAPES_DATASET/cwd
    args.colorized = False
    # Upstream's per-image pixel accuracy (2.3.0) is wrong: its "nbNotIgnoredPixels"
    # counts the *ignored* pixels (np.in1d(..., invert=True) on the not-ignored
    # ids) and its "nbCorrectPixels" counts wrong ones.  We leave it off and take
    # pixel accuracy from the evaluator's confusion matrix instead.
    args.evalPixelAccuracy = False
    args.evalInstLevelScore = all(os.path.isfile(f.replace("labelIds", "instanceIds"))
                                  for f in gt_files)

    out = io.StringIO()                      # the evaluator prints, then sys.exit()s, on errors
    try:
        with contextlib.redirect_stdout(out):
            preds = [ev.getPrediction(args, f) for f in gt_files]
            res = ev.evaluateImgLists(preds, gt_files, args)
    except SystemExit:
        raise UserError(f"official Cityscapes evaluator: {reason(out.getvalue())}") from None

    evaluated = [l for l in ev.labels if l.id >= 0 and not l.ignoreInEval]
    matrix = np.asarray(res["confMatrix"], np.float64)
    ids = [l.id for l in evaluated]
    counted = matrix[ids].sum()
    return {
        "class_iou": {l.name: res["classScores"][l.name] for l in evaluated},
        "mean_iou": res["averageScoreClasses"],
        "class_iiou": {l.name: res["classInstScores"][l.name] for l in evaluated},
        "mean_iiou": res["averageScoreInstClasses"],
        "category_iou": {c: res["categoryScores"][c]
                         for c in sorted({l.category for l in evaluated})},
        "pixel_accuracy": float(matrix[ids, ids].sum() / counted) if counted else float("nan"),
    }
