"""Per-pixel losses of FCN-8s: cross-entropy, focal, OHEM, and a soft Dice term.

``pixel_loss`` averages a per-pixel term over the labelled pixels (void = 255, or an
all-zero one-hot row, counts nowhere); ``dice_loss`` scores each class's overlap.
``fcn.optimize`` adds them up with the decoder's L2 terms.
"""
import numpy as np
import tensorflow as tf

from roadseg.errors import UserError

LOSSES = ("ce", "focal", "ohem")


def is_one_hot(correct_label):
    """True for one-hot labels ``[N, H, W, C]``, False for class ids ``[N, H, W]``.

    Told apart by rank, whatever the dtype: the seed feeds one-hot labels through a
    ``tf.int32`` placeholder, the course through float32, the project feeds int32 ids.
    Only a label tensor of unknown rank falls back to its dtype (integer = class ids).
    """
    rank = correct_label.shape.rank
    if rank is None:
        return not correct_label.dtype.is_integer
    if rank not in (3, 4):
        raise UserError(f"labels must be class ids [N, H, W] or one-hot [N, H, W, C], got a "
                        f"tensor of rank {rank} ({correct_label.shape})")
    return rank == 4


def pixel_loss(nn_last_layer, correct_label, num_classes, class_weights=None, loss="ce",
               focal_gamma=2.0, ohem_fraction=0.25):
    """Mean per-pixel loss over labelled pixels (no L2).

    ``correct_label`` is either class ids ``[N, H, W]`` (255 = void) or one-hot
    ``[N, H, W, C]`` of any dtype (an all-zero row = void), told apart by rank
    (``is_one_hot``).  Void pixels contribute nothing.
    With ``class_weights`` the mean is weighted (normalised by the weights' sum).

    ``loss`` picks the per-pixel term:

    * ``"ce"``    cross-entropy ``-log p`` (``p`` = softmax probability of the true class)
    * ``"focal"`` focal loss ``-(1 - p) ** focal_gamma * log p`` (Lin et al. 2017): pixels
      already classified confidently count less, so rare, hard pixels count more
    * ``"ohem"``  online hard example mining: cross-entropy averaged over only the hardest
      ``ohem_fraction`` of the labelled pixels of the batch (highest weighted loss)
    """
    if loss not in LOSSES:
        raise UserError(f"unknown loss '{loss}'; use one of {', '.join(LOSSES)}")
    logits = tf.reshape(nn_last_layer, (-1, num_classes))
    cw = None if class_weights is None else tf.constant(np.asarray(class_weights, np.float32))
    if not is_one_hot(correct_label):
        labels = tf.reshape(tf.cast(correct_label, tf.int32), (-1,))
        valid = tf.logical_and(labels >= 0, labels < num_classes)
        safe = tf.where(valid, labels, tf.zeros_like(labels))
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe, logits=logits)
        weight = tf.cast(valid, tf.float32)
        if cw is not None:
            weight *= tf.gather(cw, safe)
    else:
        onehot = tf.reshape(tf.cast(correct_label, tf.float32), (-1, num_classes))
        ce = tf.nn.softmax_cross_entropy_with_logits(labels=onehot, logits=logits)
        weight = tf.reduce_sum(onehot, axis=1)
        if cw is not None:
            weight = tf.reduce_sum(onehot * cw, axis=1)
    if loss == "focal":
        ce = (1.0 - tf.exp(-ce)) ** focal_gamma * ce  # exp(-ce) is p of the true class
    elif loss == "ohem":
        n_valid = tf.reduce_sum(tf.cast(weight > 0, tf.float32))
        k = tf.cast(tf.maximum(1.0, tf.math.ceil(ohem_fraction * n_valid)), tf.int32)
        # Void pixels get -1 so they are never among the hardest (real losses are >= 0).
        hardest = tf.math.top_k(tf.where(weight > 0, ce * weight, -tf.ones_like(ce)), k).indices
        ce, weight = tf.gather(ce, hardest), tf.gather(weight, hardest)
    return tf.math.divide_no_nan(tf.reduce_sum(ce * weight), tf.reduce_sum(weight),
                                 name="pixel_loss")


def dice_loss(nn_last_layer, correct_label, num_classes, smooth=1.0):
    """Soft Dice loss, ``mean over classes of 1 - (2|P*Y| + s) / (|P| + |Y| + s)``.

    ``P`` are the softmax probabilities and ``Y`` the one-hot labels of the labelled pixels
    of the whole batch (void pixels left out), summed per class (Milletari et al. 2016,
    V-Net).  Every class counts the same however few pixels it has, and a false positive
    costs as much as a miss, so it works on each class's overlap (IoU-like) directly --
    unlike per-pixel class weights, which buy recall of rare classes with false positives.
    A class absent from the batch and not predicted scores ~0 (``smooth`` = s).
    """
    logits = tf.reshape(nn_last_layer, (-1, num_classes))
    if not is_one_hot(correct_label):
        labels = tf.reshape(tf.cast(correct_label, tf.int32), (-1,))
        onehot = tf.one_hot(labels, num_classes)  # out-of-range ids (void) -> all-zero row
    else:
        onehot = tf.reshape(tf.cast(correct_label, tf.float32), (-1, num_classes))
    valid = tf.reduce_sum(onehot, axis=1, keepdims=True)
    probs = tf.nn.softmax(logits) * valid
    inter = tf.reduce_sum(probs * onehot, axis=0)
    total = tf.reduce_sum(probs, axis=0) + tf.reduce_sum(onehot, axis=0)
    return tf.reduce_mean(1.0 - (2.0 * inter + smooth) / (total + smooth), name="dice_loss")
