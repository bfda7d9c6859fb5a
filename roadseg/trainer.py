"""The training driver behind ``segment.py train`` and the notebook.

A run lives in ``runs/<name>/``: ``config.json`` (everything needed to rebuild the model),
``checkpoints/`` (latest few, with optimizer state and step/epoch counters), ``best/`` (best
validation mIoU), ``history.json`` (loss and mIoU per epoch) and ``tb/`` (TensorBoard).

The graph reads batches straight from ``tf.data`` (no ``feed_dict`` on the hot path);
placeholders with defaults let evaluation feed its own images through the same weights.
Checkpoints are written by ``tf.train.Saver``, whose ``checkpoint`` index file is
replaced atomically only after the data files are complete, so a crash while saving
leaves the previous checkpoint usable (and ``--resume`` falls back to an older checkpoint
when the newest cannot be read).  SIGINT/SIGTERM finish the current step, save, and
return (the CLI then exits with code 130); a NaN/Inf loss stops with a clear message, and
only finite weights are ever saved.  Before anything is allocated, the memory a
training step needs is estimated and a run that cannot fit is refused.  A new run that
fails before its first checkpoint leaves no run folder behind.
"""
import contextlib
import json
import math
import os
import re
import shutil
import signal
import time

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from roadseg import datasets, fcn, inference, input_pipeline, metrics, run_folders, vgg
from roadseg.errors import UserError
from roadseg.schemes import get_scheme
from roadseg.vgg import POOL_AFTER, VGG16_LAYERS

tf1 = tf.compat.v1

DEFAULTS = dict(
    scheme="road4", image_shape=[256, 512], epochs=10, batch_size=4, lr=1e-4, keep_prob=0.5,
    lr_schedule="constant", warmup_epochs=0.0, class_weights=False, augment=True, seed=0,
    skip_scales=[0.01, 0.0001], l2_scale=1e-3, checkpoint_every=0, keep_checkpoints=3,
    eval_every=1, max_eval_images=None, cache=True, val_split=None,
    loss="ce", focal_gamma=2.0, ohem_fraction=0.25, dice_weight=0.0, skip_bad=False,
)
# Options that must match when a run is resumed: the weights would not fit otherwise.
MUST_MATCH = ("scheme", "image_shape", "vgg_info", "skip_scales")


def learning_rate(step, total_steps, base, schedule="constant", warmup_steps=0):
    """Learning rate at ``step``: linear warm-up, then constant, poly (power 0.9) or cosine."""
    if warmup_steps and step < warmup_steps:
        return base * (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "poly":
        return base * (1 - t) ** 0.9
    if schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "constant":
        return base
    raise UserError(f"unknown learning-rate schedule '{schedule}'; use constant, poly or cosine")


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


# Peak memory of TensorFlow itself with this graph (measured: about 0.7 GB resident).
FRAMEWORK_BYTES = 0.7e9


def estimate_training_memory(image_shape, batch_size, width=1.0):
    """Rough peak bytes of one training step on VGG16 of channel ``width``.

    Activations: every VGG16 layer output (and pool output) per input pixel, kept for the
    backward pass and matched by a gradient (x2, float32); weights: values, gradients and
    two Adam moments (x4, float32); plus ``FRAMEWORK_BYTES``.  Measured peak resident
    memory at 256x512, batch 4: 1.13 GB at width 1/4 and 4.01 GB at width 1; this gives
    1.2 GB and 4.1 GB.
    """
    per_pixel, scale, params, c_in = 0.0, 1, 0, 3
    for name, _, channels, k in VGG16_LAYERS:
        c = max(1, round(channels * width))
        per_pixel += c / scale ** 2
        if name in POOL_AFTER:
            scale *= 2
            per_pixel += c / scale ** 2
        params += k * k * c_in * c + c
        c_in = c
    pixels = int(image_shape[0]) * int(image_shape[1]) * int(batch_size)
    return int(2 * 4 * per_pixel * pixels + 4 * 4 * params + FRAMEWORK_BYTES)


def available_memory():
    """Bytes of memory available to a new allocation (Linux MemAvailable, else free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _check_memory(cfg, log):
    """Refuse a run whose estimated memory exceeds what is available; warn above half."""
    h, w = cfg["image_shape"]
    need = estimate_training_memory((h, w), cfg["batch_size"], cfg["vgg_info"].get("width", 1.0))
    have = available_memory()
    what = f"training at {h}x{w} with batch {cfg['batch_size']} needs about {need / 1e9:.1f} GB"
    if need > have:
        raise UserError(f"{what} of memory (estimate) but only {have / 1e9:.1f} GB is available; "
                        f"use a smaller --image-shape or --batch-size (or a narrower VGG)")
    if need > have / 2:
        log(f"warning: {what} of the {have / 1e9:.1f} GB available; other programs may run short")


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


def _user_error(err):
    """The ``UserError`` a tf error carries when the pipeline failed on a file, else ``err``."""
    found = re.search(r"UserError:\s*(.*)", err.message or "")
    return UserError(found.group(1)) if found else err


def _reason(err):
    """The line of an error message that says what went wrong (tf errors have many)."""
    text = getattr(err, "message", None) or str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip() and
             not line[:1].isspace() and not line.startswith(("[[", "Node:"))]
    return lines[-1] if lines else type(err).__name__


def _restore(sess, saver, ckpt_dir, log):
    """Restore the newest readable checkpoint in ``ckpt_dir`` (older ones if it is damaged).

    Returns its path, or None when there is no checkpoint yet.  The saver keeps managing
    the older checkpoints (``max_to_keep``) as if it had written them.
    """
    state = tf1.train.get_checkpoint_state(ckpt_dir)
    paths = list(state.all_model_checkpoint_paths) if state else []
    for i in range(len(paths) - 1, -1, -1):
        try:
            saver.restore(sess, paths[i])
        except (tf.errors.OpError, ValueError) as err:
            log(f"warning: checkpoint {paths[i]} is unreadable ({_reason(err)}); "
                f"trying the one before")
            continue
        saver.recover_last_checkpoints(paths[:i + 1])
        return paths[i]
    if paths:
        raise UserError(f"no readable checkpoint in {ckpt_dir} (tried {len(paths)}); "
                        f"start a new --run")
    return None


@contextlib.contextmanager
def _remove_if_unsaved(run_dir, new_run):
    """On an error, remove a new run folder that has no checkpoint yet: nothing half-way."""
    try:
        yield
    except Exception:
        if new_run and not tf1.train.latest_checkpoint(os.path.join(run_dir, "checkpoints")):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _resume_dir(runs_dir, run):
    """The run folder to resume: ``runs_dir/run``, or the most recent run in ``runs_dir``."""
    if run is not None:
        return os.path.join(runs_dir, run)
    runs = [os.path.join(runs_dir, d) for d in os.listdir(runs_dir)] if os.path.isdir(runs_dir) else []
    runs = [d for d in runs if os.path.isfile(os.path.join(d, run_folders.RUN_CONFIG))]
    if not runs:
        raise UserError(f"--resume: no run to resume in {runs_dir}; start one without --resume")
    return max(runs, key=os.path.getmtime)


def _check_resumable(run_dir, old, config):
    for key in MUST_MATCH:
        if json.dumps(old.get(key)) != json.dumps(config.get(key)):
            was, now = (_setting(key, c.get(key)) for c in (old, config))
            raise UserError(f"cannot resume {run_dir}: it was trained with {key}={was}, "
                            f"now {key}={now}; use the same setting or start a new --run")


def _setting(key, value):
    """A setting as the user knows it (a VGG16 by source, width and seed)."""
    if key == "vgg_info":
        return ("/".join(f"{k} {value[k]:g}" if isinstance(value[k], float) else f"{k} {value[k]}"
                         for k in ("source", "width", "seed") if k in value) or "course VGG16")
    return value


def _new_run_dir(runs_dir, run):
    if run is not None and os.path.exists(os.path.join(runs_dir, run)):
        raise UserError(f"run folder {os.path.join(runs_dir, run)} already exists; pass --resume to "
                        f"continue it or choose another --run name (nothing is overwritten)")
    return run_folders.new_run_dir(runs_dir, run)


def _splits(data_dir, val_split, log=print):
    """(dataset, train samples, validation samples).

    ``val_split``: None -> the 'val' split if the dataset has one, else a whole sequence of
    the training frames held out (``datasets.hold_out_sequence``), else every 10th training
    image; never the test split (choosing the best checkpoint on it would leak).
    'none' -> no validation; 'every-10th' -> every 10th training image; 'sequence:NAME'
    -> the training frames of sequence NAME; any other name -> that split.
    """
    ds = datasets.find_dataset(data_dir)
    train = [s for s in ds.splits.get("train", []) if s.label]
    if not train:
        raise UserError(f"{data_dir} ({ds.layout} layout) has no labelled 'train' split; "
                        f"found splits: {', '.join(ds.splits) or 'none'}")
    if val_split == "none":
        return ds, train, []
    if val_split is None and "val" not in ds.splits:
        held = datasets.hold_out_sequence(train)
        val_split = f"sequence:{held}" if held else "every-10th"
    if val_split == "every-10th":
        val, train = train[::10], [s for i, s in enumerate(train) if i % 10]
        log(f"validation: every 10th training image of {data_dir} ({len(val)})")
        return ds, train, val
    if val_split and val_split.startswith("sequence:"):
        names = set(val_split.split(":", 1)[1].split(","))
        val = [s for s in train if datasets.sequence_name(s) in names]
        train = [s for s in train if datasets.sequence_name(s) not in names]
        if not val or not train:
            known = sorted({datasets.sequence_name(s) for s in val + train})
            raise UserError(f"--val-split {val_split}: {'no' if not val else 'every'} training "
                            f"frame is in that sequence; sequences of {data_dir}: {', '.join(known)}")
        log(f"validation: the whole sequence {', '.join(sorted(names))} held out "
            f"({len(val)} frames; {len(train)} left to train on)")
        return ds, train, val
    name = val_split or "val"
    if name not in ds.splits:
        raise UserError(f"{data_dir} has no '{name}' split for validation (it has "
                        f"{', '.join(ds.splits)}); pass --val-split")
    val = [s for s in ds.splits[name] if s.label]
    if not val:
        raise UserError(f"split '{name}' of {data_dir} has no labels; pass another --val-split")
    return ds, train, val


def _summary(writer, step, **scalars):
    writer.add_summary(tf1.Summary(value=[tf1.Summary.Value(tag=k, simple_value=float(v))
                                          for k, v in scalars.items()]), step)


def train(data_dir, vgg_path, runs_dir="runs", run=None, resume=False, log=print, **options):
    """Train FCN-8s on ``data_dir`` from the VGG16 SavedModel at ``vgg_path``.

    Options (see ``DEFAULTS``) are stored in the run's ``config.json``.  Returns a dict with
    ``run_dir``, ``status`` ('finished' or 'interrupted: SIGINT'...), ``history``.
    """

    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown training options: {sorted(unknown)}")
    # A resumed run keeps its own settings; options passed now override them.
    run_dir = _resume_dir(runs_dir, run) if resume else None
    old = run_folders.read_run_config(run_dir) if resume else {}
    cfg = {**DEFAULTS, **{k: v for k, v in old.items() if k in DEFAULTS}, **options}
    cfg["image_shape"] = list(fcn.check_image_shape(cfg["image_shape"]))
    scheme = get_scheme(cfg["scheme"])
    vgg.check_vgg_dir(vgg_path)
    cfg["vgg"] = os.path.abspath(vgg_path)
    cfg["vgg_info"] = vgg.read_vgg_info(vgg_path)
    cfg["data"] = os.path.abspath(data_dir)
    _check_memory(cfg, log)
    dataset, train_samples, val_samples = _splits(data_dir, cfg["val_split"], log)
    if cfg["skip_bad"]:
        train_samples = _usable_samples(train_samples, scheme, "train", log)
        val_samples = _usable_samples(val_samples, scheme, "validation", log)
    if cfg["class_weights"] is True:
        counts = datasets.class_pixel_counts(train_samples, scheme)
        cfg["class_weights"] = [float(w) for w in datasets.median_frequency_weights(counts)]
        log("class weights (median frequency): " + ", ".join(
            f"{n} {w:.2f}" for n, w in zip(scheme.class_names, cfg["class_weights"])))
    if resume:
        _check_resumable(run_dir, old, cfg)
    else:
        run_dir = _new_run_dir(runs_dir, run)
    run_folders.write_json(os.path.join(run_dir, run_folders.RUN_CONFIG), cfg)
    weights = cfg["class_weights"] or None
    batch, shape = cfg["batch_size"], cfg["image_shape"]
    steps_per_epoch = math.ceil(len(train_samples) / batch)
    total_steps = steps_per_epoch * cfg["epochs"]
    log(f"run {run_dir}: {dataset.layout} data, {len(train_samples)} train / {len(val_samples)} val "
        f"images, scheme {scheme.name}, {shape[0]}x{shape[1]}, {cfg['epochs']} epochs of "
        f"{steps_per_epoch} steps")

    graph = tf.Graph()
    with _remove_if_unsaved(run_dir, not resume), graph.as_default(), \
            tf1.Session(graph=graph) as sess, _StopFlag() as stop:
        tf1.set_random_seed(cfg["seed"])
        # The epoch number is part of the data seed, so every epoch has its own order and
        # augmentation, identical in a resumed process: resume skips exactly the batches done.
        epoch_ph = tf1.placeholder_with_default(tf.constant(0, tf.int64), [], name="epoch")
        ds = input_pipeline.make_dataset(train_samples, scheme, shape, batch, shuffle=True,
                                   augment=cfg["augment"], seed=epoch_ph * 1000003 + cfg["seed"],
                                   cache=cfg["cache"] or None, skip_bad=cfg["skip_bad"])
        skip = tf1.placeholder_with_default(tf.constant(0, tf.int64), [], name="skip_batches")
        iterator = tf1.data.make_initializable_iterator(ds.skip(skip))
        x, y = iterator.get_next()
        image_input = tf1.placeholder_with_default(x, [None, None, None, 3], name="image_feed")
        label_input = tf1.placeholder_with_default(y, [None, None, None], name="label_feed")
        keep_prob = tf1.placeholder_with_default(1.0, [], name="keep_prob_feed")
        lr = tf1.placeholder(tf.float32, [], name="learning_rate")
        _, _, l3, l4, l7 = fcn.load_vgg(sess, vgg_path, input_map={
            "image_input:0": image_input, "keep_prob:0": keep_prob})
        loaded = set(tf1.global_variables())
        logits = fcn.layers(l3, l4, l7, scheme.num_classes, **inference.decoder_kwargs(cfg))
        with tf1.variable_scope("train_state"):
            step_var = tf1.get_variable("step", [], tf.int64, tf1.zeros_initializer(), trainable=False)
            best_var = tf1.get_variable("best_miou", [], tf.float32,
                                        tf1.constant_initializer(-1.0), trainable=False)
        loss_options = {k: cfg[k] for k in ("loss", "focal_gamma", "ohem_fraction", "dice_weight")}
        _, train_op, loss = fcn.optimize(logits, label_input, lr, scheme.num_classes, weights,
                                         global_step=step_var, **loss_options)
        # the data loss for the logs (pixel + Dice terms): the total minus the L2 terms, not
        # computed twice
        data_loss = loss - tf.add_n(tf1.get_collection(tf1.GraphKeys.REGULARIZATION_LOSSES) or [0.0])
        out_size = tf1.placeholder_with_default(tf.shape(logits)[1:3], [2], name="out_size")
        classes, _ = inference.segmentation_head(logits, out_size)
        raw = tf1.placeholder(tf.uint8, [None, None, None, 3], name="raw_images")
        resized = tf.image.resize(tf.cast(raw, tf.float32), shape)
        new_best = tf1.placeholder(tf.float32, [])
        set_best = best_var.assign(new_best)
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in tf1.trainable_variables()])

        sess.run(tf1.variables_initializer([v for v in tf1.global_variables() if v not in loaded]))
        # Relative paths in the ``checkpoint`` index: a run folder can be moved or copied.
        saver = tf1.train.Saver(max_to_keep=cfg["keep_checkpoints"], save_relative_paths=True)
        best_saver = tf1.train.Saver(inference.model_variables() + [best_var], max_to_keep=1,
                                     save_relative_paths=True)
        ckpt_prefix = os.path.join(run_dir, "checkpoints", "model.ckpt")
        restored = _restore(sess, saver, os.path.dirname(ckpt_prefix), log) if resume else None
        if restored:
            log(f"resumed from {restored}")
        step, best = sess.run([step_var, best_var])
        step, best = int(step), float(best)
        writer = tf1.summary.FileWriter(os.path.join(run_dir, "tb"))
        # epochs after the restored checkpoint (if an unreadable newest one was skipped) go
        start_epoch = step // steps_per_epoch
        history = [h for h in _read_history(run_dir) if h["epoch"] <= start_epoch]

        def predict_fn(images):
            small = sess.run(resized, {raw: images})
            return sess.run(classes, {image_input: small, out_size: images.shape[1:3]})

        def stopped(problem):
            """The UserError for a NaN/Inf: nothing more is saved."""
            bar.close()  # the error line goes below the progress bar, not onto it
            kept = tf1.train.latest_checkpoint(os.path.dirname(ckpt_prefix))
            kept = kept or ("none yet" if resume else "none yet, so the new run folder is removed")
            return UserError(f"{problem} (epoch {epoch + 1}); training stopped, last good checkpoint "
                             f"kept: {kept}; try a lower --lr (now {cfg['lr']})")

        def save(which=saver, prefix=ckpt_prefix):
            """Save a checkpoint of finite weights; a failed write is a UserError."""
            if not sess.run(finite):
                raise stopped(f"weights became NaN or Inf at step {step}")
            try:
                which.save(sess, prefix, global_step=step)
            except (OSError, tf.errors.OpError) as err:
                bar.close()
                kept = tf1.train.latest_checkpoint(os.path.dirname(prefix))
                raise UserError(f"could not write checkpoint {prefix}-{step} ({_reason(err)}); "
                                f"free disk space or fix permissions, then continue with --resume: "
                                f"{kept or 'no earlier checkpoint'} is kept") from None

        status = "finished"
        for epoch in range(start_epoch, cfg["epochs"]):
            done = step - epoch * steps_per_epoch
            sess.run(iterator.initializer, {skip: done, epoch_ph: epoch})
            losses, data_losses = [], []
            bar = tqdm(total=steps_per_epoch, initial=done, desc=f"epoch {epoch + 1}/{cfg['epochs']}",
                       unit="step")
            t0 = time.time()
            while True:
                rate = learning_rate(step, total_steps, cfg["lr"], cfg["lr_schedule"],
                                     int(cfg["warmup_epochs"] * steps_per_epoch))
                try:
                    _, value, dvalue = sess.run([train_op, loss, data_loss],
                                                {keep_prob: cfg["keep_prob"], lr: rate})
                except tf.errors.OutOfRangeError:
                    break
                except tf.errors.OpError as err:  # e.g. a file the pipeline cannot read
                    bar.close()
                    raise _user_error(err) from None
                if not np.isfinite(value):
                    raise stopped(f"loss became {value} at step {step + 1}")
                step += 1
                losses.append(value)
                data_losses.append(dvalue)
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{rate:.2e}")
                if step % 10 == 0:
                    _summary(writer, step, loss=value, pixel_loss=dvalue, learning_rate=rate)
                if cfg["checkpoint_every"] and step % cfg["checkpoint_every"] == 0:
                    save()
                if stop.signal:
                    break
            bar.close()
            save()
            if stop.signal:
                status = f"interrupted: {stop.signal}"
                log(f"{stop.signal} received: checkpoint saved at step {step}; resume with --resume")
                break
            record = dict(epoch=epoch + 1, step=step, loss=float(np.mean(losses)) if losses else None,
                          pixel_loss=float(np.mean(data_losses)) if data_losses else None,
                          seconds=round(time.time() - t0, 2))
            if val_samples and cfg["eval_every"] and ((epoch + 1) % cfg["eval_every"] == 0
                                                      or epoch + 1 == cfg["epochs"]):
                subset = val_samples[:cfg["max_eval_images"]] if cfg["max_eval_images"] else val_samples
                result = metrics.evaluate(predict_fn, subset, scheme, progress=False)
                record["miou"] = float(result["mean_iou"])
                record["iou"] = dict(zip(scheme.class_names, map(_num, result["iou"])))
                _summary(writer, step, miou=result["mean_iou"], pixel_accuracy=result["pixel_accuracy"])
                if result["mean_iou"] > best:
                    best = float(result["mean_iou"])
                    sess.run(set_best, {new_best: best})
                    save(best_saver, os.path.join(run_dir, "best", "model.ckpt"))
                    save()  # keep best_miou in the latest too
            history.append(record)
            _write_history(run_dir, history)
            log(f"epoch {epoch + 1}/{cfg['epochs']}: mean loss {record['loss']:.4f}"
                + (f", val mIoU {record['miou']:.3f}" if "miou" in record else "")
                + f" ({record['seconds']:.0f}s)")
        writer.close()
    return dict(run_dir=run_dir, status=status, history=history, best_miou=best, steps=step)


def _num(v):
    return None if v is None or not np.isfinite(v) else float(v)


def _read_history(run_dir):
    path = os.path.join(run_dir, "history.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return []


def _write_history(run_dir, history):
    run_folders.write_json(os.path.join(run_dir, "history.json"), history)
