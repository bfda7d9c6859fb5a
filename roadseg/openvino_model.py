"""OpenVINO models of a run, for x86 CPUs (servers, in-car PCs): fp32, bf16 and int8.

``export_openvino(run_dir, out_dir, quantize)`` writes ``out_dir/model.xml`` +
``model.bin`` (OpenVINO IR) and ``export_info.json``.  The IR is the run's inference graph
converted by ``openvino.convert_model`` (``frozen_graph``): uint8 RGB images of any size
``[N, H, W, 3]`` -> ``classes`` (uint8 ``[N, H, W]``) and ``probabilities``, with the resize
to the network, VGG16 + FCN-8s, the upsampling and the argmax inside -- the SavedModel
export's ops, with fc6 as a convolution (``litert.encoder_layers``; measured faster in
int8) -- so fp32 class maps equal TensorFlow's.  Weights stay float32 in ``model.bin``
(``save_model``'s default would round them to float16).  Static input shapes, a
classes-only graph and OpenVINO's THROUGHPUT hint were measured no faster on 2 cores.

``quantize``:
  ``none``  float32 weights; the arithmetic is chosen when the model is opened:
            ``--precision`` fp32 (default, exact) or bf16 (OpenVINO's
            ``INFERENCE_PRECISION_HINT``; refused on a CPU without native bfloat16).
            The hint is always set: OpenVINO runs bf16 by default on AMX / AVX512_BF16 CPUs.
  ``int8``  NNCF post-training quantisation (``nncf.quantize``): int8 weights and
            activations of every convolution and matrix product, their ranges calibrated
            on training images (``litert.calibration_images``: the same choice as LiteRT
            int8), each fed at its own size as the model takes it.

``OpenVINOPredictor`` is an ``inference.Predictor`` on such a folder (``load_predictor``
returns it), so predict / evaluate / video / ``--tta flip`` work unchanged.  OpenVINO and
NNCF are imported only here, only when used (``pip install -e .[openvino]``).

A run folder runs here too (``load_predictor``'s backend ``auto`` in fp32, or ``openvino``):
``run_model`` converts the run's checkpoint once, as ``export_openvino`` does, into
``<run>/openvino_cache/<cache_key>/`` -- keyed by the checkpoint's ``.index`` (every
tensor's crc32c), which checkpoint (best / latest), the image shape, the model spec and the
OpenVINO version -- and reuses it until the checkpoint changes (then it converts again and
removes the older conversion of that checkpoint kind).  ``run_predictor`` opens it.
"""
import glob
import hashlib
import json
import os
import shutil
import tempfile
import time

import numpy as np

from roadseg import datasets, export, inference, model
from roadseg import precision as precision_module
from roadseg.errors import UserError, reason
from roadseg.log import channel, logger
from roadseg.run_folders import (
    check_can_create,
    restore_checkpoint,
    run_checkpoint,
    staged_dir,
)
from roadseg.schemes import get_scheme

MODEL_FILE, WEIGHTS_FILE = "model.xml", "model.bin"
QUANTIZE = ("none", "int8")
FORMAT = "openvino"
INSTALL = "pip install -e .[openvino] (or: pip install openvino nncf)"
EXPORT_FIX = "export the run again ('segment.py export --format openvino')"
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}
CACHE_DIR = "openvino_cache"   # a run folder's conversions (run_model)
CACHE_FORMAT = 1               # part of every cache key: raise it when the conversion changes


def _import(name):
    """``openvino`` or ``nncf``, or one line saying how to install it."""
    try:
        return __import__(name)
    except ImportError as err:
        raise UserError(f"OpenVINO models need the '{name}' package ({err}); {INSTALL}") from None


def available():
    """True when OpenVINO can be imported (``load_predictor``'s backend ``auto`` then uses it
    for a run folder in fp32)."""
    try:
        __import__("openvino")
    except ImportError:
        return False
    return True


# ============================================================================ export
def export_openvino(run_dir, out_dir, quantize="none", calibration=None, which="best", log=None):
    """Write ``model.xml`` / ``model.bin`` / ``export_info.json`` of a run into the new
    folder ``out_dir`` (staged: it appears only when complete); ``calibration``: the int8
    calibration images' folder (default: the run's training data)."""
    from roadseg import litert
    log = channel(log)
    export.check_options(out_dir, quantize, calibration, QUANTIZE, "OpenVINO models")
    _import("openvino")   # before anything is computed
    facts, paths = {}, None
    if quantize == "int8":
        _import("nncf")
        paths = litert.calibration_set(run_dir, calibration, facts, log)
    graph_def, spec, ckpt = frozen_graph(run_dir, which)
    facts.update(checkpoint=os.path.basename(ckpt), run=os.path.abspath(run_dir))
    _save(out_dir, convert(graph_def, quantize, paths), spec, quantize, facts)
    return out_dir


def _save(out_dir, model_ir, spec, quantize, facts):
    """``model.xml`` / ``model.bin`` (float32 weights) and ``export_info.json`` (``facts``) in
    the new folder ``out_dir``, staged: it appears only when complete."""
    ov = _import("openvino")
    with staged_dir(out_dir) as tmp:
        ov.save_model(model_ir, os.path.join(tmp, MODEL_FILE), compress_to_fp16=False)
        model.write_export_info(
            tmp, spec, format=FORMAT, quantize=quantize, openvino=ov.get_version().split("-")[0],
            input="images: uint8 [N, H, W, 3] RGB, any size (resized to image_shape inside)",
            output="classes: uint8 [N, H, W] at the input size; probabilities: float32 "
                   "[N, H, W, classes]", **facts)


def frozen_graph(run_dir, which="best", ckpt=None):
    """``(GraphDef, ModelSpec, checkpoint)``: the run's inference graph with the weights of
    ``ckpt`` (default: its ``which`` checkpoint) as constants -- uint8 ``images`` of any
    size -> ``classes``, ``probabilities``.

    ``inference.build_inference`` (the SavedModel export's graph) with LiteRT's encoder
    (``litert.encoder``): fc6 a plain 7x7 convolution
    instead of the encoder's patches x matrix, which OpenVINO runs as one int8 FullyConnected
    at a third of the int8 model's time (measured: int8 5.3 -> 7.7 images/s by CPU time at
    256x512; fp32 and bf16 unchanged), and the preprocessing as a 1x1 convolution."""
    import tensorflow as tf

    from roadseg import litert
    tf1 = tf.compat.v1
    spec = model.ModelSpec.from_run(run_dir)
    ckpt = ckpt or run_checkpoint(run_dir, which)
    with tf.Graph().as_default(), tf1.Session() as sess:
        inference.build_inference(sess, spec, litert.encoder(sess, spec.vgg))
        restore_checkpoint(tf1.train.Saver(inference.model_variables()), sess, ckpt)
        outputs = ["classes", "probabilities"]
        graph_def = tf1.graph_util.extract_sub_graph(tf1.graph_util.convert_variables_to_constants(
            sess, sess.graph.as_graph_def(), outputs), outputs)
    return graph_def, spec, ckpt


def convert(graph_def, quantize="none", calibration_paths=None):
    """The ``openvino.Model`` of ``frozen_graph``'s GraphDef (tensors named images, classes,
    probabilities); ``int8``: quantised by NNCF on ``calibration_paths``, each image at its
    own size."""
    ov = _import("openvino")
    ir = ov.convert_model(graph_def)
    for port in (*ir.inputs, *ir.outputs):   # "images:0" -> "images"
        port.get_tensor().set_names({name.split(":")[0] for name in port.get_names()})
    if quantize == "int8":
        nncf = _import("nncf")
        images = [datasets.load_image(path)[None] for path in calibration_paths]
        ir = nncf.quantize(ir, nncf.Dataset(images), subset_size=len(images))
    return ir


def read_info(folder):
    """The ``export_info.json`` of an OpenVINO model folder (``model.read_export_info``)."""
    return model.read_export_info(folder, EXPORT_FIX)


# ============================================================================ the predictor
def model_path(path):
    """The OpenVINO model folder of ``path`` (a folder holding model.xml or model.bin, or the
    model.xml in one), or None."""
    if os.path.isfile(path) and path.lower().endswith(".xml"):
        return os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f))
                                   for f in (MODEL_FILE, WEIGHTS_FILE)):
        return path
    return None


def check_precision(precision):
    """The OpenVINO inference precision hint of ``--precision`` (None: fp32); one line when
    this machine cannot run it."""
    precision = precision_module.check(precision)
    if precision not in PRECISION_HINTS:
        raise UserError(f"--precision {precision} does not apply to OpenVINO models on a CPU; "
                        f"use bf16 or leave --precision out (fp32)")
    if precision == "bf16" and not precision_module.native_bf16():
        raise UserError(f"--precision bf16: this CPU ({precision_module.cpu_info()[0]}) has no "
                        f"native bfloat16 (no avx512_bf16 or amx_bf16 in /proc/cpuinfo); leave "
                        f"--precision out (fp32), or export with --quantize int8 for speed")
    return PRECISION_HINTS[precision]


def compile_model(folder, hint="f32", config=None):
    """``(openvino.Model, CompiledModel)`` of the IR in ``folder`` for the CPU at ``hint``
    (``INFERENCE_PRECISION_HINT``; plus ``config``); missing or damaged files: one line."""
    ov = _import("openvino")
    xml, weights = (os.path.join(folder, f) for f in (MODEL_FILE, WEIGHTS_FILE))
    for name in (xml, weights):
        if not os.path.isfile(name):
            raise UserError(f"OpenVINO model {folder} is incomplete: {os.path.basename(name)} is "
                            f"missing; {EXPORT_FIX}")
    with open(xml, "rb") as f:   # else OpenVINO tries every frontend on it, with their log lines
        if not f.read(64).lstrip().startswith(b"<"):
            raise UserError(f"OpenVINO model {folder} is damaged ({MODEL_FILE} is not IR XML); "
                            f"{EXPORT_FIX}")
    core = ov.Core()
    try:
        ir = core.read_model(xml, weights)
        compiled = core.compile_model(ir, "CPU", {"INFERENCE_PRECISION_HINT": hint, **(config or {})})
    except RuntimeError as err:
        raise UserError(f"OpenVINO model {folder} is damaged ({reason(err, 'unreadable')}); "
                        f"{EXPORT_FIX}") from None
    names = {name for out in compiled.outputs for name in out.get_names()}
    if not {"classes", "probabilities"} <= names:
        raise UserError(f"OpenVINO model {xml} has outputs {sorted(names)}, not classes and "
                        f"probabilities; {EXPORT_FIX}")
    return ir, compiled


class OpenVINOPredictor(inference.Predictor):
    """A ``Predictor`` on an OpenVINO model folder: the whole path (resize, network,
    upsampling, argmax) runs in OpenVINO on the CPU at ``precision`` (fp32 or bf16)."""

    def __init__(self, path, precision=None, tta="none", log=None, config=None, source=None):
        folder = model_path(path) or path
        hint = check_precision(precision)
        self.info = read_info(folder)
        _, self.compiled = compile_model(folder, hint, config)
        self._request = self.compiled.create_infer_request()
        if log and hint != "f32":
            log(f"precision: OpenVINO inference precision {hint}")
        super().__init__(None, None, None, None, None, get_scheme(self.info["scheme"]),
                         self.info["image_shape"], source or path, tta=tta)

    def _run(self, images, output):
        result = self._request.infer({0: np.ascontiguousarray(images)})
        return np.array(result[output], copy=True)

    def _class_maps(self, images):
        return self._run(images, "classes")

    def _plain_proba(self, images):
        return self._run(np.asarray(images), "probabilities")

    def close(self):
        self._request = self.compiled = None


# ============================================================================ a run folder
def cache_key(spec, which, ckpt):
    """The name of a checkpoint's conversion in its run's cache: ``<which>-<H>x<W>-<digest>``,
    the digest (sha256) over the checkpoint's ``.index`` file (every tensor's name, shape and
    crc32c), its data files' sizes (a truncated one is converted again, and refused), the
    model spec, the OpenVINO version and ``CACHE_FORMAT``."""
    digest = hashlib.sha256()
    try:
        with open(ckpt + ".index", "rb") as f:
            digest.update(f.read())
        sizes = [os.path.getsize(p) for p in sorted(glob.glob(glob.escape(ckpt) + ".data-*"))]
    except OSError as err:
        raise UserError(f"checkpoint {ckpt} is damaged ({reason(err)}); restore it from a "
                        f"backup, or train again") from None
    version = _import("openvino").get_version()
    digest.update(json.dumps([spec.identity(), sizes, version, CACHE_FORMAT], sort_keys=True).encode())
    height, width = spec.image_shape
    return f"{which}-{height}x{width}-{digest.hexdigest()[:16]}"


def run_model(run_dir, which="best", log=None, scratch=None):
    """The fp32 OpenVINO model folder (``export_openvino``'s files) of a run's ``which``
    checkpoint: converted once into ``run_dir/openvino_cache/<cache_key>/``, reused while the
    checkpoint is unchanged.  Two processes converting at once both go on, with the folder
    that landed first; a read-only run folder is converted into ``scratch`` (a folder the
    caller removes), not cached.  Conversions are said in ``log``."""
    log = channel(log)
    spec = model.ModelSpec.from_run(run_dir)
    ckpt = run_checkpoint(run_dir, which)
    key = cache_key(spec, which, ckpt)
    cache = os.path.join(run_dir, CACHE_DIR)
    folder = os.path.join(cache, key)
    if os.path.isdir(folder):   # staged: a folder under its final name is complete
        logger.debug(f"OpenVINO conversion of {ckpt}: {folder} (cached)")
        return folder
    cached = _writable(folder)
    if not cached:
        if scratch is None:
            raise UserError(f"cannot write {folder}: {run_dir} is read-only")
        log(f"{run_dir} is read-only: converting {os.path.basename(ckpt)} to OpenVINO in a "
            f"temporary folder (not cached: every load converts again)")
        folder = os.path.join(scratch, key)
    start = time.perf_counter()
    graph_def, _, _ = frozen_graph(run_dir, which, ckpt)
    facts = dict(checkpoint=os.path.basename(ckpt), run=os.path.abspath(run_dir), which=which)
    try:
        _save(folder, convert(graph_def), spec, "none", facts)
    except UserError:
        if not os.path.isdir(folder):
            raise
        logger.debug(f"{folder} was converted by another process meanwhile: using it")
    if cached:
        log(f"converted {ckpt} to OpenVINO in {time.perf_counter() - start:.1f} s, cached in "
            f"{folder} (converted again when the checkpoint changes)")
        _remove_older(cache, which, key)
    return folder


def _writable(folder):
    """Can ``folder`` be made (``run_folders.check_can_create``)?"""
    try:
        check_can_create(folder, "run folder")
    except UserError:
        return False
    return True


def _remove_older(cache, which, key):
    """Remove the conversions of earlier ``which`` checkpoints from a run's cache."""
    for name in os.listdir(cache):
        if name.startswith(f"{which}-") and name != key:
            logger.debug(f"removing the outdated OpenVINO conversion {os.path.join(cache, name)}")
            shutil.rmtree(os.path.join(cache, name), ignore_errors=True)


def run_predictor(run_dir, which="best", precision=None, tta="none", log=None):
    """An ``OpenVINOPredictor`` on a run folder's ``which`` checkpoint (``run_model``); a
    cached conversion that no longer opens (damaged, say) is converted again."""
    check_precision(precision)
    with tempfile.TemporaryDirectory(prefix="roadseg-openvino-") as scratch:
        folder = run_model(run_dir, which, log, scratch)
        try:
            return OpenVINOPredictor(folder, precision, tta, log, source=run_dir)
        except UserError as err:
            if not folder.startswith(os.path.join(run_dir, CACHE_DIR)):
                raise
            logger.warning(f"warning: the cached OpenVINO conversion {folder} does not open "
                           f"({err}); converting again")
            shutil.rmtree(folder, ignore_errors=True)
        return OpenVINOPredictor(run_model(run_dir, which, log, scratch), precision, tta, log,
                                 source=run_dir)
