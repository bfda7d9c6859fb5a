"""The inference head's test-time flip (``Predictor(tta="flip")``, ``flip_averaged``).

An untrained FCN-8s on the width-1/16 random VGG16 (64x128, camvid11's 11 classes) is
enough: its weights are not mirror-symmetric, so its plain predictions are not either,
and the flip must make them so exactly.
"""
import numpy as np
import pytest
import tensorflow as tf

from roadseg import inference
from roadseg.errors import UserError
from roadseg.model import ModelSpec
from roadseg.schemes import get_scheme

tf1 = tf.compat.v1
SHAPE = (64, 128)


@pytest.fixture(scope="module")
def network(vgg_dir):
    """(graph, session, images, classes, probabilities) of an untrained FCN-8s."""
    graph = tf.Graph()
    sess = tf1.Session(graph=graph)
    with graph.as_default():
        tf1.set_random_seed(0)
        tensors = inference.build_inference(sess, ModelSpec("camvid11", SHAPE, vgg_dir, skip_scales=None))
        sess.run(tf1.global_variables_initializer())
    yield (graph, sess, *tensors)
    sess.close()


def predictor(network, tta):
    graph, sess, images, classes, probs = network
    return inference.Predictor(graph, sess, images, classes, probs, get_scheme("camvid11"),
                               SHAPE, "test", tta=tta)


def random_images(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_flip_is_exactly_mirror_symmetric(network):
    images = random_images((2, 50, 70, 3))            # any size: resized inside
    mirror = np.ascontiguousarray(images[:, :, ::-1])
    plain, flip = predictor(network, "none"), predictor(network, "flip")
    # the plain network is not mirror-symmetric (random, unsymmetric weights)...
    assert not np.array_equal(plain.predict_proba(mirror), plain.predict_proba(images)[:, :, ::-1])
    # ...the flip-averaged one is, bit for bit: probabilities and class maps
    p, p_mirror = flip.predict_proba(images), flip.predict_proba(mirror)
    assert p.shape == (2, 50, 70, 11)
    np.testing.assert_array_equal(p_mirror, p[:, :, ::-1])
    np.testing.assert_array_equal(flip.predict(mirror), flip.predict(images)[:, :, ::-1])
    assert flip.predict(images).dtype == np.uint8 and flip.predict(images[0]).shape == (50, 70)


def test_flip_averages_the_image_and_its_mirror(network):
    images = random_images((1, 64, 128, 3), seed=1)
    plain, flip = predictor(network, "none"), predictor(network, "flip")
    both = (plain.predict_proba(images)
            + plain.predict_proba(np.ascontiguousarray(images[:, :, ::-1]))[:, :, ::-1]) / 2
    np.testing.assert_allclose(flip.predict_proba(images), both, rtol=0, atol=1e-7)
    np.testing.assert_allclose(flip.predict_proba(images).sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(flip.predict(images), both.argmax(-1))
    # and it changes the answer of this unsymmetric network somewhere
    assert (flip.predict(images) != plain.predict(images)).any()


def test_flip_changes_nothing_for_a_mirror_symmetric_network(vgg_dir):
    """Every kernel made mirror-symmetric (W = (W + W mirrored) / 2; 'SAME' padding, 2x2
    pools and the transposed convolutions are symmetric at 64x128): the network commutes
    with the mirror, so the flip's average is the plain prediction up to float rounding."""
    graph = tf.Graph()
    with tf1.Session(graph=graph) as sess, graph.as_default():
        tf1.set_random_seed(0)
        tensors = inference.build_inference(sess, ModelSpec("camvid11", SHAPE, vgg_dir, skip_scales=None))
        sess.run(tf1.global_variables_initializer())
        kernels = [v for v in tf1.global_variables() if v.shape.rank == 4]
        assert len(kernels) >= 13 + 3 + 3               # VGG16 convs, fc6/fc7, scores, upsampling
        sess.run([v.assign((v + tf.reverse(v, [1])) / 2) for v in kernels])
        net = (graph, sess, *tensors)
        plain, flip = predictor(net, "none"), predictor(net, "flip")
        images = random_images((2, *SHAPE, 3), seed=2)  # the network's size: no resize
        p_plain, p_flip = plain.predict_proba(images), flip.predict_proba(images)
        np.testing.assert_allclose(p_flip, p_plain, rtol=0, atol=1e-5)
        top2 = np.sort(p_plain, axis=-1)[..., -2:]
        clear = top2[..., 1] - top2[..., 0] > 1e-4      # not a near-tie of two classes
        assert clear.mean() > 0.95
        np.testing.assert_array_equal(flip.predict(images)[clear], plain.predict(images)[clear])


def test_unknown_tta_is_a_user_error(network):
    with pytest.raises(UserError, match="unknown test-time augmentation 'rotate'"):
        predictor(network, "rotate")
