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

Decoding goes through ``datasets.load_pair`` (a ``tf.numpy_function``), so the
pipeline applies exactly the same conversions and checks as ``check-data``; PIL
releases the GIL while decoding, so parallel calls do help.  Labels are never
interpolated: resizing them uses nearest neighbour, and augmentation pads them
with IGNORE.  Random choices come from stateless ops seeded per element by a
``Dataset.random`` stream, so the same ``seed`` gives the same batches.

``numpy_batches(ds)`` iterates a dataset as numpy arrays (eagerly or in graph
mode) and turns errors raised while decoding back into ``UserError``.
"""
import hashlib
import re
import time

import numpy as np
import tensorflow as tf

from roadseg import datasets, fcn, inference
from roadseg.errors import UserError
from roadseg.log import logger
from roadseg.schemes import IGNORE

SHUFFLE_BUFFER = 1024       # decoded samples held for shuffling a cached dataset
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
                 made for other data is never reused.
    repeat       repeat forever (count steps yourself) instead of one epoch
    skip_bad     leave out (with a warning) samples that cannot be read, instead of
                 failing with ``UserError``
    """
    image_shape = fcn.check_image_shape(image_shape)
    samples = _checked_samples(samples, batch_size)
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
    by ``_cache_name``), shuffled after the cache if ``shuffle``."""
    ds = ds.cache("" if cache is True else _cache_name(cache, samples, scheme, image_shape))
    if shuffle:
        ds = ds.shuffle(min(len(samples), SHUFFLE_BUFFER), seed=seed, reshuffle_each_iteration=True)
    return ds


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
