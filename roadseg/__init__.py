"""roadseg: FCN-8 on VGG16 for road-scene segmentation, in TensorFlow 1.x style (tf.compat.v1).

One module per concept:

============================  =====================================================
``roadseg.errors``            ``UserError``: one line naming the file and the fix; ``reason``
``roadseg.log``               messages: the package logger, written through tqdm
``roadseg.schemes``           class schemes: classes, colours, dataset label maps
``roadseg.datasets``          dataset layouts on disk, reading images and labels
``roadseg.input_pipeline``    tf.data batches: decode, resize, augment
``roadseg.acquire``           the one downloader (https, pooch) and the checked unzip
``roadseg.vgg``               getting VGG16 as the course SavedModel
``roadseg.fcn``               the course API: load_vgg, layers, optimize, train_nn
``roadseg.model``             ``ModelSpec``, ``network`` (every path builds the model here),
                              the one training step; export_info.json
``roadseg.losses``            per-pixel losses and the soft Dice term
``roadseg.config``            ``TrainConfig``: every training option, once
``roadseg.trainer``           training runs in named steps
``roadseg.distribute``        several devices / hosts: tf.distribute strategies
``roadseg.checkpoints``       latest / best checkpoints and where training stands
``roadseg.memory``            the memory a training step needs
``roadseg.precision``         ``--precision`` fp32 / bf16 / fp16: the session's rewrite
``roadseg.inference``         the one inference head; predictors for runs and exports,
                              which backend runs a run folder (``--backend``)
``roadseg.export``            a run as a self-contained SavedModel
``roadseg.batch_predict``     batch inference on Apache Beam (``batch-predict``)
``roadseg.litert``            a run as a LiteRT model (float, int8); its predictor
``roadseg.openvino_model``    a run as an OpenVINO model (fp32/bf16, int8); its predictor;
                              a run folder's cached conversion
``roadseg.metrics``           confusion matrix, IoU, evaluation of a predictor
``roadseg.cityscapes_eval``   Cityscapes labelIds export and the official evaluator
``roadseg.overlays``          class maps as colours, overlays, PNGs
``roadseg.video``             video in and out, overlaid videos
``roadseg.run_folders``       run folders, safe writes, refusals, the run lock
``roadseg.course``            the course's / seed's helper functions (``helper.py``)
``roadseg.demo_scenes``       procedurally drawn demo street scenes
``roadseg.demo``              the embedded default, end to end
``roadseg.cli``               the command line (``segment.py``)
============================  =====================================================
"""
import os
import sys

__version__ = "2.0.0"


def quiet_tensorflow():
    """Import TensorFlow without its start-up chatter; returns the module.

    At import TensorFlow prints C++ info lines (oneDNN, CUDA stubs, absl) that
    ``TF_CPP_MIN_LOG_LEVEL`` does not all silence; they would bury a one-line error on the
    command line and fill notebook cells.  Its Python logger's INFO/WARNING lines
    (deprecations, "Restoring parameters") go too.  An import failure still raises, with
    its traceback, after stderr is restored.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" not in sys.modules:
        sys.stderr.flush()
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)
    import tensorflow as tf
    tf.get_logger().setLevel("ERROR")
    return tf
