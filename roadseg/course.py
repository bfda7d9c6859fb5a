"""The course's helper functions, with the seed's names and signatures.

* ``maybe_download_pretrained_vgg(data_dir)`` -- the course VGG16 into ``data_dir/vgg``
* ``gen_batch_function(data_folder, image_shape)`` -> ``get_batches_fn(batch_size)``
* ``save_inference_samples(runs_dir, data_dir, sess, image_shape, logits, keep_prob, input_image)``

They are thin: the work happens in ``vgg.py``, ``datasets.py``/``input_pipeline.py`` and
``outputs.py``.  They work whether or not the caller is inside a ``tf.Graph`` context.
"""
__all__ = ["maybe_download_pretrained_vgg", "gen_batch_function", "save_inference_samples",
           "session_predict_fn", "to_one_hot"]

import numpy as np
import tensorflow as tf
from PIL import Image

from roadseg import datasets, input_pipeline, overlays, run_folders
from roadseg.errors import UserError
from roadseg.schemes import IGNORE, get_scheme
from roadseg.vgg import maybe_download_pretrained_vgg  # noqa: F401  (the seed's entry point)

tf1 = tf.compat.v1


def _labelled(data_folder, split):
    found = datasets.find_dataset(data_folder)
    if split is None:
        split = "train" if "train" in found.splits else next(iter(found.splits))
    samples = [s for s in found.splits.get(split, []) if s.label]
    if not samples:
        raise UserError(f"{data_folder} has no labelled images in split '{split}' "
                        f"(splits: {', '.join(found.splits)})")
    return samples


def gen_batch_function(data_folder, image_shape, scheme="road4", split=None, augment=False,
                       seed=None, one_hot=False):
    """Generate a function that yields training batches, as in the course.

    :param data_folder: a dataset root in any layout ``datasets.find_dataset`` knows
    :param image_shape: (height, width), each divisible by 32
    :param one_hot: yield the seed's one-hot float labels ``[B,H,W,C]`` (void rows all
        zero) instead of integer class ids ``[B,H,W]`` (void = 255)
    :return: ``get_batches_fn(batch_size)`` yielding ``(images float32 0..255, labels)``
    """
    samples = _labelled(data_folder, split)
    scheme = get_scheme(scheme)

    def get_batches_fn(batch_size):
        # The input pipeline gets a graph and session of its own, so this works from
        # eager code and from inside the caller's training graph alike.
        with tf.Graph().as_default(), tf1.Session() as sess:
            ds = input_pipeline.make_dataset(samples, scheme, image_shape, batch_size, shuffle=True,
                                       augment=augment, seed=seed)
            iterator = tf1.data.make_initializable_iterator(ds)  # one-shot can't hold augmentation's RNG
            next_batch = iterator.get_next()
            sess.run(iterator.initializer)
            while True:
                try:
                    images, labels = sess.run(next_batch)
                except tf.errors.OutOfRangeError:
                    return
                yield images, (to_one_hot(labels, scheme.num_classes) if one_hot else labels)

    return get_batches_fn


def to_one_hot(labels, num_classes):
    """Integer labels (255 = void) -> one-hot float32 with all-zero rows for void."""
    eye = np.vstack([np.eye(num_classes, dtype=np.float32), np.zeros((1, num_classes), np.float32)])
    idx = np.where(np.asarray(labels) == IGNORE, num_classes, labels)
    return eye[idx]


def session_predict_fn(sess, image_shape, logits, keep_prob, input_image, num_classes):
    """``predict_fn(images uint8 [N,H,W,3]) -> class maps [N,H,W]`` from a live course session.

    Images are resized to ``image_shape`` for the network; the class scores are resized
    back (bilinear) to each image's own size before the argmax.
    """
    h, w = image_shape

    def predict_fn(images):
        small = np.stack([np.asarray(Image.fromarray(im).resize((w, h), Image.BILINEAR))
                          for im in images]).astype(np.float32)
        scores = sess.run(logits, {keep_prob: 1.0, input_image: small})
        scores = np.reshape(scores, (len(images), h, w, num_classes))
        out_h, out_w = images.shape[1:3]
        maps = []
        for s in scores:
            up = np.stack([np.asarray(Image.fromarray(s[..., c]).resize((out_w, out_h), Image.BILINEAR))
                           for c in range(num_classes)], axis=-1)
            maps.append(np.argmax(up, axis=-1).astype(np.uint8))
        return np.stack(maps)

    return predict_fn


def save_inference_samples(runs_dir, data_dir, sess, image_shape, logits, keep_prob, input_image,
                           scheme="road4", split=None):
    """Overlay the model's predictions on the test images into a new ``runs/<timestamp>/``.

    Writes ``<name>.png`` (overlay at the original size) and ``<name>_classes.png`` (class
    ids) per image; returns the new run folder.  ``split`` defaults to 'test', then 'val'.
    """
    scheme = get_scheme(scheme)
    found = datasets.find_dataset(data_dir)
    split = split or next((s for s in ("test", "val", "train") if s in found.splits), None)
    paths = [s.image for s in found.splits[split]]
    run_dir = run_folders.new_run_dir(runs_dir)
    predict_fn = session_predict_fn(sess, image_shape, logits, keep_prob, input_image,
                                    scheme.num_classes)
    print(f"Saving {len(paths)} inference samples of '{split}' to {run_dir}")
    overlays.write_overlays(run_dir, paths, predict_fn, scheme)
    return run_dir
