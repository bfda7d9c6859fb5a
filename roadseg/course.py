"""The course's and the seed's helper functions, with their names and signatures.

Course code (``main.py``, the seed notebook) calls these through the top-level ``helper.py``:

* ``maybe_download_pretrained_vgg(data_dir)`` -- the course VGG16 into ``data_dir/vgg``
* ``gen_batch_function(data_folder, image_shape)`` -> ``get_batches_fn(batch_size)``
* ``gen_test_output(sess, logits, keep_prob, image_pl, data_folder, image_shape)``
* ``save_inference_samples(runs_dir, data_dir, sess, image_shape, logits, keep_prob, input_image)``
* ``gen_video_output(sess, logits, keep_prob, image_pl, video_file, image_shape)`` (the seed's)
* ``DLProgress`` -- the course's download progress bar

plus ``session_predict_fn`` (class maps from a live course session) and ``to_one_hot``.
Called the course's or the seed's way they behave like the originals (see docs/course.md);
keyword arguments (``scheme=``, ``split=``, ...) give the project's behaviour.  The work
happens in ``datasets.py``, ``input_pipeline.py``, ``inference.py``, ``overlays.py`` and
``video.py``: inference goes through the project's one resize and head
(``inference.resize_to_network``, ``inference.segmentation_head``).
"""
__all__ = ["DLProgress", "maybe_download_pretrained_vgg", "gen_batch_function", "gen_test_output",
           "save_inference_samples", "gen_video_output", "session_predict_fn", "to_one_hot"]

import contextlib
import os
import queue
import threading

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from roadseg import datasets, inference, input_pipeline, overlays, run_folders, video
from roadseg.errors import UserError
from roadseg.schemes import IGNORE, SCHEMES, get_scheme
from roadseg.vgg import maybe_download_pretrained_vgg  # noqa: F401  (the course's entry point)
from roadseg.video import put_until_stopped

tf1 = tf.compat.v1

# The scheme each layout's course code used: the course's road / not road on KITTI, the
# seed's five channels in its own order on the seed layout.  Other layouts: road4.
COURSE_SCHEMES = {"kitti": "kitti2", "seed": "seed5"}
DEFAULT_SCHEME = "road4"
BATCHES_AHEAD = 2   # batches gen_batch_function's producer thread prepares in advance


class DLProgress(tqdm):
    """A tqdm bar whose ``hook`` is the ``reporthook`` of ``urllib.request.urlretrieve``
    (the course's download bar)::

        with DLProgress(unit="B", unit_scale=True, miniters=1) as bar:
            urlretrieve(url, path, bar.hook)
    """
    last_block = 0

    def hook(self, block_num=1, block_size=1, total_size=None):
        if total_size is not None and total_size > 0:
            self.total = total_size
        self.update(max(0, block_num - self.last_block) * block_size)
        self.last_block = block_num


# --------------------------------------------------------------------------- data
def _default_scheme(layout, num_classes=None):
    """The scheme of ``layout``'s course code, else road4; with ``num_classes`` the first
    of those (then of all schemes) that has that many classes."""
    names = [COURSE_SCHEMES.get(layout, DEFAULT_SCHEME), DEFAULT_SCHEME, *SCHEMES]
    if num_classes is None:
        return names[0]
    for name in names:
        if get_scheme(name).num_classes == num_classes:
            return name
    raise UserError(f"no class scheme has {num_classes} classes (the logits' last dimension); "
                    f"pass scheme= one of {', '.join(SCHEMES)} with a network of its size")


def _find_samples(data_folder, split, prefer):
    """``(layout, samples, is_split_folder)`` of a split folder (``data/data_road/training``)
    or of a dataset root's ``split`` (default: the first of ``prefer`` it has)."""
    found = datasets.find_split_folder(data_folder)
    if found is not None:
        layout, _, samples = found
        return layout, samples, True
    ds = datasets.find_dataset(data_folder)
    split = split or next((s for s in prefer if s in ds.splits), None) or next(iter(ds.splits))
    if split not in ds.splits:
        raise UserError(f"{data_folder} has no split '{split}' (splits: {', '.join(ds.splits)})")
    return ds.layout, ds.splits[split], False


def gen_batch_function(data_folder, image_shape, scheme=None, split=None, augment=False,
                       seed=None, one_hot=None):
    """Generate a function that yields training batches, as in the course.

    :param data_folder: a split folder as the course and the seed pass it
        (``data/data_road/training``, ``data/training``) or a dataset root of any layout
        ``datasets.find_dataset`` knows (then ``split``, default 'train')
    :param image_shape: (height, width), each divisible by 32
    :param scheme: class scheme; default: the layout's course scheme (KITTI: ``kitti2``,
        seed: ``seed5``), else ``road4``
    :param one_hot: None: one-hot *boolean* labels when called the course's way (a split
        folder, no ``scheme``), else class ids; True: one-hot float32; False: class ids
    :return: ``get_batches_fn(batch_size)`` yielding ``(images float32 [B,H,W,3] 0..255,
        labels)`` -- labels are class ids int32 ``[B,H,W]`` (255 = void) or one-hot
        ``[B,H,W,C]`` in the scheme's class order (void pixels: all-zero rows)

    The course's way on KITTI gives 2 channels (not road, road), the seed's way 5 (road,
    car, person, traffic light, background), as their own helpers did.  Batches are made
    by the ``tf.data`` pipeline in a thread of its own, so iterating never touches the
    caller's default graph or session (see ``_batches_in_background``).
    """
    layout, samples, split_folder = _find_samples(data_folder, split, ("train",))
    samples = [s for s in samples if s.label]
    if not samples:
        raise UserError(f"{data_folder} has no labelled images to train on; pass a folder with "
                        f"labels (e.g. data/data_road/training)")
    course_way = split_folder and scheme is None and one_hot is None
    scheme = get_scheme(scheme or _default_scheme(layout))
    shape = tuple(int(v) for v in image_shape)

    def get_batches_fn(batch_size):
        for images, labels in _batches_in_background(samples, scheme, shape, batch_size,
                                                     augment, seed):
            if course_way:
                labels = to_one_hot(labels, scheme.num_classes, dtype=bool)
            elif one_hot:
                labels = to_one_hot(labels, scheme.num_classes)
            yield images, labels

    return get_batches_fn


def _batches_in_background(samples, scheme, image_shape, batch_size, augment, seed):
    """Yield one epoch of ``(images, labels)`` numpy batches of ``input_pipeline.make_dataset``.

    The pipeline runs in a producer thread, in a graph and session of that thread.  TF's
    default graph and session stacks are per thread, so the caller's frame -- a course
    ``with tf.Session() as sess:`` training loop -- keeps its own graph and session while
    iterating, and an exception it raises between batches is its own (never a "nesting
    violated" error of a context entered here).  The producer stops when the generator is
    closed or dropped; its errors (e.g. an unreadable image) are raised here.
    """
    out, stop = queue.Queue(BATCHES_AHEAD), threading.Event()

    def produce():
        try:
            with tf.Graph().as_default():
                ds = input_pipeline.make_dataset(samples, scheme, image_shape, batch_size,
                                                 shuffle=True, augment=augment, seed=seed)
                for batch in input_pipeline.numpy_batches(ds):
                    if not put_until_stopped(out, ("batch", batch), stop):
                        return
            put_until_stopped(out, ("end", None), stop)
        except BaseException as err:  # handed to the consumer
            put_until_stopped(out, ("error", err), stop)

    thread = threading.Thread(target=produce, name="gen_batch_function", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = out.get()
            if kind == "error":
                raise value
            if kind == "end":
                return
            yield value
    finally:
        stop.set()
        thread.join()


def to_one_hot(labels, num_classes, dtype=np.float32):
    """Class ids (255 = void) -> one-hot ``[..., num_classes]`` of ``dtype``; void rows all zero."""
    eye = np.vstack([np.eye(num_classes, dtype=dtype), np.zeros((1, num_classes), dtype)])
    idx = np.where(np.asarray(labels) == IGNORE, num_classes, labels)
    return eye[idx]


# --------------------------------------------------------------------------- inference
def session_predict_fn(sess, image_shape, logits, keep_prob, input_image, num_classes=None):
    """``predict_fn(images uint8 [N,H,W,3]) -> class maps uint8 [N,H,W]`` from a live course session.

    Adds to ``sess.graph`` the project's one inference path as TF ops: images are resized
    to ``image_shape`` by ``inference.resize_to_network`` (as for training, exports and
    ``segment.py predict``), fed to ``input_image``, and ``logits`` -- the course's flat
    ``[N*H*W, C]`` or ``[N, H, W, C]`` -- go through ``inference.segmentation_head``
    (bilinear back to each image's size, argmax).  ``num_classes`` defaults to the logits'
    last dimension (which wins if they differ).
    """
    h, w = (int(v) for v in image_shape)
    num_classes = _logit_classes(logits, num_classes)
    with sess.graph.as_default(), tf1.name_scope("session_predict"):
        raw = tf1.placeholder(tf.uint8, [None, None, None, 3], name="images")
        resized = inference.resize_to_network(raw, (h, w))
        out_size = tf1.placeholder(tf.int32, [2], name="out_size")
        scores = tf.reshape(logits, [-1, h, w, num_classes])
        classes, _ = inference.segmentation_head(scores, out_size)
    fixed = {keep_prob: 1.0} if isinstance(keep_prob, tf.Tensor) else {}

    def predict_fn(images):
        images = np.asarray(images, np.uint8)
        small = sess.run(resized, {raw: images})
        return sess.run(classes, {input_image: small, out_size: images.shape[1:3], **fixed})

    return predict_fn


def _logit_classes(logits, num_classes=None):
    """The class count of ``logits`` (their static last dimension), else ``num_classes``."""
    last = logits.shape[-1] if logits.shape.rank else None
    if last is None and num_classes is None:
        raise UserError("the logits' last dimension (the class count) is unknown; pass num_classes")
    return int(last if last is not None else num_classes)


def _scheme_for(logits, layout, scheme):
    """The scheme to colour ``logits``'s classes with; a mismatch is a ``UserError``."""
    n = _logit_classes(logits)
    scheme = get_scheme(scheme or _default_scheme(layout, n))
    if scheme.num_classes != n:
        raise UserError(f"the logits have {n} classes but scheme '{scheme.name}' has "
                        f"{scheme.num_classes}; pass scheme={_default_scheme(layout, n)!r}")
    return scheme


def gen_test_output(sess, logits, keep_prob, image_pl, data_folder, image_shape, scheme=None):
    """Yield ``(file name, overlay uint8 [H,W,3])`` for each image of a test folder.

    :param data_folder: a split folder (course: ``data/data_road/testing``, seed:
        ``data/testing``) or a dataset root (its 'test' split, else 'val', else 'train')
    :param scheme: colours; default from the layout and the logits' class count (KITTI and
        2 classes: ``kitti2``; seed and 5: ``seed5``; else ``road4``)

    Unlike the course (which overlaid on the image shrunk to ``image_shape``), overlays are
    at each image's own size: the class maps are resized back by the inference head.
    """
    layout, samples, _ = _find_samples(data_folder, None, ("test", "val", "train"))
    scheme = _scheme_for(logits, layout, scheme)
    predict_fn = session_predict_fn(sess, image_shape, logits, keep_prob, image_pl)
    for sample in samples:
        image = datasets.load_image(sample.image)
        class_map = inference.predict_batch(predict_fn, image[None])[0]
        yield os.path.basename(sample.image), overlays.overlay(image, class_map, scheme)


def save_inference_samples(runs_dir, data_dir, sess, image_shape, logits, keep_prob, input_image,
                           scheme=None, split=None):
    """Overlay the model's predictions on the test images into a new ``runs/<timestamp>/``.

    ``data_dir`` is the course's ``data`` folder (``data/data_road`` or the seed's
    ``data/testing`` inside), any dataset root, or a split folder.  Writes ``<name>.png``
    (overlay at the original size) and ``<name>_classes.png`` (class ids) per image;
    returns the new run folder.  ``split`` defaults to 'test', then 'val'.  The class
    count comes from the logits; ``scheme`` as in ``gen_test_output``.
    """
    layout, samples, _ = _find_samples(data_dir, split, ("test", "val", "train"))
    scheme = _scheme_for(logits, layout, scheme)
    predict_fn = session_predict_fn(sess, image_shape, logits, keep_prob, input_image)
    run_dir = run_folders.new_run_dir(runs_dir)
    print(f"Saving {len(samples)} inference samples to {run_dir}")
    overlays.write_overlays(run_dir, [s.image for s in samples], predict_fn, scheme)
    return run_dir


def gen_video_output(sess, logits, keep_prob, image_pl, video_file, image_shape, out_file=None,
                     scheme=None, runs_dir="runs"):
    """The seed's video helper: write ``video_file`` with the predicted classes overlaid.

    The copy has the input's size and frame rate (``video.process_video``: H.264 mp4, no
    OpenCV); it goes to ``out_file``, default ``<video name>_overlay.mp4`` in a new
    ``runs_dir/<timestamp>/``: the seed overwrote its one output on every run, so a rerun of
    the notebook gets a new folder and nothing is overwritten (an ``out_file`` that exists
    is refused).  Colours: ``scheme``, default by the logits' class count as the seed's
    (5 classes: ``seed5``; 2: ``kitti2``).  Returns the written path.
    """
    scheme = _scheme_for(logits, "seed", scheme)
    predict_fn = session_predict_fn(sess, image_shape, logits, keep_prob, image_pl)
    run_dir = None
    if out_file is None:
        run_dir = run_folders.new_run_dir(runs_dir)
        name = os.path.splitext(os.path.basename(os.fspath(video_file)))[0]
        out_file = os.path.join(run_dir, name + "_overlay.mp4")
    try:
        stats = video.process_video(video_file, out_file, predict_fn, scheme)
    except BaseException:
        if run_dir:   # the new folder holds nothing: do not leave it behind
            with contextlib.suppress(OSError):
                os.rmdir(run_dir)
        raise
    print(f"Wrote {out_file}: {stats['frames']} frames")
    return out_file
