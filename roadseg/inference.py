"""Inference: one head from images to class maps, for training runs, exports and sessions.

``build_inference(sess, spec)`` wires uint8 images of any size through resize ->
``model.network`` (VGG16 + FCN-8s) -> resize back -> softmax/argmax, so callers get class
maps at their own image size.  ``load_predictor`` opens either a run folder or an export
(``roadseg.export``) and returns one ``Predictor`` with
``predict(images uint8 [N,H,W,3]) -> class maps uint8 [N,H,W]``.
``predict_batch`` / ``same_size_batches`` feed any such ``predict_fn`` image by image.
``tta="flip"`` (test-time flip) averages the class probabilities of each image and of its
mirror image, mirrored back, before the argmax (``flip_averaged``).

A run folder runs on one of ``BACKENDS`` (``run_backend``): ``auto`` (the default) is
OpenVINO in fp32 when it is installed -- the run's checkpoint converted once and cached in
the run folder (``openvino_model.run_model``); on CPUs without AVX-512 TensorFlow's fp32
reaches two thirds of the machine's matrix-multiply limit where OpenVINO reaches over 90% --
and this module's TensorFlow graph otherwise and for ``--precision`` bf16 / fp16;
``tensorflow`` or ``openvino`` choose.  Class maps are the same on both.
"""
import os

import numpy as np
import tensorflow as tf

from roadseg import model
from roadseg import precision as precision_module
from roadseg.errors import UserError, reason
from roadseg.log import channel
from roadseg.run_folders import RUN_CONFIG, restore_checkpoint, run_checkpoint
from roadseg.schemes import get_scheme

tf1 = tf.compat.v1

SERVE_TAG = "serve"
SIGNATURE = "predict"
TTA_MODES = ("none", "flip")
BACKENDS = ("auto", "tensorflow", "openvino")   # what runs a run folder (run_backend)


def resize_to_network(images, image_shape):
    """Images ``[N, H, W, 3]`` (uint8 or float, any size) -> float32 ``[N, h, w, 3]`` at the
    network's ``image_shape``: bilinear, rounded to whole grey levels in 0..255.

    The one resize of every path -- the training pipeline, training's validation, exports,
    predictors and the course helpers -- so the network always sees inputs made the way it
    was trained on (no antialiasing: ``tf.image.resize`` as in the tf.data pipeline).
    """
    resized = tf.image.resize(tf.cast(images, tf.float32), image_shape, method="bilinear")
    return tf.clip_by_value(tf.round(resized), 0.0, 255.0)


def segmentation_head(logits_4d, out_size):
    """Upsample logits to ``out_size`` ([2] tensor) -> (class map uint8, probabilities)."""
    up = tf.image.resize(logits_4d, out_size, method="bilinear")
    probs = tf.nn.softmax(up, name="probabilities")
    classes = tf.cast(tf.argmax(up, axis=-1), tf.uint8, name="classes")
    return classes, probs


def build_inference(sess, spec, encoder=None):
    """Build the inference graph of ``spec`` (a ``model.ModelSpec``) in ``sess.graph``:
    ``model.network`` on VGG16 loaded from ``spec.vgg`` (or ``encoder``); returns
    (images, classes, probabilities)."""
    images = tf1.placeholder(tf.uint8, [None, None, None, 3], name="images")
    x = resize_to_network(images, spec.image_shape)
    keep = tf.constant(1.0, name="keep_prob_inference")
    logits = model.network(spec, x, keep, encoder or model.SavedModelEncoder(sess, spec.vgg))
    classes, probs = segmentation_head(logits, tf.shape(images)[1:3])
    return images, classes, probs


def model_variables():
    """VGG + FCN weights (no optimizer slots, no counters)."""
    return [v for v in tf1.global_variables()
            if "Adam" not in v.op.name and v.op.name not in ("beta1_power", "beta2_power")
            and not v.op.name.startswith("train_state")]


def predict_batch(predict_fn, images):
    """Run ``predict_fn`` on a batch and check it kept the batch's size (the input size)."""
    maps = np.asarray(predict_fn(images))
    if maps.shape != images.shape[:3] or maps.dtype.kind not in "ui":
        raise ValueError(f"predict_fn returned {maps.dtype} {maps.shape} for images "
                         f"{images.shape}; it must return integer class ids of shape (N, H, W) "
                         f"at the input size")
    if maps.dtype != np.uint8 and maps.size and (maps.min() < 0 or maps.max() > 255):
        raise ValueError(f"predict_fn returned class ids outside 0..255 ({maps.min()}..{maps.max()})")
    return maps.astype(np.uint8, copy=False)


def same_size_batches(pairs, batch_size):
    """Group consecutive ``(item, image)`` pairs whose images share one size, up to
    ``batch_size`` at a time; yields ``(items, stacked images)``."""
    items, images = [], []
    for item, image in pairs:
        if images and (image.shape != images[0].shape or len(images) == batch_size):
            yield items, np.stack(images)
            items, images = [], []
        items.append(item)
        images.append(image)
    if images:
        yield items, np.stack(images)


def flip_averaged(proba_fn, images):
    """Test-time flip: ``(proba_fn(images) + mirror(proba_fn(mirror(images)))) / 2``.

    ``proba_fn``: uint8 images ``[N,H,W,3]`` -> class probabilities ``[N,H,W,C]``.  Exactly
    mirror-symmetric: for the mirror image the two (deterministic) calls swap and IEEE
    addition commutes, so a mirrored input gets the mirrored probabilities bit for bit.
    """
    plain = proba_fn(images)
    mirrored = proba_fn(np.ascontiguousarray(images[:, :, ::-1]))[:, :, ::-1]
    return (plain + mirrored) * np.float32(0.5)


class Predictor:
    """``predict(images uint8 [N,H,W,3] RGB) -> class maps uint8 [N,H,W]`` at the input size;
    ``tta="flip"``: from the probabilities averaged with the mirror image's (``flip_averaged``)."""

    def __init__(self, graph, sess, images, classes, probs, scheme, image_shape, source,
                 tta="none"):
        if tta not in TTA_MODES:
            raise UserError(f"unknown test-time augmentation {tta!r}; use one of {', '.join(TTA_MODES)}")
        self.graph, self.sess = graph, sess
        self._images, self._classes, self._probs = images, classes, probs
        self.scheme, self.image_shape, self.source = scheme, tuple(image_shape), source
        self.tta = tta

    def predict(self, images):
        images = np.asarray(images)
        if images.ndim == 3:
            return self.predict(images[None])[0]
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise UserError(f"predict expects uint8 RGB images [N,H,W,3], got {images.dtype} "
                            f"{images.shape}")
        if self.tta == "flip":
            return np.argmax(self.predict_proba(images), axis=-1).astype(np.uint8)
        return self._class_maps(images)

    def _class_maps(self, images):
        return self.sess.run(self._classes, {self._images: images})

    def predict_proba(self, images):
        images = np.asarray(images)
        if self.tta == "flip":
            return flip_averaged(self._plain_proba, images)
        return self._plain_proba(images)

    def _plain_proba(self, images):
        return self.sess.run(self._probs, {self._images: images})

    __call__ = predict

    def close(self):
        self.sess.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_backend(backend="auto", precision=None):
    """``(backend, why)``: what runs a run folder at ``precision`` -- ``"openvino"`` or
    ``"tensorflow"`` -- and why, for the log line.  ``auto``: OpenVINO in fp32 when it is
    installed, else TensorFlow."""
    from roadseg import openvino_model
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "openvino":
        openvino_model.check_precision(precision)
        if not openvino_model.available():
            raise UserError(f"--backend openvino needs OpenVINO: {openvino_model.INSTALL}; or "
                            f"leave --backend out")
        return backend, "--backend openvino"
    if backend == "tensorflow":
        return backend, "--backend tensorflow"
    ran = precision_module.check(precision)   # --precision auto: bf16 or fp32 by the CPU
    if ran != "fp32":
        return "tensorflow", f"auto: {ran} runs in TensorFlow"
    if not openvino_model.available():
        return "tensorflow", (f"auto: OpenVINO is not installed; {openvino_model.INSTALL} for "
                              f"faster fp32")
    return "openvino", "auto: OpenVINO is installed; --backend tensorflow for TensorFlow"


def _say_backend(log, path, backend, why, precision):
    name = {"openvino": "OpenVINO", "tensorflow": "TensorFlow"}[backend]
    channel(log)(f"backend: {name} {precision_module.check(precision)} for {path} ({why})")


def load_predictor(path, which="best", precision=None, log=None, tta="none", backend="auto"):
    """Open an exported model (``export``) or a run folder (``runs/<name>``) for inference,
    computing at ``precision`` (``roadseg.precision``; None = fp32); ``log`` gets its notes;
    ``tta``: "none" or "flip" (``Predictor``); ``backend``: what runs a run folder
    (``run_backend``; an export runs on its own).  A ``.tflite`` file, or a folder holding
    ``model.tflite``, opens in LiteRT (``roadseg.litert``), whose precision was fixed when it
    was exported; a folder holding ``model.xml`` in OpenVINO (``roadseg.openvino_model``).
    A missing, damaged or incomplete model is one ``UserError`` line naming the file."""
    from roadseg import litert, openvino_model  # they build on this module
    if backend not in BACKENDS:
        run_backend(backend)   # the one refusal of an unknown backend
    if openvino_model.model_path(path):   # model.xml / model.bin: OpenVINO, fp32 or --precision bf16
        _export_backend(path, backend, "openvino")
        return openvino_model.OpenVINOPredictor(path, precision=precision, tta=tta, log=log)
    if litert.model_path(path):
        _export_backend(path, backend, None)
        if precision is not None:
            raise UserError(f"--precision does not apply to the LiteRT model {path}: its precision "
                            f"was fixed at export (--quantize); leave --precision out")
        return litert.LiteRTPredictor(path, tta=tta)
    if os.path.isfile(path):
        raise UserError(f"model {path} is a file, not a .tflite model; pass a runs/<name> folder, "
                        f"an exported model folder or a .tflite file")
    if not os.path.isdir(path):
        raise UserError(f"model {path} does not exist; pass a runs/<name> folder or an exported model")
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        _export_backend(path, backend, "tensorflow")
    elif os.path.isfile(os.path.join(path, RUN_CONFIG)):
        chosen, why = run_backend(backend, precision)
        _say_backend(log, path, chosen, why, precision)
        if chosen == "openvino":
            return openvino_model.run_predictor(path, which, precision, tta, log)
    return _load_tensorflow(path, which, precision, log, tta)


def _export_backend(path, backend, own):
    """An export runs on its own backend (``own``; None: neither of ``BACKENDS``)."""
    if backend not in ("auto", own):
        kind = {"openvino": "an OpenVINO model", "tensorflow": "a SavedModel", None: "a LiteRT model"}[own]
        raise UserError(f"--backend {backend} does not apply to {path}: it is {kind}, which runs "
                        f"on its own; leave --backend out (it chooses for a runs/<name> folder)")


def _load_tensorflow(path, which, precision, log, tta):
    """A ``Predictor`` on an exported SavedModel or a run folder, in TensorFlow."""
    graph = tf.Graph()
    sess = precision_module.session(precision, graph, log)
    try:
        with graph.as_default():
            if os.path.isfile(os.path.join(path, "saved_model.pb")):
                scheme, shape, (images, classes, probs) = _load_export(sess, path)
            elif not os.path.isfile(os.path.join(path, RUN_CONFIG)):
                raise UserError(f"model {path} is neither a training run (no {RUN_CONFIG}) nor an "
                                f"exported model (no saved_model.pb); pass a runs/<name> folder "
                                f"or an exported model")
            else:
                spec = model.ModelSpec.from_run(path)
                scheme, shape = get_scheme(spec.scheme), spec.image_shape
                ckpt = run_checkpoint(path, which)
                images, classes, probs = build_inference(sess, spec)
                restore_checkpoint(tf1.train.Saver(model_variables()), sess, ckpt)
        return Predictor(graph, sess, images, classes, probs, scheme, shape, path, tta=tta)
    except BaseException:
        sess.close()
        raise


def worker_model(run_dir, scratch, backend="auto", log=None):
    """A model folder of a run for workers on this machine (``batch-predict``): the run's
    cached OpenVINO conversion when ``run_backend`` chooses OpenVINO (fp32), else a SavedModel
    export into the folder ``scratch`` (which the caller removes)."""
    from roadseg import export, openvino_model
    chosen, why = run_backend(backend)
    _say_backend(log, run_dir, chosen, why, None)
    if chosen == "openvino":
        return openvino_model.run_model(run_dir, log=log, scratch=scratch)
    channel(log)(f"exporting {run_dir} for Beam")
    return export.export(run_dir, os.path.join(scratch, "export"))


def _load_export(sess, path):
    """(scheme, image shape, (images, classes, probabilities)) of an exported model."""
    fix = model.EXPORT_FIX
    info = model.read_export_info(path, fix)
    if not os.path.isfile(os.path.join(path, "variables", "variables.index")):
        raise UserError(f"exported model {path} is incomplete: variables/variables.index is "
                        f"missing; {fix}")
    try:
        meta = tf1.saved_model.loader.load(sess, [SERVE_TAG], path)
        sig = meta.signature_def[SIGNATURE]
        get = sess.graph.get_tensor_by_name
        tensors = (get(sig.inputs["images"].name), get(sig.outputs["classes"].name),
                   get(sig.outputs["probabilities"].name))
    except (OSError, ValueError, KeyError, RuntimeError, tf.errors.OpError) as err:
        raise UserError(f"exported model {path} is damaged ({reason(err)}); {fix}") from None
    return get_scheme(info["scheme"]), info["image_shape"], tensors
