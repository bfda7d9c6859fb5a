"""``segment.py batch-predict``: class maps and overlays of many images and videos on Apache Beam.

    segment.py batch-predict --model RUN_OR_EXPORT INPUTS... --out DIR [--runner NAME]
                             [--chunk-seconds S] [--skip-bad] [--resume] [Beam pipeline options]

The pipeline is Beam's ``RunInference`` for images: image paths -> read and decode (any path
Beam's filesystems read: local files, ``gs://``, ``s3://``, ...) -> the exported model,
batched -> ``<name>_classes.png`` (class ids) and ``<name>.png`` (the overlay) in ``DIR``, as
``segment.py predict`` writes them (``roadseg.overlays``).  Videos (mp4, mov, avi, mkv) give
``<name>_overlay.mp4`` -- the frames ``segment.py video`` writes, through the same
``video.render_overlay`` -- and ``<name>_classes.csv`` (per frame: index, time, share of the
pixels of each class).  One video is one element; ``--chunk-seconds S`` splits a longer
video into frame ranges that are decoded from their own seek points and segmented in
parallel (their class maps go to hidden part files), then one join renders the overlay and
the table from the source and those maps: the same frames, in the same order, as one pass.

``DIR/manifest.jsonl`` has a line per input: ``status`` ok / failed / skipped, ``reason``,
``frames``, ``seconds`` (worker time); for a video also ``frames_expected``, the count its
header promises (fewer frames read -- a truncated file -- is a warning line, not a failure).
Each worker writes its input's line as a small file under ``DIR/.manifest/`` when the input
is complete; the command merges them into the manifest at the end, after a failure or
Ctrl-C too, and before a ``--resume``.  A bad input (unreadable, damaged) ends the job with
one line, or with ``--skip-bad`` is listed as failed and the job goes on; an output that
cannot be written (a full disk) ends it either way.  Beam's own log of a failed step goes to
the debug lines (``-v``).

``DIR/job.json`` records the model the job started with (its path and ``model_identity``, a
sha256 of its weights and export_info.json): ``--resume`` with another model is refused
before anything in ``DIR`` changes; the same model at another path, or the run it was
exported from, resumes.  While a job runs on this machine it holds ``DIR/.lock``
(``run_folders.run_lock``): a second job on ``DIR`` is refused.  ``--resume`` runs the same
command into the same ``DIR`` for the inputs the manifest does not list as ok: whatever a
stopped job left for them is its own -- temporary files are removed, outputs under their
final names are written again (the new file replaces them in one rename), chunk files are
reused when their gzip stream reads whole, else done again -- so the result is a clean
run's, byte for byte; outputs of inputs listed as ok are never rewritten.  Every output is
written under a hidden temporary name and renamed when complete, so a killed job leaves no
partial file under a final name.

Without ``--runner`` it runs in this process on Beam's ``FnApiRunner`` (offline; Beam's
``DirectRunner`` would first try to download a runner binary), with progress bars over inputs
and frames; ``--runner DataflowRunner`` / ``FlinkRunner`` / ``SparkRunner`` and their options
go to Beam unchanged (docs/scaling.md), and progress is Beam's counters (``roadseg``
namespace: images / videos ok and failed, frames).

The model is an export (``segment.py export``): Beam's stock TensorFlow handler cannot
load our TF1-style SavedModel under Keras 3, so ``SegmentationModelHandler`` loads it with
``tf.saved_model.load(dir, tags=['serve']).signatures['predict']``.  A run folder is first
exported to a temporary folder (for runners in this process or on this host; remote
workers need an export on storage they read).  Inputs are listed here first, so that a
missing input, an empty folder or two inputs with the same name (or one named as an input
done earlier into ``DIR``) fail before anything runs.
"""
import collections
import contextlib
import csv
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
import zlib

import numpy as np
from PIL import Image

# Beam warns on import about Google Cloud client libraries that only its GCP I/O uses
# ("apitools not found ..."): not a problem of this command, so not shown.
_root, _level = logging.getLogger(), logging.getLogger().level
_root.setLevel(logging.ERROR)
try:
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.metrics import Metrics
    from apache_beam.ml.inference.base import (
        KeyedModelHandler,
        ModelHandler,
        PredictionResult,
        RunInference,
    )
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.utils.shared import Shared
finally:
    _root.setLevel(_level)

from tqdm.auto import tqdm  # noqa: E402

from roadseg import datasets, overlays, run_folders, video  # noqa: E402
from roadseg.errors import UserError, reason  # noqa: E402
from roadseg.inference import SERVE_TAG, SIGNATURE, same_size_batches  # noqa: E402
from roadseg.log import channel, logger  # noqa: E402
from roadseg.model import read_export_info  # noqa: E402
from roadseg.run_folders import refuse_existing  # noqa: E402
from roadseg.schemes import get_scheme  # noqa: E402

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv")
MANIFEST = "manifest.jsonl"
JOB_RECORD = "job.json"   # the model the job was started with (its path and sha256)
RECORDS = ".manifest"     # the finished inputs' manifest lines while a job runs
PARTIAL = ".partial-"     # prefix of outputs being written
PART = ".chunk-"          # prefix of a video chunk's class maps (until its video is joined)
COUNTERS = "roadseg"      # Beam counters' namespace
# Beam 2.77's RunInference warns once per batch when an optional import of its own fails
# ("Resource module is not available ... memory usage cannot be fetched"): noise here.
_root.addFilter(lambda record: not record.getMessage().startswith("Resource module is not available"))
LOCAL_RUNNERS = (None, "FnApiRunner", "DirectRunner", "PrismRunner")


class SegmentationModelHandler(ModelHandler):
    """Beam ``ModelHandler`` for an exported model -- a SavedModel (any Beam filesystem), or
    a LiteRT / OpenVINO model folder on a local path (``inference.load_predictor``): uint8
    RGB images (any size) -> uint8 class maps at the image's size.  Images of one size in a
    batch run together."""

    def __init__(self, export_dir, batch_size=4):
        self.export_dir, self.batch_size = export_dir, batch_size

    def load_model(self):
        """``images -> class maps``, the model loaded once per worker."""
        if _is_local_export(self.export_dir):
            from roadseg.inference import load_predictor
            return load_predictor(self.export_dir).predict
        import tensorflow as tf
        signature = tf.saved_model.load(self.export_dir, tags=[SERVE_TAG]).signatures[SIGNATURE]
        return lambda images: signature(images=tf.constant(images))["classes"].numpy()

    def run_inference(self, batch, model, inference_args=None):
        maps = []
        for _, images in same_size_batches(((None, image) for image in batch), self.batch_size):
            maps.extend(self.class_maps(model, images))
        return [PredictionResult(image, class_map) for image, class_map in zip(batch, maps)]

    @staticmethod
    def class_maps(model, images):
        """uint8 class maps ``(N, H, W)`` of same-size uint8 RGB images ``(N, H, W, 3)``."""
        return model(images)

    def batch_elements_kwargs(self):
        return {"max_batch_size": self.batch_size}

    def get_num_bytes(self, batch):
        return sum(image.nbytes for image in batch)


# ============================================================================ the command
@dataclasses.dataclass(frozen=True)
class Job:
    """What every step of the pipeline needs (pickled to the workers)."""
    out: str
    model: str
    scheme: str
    batch_size: int = 4
    chunk_seconds: float = None
    skip_bad: bool = False
    job_id: str = ""


def batch_predict(model, inputs, out, runner=None, beam_args=(), batch_size=4, log=None,
                  chunk_seconds=None, skip_bad=False, resume=False, backend="auto"):
    """Segment every image and video of ``inputs`` into the new folder ``out`` (with
    ``resume``: complete what ``out``'s manifest does not list as ok, with the model the job
    was started with).  Returns the counts ``{"inputs", "ok", "failed", "done_before", "frames"}``."""
    if chunk_seconds is not None and not chunk_seconds > 0:
        raise UserError(f"--chunk-seconds must be a positive number of seconds, not {chunk_seconds}")
    log = channel(log)
    if not resume:
        refuse_existing(out, "choose a new --out folder", exists=_exists)
    paths = list_inputs(inputs)
    with contextlib.ExitStack() as stack:
        exported = _exported_model(model, runner, stack, log, backend)
        fresh = not _exists(out)
        stack.enter_context(_job_folder(out, fresh, model, model_identity(exported), log))
        done = set() if fresh else _prepare(out, paths)
        todo = [p for p in paths if p not in done]
        if done:
            log(f"resuming {out}: {len(done)} of {len(paths)} inputs are done, {len(todo)} to do")
        if not todo:
            _remove_leftovers(out)
            return _summary(out, paths, len(done), {})
        job = Job(out, exported, _export_info(exported)["scheme"], batch_size, chunk_seconds,
                  skip_bad, uuid.uuid4().hex)
        options = PipelineOptions(list(beam_args), **({"runner": runner} if runner else {}))
        n_videos = sum(_is_video(p) for p in todo)
        log(f"{len(todo) - n_videos} images and {n_videos} videos on "
            f"{runner or 'FnApiRunner (in this process)'}")
        counters = _run_job(job, todo, paths, options, runner, fresh)
    _warn_short_videos(out, todo)
    return _summary(out, paths, len(done), counters)


def _exported_model(model, runner, stack, log, backend="auto"):
    """The export the workers load: ``model``, or for runners on this host a run folder's
    model at ``backend`` (``inference.worker_model``: its cached OpenVINO conversion, or a
    SavedModel exported to a temporary folder removed when ``stack`` closes)."""
    if not _is_run_folder(model):
        return model
    if runner not in LOCAL_RUNNERS:
        raise UserError(f"--runner {runner} runs on other machines: export the run first "
                        f"('segment.py export --model {model} --out DIR', to storage the "
                        f"workers read) and pass --model DIR")
    from roadseg import inference
    scratch = tempfile.mkdtemp(prefix="roadseg-batch-")
    stack.callback(shutil.rmtree, scratch, ignore_errors=True)
    return inference.worker_model(model, scratch, backend, log)


def model_identity(model):
    """sha256 of what decides an export's class maps, not of where it lies: its
    export_info.json (without the source run's path) and its weights -- a SavedModel's
    variables index, which holds a checksum of every tensor; a LiteRT or OpenVINO model's
    files.  A run folder is exported first: the same checkpoint gives the same identity."""
    info = {key: value for key, value in _export_info(model).items() if key != "run"}
    digest = hashlib.sha256(json.dumps(info, sort_keys=True).encode())
    for path in _weight_files(model):
        digest.update(path.replace("\\", "/").rsplit("/", 1)[-1].encode())
        try:
            with FileSystems.open(path, compression_type="uncompressed") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        except Exception as err:   # BeamIOError, OSError, a storage client's error
            raise UserError(f"model {model} is incomplete: cannot read {path} ({reason(err)}); "
                            f"export it again") from None
    return digest.hexdigest()


def _weight_files(model):
    from roadseg import litert, openvino_model
    if _is_local_export(model):
        tflite = litert.model_path(model)
        if tflite:
            return [tflite]
        folder = openvino_model.model_path(model)
        return [os.path.join(folder, openvino_model.MODEL_FILE),
                os.path.join(folder, openvino_model.WEIGHTS_FILE)]
    return [_join(model, "variables", "variables.index")]


@contextlib.contextmanager
def _job_folder(out, fresh, model, identity, log):
    """Hold ``out`` for this job: a resumed folder must have been started with the same model
    (``job.json``: refused before anything in it changes); a new one is made, atomically (of
    two jobs started at once, the second is refused).  On this machine a lock (``.lock``,
    ``run_folders.run_lock``) refuses a second job while this one runs."""
    record = None if fresh else _check_same_model(out, model, identity, log)
    if fresh and "://" in out:
        FileSystems.mkdirs(out)
    elif fresh:
        run_folders.make_dirs(os.path.dirname(os.path.abspath(out)))
        try:
            with run_folders.write_errors_as_user_error(out):
                os.mkdir(out)
        except FileExistsError:
            refuse_existing(out, "choose a new --out folder")
    with contextlib.nullcontext() if "://" in out else run_folders.run_lock(out, "written"):
        if record is None:
            line = {"model": model if "://" in model else os.path.abspath(model),
                    "model_sha256": identity}
            _put(_join(out, JOB_RECORD), io.BytesIO(json.dumps(line, indent=2).encode()))
        yield


def _check_same_model(out, model, identity, log):
    """``out``'s job.json, when its model is ``model``'s identity; else the refusal.  None for
    a folder without one (made before job.json was): it gets this model's."""
    path = _join(out, JOB_RECORD)
    if not _exists(path):
        return None
    record = run_folders.read_json(path, "restore it, or delete it to resume with the --model "
                                   "you pass (the one the job started with)",
                                   required=("model", "model_sha256"), read_text=_read_text)
    if record["model_sha256"] != identity:
        raise UserError(f"cannot resume {out}: it was started with the model {record['model']} "
                        f"(sha256 {record['model_sha256'][:12]}), and {model} is another model "
                        f"(sha256 {identity[:12]}); pass --model {record['model']} (or a copy of "
                        f"it), or choose a new --out folder")
    if os.path.abspath(model) != record["model"] and model != record["model"]:
        log(f"{model} is the model {out} was started with ({record['model']}; same sha256)")
    return record


def _prepare(out, paths):
    """Before a job runs in ``out`` (held by it): what a stopped job left is put in order --
    its manifest lines merged, its temporary files removed, its chunks of inputs now done
    removed (chunks of inputs to do are checked when reused).  Returns the inputs done."""
    leftovers = _match(_join(out, PARTIAL + "*")) + _match(_join(out, RECORDS, PARTIAL + "*"))
    if leftovers:
        FileSystems.delete(leftovers)
    lines = _read_lines(out)
    earlier = {_stem(p): p for p, line in lines.items() if p not in set(paths)}
    for path in paths:
        if _stem(path) in earlier:
            raise UserError(f"{path} and {earlier[_stem(path)]} (done earlier into {out}) would "
                            f"both be saved as {_outputs(path)[0]}; rename one of them")
    done = {p for p in paths if lines.get(p, {}).get("status") == "ok"}
    _merge_manifest(out, paths)
    stale = [part for part in _match(_join(out, PART + "*"))
             if not any(_is_part_of(part, p) for p in paths if p not in done)]
    if stale:
        FileSystems.delete(stale)
    return done


def _warn_short_videos(out, todo):
    """A warning per video of ``todo`` that gave fewer frames than its header promised."""
    lines = _read_manifest(out)
    for path in todo:
        line = lines.get(path, {})
        frames, expected = line.get("frames", 0), line.get("frames_expected")
        if line.get("status") == "ok" and expected and _short(frames, expected):
            logger.warning(f"warning: {path}: {frames} of the {expected} frames its header "
                           f"promises could be read (a truncated file?); its outputs hold those "
                           f"{frames}")


def _short(frames, expected):
    """Fewer frames than a header's estimate by more than one frame and more than 1%."""
    return expected - frames > max(1, expected // 100)


def _run_job(job, todo, paths, options, runner, fresh):
    """Run the pipeline over ``todo``; the manifest is merged whatever happens.  After a
    failure a new ``out`` holding nothing finished is removed; otherwise it stays for --resume."""
    bars = _Progress(len(todo)) if runner in LOCAL_RUNNERS else None   # else: Beam's counters
    try:
        with bars or contextlib.nullcontext():
            if bars:
                _PROGRESS[job.job_id] = bars
            counters = _run(_pipeline(job, todo, options, runner))
    except BaseException as err:
        stopped = "interrupted" if isinstance(err, KeyboardInterrupt) else reason(err)
        try:
            lines = _merge_manifest(job.out, paths, f"not processed: the job stopped ({stopped})")
        except (OSError, UserError):   # a full disk: the lines wait in .manifest/ for --resume
            logger.debug("the manifest could not be merged:", exc_info=True)
            lines = _read_lines(job.out)
        with contextlib.suppress(OSError):
            _remove_leftovers(job.out, chunks=False)
        if fresh and not any(line["status"] == "ok" for line in lines.values()):
            FileSystems.delete([job.out])   # nothing to resume from: no output folder at all
        if isinstance(err, UserError) and _is_write_failure(err):
            raise UserError(err.base, "--resume", "(then the same command with --resume "
                            "completes the job; what is done is kept)") from None
        if isinstance(err, UserError) and any(line["status"] == "failed" for line in lines.values()):
            raise UserError(err.base, "--skip-bad", "(pass --skip-bad to list bad inputs in "
                            f"{MANIFEST} and go on; --resume keeps what is done)") from None
        raise
    finally:
        _PROGRESS.pop(job.job_id, None)
    _merge_manifest(job.out, paths)
    _remove_leftovers(job.out)
    return counters


def _is_write_failure(err):
    """An output that could not be written (a full or read-only disk): every line saying so
    starts 'could not write' (``run_folders.write_errors_as_user_error``, ``video``'s writer).
    Not a bad input: it ends the job even with --skip-bad."""
    return str(err).startswith("could not write")


def _summary(out, paths, done_before, counters):
    lines = _read_manifest(out)
    statuses = [lines.get(p, {}).get("status") for p in paths]
    return {"inputs": len(paths), "ok": statuses.count("ok"), "failed": statuses.count("failed"),
            "done_before": done_before, "frames": counters.get("frames", 0),
            "counters": counters}


def _pipeline(job, paths, options, runner):
    if runner is None:   # offline, in this process
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner
        pipeline = beam.Pipeline(runner=FnApiRunner(), options=options)
    else:
        pipeline = beam.Pipeline(options=options)
    images = [p for p in paths if not _is_video(p)]
    videos = [p for p in paths if _is_video(p)]
    if images:
        handler = KeyedModelHandler(SegmentationModelHandler(job.model, job.batch_size))
        (pipeline
         | "paths" >> beam.Create(images)
         | "spread" >> beam.Reshuffle()
         | "decode" >> beam.FlatMap(_decode, job)
         | "segment" >> RunInference(handler)
         | "write" >> beam.Map(write_outputs, job))
    if videos:
        (pipeline
         | "videos" >> beam.Create(videos)
         | "spread videos" >> beam.Reshuffle()
         | "split" >> beam.FlatMap(split_video, job)
         | "spread chunks" >> beam.Reshuffle()
         | "segment videos" >> beam.ParDo(SegmentVideo(job))
         | "chunks by video" >> beam.GroupByKey()
         | "join chunks" >> beam.Map(join_chunks, job))
    return pipeline


def _run(pipeline):
    """Run and wait; returns the ``roadseg`` counters.  A UserError raised on a worker (an
    undecodable image) stays one line: Beam's own log of it (``ERROR:apache_beam...`` and
    the traceback) becomes a debug line (``-v``)."""
    try:
        with _beam_errors_as_debug():
            result = pipeline.run()
            result.wait_until_finish()
    except Exception as err:   # Beam wraps what its workers raise, or adds to its message
        text = str(err)
        if isinstance(err, UserError) or "UserError: " in text:
            raise UserError(reason(err)) from None
        raise
    counters = {}
    for counter in result.metrics().query()["counters"]:
        if counter.key.metric.namespace == COUNTERS:
            name = counter.key.metric.name
            counters[name] = counters.get(name, 0) + counter.committed
    return counters


@contextlib.contextmanager
def _beam_errors_as_debug():
    """While a pipeline runs here, Beam's log records of an exception (a step that raised:
    Beam logs it, then raises it to the command) go to the package logger's debug lines
    instead of the root logger's handlers (which Beam's ``PipelineOptions`` set up with
    ``logging.basicConfig``); every other record passes."""
    def demote(record):
        if not (record.name.startswith("apache_beam") and record.exc_info
                and record.levelno >= logging.ERROR):
            return True
        if not getattr(record, "roadseg_demoted", False):   # once, whatever the handlers
            record.roadseg_demoted = True
            logger.debug(f"Beam: {record.getMessage()}", exc_info=record.exc_info)
        return False

    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(demote)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(demote)


# ============================================================================ progress, manifest
_PROGRESS = {}   # job id -> its _Progress, for workers running in this process


class _Progress:
    """Two bars, over inputs and over frames, that workers in this process advance."""

    def __init__(self, n_inputs):
        self.lock = threading.Lock()
        self.inputs = tqdm(total=n_inputs, desc="inputs", unit="input", position=0)
        self.frames = tqdm(desc="frames", unit="frame", position=1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.frames.close()
        self.inputs.close()


def _advance(job, inputs=0, frames=0):
    """Count finished inputs and segmented frames: Beam counters, and the bars when the
    worker runs in the command's process."""
    if frames:
        Metrics.counter(COUNTERS, "frames").inc(frames)
    bars = _PROGRESS.get(job.job_id)
    if bars is not None:
        with bars.lock:
            bars.inputs.update(inputs)
            bars.frames.update(frames)


def _record(job, path, status, reason=None, frames=0, seconds=0.0, **more):
    """Write ``path``'s manifest line (``out/.manifest/<name>.json``, replacing an older one)."""
    kind = "videos" if _is_video(path) else "images"
    Metrics.counter(COUNTERS, f"{kind}_{status}").inc()
    line = {"input": path, "status": status, "reason": reason, "frames": frames,
            "seconds": round(seconds, 3), **more}
    target = _join(job.out, RECORDS, _stem(path) + ".json")
    _put(target, io.BytesIO(json.dumps(line).encode()))
    _advance(job, inputs=1)


def _fail(job, path, err, started):
    """A bad input: its manifest line says why; without --skip-bad the job ends here.  An
    output that could not be written ends it anyway (every input after it would fail too)."""
    try:
        _record(job, path, "failed", reason=str(err), seconds=time.time() - started)
    except UserError:   # the full disk that failed the output takes no line either
        if not _is_write_failure(err):
            raise
        logger.debug(f"no manifest line for {path}:", exc_info=True)
    if not job.skip_bad or _is_write_failure(err):
        raise err


def _read_manifest(out):
    """``{input: line}`` of ``out/manifest.jsonl`` (empty when there is none; a line that
    does not parse is left out, so its input counts as not done)."""
    path = _join(out, MANIFEST)
    if not _exists(path):
        return {}
    with FileSystems.open(path, compression_type="uncompressed") as f:
        text = f.read().decode("utf-8", "replace")
    lines = (_parse_line(raw) for raw in text.splitlines())
    return {line["input"]: line for line in lines if line}


def _parse_line(text):
    """A manifest line as a dict, or None when it does not parse (its input is not done)."""
    try:
        line = json.loads(text)
    except ValueError:
        return None
    return line if isinstance(line, dict) and "input" in line and "status" in line else None


def _read_lines(out):
    """``{input: line}`` of the manifest and of the finished inputs' lines not merged yet."""
    lines = _read_manifest(out)
    for record in _match(_join(out, RECORDS, "*.json")):
        with FileSystems.open(record, compression_type="uncompressed") as f:
            line = _parse_line(f.read().decode("utf-8", "replace"))
        if line:
            lines[line["input"]] = line
    return lines


def _merge_manifest(out, paths, stopped="not processed yet"):
    """Merge the finished inputs' lines (``out/.manifest/``) into ``out/manifest.jsonl``, a line
    for each of ``paths`` in order (``skipped`` for one not done: ``stopped`` says why) and
    then the lines of earlier commands' other inputs; returns ``{input: line}``."""
    records = _match(_join(out, RECORDS, "*.json"))
    lines = _read_lines(out)
    for path in paths:
        lines.setdefault(path, {"input": path, "status": "skipped", "reason": stopped,
                                "frames": 0, "seconds": 0.0})
    ordered = [lines[p] for p in paths] + [line for p, line in lines.items() if p not in set(paths)]
    target = _join(out, MANIFEST)
    _put(target, io.BytesIO("".join(json.dumps(line) + "\n" for line in ordered).encode()))
    if records:
        FileSystems.delete(records)
    return {line["input"]: line for line in ordered}


def _remove_leftovers(out, chunks=True):
    """What stopped jobs left: partial files, and (``chunks``: after a finished job) chunks of
    videos that failed; finished chunks of a stopped job stay for its --resume."""
    leftovers = _match(_join(out, PARTIAL + "*")) + _match(_join(out, RECORDS, PARTIAL + "*"))
    leftovers += _match(_join(out, PART + "*")) if chunks else []
    if leftovers:
        FileSystems.delete(leftovers)
    if "://" not in out and os.path.isdir(_join(out, RECORDS)):
        with contextlib.suppress(OSError):
            os.rmdir(_join(out, RECORDS))


# ============================================================================ videos
def split_video(path, job):
    """``(path, (start, count, n_chunks))`` elements of a video: one chunk, or with
    --chunk-seconds ranges of whole batches; the last range runs to the end (the frame count
    in a header is an estimate)."""
    started = time.time()
    try:
        with _local_copy(path) as local:
            _, fps, estimate = video.probe_video(local)
    except UserError as err:
        _fail(job, path, err, started)
        return
    if job.chunk_seconds is None or not estimate:
        yield path, (0, None, 1)
        return
    batches = max(1, -(-round(job.chunk_seconds * float(fps)) // job.batch_size))
    per_chunk = batches * job.batch_size   # whole batches: each batch is as in one pass
    starts = list(range(0, estimate, per_chunk))
    for k, start in enumerate(starts):
        yield path, (start, per_chunk if k + 1 < len(starts) else None, len(starts))


class SegmentVideo(beam.DoFn):
    """A whole video -> its overlay and table; a chunk -> its class maps in a part file,
    then ``(path, (start, count, seconds, error))`` for the join."""

    def __init__(self, job):
        self.job, self._shared = job, Shared()

    def setup(self):
        self._handler = SegmentationModelHandler(self.job.model, self.job.batch_size)
        self._model = self._shared.acquire(self._handler.load_model, tag=self.job.model)

    def _predict(self, images):
        maps = self._handler.class_maps(self._model, images)
        _advance(self.job, frames=len(images))
        return maps

    def process(self, element):
        path, (start, count, n_chunks) = element
        job, started = self.job, time.time()
        if n_chunks == 1:
            try:
                frames, fps, expected = _render_video(path, job, self._predict)
            except UserError as err:
                _fail(job, path, err, started)
                return
            _record(job, path, "ok", frames=frames, seconds=time.time() - started, fps=fps,
                    frames_expected=expected)
            return
        part = _part_name(job.out, path, start, count)
        try:
            if not _complete_part(part):   # a chunk a stopped job finished is reused
                _write_maps(path, part, start, count, job.batch_size, self._predict)
        except UserError as err:
            if not job.skip_bad or _is_write_failure(err):
                _fail(job, path, err, started)
            yield path, (start, count, time.time() - started, str(err))
            return
        yield path, (start, count, time.time() - started, None)


def _write_maps(path, part, start, count, batch_size, predict):
    """Class maps of frames ``[start, start + count)``: a gzip stream of ``.npy`` batches."""
    with _local_copy(path) as local, _staged_output(part) as tmp, gzip.open(tmp, "wb", 1) as f:
        for images in video.read_frame_batches(local, batch_size, start, count):
            np.lib.format.write_array(f, predict(images), allow_pickle=False)


def _complete_part(part):
    """Whether the part file ``part`` is there and whole: its gzip stream reads to its end
    (its CRC and length checked) as a sequence of ``.npy`` arrays.  One that is not is done
    again (the new one replaces it)."""
    if not _exists(part):
        return False
    try:
        collections.deque(_read_maps(part), maxlen=0)
    except (OSError, EOFError, ValueError, zlib.error) as err:
        logger.debug(f"{part} is damaged ({reason(err)}): its frames are segmented again")
        return False
    return True


def _read_maps(part):
    """Yield the class maps of a part file, frame by frame."""
    with FileSystems.open(part, compression_type="uncompressed") as raw:
        with gzip.GzipFile(fileobj=raw) as f:
            while f.peek(1):
                yield from np.lib.format.read_array(f, allow_pickle=False)


def join_chunks(keyed, job):
    """A chunked video's overlay and table, rendered from the source and its chunks' maps."""
    path, chunks = keyed
    chunks = sorted(chunks)
    started, worked = time.time(), sum(chunk[2] for chunk in chunks)
    parts = [_part_name(job.out, path, start, count) for start, count, _, _ in chunks]
    errors = [chunk[3] for chunk in chunks if chunk[3]]
    if errors:   # only with --skip-bad: without it the chunk's error ended the job
        _record(job, path, "failed", reason=errors[0], seconds=worked)
        FileSystems.delete([p for p in parts if _exists(p)])
        return
    maps = (class_map for part in parts for class_map in _read_maps(part))

    def take(images):
        got = [class_map for _, class_map in zip(images, maps)]
        if len(got) < len(images):
            raise RuntimeError(f"the chunks of {path} hold fewer frames than the video")
        return np.stack(got)

    try:
        frames, fps, expected = _render_video(path, job, take)
    except UserError as err:
        _fail(job, path, err, started)
        return
    if next(maps, None) is not None:
        raise RuntimeError(f"the chunks of {path} hold more frames than the video ({frames})")
    _record(job, path, "ok", frames=frames, seconds=worked + time.time() - started, fps=fps,
            chunks=len(chunks), frames_expected=expected)
    FileSystems.delete(parts)


def _render_video(path, job, maps_fn):
    """``<name>_overlay.mp4`` (``video.render_overlay``, as ``segment.py video``) and
    ``<name>_classes.csv`` of a whole video; returns (frames, fps, the frame count its
    header promises or None)."""
    stem, scheme = _join(job.out, _stem(path)), get_scheme(job.scheme)
    with _local_copy(path) as local:
        size, fps, expected = video.probe_video(local)
        with _staged_output(stem + "_classes.csv") as table_path, \
                _staged_output(stem + "_overlay.mp4") as overlay_path, \
                open(table_path, "w", newline="") as f:
            table = ClassTable(f, scheme.class_names, fps)
            frames = video.render_overlay(video.read_frame_batches(local, job.batch_size), maps_fn,
                                          overlay_path, size, fps, scheme, name=stem + "_overlay.mp4",
                                          on_batch=lambda images, maps: table.add(maps))
            if frames == 0:
                raise UserError(f"video {path} has no frames; check the file")
    return frames, float(fps), expected


class ClassTable:
    """``<name>_classes.csv``: a row per frame -- index, time (s), share of the frame's pixels
    in each class (6 decimals) -- written as the frames come."""

    def __init__(self, f, class_names, fps):
        self.writer, self.fps, self.n = csv.writer(f), float(fps), 0
        self.num_classes = len(class_names)
        self.writer.writerow(["index", "time", *class_names])

    def add(self, maps):
        for class_map in maps:
            counts = np.bincount(class_map.ravel(), minlength=self.num_classes)[:self.num_classes]
            shares = counts / class_map.size
            self.writer.writerow([self.n, f"{self.n / self.fps:.6f}", *(f"{s:.6f}" for s in shares)])
            self.n += 1


# ============================================================================ reading, writing
def list_inputs(inputs):
    """The image and video paths of ``inputs``: files, folders (their images and videos, not
    recursive) and globs, on any filesystem Beam reads; a missing input, nothing to segment
    or two inputs that would be saved under one name are a UserError."""
    paths = []
    for item in inputs:
        folder = os.path.isdir(item) or item.endswith("/")
        found = _match(item.rstrip("/") + "/*" if folder else item)
        if not found and not any(c in item for c in "*?["):   # a folder on a remote filesystem
            folder, found = True, _match(item.rstrip("/") + "/*")
        media = sorted(p for p in found if p.lower().endswith(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
                       or (p == item and not folder))
        if not media:
            raise UserError(f"input {item} does not exist or holds no images (png/jpg) or videos "
                            f"(mp4/mov/avi/mkv); pass files, folders or globs")
        paths += media
    stems = {}
    for path in paths:
        stem = _stem(path)
        if stem in stems:
            raise UserError(f"{path} and {stems[stem]} would both be saved as {_outputs(path)[0]}; "
                            f"rename one of them")
        stems[stem] = path
    return paths


def _is_video(path):
    return path.lower().endswith(VIDEO_EXTENSIONS)


def _outputs(path):
    stem = _stem(path)
    return [f"{stem}_overlay.mp4", f"{stem}_classes.csv"] if _is_video(path) else \
        [f"{stem}.png", f"{stem}_classes.png"]


_join = run_folders.join_path   # any Beam filesystem


def _part_name(out, path, start, count):
    return _join(out, f"{PART}{_stem(path)}-{start}-{count or 'end'}.maps.gz")


def _is_part_of(part, path):
    """Whether ``part`` (a ``_part_name``) holds frames of the video ``path``."""
    name = part.replace("\\", "/").rsplit("/", 1)[-1]
    head = f"{PART}{_stem(path)}-"
    return name.startswith(head) and bool(re.fullmatch(r"\d+-(\d+|end)\.maps\.gz", name[len(head):]))


@contextlib.contextmanager
def _local_copy(path):
    """A path ffmpeg can open: ``path`` itself on this machine, else a temporary local copy
    (ffmpeg reads local files; mp4 needs seeking)."""
    if "://" not in path:
        yield path
        return
    suffix = os.path.splitext(path)[1]
    with tempfile.NamedTemporaryFile(suffix=suffix) as local:
        try:
            with FileSystems.open(path, compression_type="uncompressed") as f:
                shutil.copyfileobj(f, local, 1 << 20)
        except Exception as err:   # BeamIOError and the storage client's own errors
            raise UserError(f"cannot read {path} ({reason(err)}); check the path") from None
        local.flush()
        yield local.name


@contextlib.contextmanager
def _staged_output(target):
    """Yield a local path to write ``target``'s content to.  When the block ends without an
    error it gets ``target``'s name in one rename; on any error nothing is left.  A
    ``target`` already there is replaced: in a job's own folder it is what a stopped job
    wrote for an input its manifest does not list as ok (done again, as a clean run does).
    On this machine the temporary file is ``.partial-*`` next to it; for another filesystem
    it is uploaded under such a name and renamed."""
    remote = "://" in target
    folder = tempfile.gettempdir() if remote else run_folders.make_dirs(os.path.dirname(
        os.path.abspath(target)))
    tmp = os.path.join(folder, f"{PARTIAL}{uuid.uuid4().hex[:8]}-{_stem(target)}"
                       f"{os.path.splitext(target)[1]}")
    try:
        with run_folders.write_errors_as_user_error(target):
            yield tmp
            if not remote:
                os.replace(tmp, target)
                return
            with open(tmp, "rb") as src:
                _put(target, src)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _decode(path, job):
    """``((path, start time), image)``; an undecodable image fails (``_fail``)."""
    started = time.time()
    try:
        yield (path, started), read_image(path)
    except UserError as err:
        _fail(job, path, err, started)


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


def write_outputs(keyed, job):
    """``<stem>.png`` (overlay) and ``<stem>_classes.png`` (class ids) of one prediction,
    each written under a temporary name and renamed when complete; then its manifest line."""
    (path, started), result = keyed
    image, class_map = result.example, np.asarray(result.inference, np.uint8)
    stem = _join(job.out, _stem(path))
    for target, array in ((stem + ".png", overlays.overlay(image, class_map, get_scheme(job.scheme))),
                          (stem + "_classes.png", class_map)):
        with _staged_output(target) as tmp:
            Image.fromarray(array).save(tmp, format="PNG")
    _advance(job, frames=1)
    _record(job, path, "ok", frames=1, seconds=time.time() - started)
    return path


def _put(target, src):
    """Write the file object ``src`` to ``target`` on any Beam filesystem, under a
    ``.partial-`` name renamed when complete (replacing an older ``target``: the manifest);
    a full or read-only disk is one UserError line ('could not write ...')."""
    partial = _partial_name(target)
    with run_folders.write_errors_as_user_error(target):
        with FileSystems.create(partial) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        FileSystems.rename([partial], [target])


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
    return (os.path.isdir(model) and not os.path.isfile(os.path.join(model, "saved_model.pb"))
            and not _is_local_export(model))


def _is_local_export(model):
    """A LiteRT or OpenVINO model on this machine (``load_predictor`` opens it)."""
    from roadseg import litert, openvino_model
    return bool(litert.model_path(model) or openvino_model.model_path(model))


def _export_info(model):
    folder = os.path.dirname(os.path.abspath(model)) if os.path.isfile(model) else model
    return read_export_info(folder, read_text=_read_text)


def _read_text(path):
    if not _exists(path):
        raise FileNotFoundError(path)
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return f.read().decode("utf-8", "replace")
