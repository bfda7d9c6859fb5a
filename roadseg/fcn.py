"""FCN-8s on VGG16, in TensorFlow 1.x style (``tf.compat.v1``), one function per concept.

The four functions keep the course template's names and signatures:

* ``load_vgg(sess, vgg_path)``      -> the five VGG16 tensors from the SavedModel
* ``layers(l3, l4, l7, num_classes)`` -> the FCN-8s decoder (skips, 1x1 convs, upsampling)
* ``optimize(last, labels, lr, num_classes)`` -> ``(logits, train_op, loss)``
* ``train_nn(sess, epochs, batch_size, get_batches_fn, ...)`` -> mean loss per epoch

The graph is built from ``tf.nn`` ops and ``tf.compat.v1.get_variable``:
``tf.compat.v1.layers`` does not exist under Keras 3 (TF >= 2.16).
"""
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from roadseg import losses, precision, vgg
from roadseg.errors import UserError, reason

tf1 = tf.compat.v1

VGG_TAG = "vgg16"
VGG_TENSORS = ("image_input:0", "keep_prob:0", "layer3_out:0", "layer4_out:0", "layer7_out:0")
IGNORE = 255


# --------------------------------------------------------------------------- encoder
def load_vgg(sess, vgg_path, input_map=None):
    """Load the pretrained VGG16 SavedModel into ``sess``'s graph.

    :param sess: TensorFlow session
    :param vgg_path: folder holding ``saved_model.pb`` and ``variables/``
    :param input_map: optional ``{"image_input:0": tensor, "keep_prob:0": tensor}`` to drive the
        encoder from other tensors (e.g. a ``tf.data`` iterator) instead of its placeholders
    :return: (image_input, keep_prob, layer3_out, layer4_out, layer7_out)

    The loader is called exactly as the course does, ``loader.load(sess, ['vgg16'], vgg_path)``
    (``input_map`` is passed only when given); only when loading fails is the folder
    examined, and the failure becomes a one-line ``UserError`` naming the folder and the fix.
    The weights are restored; ``global_variables_initializer()`` afterwards keeps them on
    every model ``roadseg.vgg`` builds or downloads (see ``vgg.keep_restored_values``).
    """
    extra = {} if input_map is None else {"input_map": input_map}
    try:
        tf1.saved_model.loader.load(sess, [VGG_TAG], vgg_path, **extra)
        graph = sess.graph
        tensors = [graph.get_tensor_by_name(name) for name in VGG_TENSORS]
    except Exception as err:  # OSError, RuntimeError (no such tag), DecodeError, OpError, ...
        vgg.check_vgg_dir(vgg_path)   # a missing folder or file: the error names it
        raise UserError(f"VGG16 model folder {vgg_path} is damaged: it does not load as a VGG16 "
                        f"SavedModel with the tag '{VGG_TAG}' ({reason(err)}); move "
                        f"the folder away and {vgg.GET_VGG_HINT}") from None
    if input_map:  # the mapped tensors stand where the placeholders were
        tensors = [input_map.get(name, t) for name, t in zip(VGG_TENSORS, tensors)]
    return tuple(tensors)


def initialize_new_variables(sess, existing):
    """Initialise every global variable of ``sess.graph`` not in ``existing`` -- e.g. all
    but VGG16's, which its SavedModel loader restored -- and the local ones (fp16's loss
    scale); returns the global ones initialised."""
    new = [v for v in tf1.global_variables() if v not in set(existing)]
    sess.run(tf1.variables_initializer(new + tf1.local_variables()))
    return new


# --------------------------------------------------------------------------- decoder
def bilinear_kernel(size, channels):
    """Transposed-conv kernel ``[size, size, channels, channels]`` doing bilinear upsampling.

    As in shelhamer's ``surgery.py``: each class is upsampled on its own (diagonal).
    """
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = np.ogrid[:size, :size]
    filt = (1 - abs(og[0] - center) / factor) * (1 - abs(og[1] - center) / factor)
    kernel = np.zeros((size, size, channels, channels), np.float32)
    for c in range(channels):
        kernel[:, :, c, c] = filt
    return kernel


def _l2(weights, scale):
    if scale:
        tf1.add_to_collection(tf1.GraphKeys.REGULARIZATION_LOSSES,
                              tf.multiply(scale, tf.reduce_sum(tf.square(weights)), name="l2"))


def _score(x, num_classes, name, l2_scale, init_std):
    """1x1 convolution to ``num_classes`` scores."""
    with tf1.variable_scope(name):
        c_in = x.shape[-1]
        w = tf1.get_variable("weights", [1, 1, c_in, num_classes],
                             initializer=tf1.truncated_normal_initializer(stddev=init_std))
        b = tf1.get_variable("biases", [num_classes], initializer=tf1.zeros_initializer())
        _l2(w, l2_scale)
        return tf.nn.bias_add(tf.nn.conv2d(x, w, 1, "SAME"), b)


def _upsample(x, like_hw, factor, num_classes, name, l2_scale, bilinear):
    """Transposed convolution by ``factor`` to the spatial size ``like_hw`` (a [2] tensor)."""
    size = 2 * factor
    with tf1.variable_scope(name):
        init = (tf1.constant_initializer(bilinear_kernel(size, num_classes)) if bilinear
                else tf1.truncated_normal_initializer(stddev=0.01))
        w = tf1.get_variable("weights", [size, size, num_classes, num_classes], initializer=init)
        _l2(w, l2_scale)
        out_shape = tf.stack([tf.shape(x)[0], like_hw[0], like_hw[1], num_classes])
        y = tf.nn.conv2d_transpose(x, w, out_shape, strides=factor, padding="SAME")
        static = x.shape
        y.set_shape([static[0], None if static[1] is None else static[1] * factor,
                     None if static[2] is None else static[2] * factor, num_classes])
        return y


def _nearest_32(v):
    return max(32, round(v / 32) * 32)


def check_image_shape(image_shape):
    """``(H, W)`` as ints when both are multiples of 32 of at least 32, else a ``UserError``.

    The one shape check of the project (pipeline, inference, training options): VGG16
    downsamples by 32, so FCN-8s needs sides divisible by 32.  The error suggests the
    nearest shape that works (60 x 100 -> 64 96).
    """
    try:
        h, w = (int(v) for v in image_shape)
    except (TypeError, ValueError):
        raise UserError(f"image shape must be two integers H W, got {image_shape!r}") from None
    if h < 32 or w < 32:
        raise UserError(f"image shape {h}x{w}: both sides must be at least 32 (and divisible "
                        f"by 32); use e.g. {_nearest_32(abs(h))} {_nearest_32(abs(w))}")
    if h % 32 or w % 32:
        raise UserError(f"image shape {h}x{w} is not divisible by 32 (VGG16 downsamples by 32); "
                        f"use e.g. {_nearest_32(h)} {_nearest_32(w)}")
    return h, w


def _check_divisible(l3, l4, l7):
    """At graph-build time, the feature maps of an input whose sides are not divisible by 32
    do not halve exactly from pool3 to fc7: reject them (when the shapes are static)."""
    for small, big in ((l7, l4), (l4, l3)):
        for axis in (1, 2):
            s, b = small.shape[axis], big.shape[axis]
            if s is not None and b is not None and 2 * s != b:
                raise UserError(f"image height and width must be divisible by 32 (VGG16 downsamples "
                                f"by 32); got a feature map of {b} vs {s} -- resize or crop the input")


def layers(vgg_layer3_out, vgg_layer4_out, vgg_layer7_out, num_classes,
           skip_scales=(0.01, 0.0001), l2_scale=1e-3, bilinear_init=True, score_init_std=0.01):
    """FCN-8s decoder: score fc7, upsample x2, add scored pool4, x2, add scored pool3, x8.

    :param vgg_layer3_out: pool3 (H/8), :param vgg_layer4_out: pool4 (H/16),
    :param vgg_layer7_out: fc7 (H/32); :param num_classes: classes to score
    :param skip_scales: pool4 / pool3 multipliers before their score layers (the FCN-8s
        "at-once" reference uses 0.01 and 0.0001); ``None`` disables the scaling
    :param l2_scale: L2 weight of the decoder's kernels, recorded in REGULARIZATION_LOSSES
    :param bilinear_init: initialise transposed convolutions to bilinear upsampling
    :return: logits ``[N, H, W, num_classes]`` with the input image's H and W.

    Sizes: H and W must be divisible by 32; other sizes are rejected (a ``UserError``
    when the shapes are static; the data pipeline and predictors resize to such a shape).
    """
    _check_divisible(vgg_layer3_out, vgg_layer4_out, vgg_layer7_out)
    s4, s3 = skip_scales or (1.0, 1.0)
    with tf1.variable_scope("fcn8"):
        score7 = _score(vgg_layer7_out, num_classes, "score_fc7", l2_scale, score_init_std)
        pool4 = vgg_layer4_out * s4 if s4 != 1 else vgg_layer4_out
        score4 = _score(pool4, num_classes, "score_pool4", l2_scale, score_init_std)
        up7 = _upsample(score7, tf.shape(score4)[1:3], 2, num_classes, "upscore2", l2_scale,
                        bilinear_init)
        fuse4 = tf.add(up7, score4, name="fuse_pool4")

        pool3 = vgg_layer3_out * s3 if s3 != 1 else vgg_layer3_out
        score3 = _score(pool3, num_classes, "score_pool3", l2_scale, score_init_std)
        up4 = _upsample(fuse4, tf.shape(score3)[1:3], 2, num_classes, "upscore_pool4", l2_scale,
                        bilinear_init)
        fuse3 = tf.add(up4, score3, name="fuse_pool3")
        return tf.identity(
            _upsample(fuse3, tf.shape(score3)[1:3] * 8, 8, num_classes, "upscore8", l2_scale,
                      bilinear_init), name="logits_4d")


# --------------------------------------------------------------------------- loss and optimizer
def data_loss(nn_last_layer, correct_label, num_classes, class_weights=None, dice_weight=0.0,
              **loss_options):
    """The pixel loss (``losses.pixel_loss``) plus ``dice_weight`` x the soft Dice loss:
    ``optimize``'s loss without the L2 terms."""
    loss = losses.pixel_loss(nn_last_layer, correct_label, num_classes, class_weights,
                             **loss_options)
    if dice_weight:
        loss = loss + dice_weight * losses.dice_loss(nn_last_layer, correct_label, num_classes)
    return loss


def optimize(nn_last_layer, correct_label, learning_rate, num_classes, class_weights=None,
             global_step=None, dice_weight=0.0, loss_scaling=False, **loss_options):
    """Loss and Adam training op.

    :param nn_last_layer: logits ``[N, H, W, C]`` from ``layers``
    :param correct_label: class ids ``[N, H, W]`` (255 = void) or one-hot ``[N, H, W, C]``
        (any dtype: the seed feeds an int32 one-hot placeholder); told apart by rank
    :param learning_rate: float or scalar tensor/placeholder
    :param class_weights: optional per-class loss weights (e.g. median frequency)
    :param dice_weight: if > 0, adds ``dice_weight * dice_loss`` to the pixel loss
    :param loss_scaling: dynamic loss scaling (fp16 training, ``precision.minimize``)
    :param loss_options: ``loss``, ``focal_gamma``, ``ohem_fraction`` of ``pixel_loss``
    :return: (logits ``[N*H*W, C]``, train_op, loss) -- the loss includes the L2 terms in
        ``REGULARIZATION_LOSSES`` (the course seed dropped them)
    """
    logits = tf.reshape(nn_last_layer, (-1, num_classes), name="logits")
    loss = data_loss(nn_last_layer, correct_label, num_classes, class_weights, dice_weight,
                     **loss_options)
    reg = tf1.get_collection(tf1.GraphKeys.REGULARIZATION_LOSSES)
    if reg:
        loss = tf.add(loss, tf.add_n(reg), name="total_loss")
    train_op = precision.minimize(tf1.train.AdamOptimizer(learning_rate), loss, global_step,
                                  loss_scaling)
    return logits, train_op, loss


# --------------------------------------------------------------------------- training
def train_nn(sess, epochs, batch_size, get_batches_fn, train_op, cross_entropy_loss, input_image,
             correct_label, keep_prob, learning_rate, keep_prob_value=0.5, learning_rate_value=1e-4):
    """Train with ``feed_dict`` batches, as in the course.

    :param get_batches_fn: ``get_batches_fn(batch_size)`` yields ``(images, labels)``
    :param keep_prob, learning_rate: placeholders fed ``keep_prob_value`` and
        ``learning_rate_value``; a plain number (a course solution may pass its learning
        rate straight to ``optimize``) is not fed
    :return: list of the mean loss of each epoch (printed as it goes)
    """
    fixed = {t: v for t, v in ((keep_prob, keep_prob_value), (learning_rate, learning_rate_value))
             if isinstance(t, tf.Tensor)}
    history = []
    for epoch in range(epochs):
        losses = []
        bar = tqdm(get_batches_fn(batch_size), desc=f"epoch {epoch + 1}/{epochs}", unit="batch")
        for images, labels in bar:
            _, loss = sess.run([train_op, cross_entropy_loss],
                               feed_dict={input_image: images, correct_label: labels, **fixed})
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}")
        mean = float(np.mean(losses)) if losses else float("nan")
        print(f"Epoch {epoch + 1}/{epochs}: mean loss {mean:.4f} over {len(losses)} batches")
        history.append(mean)
    return history
