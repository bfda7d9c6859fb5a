"""Evaluation: confusion matrix, IoU, and the official Cityscapes evaluator.

Modelled on torchvision ``references/segmentation`` (``ConfusionMatrix``) and
shelhamer's fcn ``score.py``.  All metrics come from one confusion matrix
``M[label, prediction]`` counted at each label's *native* resolution: the
model's ``predict_fn`` returns a class map the size of its input image, and
labels are never resized.  Pixels labelled ``IGNORE`` (255) are not counted.

    IoU_c      = M[c,c] / (row_c + col_c - M[c,c])      (TP / (TP + FP + FN))
    accuracy_c = M[c,c] / row_c                          (recall of class c)
    mean IoU   = mean of IoU_c over classes where it is defined
    pixel acc. = trace(M) / sum(M)
    fwIoU      = sum_c (row_c / sum(M)) * IoU_c

For Cityscapes submissions, ``write_cityscapes_predictions`` writes labelIds
PNGs and ``run_official_evaluator`` scores them with cityscapesscripts.

    >>> import numpy as np
    >>> cm = ConfusionMatrix(2)
    >>> cm.update(np.array([0, 0, 1, 255]), np.array([0, 1, 1, 0]))
    >>> [round(float(x), 3) for x in cm.compute()["iou"]]
    [0.5, 0.5]
"""
import contextlib
import copy
import glob
import io
import json
import os

import numpy as np
from PIL import Image
from tqdm import tqdm

from errors import UserError
from schemes import IGNORE


class ConfusionMatrix:
    """Counts (label, prediction) pixel pairs for ``num_classes`` classes.

    ``matrix[i, j]`` is the number of pixels labelled ``i`` and predicted ``j``.
    """

    def __init__(self, num_classes):
        self.num_classes = int(num_classes)
        self.matrix = np.zeros((self.num_classes, self.num_classes), np.int64)

    def update(self, label, pred):
        """Add one label/prediction pair (numpy arrays of the same shape).

        Pixels whose label is ``IGNORE`` or otherwise ``>= num_classes`` are
        skipped.  Every counted pixel must have a prediction in
        ``[0, num_classes)``.
        """
        label = np.asarray(label)
        pred = np.asarray(pred)
        if label.shape != pred.shape:
            raise ValueError(f"label shape {label.shape} != prediction shape {pred.shape}")
        n = self.num_classes
        keep = (label >= 0) & (label < n)
        label = label[keep].astype(np.int64)
        pred = pred[keep].astype(np.int64)
        if pred.size and (pred.min() < 0 or pred.max() >= n):
            raise ValueError(f"predictions must be class ids in [0, {n}), "
                             f"got values {pred.min()}..{pred.max()}")
        self.matrix += np.bincount(n * label + pred, minlength=n * n).reshape(n, n)

    def merge(self, other):
        """Add the counts of another ``ConfusionMatrix`` (same classes); returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self.matrix += other.matrix
        return self

    def compute(self):
        """All metrics as a dict.

        ``iou`` and ``accuracy`` are (num_classes,) float arrays.  A class's IoU
        is NaN when the class is absent from both labels and predictions (0/0:
        nothing to score); its accuracy is NaN when it is absent from the labels.
        ``mean_iou`` and ``mean_accuracy`` average over the non-NaN entries only,
        like the Cityscapes evaluator.  ``pixels`` is the number of pixels counted.
        """
        m = self.matrix.astype(np.float64)
        tp = np.diag(m)
        rows = m.sum(axis=1)            # pixels labelled c
        cols = m.sum(axis=0)            # pixels predicted c
        total = m.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = tp / (rows + cols - tp)
            accuracy = tp / rows
            pixel_accuracy = tp.sum() / total
        present = rows > 0
        fw_iou = float((rows[present] / total * iou[present]).sum()) if total else float("nan")
        return {
            "iou": iou,
            "accuracy": accuracy,
            "mean_iou": _nanmean(iou),
            "mean_accuracy": _nanmean(accuracy),
            "pixel_accuracy": float(pixel_accuracy),
            "fw_iou": fw_iou,
            "pixels": int(total),
            "confusion_matrix": self.matrix.copy(),
        }


def _nanmean(values):
    """Mean of the non-NaN values; NaN (without a warning) when there are none."""
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


# ---------------------------------------------------------------------------------
# Running a model over samples
# ---------------------------------------------------------------------------------
def _predictions(predict_fn, samples, scheme, batch_size, progress, desc):
    """Yield ``(sample, label, pred)`` for every sample, in order.

    Consecutive images of the same size are batched (up to ``batch_size``); an
    image of another size starts a new batch.  ``pred`` must come back at the
    size of its image, so ``label`` stays at native resolution.
    """
    import datasets  # imported when needed: the metrics above work without the loaders
    from outputs import predict_batch, same_size_batches

    total = len(samples) if hasattr(samples, "__len__") else None
    pairs = (((sample, label), image) for sample in
             tqdm(samples, total=total, desc=desc, unit="img", disable=not progress)
             for image, label in [datasets.load_pair(sample, scheme)])
    for items, images in same_size_batches(pairs, batch_size):
        for (sample, label), pred in zip(items, predict_batch(predict_fn, images)):
            yield sample, label, pred


def evaluate(predict_fn, samples, scheme, batch_size=4, progress=True):
    """Score ``predict_fn`` on labelled ``samples``; returns ``ConfusionMatrix.compute()``.

    ``predict_fn(images uint8 [N,H,W,3]) -> class maps [N,H,W]`` at the input
    size.  Samples are loaded with ``datasets.load_pair(sample, scheme)`` and
    must have labels.
    """
    cm = ConfusionMatrix(scheme.num_classes)
    for sample, label, pred in _predictions(predict_fn, samples, scheme, batch_size,
                                            progress, "evaluate"):
        if label is None:
            raise UserError(f"image {sample.image} has no label; evaluate a labelled "
                            f"split (e.g. val), not an unlabelled test split")
        cm.update(label, pred)
    return cm.compute()


# ---------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------
def _fmt(value):
    return "    -" if np.isnan(value) else f"{value:.4f}"


def format_table(result, class_names):
    """A plain-text table: one row per class (IoU, accuracy), then the summary."""
    width = max(len("frequency-weighted IoU"), *(len(n) for n in class_names))
    lines = [f"{'class':<{width}}     IoU     acc", "-" * (width + 16)]
    for name, iou, acc in zip(class_names, result["iou"], result["accuracy"]):
        lines.append(f"{name:<{width}}  {_fmt(iou):>6}  {_fmt(acc):>6}")
    lines.append("-" * (width + 16))
    lines.append(f"{'mean IoU':<{width}}  {_fmt(result['mean_iou']):>6}")
    lines.append(f"{'pixel accuracy':<{width}}  {_fmt(result['pixel_accuracy']):>6}")
    lines.append(f"{'frequency-weighted IoU':<{width}}  {_fmt(result['fw_iou']):>6}")
    return "\n".join(lines)


def _json_number(value):
    """JSON has no NaN: undefined scores are written as null."""
    value = float(value)
    return None if np.isnan(value) else value


def save_json(result, class_names, path):
    """Write ``result`` as JSON to ``path``; refuses to overwrite an existing file."""
    if os.path.exists(path):
        raise UserError(f"{path} already exists; choose another file name (nothing is overwritten)")
    data = {
        "classes": {name: {"iou": _json_number(iou), "accuracy": _json_number(acc)}
                    for name, iou, acc in zip(class_names, result["iou"], result["accuracy"])},
        "mean_iou": _json_number(result["mean_iou"]),
        "mean_accuracy": _json_number(result["mean_accuracy"]),
        "pixel_accuracy": _json_number(result["pixel_accuracy"]),
        "fw_iou": _json_number(result["fw_iou"]),
        "pixels": result["pixels"],
        "confusion_matrix": np.asarray(result["confusion_matrix"]).tolist(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "x") as f:   # "x": fail rather than overwrite, even in a race
        json.dump(data, f, indent=2)


# ---------------------------------------------------------------------------------
# Cityscapes submission format and the official evaluator
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
    for sample, _, pred in _predictions(predict_fn, samples, scheme, batch_size,
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
    from cs_compat import import_cityscapes_evaluator
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
        message = out.getvalue().strip().splitlines() or ["unknown error"]
        raise UserError(f"official Cityscapes evaluator: {message[-1]}") from None

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
