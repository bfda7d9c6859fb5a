"""The course's project tests, made real: run with ``python -m pytest project_tests.py``.

First the course's five tests as the course wrote them (``test_load_vgg(load_vgg, tf_module)``,
``test_layers(layers)``, ``test_optimize(optimize)``, ``test_train_nn(train_nn)``,
``test_for_kitti_dataset(data_dir)``, their assertions unchanged): a course ``main.py`` calls
them on its own functions (``tests.test_load_vgg(load_vgg, tf)`` with
``import tensorflow.compat.v1 as tf``), and pytest runs them on the project's (fixtures of
those names in conftest.py).  Then the project's own tests: each keeps the course check
(mocked loader, output shapes, a train op) and adds one that runs the real thing on a narrow
VGG16 SavedModel built by the converter (random weights, width 1/16: the same interface,
built in seconds -- fixture ``vgg_dir`` in conftest.py).
"""
import contextlib
import functools
import io
import os
from glob import glob
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf

from roadseg import fcn, losses, vgg
from roadseg.errors import UserError
from roadseg.fcn import layers, load_vgg, optimize, train_nn

tf1 = tf.compat.v1
SIZES = [(64, 96), (96, 160), (160, 224)]


def _graph():
    return tf.Graph().as_default()


# ------------------------------------------------------------------------- the course's five tests
def isolated(test):
    """Run a course test in a graph of its own, then say so as the course did."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        with tf.Graph().as_default():
            result = test(*args, **kwargs)
        print("Tests Passed")
        return result
    return run


def _quietly(function, params):
    """Call ``function(**params)`` with its prints swallowed."""
    with contextlib.redirect_stdout(io.StringIO()):
        function(**params)


def _assert_tensor_shape(tensor, shape, display_name):
    """Assert ``tensor`` has the rank of ``shape`` and its dimensions where ``shape`` gives one."""
    assert tf1.assert_rank(tensor, len(shape), message='{} has wrong rank'.format(display_name))

    tensor_shape = tensor.get_shape().as_list() if len(shape) else []

    wrong_dimension = [ten_dim for ten_dim, cor_dim in zip(tensor_shape, shape)
                       if cor_dim is not None and ten_dim != cor_dim]
    assert not wrong_dimension, \
        '{} has wrong shape.  Found {}'.format(display_name, tensor_shape)


@isolated
def test_load_vgg(load_vgg, tf_module):
    """The course's check of ``load_vgg``: it calls the SavedModel loader exactly as
    ``loader.load(sess, ['vgg16'], vgg_path)`` and returns the five named tensors."""
    with mock.patch.object(tf_module.saved_model.loader, "load") as mock_load_model:
        vgg_path = ''
        sess = tf1.Session()
        test_input_image = tf1.placeholder(tf.float32, name='image_input')
        test_keep_prob = tf1.placeholder(tf.float32, name='keep_prob')
        test_vgg_layer3_out = tf1.placeholder(tf.float32, name='layer3_out')
        test_vgg_layer4_out = tf1.placeholder(tf.float32, name='layer4_out')
        test_vgg_layer7_out = tf1.placeholder(tf.float32, name='layer7_out')

        input_image, keep_prob, vgg_layer3_out, vgg_layer4_out, vgg_layer7_out = load_vgg(sess, vgg_path)

        assert mock_load_model.called, \
            'tf.saved_model.loader.load() not called'
        assert mock_load_model.call_args == mock.call(sess, ['vgg16'], vgg_path), \
            'tf.saved_model.loader.load() called with wrong arguments.'

        assert input_image == test_input_image, 'input_image is the wrong object'
        assert keep_prob == test_keep_prob, 'keep_prob is the wrong object'
        assert vgg_layer3_out == test_vgg_layer3_out, 'layer3_out is the wrong object'
        assert vgg_layer4_out == test_vgg_layer4_out, 'layer4_out is the wrong object'
        assert vgg_layer7_out == test_vgg_layer7_out, 'layer7_out is the wrong object'
        sess.close()


@isolated
def test_layers(layers):
    """The course's check of ``layers``: 2 classes out, whatever the (unknown) sizes."""
    num_classes = 2
    vgg_layer3_out = tf1.placeholder(tf.float32, [None, None, None, 256])
    vgg_layer4_out = tf1.placeholder(tf.float32, [None, None, None, 512])
    vgg_layer7_out = tf1.placeholder(tf.float32, [None, None, None, 4096])
    layers_output = layers(vgg_layer3_out, vgg_layer4_out, vgg_layer7_out, num_classes)

    _assert_tensor_shape(layers_output, [None, None, None, num_classes], 'Layers Output')


@isolated
def test_optimize(optimize):
    """The course's check of ``optimize``: flat logits, and a train op that changes the
    weights (float one-hot labels, a learning rate fed as 10)."""
    num_classes = 2
    shape = [2, 3, 4, num_classes]
    layers_output = tf1.Variable(tf.zeros(shape))
    correct_label = tf1.placeholder(tf.float32, [None, None, None, num_classes])
    learning_rate = tf1.placeholder(tf.float32)
    logits, train_op, cross_entropy_loss = optimize(layers_output, correct_label, learning_rate, num_classes)

    _assert_tensor_shape(logits, [2*3*4, num_classes], 'Logits')

    labels = np.arange(np.prod(shape)).reshape(shape)
    with tf1.Session() as sess:
        sess.run(tf1.global_variables_initializer())
        sess.run([train_op], {correct_label: labels, learning_rate: 10})
        test, loss = sess.run([layers_output, cross_entropy_loss], {correct_label: labels})

    assert test.min() != 0 or test.max() != 0, 'Training operation not changing weights.'


@isolated
def test_train_nn(train_nn):
    """The course's check of ``train_nn``: one epoch over a batch function that returns an
    array, with constant ops standing for the train op and the loss."""
    epochs = 1
    batch_size = 2

    def get_batches_fn(batch_size_param):
        shape = [batch_size_param, 2, 3, 3]
        return np.arange(np.prod(shape)).reshape(shape)

    train_op = tf.constant(0)
    cross_entropy_loss = tf.constant(10.11)
    input_image = tf1.placeholder(tf.float32, name='input_image')
    correct_label = tf1.placeholder(tf.float32, name='correct_label')
    keep_prob = tf1.placeholder(tf.float32, name='keep_prob')
    learning_rate = tf1.placeholder(tf.float32, name='learning_rate')
    with tf1.Session() as sess:
        parameters = {
            'sess': sess,
            'epochs': epochs,
            'batch_size': batch_size,
            'get_batches_fn': get_batches_fn,
            'train_op': train_op,
            'cross_entropy_loss': cross_entropy_loss,
            'input_image': input_image,
            'correct_label': correct_label,
            'keep_prob': keep_prob,
            'learning_rate': learning_rate}
        _quietly(train_nn, parameters)


@isolated
def test_for_kitti_dataset(data_dir):
    """The course's check that the whole KITTI road dataset is in ``data_dir/data_road``."""
    kitti_dataset_path = os.path.join(data_dir, 'data_road')
    training_labels_count = len(glob(os.path.join(kitti_dataset_path, 'training/gt_image_2/*_road_*.png')))
    training_images_count = len(glob(os.path.join(kitti_dataset_path, 'training/image_2/*.png')))
    testing_images_count = len(glob(os.path.join(kitti_dataset_path, 'testing/image_2/*.png')))

    assert not (training_images_count == training_labels_count == testing_images_count == 0),\
        'Kitti dataset not found. Extract Kitti dataset in {}'.format(kitti_dataset_path)
    assert training_images_count == 289, \
        'Expected 289 training images, found {} images.'.format(training_images_count)
    assert training_labels_count == 289, \
        'Expected 289 training labels, found {} labels.'.format(training_labels_count)
    assert testing_images_count == 290, \
        'Expected 290 testing images, found {} images.'.format(testing_images_count)


# ------------------------------------------------------------------------- load_vgg
def test_load_vgg_mocked():
    """load_vgg calls the loader as the course does; input_map is passed only when given."""
    with _graph(), tf1.Session() as sess, \
            mock.patch.object(tf1.saved_model.loader, "load") as mock_load, \
            mock.patch.object(vgg, "check_vgg_dir") as check:
        expected = [tf1.placeholder(tf.float32, name=n.split(":")[0]) for n in fcn.VGG_TENSORS]
        got = load_vgg(sess, "some/vgg")
        assert mock_load.call_args == mock.call(sess, ["vgg16"], "some/vgg")
        assert list(got) == expected
        assert not check.called   # the folder is examined only when loading fails
        image = tf1.placeholder(tf.float32, [None, 64, 64, 3])
        got = load_vgg(sess, "some/vgg", input_map={"image_input:0": image})
        assert mock_load.call_args == mock.call(sess, ["vgg16"], "some/vgg",
                                                input_map={"image_input:0": image})
        assert got[0] is image and got[1] is expected[1]


def test_load_vgg_real(vgg_dir):
    with _graph(), tf1.Session() as sess:
        image, keep, l3, l4, l7 = load_vgg(sess, vgg_dir)
        out = sess.run([l3, l4, l7], {image: np.zeros((2, 64, 96, 3), np.float32), keep: 1.0})
        assert [o.shape[:3] for o in out] == [(2, 8, 12), (2, 4, 6), (2, 2, 3)]
        assert [o.shape[3] for o in out] == [16, 32, 256]  # 256/512/4096 at width 1/16
        assert len(tf1.trainable_variables()) == 2 * 15  # 13 convs + fc6 + fc7, weights + biases


def test_load_vgg_missing_folder(tmp_path):
    with _graph(), tf1.Session() as sess, pytest.raises(UserError, match="saved_model.pb"):
        load_vgg(sess, str(tmp_path))
    with _graph(), tf1.Session() as sess, pytest.raises(UserError, match="does not exist"):
        load_vgg(sess, str(tmp_path / "nothing"))


def test_load_vgg_unloadable_folder_is_one_line(vgg_dir, tmp_path):
    """Complete files that the loader rejects: a one-line UserError naming the folder."""
    import shutil
    broken = tmp_path / "vgg"
    shutil.copytree(vgg_dir, broken)
    (broken / "saved_model.pb").write_bytes(b"not a protobuf")
    with _graph(), tf1.Session() as sess, pytest.raises(UserError) as err:
        load_vgg(sess, str(broken))
    message = str(err.value)
    assert str(broken) in message and "get-vgg" in message and "\n" not in message


def test_global_variables_initializer_keeps_the_loaded_weights(vgg_dir):
    """What every course solution does right after load_vgg: the encoder keeps its weights."""
    with _graph(), tf1.Session() as sess:
        load_vgg(sess, vgg_dir)
        encoder = tf1.global_variables()
        before = sess.run(encoder)
        sess.run(tf1.global_variables_initializer())
        after = sess.run(encoder)
    assert len(encoder) == 30
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------- layers
@pytest.mark.parametrize("num_classes", [2, 5])
def test_layers_static_shapes(num_classes):
    """The course check, on static shapes: the output has the image's height and width."""
    for h, w in SIZES:
        with _graph():
            l3 = tf1.placeholder(tf.float32, [2, h // 8, w // 8, 256])
            l4 = tf1.placeholder(tf.float32, [2, h // 16, w // 16, 512])
            l7 = tf1.placeholder(tf.float32, [2, h // 32, w // 32, 4096])
            out = layers(l3, l4, l7, num_classes)
            assert out.shape.as_list() == [2, h, w, num_classes]


@pytest.mark.parametrize("num_classes", [2, 5])
def test_layers_runtime_shapes(vgg_dir, num_classes):
    with _graph(), tf1.Session() as sess:
        image, keep, l3, l4, l7 = load_vgg(sess, vgg_dir)
        out = layers(l3, l4, l7, num_classes)
        sess.run(tf1.variables_initializer(tf1.global_variables(scope="fcn8")))
        for h, w in SIZES:
            got = sess.run(out, {image: np.random.rand(1, h, w, 3) * 255, keep: 1.0})
            assert got.shape == (1, h, w, num_classes)


def test_layers_rejects_sizes_not_divisible_by_32():
    with _graph():
        l3 = tf1.placeholder(tf.float32, [1, 13, 13, 256])   # a 100x100 image
        l4 = tf1.placeholder(tf.float32, [1, 7, 7, 512])
        l7 = tf1.placeholder(tf.float32, [1, 4, 4, 4096])
        with pytest.raises(Exception, match="divisible by 32"):
            layers(l3, l4, l7, 2)


def test_bilinear_upsampling_init():
    """Transposed convs start as bilinear upsampling: a constant map stays constant inside."""
    with _graph(), tf1.Session() as sess:
        l3 = tf1.placeholder(tf.float32, [1, 8, 8, 4])
        l4 = tf1.placeholder(tf.float32, [1, 4, 4, 4])
        l7 = tf1.placeholder(tf.float32, [1, 2, 2, 4])
        layers(l3, l4, l7, 3)
        kernel = [v for v in tf1.global_variables() if "upscore2/weights" in v.name][0]
        sess.run(tf1.global_variables_initializer())
        k = sess.run(kernel)
        x = tf.constant(np.ones((1, 4, 4, 3), np.float32))
        y = sess.run(tf.nn.conv2d_transpose(x, k, [1, 8, 8, 3], 2, "SAME"))
        np.testing.assert_allclose(y[0, 1:-1, 1:-1], 1.0, rtol=1e-6)
        assert np.all(k[:, :, 0, 1] == 0)  # classes are upsampled independently


# ------------------------------------------------------------------------- optimize
def _tiny_net(num_classes=3):
    image = tf1.placeholder(tf.float32, [None, 32, 32, 3])
    feat = lambda k, c: tf.tile(tf.nn.avg_pool2d(image, k, k, "SAME"), [1, 1, 1, c])  # noqa: E731
    return image, layers(feat(8, 2), feat(16, 2), feat(32, 2), num_classes, skip_scales=None)


def test_optimize_changes_weights_and_returns_flat_logits():
    with _graph(), tf1.Session() as sess:
        image, out = _tiny_net()
        label = tf1.placeholder(tf.int32, [None, None, None])
        logits, train_op, loss = optimize(out, label, 1e-2, 3)
        sess.run(tf1.global_variables_initializer())
        w = tf1.global_variables(scope="fcn8/score_fc7/weights")[0]
        before = sess.run(w)
        feed = {image: np.random.rand(2, 32, 32, 3), label: np.random.randint(0, 3, (2, 32, 32))}
        assert sess.run(logits, feed).shape == (2 * 32 * 32, 3)
        sess.run(train_op, feed)
        assert not np.allclose(before, sess.run(w))


def test_optimize_ignores_void_and_includes_l2():
    with _graph(), tf1.Session() as sess:
        image, out = _tiny_net()
        label = tf1.placeholder(tf.int32, [None, None, None])
        _, _, loss = optimize(out, label, 1e-2, 3)
        pix = losses.pixel_loss(out, label, 3)
        sess.run(tf1.global_variables_initializer())
        x = np.random.rand(1, 32, 32, 3) * 255
        y = np.random.randint(0, 3, (1, 32, 32))
        y_void = y.copy()
        y_void[:, :16] = 255
        full = sess.run(pix, {image: x, label: y})
        part = sess.run(pix, {image: x, label: y_void})
        total = sess.run(loss, {image: x, label: y})
        # void pixels contribute nothing: equals the loss over the labelled half alone
        logits = sess.run(out, {image: x})[0, 16:]
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ce = -np.log(np.take_along_axis(p, y[0, 16:, :, None], -1)).mean()
        np.testing.assert_allclose(part, ce, rtol=1e-4)
        # the L2 terms are really in the loss
        reg = sess.run(tf.add_n(tf1.get_collection(tf1.GraphKeys.REGULARIZATION_LOSSES)))
        assert reg > 0
        np.testing.assert_allclose(total, full + reg, rtol=1e-5)
        # one-hot labels (the seed's placeholders) give the same loss; void = all-zero rows
        onehot = tf1.placeholder(tf.float32, [None, None, None, 3])
        eye = np.vstack([np.eye(3), np.zeros((1, 3))])
        np.testing.assert_allclose(
            sess.run(losses.pixel_loss(out, onehot, 3),
                     {image: x, onehot: eye[np.where(y_void == 255, 3, y_void)]}), part, rtol=1e-5)


def test_optimize_tells_one_hot_from_ids_by_rank():
    """The seed's int32 one-hot placeholder [N,H,W,C] and class ids [N,H,W] give one loss."""
    with _graph(), tf1.Session() as sess:
        image, out = _tiny_net()
        ids = tf1.placeholder(tf.int32, [None, None, None])
        onehot = tf1.placeholder(tf.int32, [None, None, None, 3])
        _, _, by_ids = optimize(out, ids, 1e-2, 3, dice_weight=1.0)
        _, _, by_onehot = optimize(out, onehot, 1e-2, 3, dice_weight=1.0)
        sess.run(tf1.global_variables_initializer())
        y = np.random.randint(0, 3, (2, 32, 32))
        feed = {image: np.random.rand(2, 32, 32, 3) * 255, ids: y, onehot: np.eye(3, dtype=int)[y]}
        np.testing.assert_allclose(*sess.run([by_ids, by_onehot], feed), rtol=1e-6)
        with pytest.raises(UserError, match="rank 2"):
            optimize(out, tf1.placeholder(tf.int32, [None, 3]), 1e-2, 3)


def test_optimize_class_weights():
    with _graph(), tf1.Session() as sess:
        image, out = _tiny_net()
        label = tf1.placeholder(tf.int32, [None, None, None])
        plain = losses.pixel_loss(out, label, 3)
        only_class_1 = losses.pixel_loss(out, label, 3, class_weights=[0.0, 1.0, 0.0])
        sess.run(tf1.global_variables_initializer())
        x = np.random.rand(1, 32, 32, 3) * 255
        y = np.random.randint(0, 3, (1, 32, 32))
        y1 = np.where(y == 1, 1, 255)
        np.testing.assert_allclose(sess.run(only_class_1, {image: x, label: y}),
                                   sess.run(plain, {image: x, label: y1}), rtol=1e-5)


# ------------------------------------------------------------------------- train_nn
def test_train_nn_loss_falls(vgg_dir, capsys):
    """Over-fitting one tiny batch through the real (narrow) VGG lowers the loss."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    labels = np.zeros((2, 64, 64), np.int32)
    labels[:, 32:] = 1
    images[:, 32:] *= 0.3  # the lower half is darker: learnable

    def get_batches_fn(batch_size):
        for _ in range(5):
            yield images, labels

    with _graph(), tf1.Session() as sess:
        tf1.set_random_seed(0)
        image, keep, l3, l4, l7 = load_vgg(sess, vgg_dir)
        pretrained = set(tf1.global_variables())  # restored by the loader: don't re-initialise
        out = layers(l3, l4, l7, 2, skip_scales=None)
        label = tf1.placeholder(tf.int32, [None, None, None])
        lr = tf1.placeholder(tf.float32)
        _, train_op, loss = optimize(out, label, lr, 2)
        sess.run(tf1.variables_initializer([v for v in tf1.global_variables() if v not in pretrained]))
        history = train_nn(sess, 3, 2, get_batches_fn, train_op, loss, image, label, keep, lr,
                           keep_prob_value=1.0, learning_rate_value=1e-3)
    assert len(history) == 3
    assert history[-1] < 0.7 * history[0], history
    assert "Epoch 3/3: mean loss" in capsys.readouterr().out


# ------------------------------------------------------------------------- dataset
def test_for_cityscapes_dataset(shared_data):
    """Counts the Cityscapes files present (the real sample frame in ../shared/data)."""
    from roadseg import datasets
    root = os.environ.get("CITYSCAPES_DATASET") or str(shared_data / "cityscapes_sample")
    found = datasets.find_dataset(root)
    assert found.layout == "cityscapes"
    counts = {split: len(samples) for split, samples in found.splits.items()}
    if root.endswith("cityscapes_sample"):
        assert counts == {"val": 1}
    else:  # the full dataset: 2975 train, 500 val, 1525 test
        assert counts.get("train") == 2975 and counts.get("val") == 500, counts
    assert all(s.label for s in found.splits.get("val", []))
