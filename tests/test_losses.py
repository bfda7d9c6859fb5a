"""losses.pixel_loss (cross-entropy, focal, OHEM) and losses.dice_loss, against numpy on known logits."""
import numpy as np
import pytest
import tensorflow as tf

from roadseg import fcn, losses
from roadseg.errors import UserError

tf1 = tf.compat.v1

# One image of 1x5 pixels, 3 classes; the last pixel is void (255).
LOGITS = np.array([[[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0],
                     [1.0, 1.0, 1.0], [0.0, 9.0, 0.0]]]], np.float32)
LABELS = np.array([[[0, 0, 2, 1, 255]]], np.int32)


def _np_ce():
    """Per-pixel cross-entropy and true-class probability of the 4 labelled pixels."""
    z = LOGITS[0, 0, :4]
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    pt = p[np.arange(4), LABELS[0, 0, :4]]
    return -np.log(pt), pt


def _loss(labels=LABELS, **options):
    with tf.Graph().as_default(), tf1.Session() as sess:
        return float(sess.run(losses.pixel_loss(tf.constant(LOGITS), tf.constant(labels), 3, **options)))


def test_ce_is_mean_over_labelled_pixels():
    ce, _ = _np_ce()
    assert _loss() == pytest.approx(ce.mean(), rel=1e-5)


def test_focal_matches_formula_and_gamma_zero_is_ce():
    ce, pt = _np_ce()
    assert _loss(loss="focal", focal_gamma=2.0) == pytest.approx(((1 - pt) ** 2 * ce).mean(), rel=1e-5)
    assert _loss(loss="focal", focal_gamma=0.0) == pytest.approx(ce.mean(), rel=1e-5)
    # Confident pixels are discounted: the focal loss is well below the cross-entropy here.
    assert _loss(loss="focal") < 0.5 * _loss()


def test_focal_with_class_weights():
    ce, pt = _np_ce()
    w = np.array([1.0, 4.0, 0.5])[LABELS[0, 0, :4]]
    expected = (w * (1 - pt) ** 2 * ce).sum() / w.sum()
    assert _loss(loss="focal", class_weights=[1.0, 4.0, 0.5]) == pytest.approx(expected, rel=1e-5)


def test_ohem_averages_the_hardest_fraction_and_never_picks_void():
    ce, _ = _np_ce()
    hardest_two = np.sort(ce)[-2:].mean()
    # The void pixel (label 255) has logits far from any class: it must be ignored.
    assert _loss(loss="ohem", ohem_fraction=0.5) == pytest.approx(hardest_two, rel=1e-5)
    assert _loss(loss="ohem", ohem_fraction=0.01) == pytest.approx(ce.max(), rel=1e-5)  # k >= 1
    assert _loss(loss="ohem", ohem_fraction=1.0) == pytest.approx(ce.mean(), rel=1e-5)


def test_all_void_batch_gives_zero_not_nan():
    void = np.full_like(LABELS, 255)
    for name in losses.LOSSES:
        assert _loss(labels=void, loss=name) == 0.0


def test_unknown_loss_is_a_user_error():
    with pytest.raises(UserError, match="unknown loss 'hinge'"):
        _loss(loss="hinge")


def test_optimize_passes_loss_options():
    with tf.Graph().as_default(), tf1.Session() as sess:
        logits = tf1.get_variable("w", initializer=tf.constant(LOGITS))
        _, train_op, loss = fcn.optimize(logits, tf.constant(LABELS), 0.1, 3, loss="ohem",
                                         ohem_fraction=0.25)
        sess.run(tf1.global_variables_initializer())
        before = sess.run(loss)
        assert before == pytest.approx(_np_ce()[0].max(), rel=1e-5)
        for _ in range(20):
            sess.run(train_op)
        assert sess.run(loss) < before


def _np_dice(logits=LOGITS, labels=LABELS, smooth=1.0):
    z = logits[0, 0, :4]
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    y = np.eye(3)[labels[0, 0, :4]]
    return np.mean(1 - (2 * (p * y).sum(0) + smooth) / (p.sum(0) + y.sum(0) + smooth))


def _dice(labels=LABELS, logits=LOGITS):
    with tf.Graph().as_default(), tf1.Session() as sess:
        return float(sess.run(losses.dice_loss(tf.constant(logits), tf.constant(labels), 3)))


def test_dice_matches_formula_and_ignores_void():
    assert _dice() == pytest.approx(_np_dice(), rel=1e-5)
    # The void pixel's logits (class 1 at 9.0) change nothing.
    moved = LOGITS.copy()
    moved[0, 0, 4] = [9.0, 0.0, 0.0]
    assert _dice(logits=moved) == pytest.approx(_np_dice(), rel=1e-5)
    # The seed's one-hot labels (void = all-zero row) give the same value.
    onehot = np.zeros((1, 1, 5, 3), np.float32)
    onehot[0, 0, np.arange(4), LABELS[0, 0, :4]] = 1
    assert _dice(labels=onehot) == pytest.approx(_np_dice(), rel=1e-5)


def test_dice_is_zero_when_perfect_and_counts_a_small_class_like_a_big_one():
    perfect = np.where(np.eye(3)[LABELS[0, 0, :4]] > 0, 30.0, -30.0)[None, None].astype(np.float32)
    perfect = np.concatenate([perfect, np.zeros((1, 1, 1, 3), np.float32)], axis=2)
    assert _dice(logits=perfect) == pytest.approx(0.0, abs=1e-6)
    # Calling the one class-1 pixel (1/4 of the labelled pixels) class 0: class 1's term goes
    # 0 -> 1/2 and class 0's 0 -> 1/6 -- the rare class's miss weighs as a whole class, 1/3 of the mean.
    wrong = perfect.copy()
    wrong[0, 0, 3] = [30.0, -30.0, -30.0]  # the class-1 pixel called class 0
    assert _dice(logits=wrong) == pytest.approx(np.mean([1 - 5 / 6, 1 - 1 / 2, 0.0]), rel=1e-4)


def test_optimize_adds_the_weighted_dice_term():
    with tf.Graph().as_default(), tf1.Session() as sess:
        logits = tf1.get_variable("w", initializer=tf.constant(LOGITS))
        _, train_op, loss = fcn.optimize(logits, tf.constant(LABELS), 0.1, 3, dice_weight=0.5)
        sess.run(tf1.global_variables_initializer())
        before = sess.run(loss)
        assert before == pytest.approx(_np_ce()[0].mean() + 0.5 * _np_dice(), rel=1e-5)
        for _ in range(20):
            sess.run(train_op)
        assert sess.run(loss) < before
