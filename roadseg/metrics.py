"""Evaluation: confusion matrix, per-class IoU and mean IoU of a predictor on labelled images.

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

For Cityscapes submissions see ``roadseg.cityscapes_eval``.

    >>> import numpy as np
    >>> cm = ConfusionMatrix(2)
    >>> cm.update(np.array([0, 0, 1, 255]), np.array([0, 1, 1, 0]))
    >>> [round(float(x), 3) for x in cm.compute()["iou"]]
    [0.5, 0.5]
"""
import json

import numpy as np
from tqdm.auto import tqdm

from roadseg import datasets
from roadseg.errors import UserError
from roadseg.inference import predict_batch, same_size_batches
from roadseg.run_folders import refuse_existing, staged_file


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
def predictions(predict_fn, samples, scheme, batch_size, progress, desc):
    """Yield ``(sample, label, pred)`` for every sample, in order.

    Consecutive images of the same size are batched (up to ``batch_size``); an
    image of another size starts a new batch.  ``pred`` must come back at the
    size of its image, so ``label`` stays at native resolution.
    """
    total = len(samples) if hasattr(samples, "__len__") else None
    bar = tqdm(samples, total=total, desc=desc, unit="img", disable=not progress)
    pairs = (((sample, label), image) for sample in bar
             for image, label in [datasets.load_pair(sample, scheme)])
    try:
        for items, images in same_size_batches(pairs, batch_size):
            for (sample, label), pred in zip(items, predict_batch(predict_fn, images)):
                yield sample, label, pred
    finally:
        bar.close()   # before an error is printed: the error gets a line of its own


def evaluate(predict_fn, samples, scheme, batch_size=4, progress=True):
    """Score ``predict_fn`` on labelled ``samples``; returns ``ConfusionMatrix.compute()``.

    ``predict_fn(images uint8 [N,H,W,3]) -> class maps [N,H,W]`` at the input
    size.  Samples are loaded with ``datasets.load_pair(sample, scheme)`` and
    must have labels.
    """
    cm = ConfusionMatrix(scheme.num_classes)
    for sample, label, pred in predictions(predict_fn, samples, scheme, batch_size,
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
    """Write ``result`` as JSON to ``path``; refuses to overwrite an existing file.

    Written under a temporary name and renamed when complete: a full disk is one UserError
    line and leaves nothing under ``path``."""
    refuse_existing(path, "choose another file name")
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
    with staged_file(path) as tmp:   # complete, or nothing under the final name
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
