"""The tf.data input pipeline: files -> decoded, resized, augmented batches.

``make_dataset(samples, scheme, image_shape, batch_size)`` gives a
``tf.data.Dataset`` of ``(images, labels)``: float32 ``[B, H, W, 3]`` RGB in 0..255
and int32 ``[B, H, W]`` classes with ``schemes.IGNORE`` (255) for pixels that count
nowhere.  The steps, in order::

    [shuffle file order] -> decode + map labels to classes at full resolution
    (datasets.load_pair, in parallel) -> resize (image bilinear, label NEAREST)
    -> [cache -> shuffle decoded samples] -> [repeat] -> [augment] -> batch -> prefetch

(without a cache the file order is shuffled; with one, the decoded samples are,
as the cache replays the first epoch's order).

Where decoded samples are kept is ``choose_cache``'s decision (training's ``--cache``):
in memory when their estimated size (``decoded_bytes``) is a small share of the memory
available, else in a file cache under the run folder (read back through the OS page
cache, which the kernel can evict, so a Cityscapes-size set never meets the OOM killer),
else -- no disk space for it -- not at all; a log line says which and why.  A file cache
holds the samples in one fixed pseudo-random order (``_permuted``: the same in every
process, so ``--resume`` replays the same batches) and is shuffled after it in a buffer
bounded in bytes (``SHUFFLE_BYTES``), so memory does not grow with the dataset.

Decoding goes through ``datasets.load_pair`` (a ``tf.numpy_function``), so the
pipeline applies exactly the same conversions and checks as ``check-data``; PIL
releases the GIL while decoding, so parallel calls do help.  Labels are never
interpolated: resizing them uses nearest neighbour, and augmentation pads them
with IGNORE.  Random choices come from stateless ops seeded per element by a
``Dataset.random`` stream, so the same ``seed`` gives the same batches.

``numpy_batches(ds)`` iterates a dataset as numpy arrays (eagerly or in graph
mode) and turns errors raised while decoding back into ``UserError``.
"""
import glob
import hashlib
import os
import re
import shutil
import time

import numpy as np
import tensorflow as tf

from roadseg import datasets, fcn, inference, memory, run_folders
from roadseg.config import CACHE_MODES
from roadseg.errors import UserError
from roadseg.log import logger
from roadseg.schemes import IGNORE

SHUFFLE_BUFFER = 1024       # decoded samples held for shuffling a cached dataset
SHUFFLE_BYTES = 64 << 20    # ... at most this many bytes of them after a file cache
MEMORY_CACHE_SHARE = 1 / 64  # a memory cache may take this share of the available memory
DISK_CACHE_SHARE = 1 / 2    # a file cache this share of the free disk space
SCALE_RANGE = (0.5, 2.0)    # random scale of augmentation
# Augmentation levels: (scale range or None, colour jitter).  True means "full".
AUGMENT_LEVELS = {"flip": (None, False), "mild": ((0.8, 1.25), False), "full": (SCALE_RANGE, True)}
_ERROR_MARK = "UserError:"  # how a UserError shows inside a tf error message


def make_dataset(samples, scheme, image_shape, batch_size, *, shuffle=True, augment=False,
                 seed=None, cache=None, repeat=False, drop_remainder=False, skip_bad=False):
    """Batches of ``(images float32 [B,H,W,3] 0..255, labels int32 [B,H,W])``.

    samples      labelled ``datasets.Sample`` list (e.g. ``find_dataset(root).splits['train']``)
    scheme       a ``schemes.Scheme``; labels are mapped to its classes
    image_shape  (H, W) of the batches, each divisible by 32 (the FCN-8 stride)
    shuffle      new random order every epoch (pass over the dataset)
    augment      False, or a level: "flip" (random horizontal flip only), "mild" (flip and
                 scale 0.8-1.25x with crop/pad), "full" or True: joint random flip, scale
                 (0.5-2x) and crop/pad of image and label,
                 plus brightness / contrast / saturation jitter of the image
    seed         an int makes order and augmentation reproducible
    cache        None; True (memory); or a file prefix: keeps decoded, resized samples
                 (before augmentation) after the first epoch.  A short hash of the
                 samples, scheme and shape is appended to a file prefix, so a cache
                 made for other data is never reused.  ``choose_cache`` picks one.
    repeat       repeat forever (count steps yourself) instead of one epoch
    skip_bad     leave out (with a warning) samples that cannot be read, instead of
                 failing with ``UserError``
    """
    image_shape = fcn.check_image_shape(image_shape)
    samples = _checked_samples(samples, batch_size)
    if shuffle and isinstance(cache, str):
        samples = _permuted(samples)
    ds = _decoded(samples, scheme, image_shape, shuffle and cache is None, seed, skip_bad)
    if cache is not None:
        ds = _cached(ds, cache, samples, scheme, image_shape, shuffle, seed)
    if repeat:
        ds = ds.repeat()
    if augment:
        ds = _augmented(ds, augment, image_shape, seed)
    ds = ds.map(lambda image, label: (tf.cast(image, tf.float32), tf.cast(label, tf.int32)))
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


def _checked_samples(samples, batch_size):
    """``samples`` as a list; none, an unlabelled one or a batch size below 1 is a UserError."""
    samples = list(samples)
    if not samples:
        raise UserError("no samples to make batches from; check the dataset split")
    unlabelled = [s.image for s in samples if s.label is None]
    if unlabelled:
        raise UserError(f"{len(unlabelled)} samples have no label (e.g. {unlabelled[0]}); "
                        f"training and evaluation need a labelled split")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    return samples


def _decoded(samples, scheme, image_shape, shuffle, seed, skip_bad):
    """(image uint8, label uint8) pairs resized to ``image_shape``, in a new random order
    every epoch if ``shuffle``; unreadable samples left out if ``skip_bad``."""
    def load(index):
        image, label, ok = tf.numpy_function(
            lambda i: _load(samples[int(i)], scheme, skip_bad), [index],
            (tf.uint8, tf.uint8, tf.bool), stateful=False)
        image.set_shape([None, None, 3])
        label.set_shape([None, None])
        return _resize(image, label, image_shape) + (ok,)

    ds = tf.data.Dataset.range(len(samples))
    if shuffle:
        ds = ds.shuffle(len(samples), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if skip_bad:
        ds = ds.filter(lambda image, label, ok: ok)
    return ds.map(lambda image, label, ok: (image, label))


def _cached(ds, cache, samples, scheme, image_shape, shuffle, seed):
    """``ds`` kept after its first pass (in memory for ``cache=True``, else in files named
    by ``_cache_name``), shuffled after the cache if ``shuffle``: from memory in a buffer of
    up to ``SHUFFLE_BUFFER`` samples (they share the cache's buffers), from a file in one
    of at most ``SHUFFLE_BYTES`` (each sample there is a copy)."""
    buffer = min(len(samples), SHUFFLE_BUFFER)
    if cache is True:
        ds = ds.cache("")
    else:
        name = _cache_name(cache, samples, scheme, image_shape)
        _remove_unfinished(name)
        ds = ds.cache(name)
        buffer = min(buffer, max(2, SHUFFLE_BYTES // decoded_bytes(1, image_shape)))
    if shuffle:
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    return ds


def decoded_bytes(n, image_shape):
    """Bytes that ``n`` decoded, resized samples take in a cache: uint8 RGB + uint8 label."""
    return int(n) * int(image_shape[0]) * int(image_shape[1]) * 4


def choose_cache(mode, samples, image_shape, folder=None, reserve=0, log=None):
    """The ``cache`` argument of ``make_dataset`` for ``--cache mode``, said in a log line.

    mode     "auto" (or True): memory when the decoded samples (``decoded_bytes``) take at
             most ``MEMORY_CACHE_SHARE`` of the memory available after ``reserve`` bytes
             (the training step's own estimate), else a file cache in ``folder``; "memory"
             or "file" as asked ("memory" larger than what is available is a UserError);
             False / None: no cache (decode every epoch).
    A file cache that would take more than ``DISK_CACHE_SHARE`` of the free disk space (or
    with no ``folder``) is not made: the samples are decoded every epoch instead.
    Returns True (memory), a file prefix under ``folder`` or None.
    """
    log = log or logger.info
    if not mode:
        log("cache: none (--no-cache): training images are decoded again every epoch")
        return None
    mode = "auto" if mode is True else mode
    if mode not in CACHE_MODES:
        raise UserError(f"unknown cache mode {mode!r}; use one of {', '.join(CACHE_MODES)}, or off")
    size, n = decoded_bytes(len(samples), image_shape), len(samples)
    have = max(memory.available_memory() - int(reserve), 0)
    what = f"{n} decoded samples at {image_shape[0]}x{image_shape[1]} take {size / 1e9:.2f} GB"
    if mode == "memory" and size > have:
        raise UserError(f"--cache memory: {what} but only {have / 1e9:.1f} GB of memory is "
                        f"available after the training step's; use --cache auto or file")
    if mode == "memory" or (mode == "auto" and size <= have * MEMORY_CACHE_SHARE):
        log(f"cache: in memory ({what}; {have / 1e9:.1f} GB available)")
        return True
    why = f"{what}, over 1/{round(1 / MEMORY_CACHE_SHARE)} of the {have / 1e9:.1f} GB available" \
        if mode == "auto" else what
    if folder is None:
        log(f"cache: none ({why}, and there is no run folder for a file cache)")
        return None
    run_folders.make_dirs(folder)
    free = shutil.disk_usage(folder).free + folder_bytes(folder)
    if size > free * DISK_CACHE_SHARE:
        log(f"cache: none ({why}, and a file cache would take over {DISK_CACHE_SHARE:.0%} of the "
            f"{free / 1e9:.1f} GB free on {folder}'s disk): decoding every epoch")
        return None
    log(f"cache: file in {folder} ({why}); removed when training finishes")
    return os.path.join(folder, "train")


def release_cache(folder, log=None):
    """Remove the file cache ``folder`` (if any), saying how much disk it had taken."""
    if folder and os.path.isdir(folder):
        size = folder_bytes(folder)
        shutil.rmtree(folder, ignore_errors=True)
        (log or logger.info)(f"cache: removed {folder} ({size / 1e9:.2f} GB)")


def _permuted(samples):
    """``samples`` in one fixed pseudo-random order (the same in every process): a file
    cache keeps its first pass's order, and a dataset listed folder by folder (Cityscapes:
    city by city) would otherwise be shuffled only within ``SHUFFLE_BYTES``."""
    order = np.random.default_rng(0x5CA1E).permutation(len(samples))
    return [samples[i] for i in order]


def folder_bytes(folder):
    """Bytes the files under ``folder`` take (0 if it does not exist)."""
    total = 0
    for where, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(where, name)).st_size
            except OSError:   # removed while we walked
                pass
    return total


def _remove_unfinished(name):
    """Remove what an interrupted run left of the file cache ``name``: tf.data refuses a
    cache whose lock file exists ("concurrent caching iterator") and rewrites one without an
    index.  The run lock (``run_folders.run_lock``) keeps other runs out of this folder."""
    if os.path.exists(name + ".index") and not glob.glob(glob.escape(name) + "*.lockfile"):
        return
    for path in glob.glob(glob.escape(name) + "*"):
        if os.path.isfile(path):
            os.remove(path)


def _augmented(ds, augment, image_shape, seed):
    """Each pair augmented at ``augment``'s level with its own random key (reproducible
    with ``seed``)."""
    level = _augment_level(augment)
    keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    return tf.data.Dataset.zip((ds, keys)).map(
        lambda pair, key: _augment(pair[0], pair[1], key, image_shape, *level),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _load(sample, scheme, skip_bad):
    """numpy side of decoding: (image uint8, label uint8, ok) of one sample."""
    try:
        image, label = datasets.load_pair(sample, scheme)
        return image, label, np.bool_(True)
    except UserError as err:
        if not skip_bad:
            raise
        logger.warning(f"skipping bad sample: {err}")
        return np.zeros((1, 1, 3), np.uint8), np.zeros((1, 1), np.uint8), np.bool_(False)


def _resize(image, label, image_shape):
    """Image bilinear (rounded back to uint8), label nearest neighbour."""
    image = tf.cast(inference.resize_to_network(image[None], image_shape)[0], tf.uint8)
    label = tf.image.resize(label[..., None], image_shape, method="nearest")[..., 0]
    return tf.ensure_shape(image, image_shape + (3,)), tf.ensure_shape(label, image_shape)


def _cache_name(prefix, samples, scheme, image_shape):
    key = repr(([(s.image, s.label) for s in samples], scheme.name, image_shape))
    return f"{prefix}_{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def _augment_level(augment):
    name = "full" if augment is True else augment
    if name not in AUGMENT_LEVELS:
        raise UserError(f"unknown augmentation '{augment}'; use one of {', '.join(AUGMENT_LEVELS)}")
    return AUGMENT_LEVELS[name]


def _augment(image, label, key, image_shape, scale_range=SCALE_RANGE, jitter=True):
    """Joint flip, scale and crop/pad of image and label; colour jitter of the image.

    ``scale_range`` None skips scale-and-crop; ``jitter`` False skips the colour jitter.

    ``key`` (int64) seeds every random draw through stateless ops, so the result
    depends only on the key, not on thread timing.
    """
    h, w = image_shape
    seeds = tf.random.experimental.stateless_split(tf.stack([key, key // 7919]), 7)
    flip = tf.random.stateless_uniform([], seeds[0]) < 0.5
    image = tf.cond(flip, lambda: image[:, ::-1], lambda: image)
    label = tf.cond(flip, lambda: label[:, ::-1], lambda: label)

    image = tf.cast(image, tf.float32)
    if scale_range is not None:
        image, label = _scale_and_crop(image, label, seeds, image_shape, scale_range)
    if jitter:
        image = tf.image.stateless_random_brightness(image, 0.15 * 255, seeds[4])
        image = tf.image.stateless_random_contrast(image, 0.75, 1.25, seeds[5])
        image = tf.clip_by_value(image, 0, 255) / 255  # saturation works on 0..1
        image = tf.image.stateless_random_saturation(image, 0.75, 1.25, seeds[6]) * 255
    return tf.ensure_shape(image, image_shape + (3,)), tf.ensure_shape(label, image_shape)


def _scale_and_crop(image, label, seeds, image_shape, scale_range):
    """Scale image (bilinear) and label (nearest) by a random factor, then pad (label with
    IGNORE) to at least ``image_shape`` and crop ``image_shape`` at a random place."""
    h, w = image_shape
    scale = tf.random.stateless_uniform([], seeds[1], *scale_range)
    size = tf.cast(tf.round(scale * tf.constant(image_shape, tf.float32)), tf.int32)
    image = tf.image.resize(image, size, method="bilinear")
    label = tf.image.resize(label[..., None], size, method="nearest")[..., 0]
    ph, pw = tf.maximum(h - size[0], 0), tf.maximum(w - size[1], 0)
    pads = [[ph // 2, ph - ph // 2], [pw // 2, pw - pw // 2]]
    image = tf.pad(image, pads + [[0, 0]])
    label = tf.pad(label, pads, constant_values=IGNORE)
    big = tf.shape(label)
    top = tf.random.stateless_uniform([], seeds[2], 0, big[0] - h + 1, tf.int32)
    left = tf.random.stateless_uniform([], seeds[3], 0, big[1] - w + 1, tf.int32)
    return image[top:top + h, left:left + w], label[top:top + h, left:left + w]


def numpy_batches(dataset):
    """Yield the batches of ``dataset`` as numpy arrays.

    Works eagerly and inside a ``tf.Graph`` (through an initializable iterator
    and a session of its own).  A ``UserError`` raised while decoding a file comes out as
    ``UserError`` again (tf wraps it in its own error type on the way).
    """
    try:
        if tf.executing_eagerly():
            yield from dataset.as_numpy_iterator()
            return
        iterator = tf.compat.v1.data.make_initializable_iterator(dataset)
        batch = iterator.get_next()
        with tf.compat.v1.Session() as sess:
            sess.run(iterator.initializer)
            while True:
                try:
                    yield sess.run(batch)
                except tf.errors.OutOfRangeError:
                    return
    except tf.errors.OpError as err:
        found = re.search(re.escape(_ERROR_MARK) + r"\s*(.*)", err.message)
        if found:
            raise UserError(found.group(1)) from None
        raise


def throughput(samples, scheme, image_shape, batch_size, n_batches, augment, cache):
    """Images per second delivered by ``make_dataset`` (the first batch, which
    includes start-up, is not timed; with ``cache`` the first epoch is)."""
    ds = make_dataset(samples, scheme, image_shape, batch_size, augment=augment,
                      cache=cache, repeat=True, seed=0)
    batches = numpy_batches(ds)
    next(batches)
    start = time.perf_counter()
    images = sum(len(next(batches)[0]) for _ in range(n_batches))
    return images / (time.perf_counter() - start)
