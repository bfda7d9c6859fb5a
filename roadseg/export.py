"""Export a training run as a self-contained inference SavedModel.

``export(run_dir, out_dir)`` saves the inference graph of ``roadseg.inference`` (uint8
images of any size -> class maps at that size) with the run's weights: tag ``serve``,
signature ``predict`` (inputs ``images``; outputs ``classes``, ``probabilities``), plus
``export_info.json`` (the run's ``ModelSpec``, class names, checkpoint, source run; written
and read by ``model.write_export_info`` / ``model.read_export_info``).
``inference.load_predictor`` and every command that takes ``--model`` accept the folder.
"""
import os

import tensorflow as tf

from roadseg import model
from roadseg.errors import UserError
from roadseg.inference import SERVE_TAG, SIGNATURE, build_inference, model_variables
from roadseg.run_folders import (
    check_can_create,
    refuse_existing,
    restore_checkpoint,
    run_checkpoint,
    staged_dir,
)

tf1 = tf.compat.v1


def export(run_dir, out_dir, which="best"):
    """Write a self-contained inference SavedModel of a run into the new folder ``out_dir``.

    Everything is written into a hidden folder next to ``out_dir`` that is renamed only when
    complete: a failure (full disk, Ctrl-C) leaves nothing under ``out_dir``."""
    refuse_existing(out_dir, "choose a new --out folder")
    check_can_create(out_dir, "--out folder")
    if os.path.isfile(os.path.join(run_dir, "saved_model.pb")):
        raise UserError(f"{run_dir} is an exported model already; export takes a training run "
                        f"(a runs/<name> folder)")
    spec = model.ModelSpec.from_run(run_dir)
    ckpt = run_checkpoint(run_dir, which)
    # the Builder wants to create the folder itself
    with staged_dir(out_dir, create=False) as tmp:
        with tf.Graph().as_default(), tf1.Session() as sess:
            images, classes, probs = build_inference(sess, spec)
            restore_checkpoint(tf1.train.Saver(model_variables()), sess, ckpt)
            sig = tf1.saved_model.signature_def_utils.predict_signature_def(
                inputs={"images": images}, outputs={"classes": classes, "probabilities": probs})
            builder = tf1.saved_model.Builder(tmp)
            builder.add_meta_graph_and_variables(sess, [SERVE_TAG], signature_def_map={SIGNATURE: sig})
            builder.save()
        model.write_export_info(tmp, spec, checkpoint=os.path.basename(ckpt),
                                run=os.path.abspath(run_dir))
    return out_dir


def check_options(out_dir, quantize, calibration, choices, what):
    """Before anything is computed, the options every export format shares: ``quantize`` one
    of ``choices`` (``what``: the format's models, for the message), ``calibration`` only with
    int8, and a new ``out_dir`` that can be made."""
    if quantize not in choices:
        raise UserError(f"--quantize {quantize}: {what} take one of {', '.join(choices)}")
    if calibration and quantize != "int8":
        raise UserError("--calibration is for --quantize int8 only (other models need no "
                        "representative images); leave it out")
    refuse_existing(out_dir, "choose a new --out folder")
    check_can_create(out_dir, "--out folder")
