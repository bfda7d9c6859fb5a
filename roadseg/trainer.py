"""The training driver behind ``segment.py train``, the demo and the notebook's runs.

Read it top to bottom; ``train`` is the whole run in named steps:

    resolve_config        defaults < recipe file < flags (< the run's own settings on --resume)
    prepare_samples       the train / validation split, --skip-bad, class weights
    build_training_graph  tf.data -> VGG16 -> FCN-8s -> loss -> Adam, and the validation head,
                          on one device or replicated over several (``roadseg.distribute``)
    Checkpointer          latest and best checkpoints, with where training stands (Progress)
    train_one_epoch       the steps of one epoch
    validate              mIoU on the validation images through the inference head
    close_epoch           validation, best checkpoint and history.json for a finished epoch

A run lives in ``runs/<name>/``: ``config.json`` (everything needed to rebuild the model),
``checkpoints/``, ``best/``, ``history.json`` (loss and mIoU per epoch) and ``tb/``
(TensorBoard).  The graph reads batches straight from ``tf.data``; placeholders with
defaults let validation feed its own images through the same weights.  SIGINT/SIGTERM
finish the current step, save and return (the CLI then exits with code 130); a killed run
continues with ``--resume`` from its last checkpoint, replaying exactly the batches it would
have had (the epoch is part of the data seed) and finishing the bookkeeping of an epoch
whose validation never ran.  Only one process trains a run at a time (``run_lock``).
"""
import contextlib
import json
import math
import os
import re
import shutil
import signal
import time
from typing import NamedTuple

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from roadseg import (
    datasets,
    distribute,
    fcn,
    inference,
    input_pipeline,
    metrics,
    model,
    precision,
    run_folders,
    vgg,
)
from roadseg.checkpoints import Checkpointer, Progress, find_checkpoints, progress_variables
from roadseg.config import TrainConfig
from roadseg.errors import UserError
from roadseg.log import channel
from roadseg.memory import check_training_memory, estimate_training_memory
from roadseg.schemes import get_scheme

tf1 = tf.compat.v1

RUN_FACTS = ("vgg_info", "precision_used")   # in config.json, about the run rather than options


# ============================================================================ config
def resolve_config(options, recipe=None, runs_dir="runs", run=None, resume=False):
    """``(TrainConfig, run_dir or None for a new run, ModelSpec)``, checked as a whole.

    Defaults < the ``recipe`` file < ``options``; on ``--resume`` the run's own
    ``config.json`` comes between the defaults and the recipe, and what shapes the weights
    (its ``ModelSpec``) and the batch size must not change.
    """
    explicit = TrainConfig.read_recipe(recipe) if recipe else {}
    run_dir, old = None, {}
    if resume:
        run_dir = _resume_dir(runs_dir, run)
        old = run_folders.read_run_config(run_dir, required=model.REQUIRED)
    saved = {k: v for k, v in old.items() if k not in RUN_FACTS}
    TrainConfig.from_dict(saved, os.path.join(run_dir or "", run_folders.RUN_CONFIG))
    cfg = TrainConfig.from_dict({**saved, **explicit, **options}).validate()
    if not cfg.data:
        raise UserError("no dataset: pass --data DIR (or set \"data\" in the --config file)")
    vgg_path = cfg.vgg or vgg.obtain_vgg(vgg.DATA_ROOT, cfg.vgg_source, cfg.width,
                                         fc_width=cfg.fc_width)[0]
    vgg.check_vgg_dir(vgg_path)
    cfg = cfg.replace(vgg=os.path.abspath(vgg_path), data=os.path.abspath(cfg.data))
    spec = model.ModelSpec.from_config(cfg, vgg.read_vgg_info(vgg_path))
    if resume:
        _check_resumable(run_dir, old, spec, cfg)
    return cfg, run_dir, spec


def _resume_dir(runs_dir, run):
    """The run folder to resume: ``runs_dir/run``, or the most recent run in ``runs_dir``."""
    if run is not None:
        return os.path.join(runs_dir, run)
    runs = [os.path.join(runs_dir, d) for d in os.listdir(runs_dir)] if os.path.isdir(runs_dir) else []
    runs = [d for d in runs if os.path.isfile(os.path.join(d, run_folders.RUN_CONFIG))]
    if not runs:
        raise UserError(f"--resume: no run to resume in {runs_dir}; start one without --resume")
    return max(runs, key=os.path.getmtime)


# Besides the ModelSpec, the options that change the graph or the steps: every worker of a
# multi-worker run must start with the same (distribute.check_agreement).
STEP_OPTIONS = ("batch_size", "epochs", "lr", "lr_schedule", "warmup_epochs", "loss", "focal_gamma",
                "ohem_fraction", "dice_weight", "class_weights", "keep_prob", "augment", "seed",
                "precision", "val_split", "skip_bad", "devices", "workers", "encoder_lr_scale",
                "reinit")
# Options a resumed run keeps: its checkpoints hold the Adam slots that the encoder's
# learning rate decides (none for frozen layers), and re-initialising is done once.
KEPT_ON_RESUME = ("batch_size", "encoder_lr_scale", "reinit")


def agreed_options(cfg, spec):
    """``[(option, value)]`` every worker must share: the spec's fields and STEP_OPTIONS."""
    return spec.identity() + [(name, getattr(cfg, name)) for name in STEP_OPTIONS]


def _check_resumable(run_dir, old, spec, cfg):
    """The run's ModelSpec, batch size (its position in the epoch is counted in batches) and
    the encoder's learning (``KEPT_ON_RESUME``) must be the new ones; a field the run's
    config.json lacks (an early version) is not compared."""
    path = os.path.join(run_dir, run_folders.RUN_CONFIG)
    changed = model.ModelSpec.from_dict(old, path).differences(spec)
    changed += [(name, old.get(name), getattr(cfg, name)) for name in KEPT_ON_RESUME]
    for key, was, now in changed:
        if key in old and json.dumps(was, default=list) != json.dumps(now, default=list):
            was, now = _setting(key, was), _setting(key, now)
            raise UserError(f"cannot resume {run_dir}: it was trained with {key}={was}, "
                            f"now {key}={now}; use the same setting or start a new --run")


def _setting(key, value):
    """A setting as the user knows it (a VGG16 by source, width and seed)."""
    if key == "vgg_info":
        return ("/".join(f"{k} {value[k]:g}" if isinstance(value[k], float) else f"{k} {value[k]}"
                         for k in ("source", "width", "fc_width", "seed") if k in value)
                or "course VGG16")
    return value


# ============================================================================ samples
class Samples(NamedTuple):
    layout: str
    train: list
    val: list


def prepare_samples(cfg, log=None):
    """The training and validation samples (``--skip-bad`` leaves bad ones out) and, for
    ``class_weights: true``, the cfg with the median-frequency weights filled in."""
    log = channel(log)
    scheme = get_scheme(cfg.scheme)
    dataset, train, val = datasets.training_splits(cfg.data, cfg.val_split, log)
    if cfg.skip_bad:
        train = _usable_samples(train, scheme, "train", log)
        val = _usable_samples(val, scheme, "validation", log)
    if cfg.class_weights is True:
        counts = datasets.class_pixel_counts(train, scheme)
        weights = [float(w) for w in datasets.median_frequency_weights(counts)]
        log("class weights (median frequency): " + ", ".join(
            f"{n} {w:.2f}" for n, w in zip(scheme.class_names, weights)))
        cfg = cfg.replace(class_weights=weights)
    return Samples(dataset.layout, train, val), cfg


def _usable_samples(samples, scheme, what, log):
    """``--skip-bad``: the samples that load cleanly; the others are listed and counted."""
    good = []
    for sample in tqdm(samples, desc=f"checking {what} files", unit="img", leave=False):
        try:
            datasets.load_pair(sample, scheme)
            good.append(sample)
        except UserError as err:
            log(f"skipped: {err}")
    if len(good) < len(samples):
        log(f"--skip-bad: skipped {len(samples) - len(good)} of {len(samples)} {what} samples")
    if samples and not good:
        raise UserError(f"no {what} sample could be read (all {len(samples)} are bad); "
                        f"fix the dataset (see 'segment.py check-data')")
    return good


# ============================================================================ graph
class TrainingGraph(NamedTuple):
    """What one training step and one validation batch need, by name."""
    data_init: tf.Operation       # (re)start the data: feed ``epoch`` and ``skip``
    epoch: tf.Tensor              # placeholder: the epoch, part of the data seed
    skip: tf.Tensor               # placeholder: batches of the epoch already done
    images: tf.Tensor             # float images fed to VGG16 (the batch, or fed)
    labels: tf.Tensor             # their class ids (the batch, or fed)
    keep_prob: tf.Tensor
    lr: tf.Tensor
    logits: tf.Tensor             # [N, H, W, C]
    loss: tf.Tensor               # total, with the L2 terms
    data_loss: tf.Tensor          # pixel (+ Dice) loss, without the L2 terms
    train_op: tf.Operation
    raw: tf.Tensor                # validation: uint8 images of any size ...
    resized: tf.Tensor            # ... resized as every inference path does,
    out_size: tf.Tensor           # the size to upsample to,
    classes: tf.Tensor            # and the class maps at that size
    progress: tuple               # progress_variables(): (variables, feeds, assign)


def _reinitialize(sess, cfg, vgg_variables, log=None):
    """``--reinit``: new random weights for those VGG16 layers (a resumed run's checkpoint
    then restores its own); say which, and how the encoder learns when not at ``lr``."""
    log = channel(log)
    if cfg.reinit:
        names = vgg.reinitialize(sess, vgg_variables, cfg.reinit, cfg.seed)
        log(f"re-initialised randomly (He-normal, zero biases, seed {cfg.seed}): {', '.join(names)}")
    if cfg.encoder_lr_scale != 1:
        learns = ("frozen (no gradients)" if cfg.encoder_lr_scale == 0 else
                  f"at lr x {cfg.encoder_lr_scale:g}")
        log(f"VGG16's pretrained conv layers {learns}; fc6/fc7, re-initialised layers and the "
            f"decoder at lr")


def build_training_graph(sess, cfg, samples, vgg_path, dist=None, cache_dir=None, log=None):
    """Build the training graph of ``cfg`` in ``sess.graph``: ``model.training_step`` on one
    device, or replicated by ``dist.strategy`` (``roadseg.distribute``) with one more tower
    for validation.  VGG16's weights are restored, every variable added on top is
    initialised.  ``cache_dir``: where a file cache may go (``--cache``)."""
    vgg_info = vgg.read_vgg_info(vgg_path)
    spec = model.ModelSpec.from_config(cfg.replace(vgg=vgg_path), vgg_info)
    tf1.set_random_seed(cfg.seed)
    epoch = tf1.placeholder_with_default(tf.constant(0, tf.int64), [], name="epoch")
    skip = tf1.placeholder_with_default(tf.constant(0, tf.int64), [], name="skip_batches")
    step_bytes = estimate_training_memory(cfg.image_shape, cfg.batch_size, vgg_info.get("width", 1.0))
    cache = input_pipeline.choose_cache(cfg.cache, samples, cfg.image_shape, cache_dir, step_bytes)
    ds = input_pipeline.make_dataset(samples, get_scheme(cfg.scheme), cfg.image_shape, cfg.batch_size,
                                     shuffle=True, augment=cfg.augment, seed=epoch * 1000003 + cfg.seed,
                                     cache=cache, skip_bad=cfg.skip_bad)
    iterator = tf1.data.make_initializable_iterator(ds.skip(skip))
    x, y = iterator.get_next()
    images = tf1.placeholder_with_default(x, [None, None, None, 3], name="image_feed")
    labels = tf1.placeholder_with_default(y, [None, None, None], name="label_feed")
    keep_prob = tf1.placeholder_with_default(1.0, [], name="keep_prob_feed")
    lr = tf1.placeholder(tf.float32, [], name="learning_rate")
    strategy = dist.strategy if dist else None
    with strategy.scope() if strategy else contextlib.nullcontext():
        if strategy:
            vgg16 = distribute.MirroredVGG(strategy, vgg_path)
            encoder = vgg16.apply
        else:
            encoder = model.SavedModelEncoder(sess, vgg_path)
        progress = progress_variables()
        step = model.training_step(spec, images, labels, keep_prob, lr, progress[0]["step"], encoder,
                                   model.LossOptions.from_config(cfg),
                                   precision.needs_loss_scaling(cfg.precision), strategy,
                                   model.EncoderOptions.from_config(cfg))
        logits = step.logits
        if strategy:   # validation: one more tower on the first replica's copy of the weights
            with tf.device(distribute.eval_device(strategy)), \
                    tf1.variable_scope(tf1.get_variable_scope(), reuse=True):
                logits = model.network(spec, images, keep_prob, encoder)
    raw = tf1.placeholder(tf.uint8, [None, None, None, 3], name="raw_images")
    out_size = tf1.placeholder_with_default(tf.shape(logits)[1:3], [2], name="out_size")
    classes, _ = inference.segmentation_head(logits, out_size)
    if strategy is None:
        fcn.initialize_new_variables(sess, encoder.variables)
    else:
        sess.run([tf1.global_variables_initializer(), tf1.local_variables_initializer()])
        vgg16.restore(sess)
    _reinitialize(sess, cfg, (vgg16 if strategy else encoder).variables, log)
    return TrainingGraph(iterator.initializer, epoch, skip, images, labels, keep_prob, lr, logits,
                         step.loss, step.data_loss, step.train_op, raw,
                         inference.resize_to_network(raw, cfg.image_shape), out_size, classes, progress)


# ============================================================================ the run
def train(data_dir=None, vgg_path=None, runs_dir="runs", run=None, resume=False, log=None,
          recipe=None, **options):
    """Train FCN-8s on ``data_dir`` from the VGG16 SavedModel at ``vgg_path``.

    ``options`` are ``TrainConfig`` fields; ``recipe`` a config file they override.
    Returns a dict with ``run_dir``, ``status`` ('finished' or 'interrupted: SIGINT'...),
    ``history``, ``best_miou``, ``steps`` and ``worker`` (0: the chief, or the only process).
    """
    log = channel(log)
    given = {**options, **{k: v for k, v in (("data", data_dir), ("vgg", vgg_path)) if v is not None}}
    cfg, run_dir, spec = resolve_config(given, recipe, runs_dir, run, resume)
    check_training_memory(cfg.image_shape, cfg.batch_size, spec.vgg_info.get("width", 1.0), log)
    samples, cfg = prepare_samples(cfg, log)
    dist = distribute.Distribution(cfg)   # TF_CONFIG is checked before any folder is made
    if dist.workers > 1 and run is None:
        raise UserError("--workers needs --run NAME (the same on every host): the chief writes "
                        "runs/NAME, the others read it on --resume")
    run_dir = run_dir or (_new_run_dir(runs_dir, run) if dist.is_chief else os.path.join(runs_dir, run))
    cache_dir = os.path.join(run_dir, "cache" if dist.is_chief else f"cache-{dist.worker}")
    with _run_folder(run_dir, not resume, dist.is_chief):
        if dist.is_chief:
            ran = {"precision_used": precision.computed(cfg.precision)}   # what auto / bf16 ran
            run_folders.write_json(os.path.join(run_dir, run_folders.RUN_CONFIG),
                                   spec.run_config({**cfg.to_dict(), **ran}))
        spe = math.ceil(len(samples.train) / cfg.batch_size)
        log(f"run {run_dir}: {samples.layout} data, {len(samples.train)} train / "
            f"{len(samples.val)} val images, scheme {cfg.scheme}, {cfg.image_shape[0]}x"
            f"{cfg.image_shape[1]}, {cfg.epochs} epochs of {spe} steps")
        graph = tf.Graph()
        with graph.as_default(), dist.start().session(graph, cfg.precision, log) as sess, \
                _StopFlag() as stop:
            if dist.strategy:
                log(f"training on {dist.describe()}")
            g = build_training_graph(sess, cfg, samples.train, cfg.vgg, dist, cache_dir, log)
            ckpt = Checkpointer(sess, run_dir, inference.model_variables(), g.progress,
                                cfg.keep_checkpoints, cfg.lr, log, writes=dist.is_chief)
            with distribute.one_line_errors(dist, ckpt):
                progress, restored = ckpt.restore() if resume else (Progress(), None)
                if restored:
                    log(f"resumed from {restored} (epoch {progress.epochs_done + 1}, "
                        f"step {progress.step})")
                if dist.workers > 1:
                    distribute.check_agreement(sess, dist, g, len(samples.train), run_dir,
                                               agreed_options(cfg, spec))
                history = _epochs(run_dir, cfg, samples, sess, g, ckpt, progress, stop, spe, log,
                                  dist.is_chief)
    if not stop.signal:   # an interrupted run keeps its cache for --resume
        input_pipeline.release_cache(cache_dir, log)
    log(f"run folder {run_dir}: {input_pipeline.folder_bytes(run_dir) / 1e9:.2f} GB on disk")
    status = f"interrupted: {stop.signal}" if stop.signal else "finished"
    return dict(run_dir=run_dir, status=status, history=history, best_miou=progress.best_miou,
                steps=progress.step, worker=dist.worker)


def _epochs(run_dir, cfg, samples, sess, g, ckpt, progress, stop, spe, log, chief=True):
    """Finish a pending epoch's bookkeeping, then train the remaining epochs.  Only the
    chief (worker 0, or the only process) validates and writes history and TensorBoard."""
    history = [h for h in _read_history(run_dir) if h["epoch"] <= progress.epochs_done] if chief else []
    writer = tf1.summary.FileWriter(os.path.join(run_dir, "tb")) if chief else _NoWriter()
    try:
        if chief and progress.epochs_done and progress.epoch_step == 0 and (
                not history or history[-1]["epoch"] < progress.epochs_done):
            log(f"epoch {progress.epochs_done} ended before its validation was recorded: "
                f"recording it now")
            close_epoch(run_dir, cfg, samples.val, sess, g, ckpt, progress, history, writer, log)
        if progress.epochs_done >= cfg.epochs:
            log(f"{run_dir} has {progress.epochs_done} epochs already; pass a larger --epochs "
                f"to train on")
        while progress.epochs_done < cfg.epochs and not stop.signal:
            if train_one_epoch(sess, g, ckpt, cfg, progress, stop, spe, writer) and chief:
                close_epoch(run_dir, cfg, samples.val, sess, g, ckpt, progress, history, writer, log)
        if stop.signal:   # whenever it came: mid-epoch, at an epoch's end, in validation
            ckpt.save_for_resume(progress)
            log(f"{stop.signal} received: checkpoint saved at step {progress.step}; "
                f"resume with --resume")
    finally:
        writer.close()
    return history


def learning_rate(step, total_steps, base, schedule="constant", warmup_steps=0):
    """Learning rate at ``step``: linear warm-up, then constant, poly (power 0.9) or cosine."""
    if warmup_steps and step < warmup_steps:
        return base * (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "poly":
        return base * (1 - t) ** 0.9
    if schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * t))
    return base


def train_one_epoch(sess, g, ckpt, cfg, progress, stop, spe, writer):
    """Train the rest of epoch ``progress.epochs_done``; checkpoints at its end.  Returns
    True when the epoch is complete, False when SIGINT/SIGTERM stopped it before its last
    step (the caller saves).  A signal during the last step leaves a complete epoch."""
    epoch = progress.epochs_done
    progress.start_epoch()
    sess.run(g.data_init, {g.skip: progress.epoch_step, g.epoch: epoch})
    total, warmup = spe * cfg.epochs, int(cfg.warmup_epochs * spe)
    start = time.time() - progress.seconds
    with tqdm(total=spe, initial=progress.epoch_step, unit="step",
              desc=f"epoch {epoch + 1}/{cfg.epochs}") as bar:
        # Exactly the epoch's steps: a run that ends in OutOfRangeError would make every
        # worker of a multi-worker run re-fetch its collective step ids, a race.
        while not stop.signal and progress.epoch_step < spe:
            rate = learning_rate(progress.step, total, cfg.lr, cfg.lr_schedule, warmup)
            try:
                _, value, data_value = sess.run([g.train_op, g.loss, g.data_loss],
                                                {g.keep_prob: cfg.keep_prob, g.lr: rate})
            except tf.errors.OutOfRangeError:
                break
            except tf.errors.OpError as err:  # e.g. a file the pipeline cannot read
                raise _user_error(err) from None
            if not np.isfinite(value):
                raise ckpt.stopped(f"loss became {value} at step {progress.step + 1}", epoch)
            progress.add_step(value, data_value)
            progress.seconds = time.time() - start
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{rate:.2e}")
            if progress.step % 10 == 0:
                _summary(writer, progress.step, loss=value, data_loss=data_value, learning_rate=rate)
            if cfg.checkpoint_every and progress.step % cfg.checkpoint_every == 0:
                ckpt.save(progress)
    if stop.signal and progress.epoch_step < spe:   # stopped before its last step
        return False
    progress.end_epoch()
    ckpt.save(progress)
    return True


def close_epoch(run_dir, cfg, val_samples, sess, g, ckpt, progress, history, writer, log):
    """Record the epoch just finished: validation (when due), the best checkpoint, history."""
    epoch = progress.epochs_done
    n = max(1, progress.loss_count)
    record = dict(epoch=epoch, step=progress.step, loss=progress.loss_sum / n,
                  pixel_loss=progress.data_loss_sum / n, seconds=round(progress.seconds, 2))
    if val_samples and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
        result = validate(sess, g, val_samples[:cfg.max_eval_images], cfg.scheme)
        record["miou"] = float(result["mean_iou"])
        record["iou"] = dict(zip(get_scheme(cfg.scheme).class_names, map(_num, result["iou"])))
        _summary(writer, progress.step, miou=result["mean_iou"],
                 pixel_accuracy=result["pixel_accuracy"])
        if result["mean_iou"] > progress.best_miou:
            progress.best_miou = float(result["mean_iou"])
            ckpt.save(progress, best=True)
    history.append(record)
    run_folders.write_json(os.path.join(run_dir, "history.json"), history)
    log(f"epoch {epoch}/{cfg.epochs}: mean loss {record['loss']:.4f}"
        + (f", val mIoU {record['miou']:.3f}" if "miou" in record else "")
        + f" ({record['seconds']:.0f}s)")


def validate(sess, g, samples, scheme_name):
    """``metrics.evaluate`` of the current weights: images resized and class maps upsampled
    exactly as ``inference.build_inference`` does."""
    def predict_fn(images):
        small = sess.run(g.resized, {g.raw: images})
        return sess.run(g.classes, {g.images: small, g.out_size: images.shape[1:3]})

    return metrics.evaluate(predict_fn, samples, get_scheme(scheme_name), progress=False)


# ============================================================================ helpers
class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps (main thread only)."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no handlers, Ctrl-C is the caller's
            pass
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _NoWriter:
    """The TensorBoard writer of a worker that is not the chief: writes nothing."""

    def add_summary(self, *args):
        pass

    def close(self):
        pass


@contextlib.contextmanager
def _run_folder(run_dir, new_run, chief):
    """The chief (or the only process) owns the run folder: locked while it trains, removed
    when an error comes before its first checkpoint.  Other workers only read it."""
    if not chief:
        yield
        return
    with _remove_if_unsaved(run_dir, new_run), run_folders.run_lock(run_dir):
        yield


@contextlib.contextmanager
def _remove_if_unsaved(run_dir, new_run):
    """On an error, remove a new run folder that has no checkpoint yet: nothing half-way."""
    try:
        yield
    except BaseException:
        if new_run and not find_checkpoints(os.path.join(run_dir, "checkpoints"), lambda *a: None):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _new_run_dir(runs_dir, run):
    if run is not None:
        run_folders.refuse_existing(os.path.join(runs_dir, run), "pass --resume to continue it or "
                                    "choose another --run name", kind="run folder")
    return run_folders.new_run_dir(runs_dir, run)


def _user_error(err):
    """The ``UserError`` a tf error carries when the pipeline failed on a file, else ``err``."""
    found = re.search(r"UserError:\s*(.*)", err.message or "")
    return UserError(found.group(1)) if found else err


def _summary(writer, step, **scalars):
    writer.add_summary(tf1.Summary(value=[tf1.Summary.Value(tag=k, simple_value=float(v))
                                          for k, v in scalars.items()]), step)


def _num(v):
    return None if v is None or not np.isfinite(v) else float(v)


def _read_history(run_dir):
    path = os.path.join(run_dir, "history.json")
    if not os.path.isfile(path):
        return []
    fix = "restore it or move it away (the checkpoints do not need it)"
    history = run_folders.read_json(path, fix, kind=list)
    if not all(isinstance(h, dict) and isinstance(h.get("epoch"), int) for h in history):
        raise UserError(f"{path} is damaged: every entry must be an object with an 'epoch'; {fix}")
    return history
