"""LiteRT (TensorFlow Lite) models of a run, for in-car CPUs and int8 accelerators.

``export_tflite(run_dir, out_dir, quantize)`` writes ``out_dir/model.tflite`` and
``out_dir/export_info.json`` (scheme, image shape, quantisation, calibration).  A LiteRT
model has a fixed input: one image at the network's ``image_shape``, float32 RGB 0..255 as
``inference.resize_to_network`` makes it; its output is the logits at that size.  The host
does the rest exactly as every other path: ``LiteRTPredictor`` resizes with
``resize_to_network`` and upsamples + argmaxes with ``segmentation_head`` (TensorFlow ops in
a small session), and runs the model in the LiteRT interpreter (XNNPACK, one thread per
core) in between -- so ``load_predictor`` returns it and every command works unchanged.

``quantize``:
  ``none``     float32 weights and arithmetic
  ``float16``  float16 weights (half the file), float32 arithmetic
  ``int8``     post-training full-integer quantisation: int8 weights and activations,
               their ranges calibrated on a representative set of training images
               (``calibration_images``: evenly spread over the run's training split, or
               over ``--calibration DIR``); input and output stay float32

The network inside is ``model.network`` on ``encoder``: VGG16 rebuilt from the loaded
encoder's own ops and the run's weights with LiteRT's built-in kernels only: fc6 as a plain
7x7 convolution (the encoder computes it as patches x matrix, which LiteRT lacks), no
dropout (keep 1), and the preprocessing as a 1x1 convolution (``input_affine``: int8-safe).
"""
import os

import numpy as np
import tensorflow as tf

from roadseg import datasets, export, fcn, inference, model, vgg
from roadseg.errors import UserError, reason
from roadseg.log import channel as log_channel
from roadseg.run_folders import read_run_config, run_checkpoint, staged_dir
from roadseg.schemes import get_scheme

tf1 = tf.compat.v1

MODEL_FILE = "model.tflite"
QUANTIZE = ("none", "float16", "int8")
CALIBRATION_IMAGES = 100   # representative images for int8 ranges (evenly spread)


# ============================================================================ the network
def encoder_layers(sess, images):
    """``(pool3, pool4, fc7)`` recomputed from the VGG16 loaded in ``sess`` on ``images``
    (its kernels and biases) with built-in ops only: every layer a ``conv2d`` (fc6 too,
    whether the encoder runs it as a convolution or as patches x matrix), no dropout, and
    its preprocessing as one 1x1 convolution (``input_affine``)."""
    kernels = []
    for op in sess.graph.get_operations():
        if op.type == "Conv2D" and not op.name.startswith("fcn8/"):
            kernels.append((op.inputs[0], op.inputs[1], op.outputs[0]))
        elif op.type == "ExtractImagePatches":   # vgg.conv_as_matmul: patches x kernel matrix
            matmul = next(c for c in op.outputs[0].consumers()[0].outputs[0].consumers()
                          if c.type == "MatMul")
            out = matmul.outputs[0].consumers()[0].outputs[0]    # reshaped back to [N,h,w,C]
            kernels.append((op.inputs[0], matmul.inputs[1].op.inputs[0], out))
    if len(kernels) < len(vgg.VGG16_LAYERS):
        raise UserError(f"the VGG16 encoder has {len(kernels)} convolutions, not "
                        f"{len(vgg.VGG16_LAYERS)}: it cannot be exported to LiteRT")
    x, pools = input_affine(sess, images, kernels[0][0]), []
    for (name, _, _, _), (_, kernel, out) in zip(vgg.VGG16_LAYERS, kernels):
        bias = next(c for c in out.consumers() if c.type == "BiasAdd").inputs[1]
        x = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, kernel, 1, "SAME"), bias))
        if name in vgg.POOL_AFTER:
            x = tf.nn.max_pool2d(x, 2, 2, "SAME")
            pools.append(x)
    return pools[2], pools[3], x


def input_affine(sess, images, preprocessed):
    """The encoder's preprocessing (RGB->BGR, mean, std: ``A @ rgb + q`` per pixel) as one
    1x1 convolution with bias on ``images``, measured by feeding probe images.

    As the ops themselves (reverse, subtract, divide) it breaks int8 models: LiteRT's int8
    REVERSE_V2 copies its input's bytes under other quantisation parameters (measured on the
    CamVid model: 63 steps of RMS error, test mIoU 0.67 -> 0.36); a convolution quantises
    like every other layer."""
    shape = [-1] + [int(d) for d in images.shape[1:]]   # any batch size (OpenVINO's graph)
    probes = np.zeros([4] + shape[1:], np.float32)
    for channel in range(3):
        probes[channel + 1, ..., channel] = 100.0
    seen = np.stack([sess.run(preprocessed, {images: p[None]})[0, 0, 0] for p in probes])
    q = seen[0]
    a = (seen[1:] - q) / 100.0                                  # a[in, out]
    check = np.random.default_rng(0).uniform(0, 255, shape[1:]).astype(np.float32)
    expected = check @ a + q
    got = sess.run(preprocessed, {images: check[None]})[0]
    if not np.allclose(got, expected, rtol=1e-4, atol=1e-3 * np.abs(expected).max()):
        raise UserError("the VGG16 encoder's preprocessing is not affine in the pixel values; "
                        "it cannot be exported to LiteRT")
    kernel = tf.constant(a[None, None].astype(np.float32))
    return tf.nn.bias_add(tf.nn.conv2d(images, kernel, 1, "VALID"), q.astype(np.float32))


def encoder(sess, vgg_path):
    """The LiteRT encoder for ``model.network``: VGG16 loaded from ``vgg_path`` into ``sess``,
    then rebuilt from built-in ops (``encoder_layers``)."""
    def encode(images, keep_prob):
        fcn.load_vgg(sess, vgg_path, input_map={"image_input:0": images, "keep_prob:0": keep_prob})
        return encoder_layers(sess, images)
    return encode


def _network(sess, spec, ckpt):
    """The run's network in ``sess``: float32 ``[1, h, w, 3]`` resized images -> logits
    ``[1, h, w, C]``, with the checkpoint's weights.  Returns (input, logits)."""
    x = tf1.placeholder(tf.float32, [1, *spec.image_shape, 3], name="images")
    logits = model.network(spec, x, tf.constant(1.0), encoder(sess, spec.vgg))
    tf1.train.Saver(inference.model_variables()).restore(sess, ckpt)
    return x, logits


# ============================================================================ calibration
def calibration_images(data_dir, count=CALIBRATION_IMAGES):
    """Paths of up to ``count`` images evenly spread over the training split of the dataset
    at ``data_dir`` (any split when it has no 'train'), or over the images under a plain
    folder.  No image is a UserError."""
    if not os.path.isdir(data_dir):
        raise UserError(f"calibration folder {data_dir} does not exist; pass --calibration "
                        f"with the training images' folder (a dataset root)")
    try:
        splits = datasets.find_dataset(data_dir).splits
        samples = splits.get("train") or [s for split in splits.values() for s in split]
        paths = [s.image for s in samples]
    except UserError:
        paths = sorted(os.path.join(d, f) for d, _, files in os.walk(data_dir) for f in files
                       if os.path.splitext(f)[1].lower() in datasets.IMAGE_SUFFIXES)
    if not paths:
        raise UserError(f"calibration folder {data_dir} has no images (png/jpg); pass "
                        f"--calibration with a dataset root or a folder of training images")
    step = max(1, len(paths) / count)
    return [paths[int(i * step)] for i in range(min(count, len(paths)))]


def calibration_set(run_dir, calibration, facts, log):
    """The int8 calibration images of a run (every int8 export's choice): ``calibration_images``
    of ``calibration``, else of the run's training data; said in ``log`` and recorded in
    ``facts["calibration"]`` for export_info.json."""
    calibration = calibration or read_run_config(run_dir).get("data") or ""
    paths = calibration_images(calibration)
    log(f"int8 calibration on {len(paths)} images of {calibration}")
    facts["calibration"] = dict(data=os.path.abspath(calibration), images=len(paths))
    return paths


def _representative(paths, image_shape):
    """The representative dataset: each image resized as every inference path does."""
    def generate():
        with tf.Graph().as_default(), tf1.Session() as sess:
            raw = tf1.placeholder(tf.uint8, [None, None, 3])
            resized = inference.resize_to_network(raw[None], image_shape)
            for path in paths:
                yield [sess.run(resized, {raw: datasets.load_image(path)})]
    return generate


# ============================================================================ export
def export_tflite(run_dir, out_dir, quantize="none", calibration=None, which="best", log=None):
    """Write ``out_dir/model.tflite`` (+ ``export_info.json``) of a run into the new folder
    ``out_dir``; ``calibration``: the int8 representative images' folder (default: the
    run's training data)."""
    log = log_channel(log)
    export.check_options(out_dir, quantize, calibration, QUANTIZE, "LiteRT models")
    spec = model.ModelSpec.from_run(run_dir)
    ckpt = run_checkpoint(run_dir, which)
    facts = dict(checkpoint=os.path.basename(ckpt), run=os.path.abspath(run_dir))
    paths = calibration_set(run_dir, calibration, facts, log) if quantize == "int8" else None
    with tf.Graph().as_default(), tf1.Session() as sess:
        x, logits = _network(sess, spec, ckpt)
        tflite = convert(sess, x, logits, quantize, paths)
    write_model_folder(out_dir, tflite, spec, quantize, **facts)
    return out_dir


def convert(sess, x, logits, quantize="none", calibration_paths=None):
    """The LiteRT flatbuffer of ``x -> logits`` in ``sess`` (variables become constants);
    int8 calibrates on ``calibration_paths`` (resized to ``x``'s size)."""
    converter = tf1.lite.TFLiteConverter.from_session(sess, [x], [logits])
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantize == "int8":
        converter.representative_dataset = _representative(calibration_paths,
                                                            [int(d) for d in x.shape[1:3]])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def write_model_folder(out_dir, tflite, spec, quantize, **facts):
    """``out_dir/model.tflite`` and its ``export_info.json`` (the spec, the quantisation,
    what the input and output are, ``facts``), staged: ``out_dir`` appears when complete."""
    with staged_dir(out_dir) as tmp:
        with open(os.path.join(tmp, MODEL_FILE), "wb") as f:
            f.write(tflite)
        model.write_export_info(tmp, spec, format="tflite", quantize=quantize, **facts,
                          input="images: float32 [1, H, W, 3] RGB 0..255, resized to image_shape by "
                                "roadseg.inference.resize_to_network",
                          output="logits: float32 [1, H, W, classes] at image_shape; class maps by "
                                 "roadseg.inference.segmentation_head (bilinear to the image size, "
                                 "argmax)")


# ============================================================================ the predictor
def model_path(path):
    """The .tflite file of ``path`` (a .tflite file, or a folder holding model.tflite), or None."""
    if os.path.isfile(path) and path.lower().endswith(".tflite"):
        return path
    candidate = os.path.join(path, MODEL_FILE)
    if os.path.isdir(path) and os.path.isfile(candidate):
        return candidate
    return None


def cores():
    """The cores this process may run on (its CPU affinity; all of them when unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def interpreter(path, threads=None):
    """A LiteRT interpreter on ``path`` (XNNPACK; ``threads`` default: one per core this
    process may use -- more would only make XNNPACK's spinning threads wait for each other)."""
    from ai_edge_litert.interpreter import Interpreter
    try:
        interp = Interpreter(model_path=path, num_threads=threads or cores())
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as err:
        raise UserError(f"{path} is not a LiteRT (.tflite) model ({reason(err)}); export one with "
                        f"'segment.py export --format tflite'") from None
    return interp


class LiteRTPredictor(inference.Predictor):
    """A ``Predictor`` on a LiteRT model: resize and head in TensorFlow (the shared
    ``resize_to_network`` / ``segmentation_head``), the network in LiteRT."""

    def __init__(self, path, threads=None, tta="none"):
        tflite = model_path(path)
        self.info = model.read_export_info(os.path.dirname(tflite), "export the run again with "
                                     "'segment.py export --format tflite'")
        self.interp = interpreter(tflite, threads)
        self._in = self.interp.get_input_details()[0]
        self._out = self.interp.get_output_details()[0]
        shape = self.info["image_shape"]
        if list(self._in["shape"]) != [1, *shape, 3]:
            raise UserError(f"{tflite} takes input {list(self._in['shape'])}, but its "
                            f"{model.EXPORT_INFO} says image_shape {shape}; re-export the model")
        graph = tf.Graph()
        with graph.as_default():
            raw = tf1.placeholder(tf.uint8, [None, None, None, 3], name="images")
            self._resized = inference.resize_to_network(raw, shape)
            self._logits = tf1.placeholder(tf.float32, [None, *shape, None], name="logits")
            self._size = tf1.placeholder(tf.int32, [2], name="out_size")
            classes, probs = inference.segmentation_head(self._logits, self._size)
        super().__init__(graph, tf1.Session(graph=graph), raw, classes, probs,
                         get_scheme(self.info["scheme"]), shape, path, tta=tta)

    def logits(self, images):
        """The model's logits ``[N, h, w, C]`` at the network size for uint8 images."""
        resized = self.sess.run(self._resized, {self._images: images})
        out = []
        for image in resized:
            self.interp.set_tensor(self._in["index"], image[None])
            self.interp.invoke()
            out.append(self.interp.get_tensor(self._out["index"])[0])
        return np.stack(out)

    def _head(self, fetch, images):
        images = np.asarray(images)
        return self.sess.run(fetch, {self._logits: self.logits(images),
                                     self._size: images.shape[1:3]})

    def _class_maps(self, images):
        return self._head(self._classes, images)

    def _plain_proba(self, images):
        return self._head(self._probs, images)
