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
"""
import os

import numpy as np

from roadseg import datasets, export, inference, model
from roadseg import precision as precision_module
from roadseg.errors import UserError, reason
from roadseg.log import channel
from roadseg.run_folders import (
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


def _import(name):
    """``openvino`` or ``nncf``, or one line saying how to install it."""
    try:
        return __import__(name)
    except ImportError as err:
        raise UserError(f"OpenVINO models need the '{name}' package ({err}); {INSTALL}") from None


# ============================================================================ export
def export_openvino(run_dir, out_dir, quantize="none", calibration=None, which="best", log=None):
    """Write ``model.xml`` / ``model.bin`` / ``export_info.json`` of a run into the new
    folder ``out_dir`` (staged: it appears only when complete); ``calibration``: the int8
    calibration images' folder (default: the run's training data)."""
    from roadseg import litert
    log = channel(log)
    export.check_options(out_dir, quantize, calibration, QUANTIZE, "OpenVINO models")
    ov = _import("openvino")
    facts, paths = {}, None
    if quantize == "int8":
        _import("nncf")
        paths = litert.calibration_set(run_dir, calibration, facts, log)
    graph_def, spec, ckpt = frozen_graph(run_dir, which)
    model_ir = convert(graph_def, quantize, paths)
    facts.update(checkpoint=os.path.basename(ckpt), run=os.path.abspath(run_dir))
    with staged_dir(out_dir) as tmp:
        ov.save_model(model_ir, os.path.join(tmp, MODEL_FILE), compress_to_fp16=False)
        model.write_export_info(
            tmp, spec, format=FORMAT, quantize=quantize, openvino=ov.get_version().split("-")[0],
            input="images: uint8 [N, H, W, 3] RGB, any size (resized to image_shape inside)",
            output="classes: uint8 [N, H, W] at the input size; probabilities: float32 "
                   "[N, H, W, classes]", **facts)
    return out_dir


def frozen_graph(run_dir, which="best"):
    """``(GraphDef, ModelSpec, checkpoint)``: the run's inference graph with its weights as
    constants -- uint8 ``images`` of any size -> ``classes``, ``probabilities``.

    ``inference.build_inference`` (the SavedModel export's graph) with LiteRT's encoder
    (``litert.encoder``): fc6 a plain 7x7 convolution
    instead of the encoder's patches x matrix, which OpenVINO runs as one int8 FullyConnected
    at a third of the int8 model's time (measured: int8 5.3 -> 7.7 images/s by CPU time at
    256x512; fp32 and bf16 unchanged), and the preprocessing as a 1x1 convolution."""
    import tensorflow as tf

    from roadseg import litert
    tf1 = tf.compat.v1
    spec = model.ModelSpec.from_run(run_dir)
    ckpt = run_checkpoint(run_dir, which)
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

    def __init__(self, path, precision=None, tta="none", log=None, config=None):
        folder = model_path(path) or path
        hint = check_precision(precision)
        self.info = read_info(folder)
        _, self.compiled = compile_model(folder, hint, config)
        self._request = self.compiled.create_infer_request()
        if log and hint != "f32":
            log(f"precision: OpenVINO inference precision {hint}")
        super().__init__(None, None, None, None, None, get_scheme(self.info["scheme"]),
                         self.info["image_shape"], path, tta=tta)

    def _run(self, images, output):
        result = self._request.infer({0: np.ascontiguousarray(images)})
        return np.array(result[output], copy=True)

    def _class_maps(self, images):
        return self._run(images, "classes")

    def _plain_proba(self, images):
        return self._run(np.asarray(images), "probabilities")

    def close(self):
        self._request = self.compiled = None
