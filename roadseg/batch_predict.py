"""``segment.py batch-predict``: class maps and overlays of many images on Apache Beam.

    segment.py batch-predict --model RUN_OR_EXPORT INPUTS... --out DIR [--runner NAME]
                             [Beam pipeline options]

The pipeline is Beam's ``RunInference``: image paths -> read and decode (any path Beam's
filesystems read: local files, ``gs://``, ``s3://``, ...) -> the exported model, batched
-> ``<name>_classes.png`` (class ids) and ``<name>.png`` (the overlay) in ``DIR``, as
``segment.py predict`` writes them (``roadseg.overlays``).  Without ``--runner`` it runs
in this process on Beam's ``FnApiRunner`` (offline; Beam's ``DirectRunner`` would first
try to download a runner binary); ``--runner DataflowRunner`` / ``FlinkRunner`` /
``SparkRunner`` and their options go to Beam unchanged (docs/scaling.md).

The model is an export (``segment.py export``): Beam's stock TensorFlow handler cannot
load our TF1-style SavedModel under Keras 3, so ``SegmentationModelHandler`` loads it with
``tf.saved_model.load(dir, tags=['serve']).signatures['predict']``.  A run folder is first
exported to a temporary folder (for runners in this process or on this host; remote
workers need an export on storage they read).  Inputs are listed here first, so that a
missing input, an empty folder or two images with the same name fail before anything runs.
"""
import io
import logging
import os
import posixpath
import shutil
import tempfile

import numpy as np
from PIL import Image

# Beam warns on import about Google Cloud client libraries that only its GCP I/O uses
# ("apitools not found ..."): not a problem of this command, so not shown.
_root, _level = logging.getLogger(), logging.getLogger().level
_root.setLevel(logging.ERROR)
try:
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.ml.inference.base import (
        KeyedModelHandler,
        ModelHandler,
        PredictionResult,
        RunInference,
    )
    from apache_beam.options.pipeline_options import PipelineOptions
finally:
    _root.setLevel(_level)

from roadseg import datasets, overlays  # noqa: E402
from roadseg.errors import UserError  # noqa: E402
from roadseg.inference import SERVE_TAG, SIGNATURE, same_size_batches  # noqa: E402
from roadseg.model import read_export_info  # noqa: E402
from roadseg.schemes import get_scheme  # noqa: E402

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
# Beam 2.77's RunInference warns once per batch when an optional import of its own fails
# ("Resource module is not available ... memory usage cannot be fetched"): noise here.
_root.addFilter(lambda record: not record.getMessage().startswith("Resource module is not available"))
LOCAL_RUNNERS = (None, "FnApiRunner", "DirectRunner", "PrismRunner")


class SegmentationModelHandler(ModelHandler):
    """Beam ``ModelHandler`` for an exported model: uint8 RGB images (any size) -> uint8
    class maps at the image's size.  Images of one size in a batch run together."""

    def __init__(self, export_dir, batch_size=4):
        self.export_dir, self.batch_size = export_dir, batch_size

    def load_model(self):
        import tensorflow as tf
        return tf.saved_model.load(self.export_dir, tags=[SERVE_TAG]).signatures[SIGNATURE]

    def run_inference(self, batch, model, inference_args=None):
        import tensorflow as tf
        maps = []
        for _, images in same_size_batches(((None, image) for image in batch), self.batch_size):
            maps.extend(model(images=tf.constant(images))["classes"].numpy())
        return [PredictionResult(image, class_map) for image, class_map in zip(batch, maps)]

    def batch_elements_kwargs(self):
        return {"max_batch_size": self.batch_size}

    def get_num_bytes(self, batch):
        return sum(image.nbytes for image in batch)


# ============================================================================ the command
def batch_predict(model, inputs, out, runner=None, beam_args=(), batch_size=4, log=print):
    """Segment every image of ``inputs`` into the new folder ``out``; returns the count."""
    if _exists(out):
        raise UserError(f"{out} already exists; choose a new --out folder (nothing is overwritten)")
    paths = list_images(inputs)
    scratch = None
    try:
        if _is_run_folder(model):
            if runner not in LOCAL_RUNNERS:
                raise UserError(f"--runner {runner} runs on other machines: export the run first "
                                f"('segment.py export --model {model} --out DIR', to storage the "
                                f"workers read) and pass --model DIR")
            from roadseg import export
            scratch = tempfile.mkdtemp(prefix="roadseg-batch-")
            log(f"exporting {model} for Beam")
            model = export.export(model, os.path.join(scratch, "export"))
        scheme = get_scheme(_export_info(model)["scheme"])
        options = PipelineOptions(list(beam_args), **({"runner": runner} if runner else {}))
        log(f"{len(paths)} images on {runner or 'FnApiRunner (in this process)'}")
        FileSystems.mkdirs(out)
        try:
            _run(_pipeline(paths, model, out, scheme, batch_size, options, runner))
        except BaseException:   # no half-written output folder
            FileSystems.delete([out])
            raise
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    return len(paths)


def _pipeline(paths, model, out, scheme, batch_size, options, runner):
    if runner is None:   # offline, in this process
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner
        pipeline = beam.Pipeline(runner=FnApiRunner(), options=options)
    else:
        pipeline = beam.Pipeline(options=options)
    handler = KeyedModelHandler(SegmentationModelHandler(model, batch_size))
    (pipeline
     | "paths" >> beam.Create(paths)
     | "spread" >> beam.Reshuffle()
     | "decode" >> beam.Map(lambda path: (path, read_image(path)))
     | "segment" >> RunInference(handler)
     | "write" >> beam.Map(write_outputs, out, scheme))
    return pipeline


def _run(pipeline):
    """Run and wait; a UserError raised on a worker (an undecodable image) stays one line."""
    try:
        pipeline.run().wait_until_finish()
    except UserError:
        raise
    except Exception as err:   # Beam wraps what its workers raise
        text = str(err)
        if "UserError: " in text:
            raise UserError(text.split("UserError: ", 1)[1].splitlines()[0]) from None
        raise


# ============================================================================ reading, writing
def list_images(inputs):
    """The image paths of ``inputs``: files, folders (their images, not recursive) and
    globs, on any filesystem Beam reads; a missing input, no image at all or two images
    that would be saved under one name are a UserError."""
    paths = []
    for item in inputs:
        folder = os.path.isdir(item) or item.endswith("/")
        found = _match(item.rstrip("/") + "/*" if folder else item)
        if not found and not any(c in item for c in "*?["):   # a folder on a remote filesystem
            folder, found = True, _match(item.rstrip("/") + "/*")
        images = sorted(p for p in found if p.lower().endswith(IMAGE_EXTENSIONS)
                        or (p == item and not folder))
        if not images:
            raise UserError(f"input {item} does not exist or holds no png/jpg images; pass image "
                            f"files, folders of images or globs")
        paths += images
    if not paths:
        raise UserError(f"no images (png/jpg) found in {', '.join(inputs)}")
    stems = {}
    for path in paths:
        stem = _stem(path)
        if stem in stems:
            raise UserError(f"{path} and {stems[stem]} would both be saved as {stem}.png; "
                            f"rename one of them")
        stems[stem] = path
    return paths


def _match(pattern):
    try:
        result = FileSystems.match([pattern])[0]
    except Exception:   # BeamIOError for a missing path or an unknown scheme's error
        return []
    return [m.path for m in result.metadata_list]


def read_image(path):
    """An image file (any Beam filesystem) as uint8 RGB, decoded as ``segment.py predict``
    does (``datasets.load_image``)."""
    with FileSystems.open(path, compression_type="uncompressed") as f:
        data = f.read()
    try:
        return datasets.load_image(io.BytesIO(data))
    except UserError:
        raise UserError(f"cannot decode image '{path}'; replace the file or leave it out") from None


def write_outputs(keyed, out, scheme):
    """``<stem>.png`` (overlay) and ``<stem>_classes.png`` (class ids) of one prediction,
    each written under a temporary name and renamed when complete."""
    path, result = keyed
    image, class_map = result.example, np.asarray(result.inference, np.uint8)
    stem = posixpath.join(out, _stem(path)) if "://" in out else os.path.join(out, _stem(path))
    for target, array in ((stem + ".png", overlays.overlay(image, class_map, scheme)),
                          (stem + "_classes.png", class_map)):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        partial = _partial_name(target)
        with FileSystems.create(partial) as f:
            f.write(buffer.getvalue())
        FileSystems.rename([partial], [target])
    return path


def _partial_name(target):
    head, tail = target.rsplit("/", 1) if "/" in target else ("", target)
    return f"{head}/.partial-{tail}" if head else f".partial-{tail}"


def _stem(path):
    return os.path.splitext(path.rstrip("/").rsplit("/", 1)[-1])[0]


def _exists(path):
    try:
        return FileSystems.exists(path)
    except Exception:
        return False


def _is_run_folder(model):
    return os.path.isdir(model) and not os.path.isfile(os.path.join(model, "saved_model.pb"))


def _export_info(model):
    return read_export_info(model, read_text=_read_text)


def _read_text(path):
    if not _exists(path):
        raise FileNotFoundError(path)
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return f.read().decode("utf-8", "replace")
