"""Our FCN-8s graphs as the benchmarks run them, built from the project's modules.

* ``model_spec(vgg)`` -- the benchmarks' ``ModelSpec`` (``common.SCHEME`` at 256x512, the
  default decoder options); every graph here is built through ``model.network``.
* ``inference(sess, vgg, variant)`` -- ``head.build_inference`` as the
  product uses it (``variant="product"``), the same graph frozen to constants
  (``"frozen"``, ``convert_variables_to_constants``), or rebuilt from those constants
  with the cheap linear steps folded into weights (``"folded"``: RGB->BGR into
  conv1_1's kernel, the pool3/pool4 scales into the score convolutions).
* training is not rebuilt here: ``cases.train`` times ``trainer.build_training_graph``.
* ``forward_flops`` / ``training_flops`` -- floating-point operations per image,
  counted by TensorFlow's profiler on twins of these graphs with fully static shapes.
* ``new_predictor(vgg)`` -- a ``head.Predictor`` straight from a VGG folder
  with a freshly initialised decoder (no training run needed).

VGG's own variables are restored by the SavedModel loader; only the variables added
on top are initialised here.
"""
import common  # bench/ is on sys.path as the script's folder
import numpy as np
import tensorflow as tf

from roadseg import fcn, model
from roadseg import inference as head
from roadseg import vgg as vgg_module
from roadseg.schemes import get_scheme

tf1 = tf.compat.v1
H, W = common.IMAGE_SHAPE
INFERENCE_VARIANTS = ("product", "frozen", "folded")
LOGITS = "fcn8/logits_4d:0"


def model_spec(vgg):
    """The benchmarks' network: ``common.SCHEME`` at ``common.IMAGE_SHAPE`` on VGG at ``vgg``,
    the default decoder options."""
    return model.ModelSpec(common.SCHEME, common.IMAGE_SHAPE, vgg)


def init_new_variables(sess, loaded):
    """Initialise the global variables that are not in ``loaded`` (VGG's)."""
    sess.run(tf1.variables_initializer([v for v in tf1.global_variables() if v not in loaded]))


# --------------------------------------------------------------------------- inference
def inference(sess, vgg, variant="product"):
    """Build an inference graph in ``sess.graph``; return ``(images, classes, logits)``.

    ``images`` is a uint8 ``[N, H, W, 3]`` placeholder (any size; resized to 256x512
    inside), ``classes`` the uint8 class maps at the input's size, ``logits`` the
    decoder's 256x512 scores.  Variants:

    product         ``head.build_inference``
    frozen          the same graph with its variables turned into constants
    folded          rebuilt from those constants with cheap linear steps folded in

    The same seed gives every variant the same decoder weights, so all compute the
    same function of the same weights (``cases.check_variants`` checks it).
    """
    if variant not in INFERENCE_VARIANTS:
        raise ValueError(f"inference variant must be one of {INFERENCE_VARIANTS}")
    tf1.set_random_seed(0)
    if variant == "product":
        images, classes, _ = head.build_inference(sess, model_spec(vgg))
        init_new_variables(sess, _vgg_variables())
        return images, classes, sess.graph.get_tensor_by_name(LOGITS)
    with tf.Graph().as_default() as scratch, tf1.Session(graph=scratch) as src:
        tf1.set_random_seed(0)
        images, classes, _ = head.build_inference(src, model_spec(vgg))
        init_new_variables(src, _vgg_variables())
        if variant == "frozen":
            frozen = tf1.graph_util.convert_variables_to_constants(
                src, scratch.as_graph_def(), [classes.op.name])
        else:
            weights = {v.op.name: value for v, value in
                       zip(tf1.global_variables(), src.run(tf1.global_variables()))}
            affine = _input_affine(src, images)
    if variant == "frozen":
        tf1.import_graph_def(frozen, name="")
        get = sess.graph.get_tensor_by_name
        return get(images.name), get(classes.name), get(LOGITS)
    return _folded_graph(weights, affine, model_spec(vgg))


def _input_affine(sess, images):
    """VGG's input preprocessing as ``(A, q)``: conv1_1 sees ``A @ rgb + q`` per pixel.

    Measured by feeding probe images (all 0, then 100 in one channel) and reading
    conv1_1's input, so it follows whatever vgg.py does (RGB->BGR, mean, optional
    std) without repeating it here.
    """
    conv = next(op for op in images.graph.get_operations() if op.type == "Conv2D")  # conv1_1
    probes = np.zeros((4, H, W, 3), np.uint8)
    for channel in range(3):
        probes[channel + 1, ..., channel] = 100
    seen = sess.run(conv.inputs[0], {images: probes})[:, 0, 0, :].astype(np.float64)
    q = seen[0]
    return (seen[1:] - q).T / 100, q


def _vgg_variables():
    """VGG's variables: the ones whose names are VGG16 layers (conv1_1 .. fc7)."""
    names = {name for name, _, _, _ in vgg_module.VGG16_LAYERS}
    return {v for v in tf1.global_variables() if v.op.name.split("/")[0] in names}


def _folded_graph(weights, affine, spec):
    """VGG16 + FCN-8s from constant weights, with the cheap linear steps folded in.

    * Preprocessing ``A @ rgb + q`` (RGB->BGR, /std) = ``A @ (rgb - m)`` with
      ``m = -A^-1 q``: ``A`` goes into conv1_1's kernel, only ``rgb - m`` stays (zero
      padding at the borders makes folding ``m`` into the bias inexact).
    * pool4 * 0.01 and pool3 * 0.0001 (the skip scales): multiplied into the kernels
      of score_pool4 / score_pool3 (a 1x1 convolution is linear).
    """
    s4, s3 = spec.skip_scales
    num_classes = spec.num_classes
    a, q = affine
    images = tf1.placeholder(tf.uint8, [None, None, None, 3], name="images")
    x = tf.image.resize(tf.cast(images, tf.float32), common.IMAGE_SHAPE, method="bilinear")
    x = x - tf.constant(-np.linalg.solve(a, q), tf.float32)
    pools = []
    for name, _, _, _ in vgg_module.VGG16_LAYERS:
        kernel, bias = weights[f"{name}/weights"], weights[f"{name}/biases"]
        if name == "conv1_1":
            kernel = np.einsum("hwjo,ji->hwio", kernel, a).astype(np.float32)
        if name == "fc6":   # as vgg.py builds it: patches x one matrix
            y = vgg_module.conv_as_matmul(x, tf.constant(kernel))
        else:
            y = tf.nn.conv2d(x, tf.constant(kernel), 1, "SAME")
        x = tf.nn.relu(tf.nn.bias_add(y, bias))
        if name in vgg_module.POOL_AFTER:
            x = tf.nn.max_pool2d(x, 2, 2, "SAME")
            pools.append(x)

    def score(x, name, scale=1.0):
        kernel = weights[f"fcn8/{name}/weights"] * np.float32(scale)
        return tf.nn.bias_add(tf.nn.conv2d(x, tf.constant(kernel), 1, "SAME"),
                              weights[f"fcn8/{name}/biases"])

    def upsample(x, factor, name):
        shape = tf.stack([tf.shape(x)[0], tf.shape(x)[1] * factor, tf.shape(x)[2] * factor,
                          num_classes])
        return tf.nn.conv2d_transpose(x, tf.constant(weights[f"fcn8/{name}/weights"]), shape,
                                      strides=factor, padding="SAME")

    fuse4 = upsample(score(x, "score_fc7"), 2, "upscore2") + score(pools[3], "score_pool4", s4)
    fuse3 = upsample(fuse4, 2, "upscore_pool4") + score(pools[2], "score_pool3", s3)
    logits = upsample(fuse3, 8, "upscore8")
    classes, _ = head.segmentation_head(logits, tf.shape(images)[1:3])
    return images, classes, logits


def litert_model(vgg, quantize, calibration_paths, out_dir):
    """The product's LiteRT network (``model.network`` on ``litert.encoder``) on VGG at
    ``vgg`` with a freshly initialised decoder (seed 0), converted as ``segment.py export
    --format tflite`` does, in the new folder ``out_dir``."""
    from roadseg import litert
    spec = model_spec(vgg)
    with tf.Graph().as_default(), tf1.Session() as sess:
        tf1.set_random_seed(0)
        x = tf1.placeholder(tf.float32, [1, H, W, 3], name="images")
        logits = model.network(spec, x, tf.constant(1.0), litert.encoder(sess, vgg))
        init_new_variables(sess, _vgg_variables())
        tflite = litert.convert(sess, x, logits, quantize, calibration_paths)
    litert.write_model_folder(out_dir, tflite, spec, quantize)
    return out_dir


# --------------------------------------------------------------------------- FLOPs
def _static_model(sess, vgg, batch):
    x = tf1.placeholder(tf.float32, [batch, H, W, 3])
    keep = tf1.placeholder_with_default(1.0, [])
    return model.network(model_spec(vgg), x, keep, model.SavedModelEncoder(sess, vgg))


def forward_flops(vgg):
    """FLOPs of one 256x512 image through VGG16 + the FCN-8s decoder."""
    with tf.Graph().as_default() as graph, tf1.Session(graph=graph) as sess:
        _static_model(sess, vgg, 1)
        return common.count_flops(graph)


def training_flops(vgg, batch):
    """FLOPs per image of one training step (forward, loss, gradients) at ``batch``."""
    with tf.Graph().as_default() as graph, tf1.Session(graph=graph) as sess:
        logits = _static_model(sess, vgg, batch)
        labels = tf1.placeholder(tf.int32, [batch, H, W])
        fcn.optimize(logits, labels, 1e-4, model_spec(vgg).num_classes)
        return common.count_flops(graph) / batch


# --------------------------------------------------------------------------- predictor
def new_predictor(vgg, config=None, variant="product"):
    """A ``head.Predictor`` on VGG at ``vgg`` with a freshly initialised FCN-8s decoder."""
    graph = tf.Graph()
    sess = tf1.Session(graph=graph, config=config)
    with graph.as_default():
        images, classes, _ = inference(sess, vgg, variant)
    return head.Predictor(graph, sess, images, classes, None, get_scheme(common.SCHEME),
                          common.IMAGE_SHAPE, vgg)
