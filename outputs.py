"""What the trained network produces for people to look at: overlays, class maps, videos.

Every function here takes a ``predict_fn(images) -> class_maps``: ``images`` is a uint8
``(N, H, W, 3)`` RGB batch and the result a ``(N, H, W)`` integer batch of class ids at the
*same* size (the predictor resizes for the network internally).  So this module needs no
TensorFlow and works with any model, or with a fake one in the tests.

* ``new_run_dir``                 -> a fresh folder under ``runs/`` (never an existing one)
* ``colorize`` / ``overlay``      -> class map as colours / blended over the image
* ``save_inference_samples_core`` -> ``<stem>.png`` overlay + ``<stem>_classes.png`` per image
* ``process_video``               -> an overlaid H.264 copy of a video, decode/infer/encode
                                     overlapped in three threads
* ``make_test_video``             -> a small synthetic clip with known colour regions

Colours come from the class scheme: ``schemes.get_scheme("road4").colors``.
"""
import os
import queue
import threading
import time
import uuid
from fractions import Fraction

import imageio_ffmpeg
import numpy as np
from PIL import Image
from tqdm import tqdm

from datasets import load_image
from errors import UserError
from schemes import IGNORE

CRF = 18          # libx264 constant rate factor: 18 is close to visually lossless
QUEUE_BATCHES = 4  # batches buffered between the reader, the model and the writer


# --------------------------------------------------------------------------- run folders
def new_run_dir(runs_dir, name=None):
    """Create and return a new folder ``runs_dir/<name or YYYYmmdd-HHMMSS>``.

    An existing folder is never reused: ``-1``, ``-2``, ... is appended until ``os.mkdir``
    succeeds (mkdir is atomic, so two runs started at once still get different folders).
    """
    base = name or time.strftime("%Y%m%d-%H%M%S")
    if base in (".", "..") or os.sep in base or (os.altsep and os.altsep in base):
        raise UserError(f"run name '{base}' must be a plain folder name without '/'")
    os.makedirs(runs_dir, exist_ok=True)
    candidate, n = base, 0
    while True:
        path = os.path.join(runs_dir, candidate)
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            n += 1
            candidate = f"{base}-{n}"


# --------------------------------------------------------------------------- colours
def _palette(colors):
    """A 256-entry colour table: class ``i`` -> ``colors[i]``, every other id -> black."""
    colors = np.asarray(colors, np.uint8).reshape(-1, 3)
    if len(colors) > IGNORE:
        raise ValueError(f"at most {IGNORE} classes can have colours, got {len(colors)}")
    table = np.zeros((256, 3), np.uint8)
    table[:len(colors)] = colors
    return table


def colorize(class_map, colors):
    """Class map ``(..., H, W)`` -> colour image ``(..., H, W, 3)`` uint8.

    Class ``i`` gets ``colors[i]``; IGNORE (255) and any id without a colour are black.
    """
    return np.take(_palette(colors), np.asarray(class_map, np.uint8), axis=0)


def overlay(image, class_map, colors, alpha=0.5, skip_classes=None):
    """Blend each pixel's class colour over ``image``: ``(1 - alpha) * image + alpha * colour``.

    ``image`` is uint8 ``(..., H, W, 3)`` RGB and ``class_map`` ``(..., H, W)`` (batches work
    too).  ``colors`` is a ``schemes.Scheme`` or an (N, 3) colour table.  Pixels of
    ``skip_classes`` (default: the scheme's ``unpainted`` classes, class 0 for a bare
    colour table), IGNORE and ids without a colour keep the image unchanged.  Rounded to
    the nearest integer, uint8.
    """
    if skip_classes is None:
        skip_classes = getattr(colors, "unpainted", (0,))
    colors = getattr(colors, "colors", colors)
    image = np.asarray(image, np.uint8)
    class_map = np.asarray(class_map, np.uint8)
    if image.shape[:-1] != class_map.shape or image.shape[-1] != 3:
        raise ValueError(f"image {image.shape} and class map {class_map.shape} differ in size")
    n_colors = len(np.reshape(colors, (-1, 3)))
    painted = np.zeros(256, bool)  # which class ids get a colour
    painted[:n_colors] = True
    painted[list(skip_classes)] = False
    # In place and with np.take: about twice as fast as the plain expression on video frames.
    blend = image.astype(np.float32)
    blend *= 1.0 - alpha
    blend += np.take(_palette(colors).astype(np.float32) * alpha, class_map, axis=0)
    np.rint(blend, out=blend)
    return np.where(np.take(painted, class_map)[..., None], blend.astype(np.uint8), image)


def predict_batch(predict_fn, images):
    """Run ``predict_fn`` on a batch and check it kept the batch's size (the input size)."""
    maps = np.asarray(predict_fn(images))
    if maps.shape != images.shape[:3] or maps.dtype.kind not in "ui":
        raise ValueError(f"predict_fn returned {maps.dtype} {maps.shape} for images "
                         f"{images.shape}; it must return integer class ids of shape (N, H, W) "
                         f"at the input size")
    if maps.dtype != np.uint8 and maps.size and (maps.min() < 0 or maps.max() > 255):
        raise ValueError(f"predict_fn returned class ids outside 0..255 ({maps.min()}..{maps.max()})")
    return maps.astype(np.uint8, copy=False)


def same_size_batches(pairs, batch_size):
    """Group consecutive ``(item, image)`` pairs whose images share one size, up to
    ``batch_size`` at a time; yields ``(items, stacked images)``."""
    items, images = [], []
    for item, image in pairs:
        if images and (image.shape != images[0].shape or len(images) == batch_size):
            yield items, np.stack(images)
            items, images = [], []
        items.append(item)
        images.append(image)
    if images:
        yield items, np.stack(images)


# --------------------------------------------------------------------------- images
def _write_png(path, array):
    """Write a PNG, refusing to replace an existing file (exclusive create)."""
    try:
        with open(path, "xb") as f:
            Image.fromarray(array).save(f, format="PNG")
    except FileExistsError:
        raise UserError(f"{path} already exists; write into a new run folder") from None


def save_inference_samples_core(run_dir, image_paths, predict_fn, colors, batch_size=4):
    """Segment each image and write ``<stem>.png`` (overlay) and ``<stem>_classes.png``.

    Both are at the image's original size; the class map holds the raw uint8 class ids.
    ``run_dir`` must exist (see ``new_run_dir``); files are never overwritten.  Consecutive
    images of the same size go to ``predict_fn`` together, up to ``batch_size`` at a time.
    Returns the written paths, overlay then class map for each image, in input order.
    """
    image_paths = [os.fspath(p) for p in image_paths]
    stems = {}
    for path in image_paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in stems:
            raise UserError(f"{path} and {stems[stem]} would both be saved as {stem}.png; "
                            f"rename one of them")
        stems[stem] = path
    written = []
    with tqdm(total=len(image_paths), desc="samples", unit="img") as bar:
        pairs = ((path, load_image(path)) for path in image_paths)
        for paths, images in same_size_batches(pairs, batch_size):
            maps = predict_batch(predict_fn, images)
            for path, image, class_map in zip(paths, images, maps):
                stem = os.path.join(run_dir, os.path.splitext(os.path.basename(path))[0])
                _write_png(stem + ".png", overlay(image, class_map, colors))
                _write_png(stem + "_classes.png", class_map)
                written += [stem + ".png", stem + "_classes.png"]
            bar.update(len(paths))
    return written


# --------------------------------------------------------------------------- video
def _exact_fps(fps):
    """ffmpeg prints rates rounded (29.97); restore the NTSC fractions such as 30000/1001."""
    ntsc = round(fps * 1.001)
    if fps != int(fps) and abs(fps - ntsc / 1.001) < 0.005:
        return Fraction(ntsc * 1000, 1001)
    return Fraction(fps).limit_denominator(1001)


def _first_line(err):
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _open_reader(path):
    """``(raw frame generator, metadata)`` of a video, or a UserError naming the file."""
    if not os.path.isfile(path):
        raise UserError(f"video {path} does not exist; check the path")
    frames = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24")
    try:
        meta = next(frames)
    except (OSError, RuntimeError, IndexError, AttributeError, StopIteration) as err:
        frames.close()
        raise UserError(f"cannot read video {path} ({_first_line(err)}); "
                        f"is it a video file?") from None
    return frames, meta


def _read_batches(frames, path, size, batch_size, max_frames=None):
    """Yield uint8 (N, H, W, 3) RGB batches from a ``read_frames`` generator, then close it."""
    width, height = size
    batch = []
    try:
        for i, raw in enumerate(frames):
            if max_frames is not None and i >= max_frames:
                break
            batch.append(np.frombuffer(raw, np.uint8).reshape(height, width, 3))
            if len(batch) == batch_size:
                yield np.stack(batch)
                batch = []
    except (OSError, RuntimeError) as err:
        raise UserError(f"cannot decode video {path}: {_first_line(err)}") from None
    finally:
        frames.close()  # stops ffmpeg
    if batch:
        yield np.stack(batch)


def _open_writer(path, size, fps):
    """An imageio-ffmpeg writer (a generator: ``.send(frame)``, ``.close()``) for RGB frames.

    H.264 at exactly ``size`` (W, H).  yuv420p, which every player supports, needs even
    sides; odd sizes are written as yuv444p rather than rescaled.
    """
    even = size[0] % 2 == 0 and size[1] % 2 == 0
    writer = imageio_ffmpeg.write_frames(
        path, size, fps=fps, codec="libx264", pix_fmt_in="rgb24",
        pix_fmt_out="yuv420p" if even else "yuv444p", macro_block_size=1,
        quality=None, output_params=["-crf", str(CRF), "-f", "mp4"], ffmpeg_log_level="error")
    writer.send(None)  # start ffmpeg
    return writer


def _write_batches(batches, path, size, fps):
    """Encode every frame of every batch; ffmpeg starts at the first batch."""
    writer = None
    try:
        for batch in batches:
            writer = writer or _open_writer(path, size, fps)
            for frame in batch:
                writer.send(np.ascontiguousarray(frame))
    finally:
        if writer is not None:
            writer.close()  # waits until ffmpeg has finished the file


_END = object()  # end-of-stream marker passed through the queues


def _put(q, item, stop):
    """``q.put(item)`` that gives up (returns False) once ``stop`` is set."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


def _drain(q, stop):
    """Iterate over a queue's items until ``_END``, or until ``stop`` is set."""
    while not stop.is_set():
        try:
            item = q.get(timeout=0.1)
        except queue.Empty:
            continue
        if item is _END:
            return
        yield item


def _overlapped(source, transform, sink, on_item=lambda item: None):
    """``sink(transform(x) for x in source)`` with the three stages in three threads.

    ``source`` is iterated in a reader thread, ``transform`` runs in this thread and
    ``sink`` consumes the results in a writer thread; bounded queues connect them.  The
    first error of any stage stops the others and is raised here; threads are always joined.
    """
    inbox, outbox = queue.Queue(QUEUE_BATCHES), queue.Queue(QUEUE_BATCHES)
    stop, errors = threading.Event(), []

    def run(stage, *args):
        try:
            stage(*args)
        except BaseException as err:
            errors.append(err)
            stop.set()

    def read():
        for item in source:
            if not _put(inbox, item, stop):
                return
        _put(inbox, _END, stop)

    reader = threading.Thread(target=run, args=(read,), daemon=True)
    writer = threading.Thread(target=run, args=(sink, _drain(outbox, stop)), daemon=True)
    reader.start()
    writer.start()
    try:
        for item in _drain(inbox, stop):
            result = transform(item)
            if not _put(outbox, result, stop):
                break
            on_item(item)
        _put(outbox, _END, stop)
        writer.join()  # normal end: the writer empties the queue and finishes
    finally:
        stop.set()  # after an error: releases both threads from their queues
        reader.join()
        writer.join()
    if errors:
        raise errors[0]


def process_video(in_path, out_path, predict_fn, colors, batch_size=4, alpha=0.5,
                  max_frames=None):
    """Write an H.264 mp4 of ``in_path`` with the predicted classes overlaid.

    Same frame count (or the first ``max_frames``), size and frame rate as the input; RGB
    end to end.  Decoding, inference (this thread) and overlay + encoding overlap
    (``_overlapped``), so the rate is close to ``predict_fn``'s own.  The video goes to a
    hidden temporary file next to ``out_path`` that gets its name only when complete; an
    existing ``out_path`` is refused.

    Returns ``{"frames", "fps", "size", "seconds", "frames_per_second"}`` (wall-clock rate).
    """
    in_path, out_path = os.fspath(in_path), os.fspath(out_path)
    if max_frames is not None and max_frames < 1:
        raise UserError(f"max_frames must be at least 1, got {max_frames}")
    if not out_path.lower().endswith(".mp4"):
        raise UserError(f"output video {out_path} must end in .mp4 (H.264 in an mp4 file)")
    if os.path.exists(out_path):
        raise UserError(f"{out_path} already exists; choose another output name or delete it")
    frames, meta = _open_reader(in_path)
    size = tuple(meta["size"])
    fps = _exact_fps(meta["fps"] or 25.0)
    total = round(meta.get("duration", 0) * float(fps)) or None
    if max_frames is not None:
        total = min(total or max_frames, max_frames)

    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    tmp_name = f".{os.path.basename(out_path)}.{uuid.uuid4().hex[:8]}.part"  # hidden, unique
    tmp_path = os.path.join(out_dir, tmp_name)
    n_frames, start = 0, time.perf_counter()
    bar = tqdm(total=total, desc=os.path.basename(in_path), unit="frame")

    def advance(images):
        nonlocal n_frames
        n_frames += len(images)
        bar.update(len(images))

    try:
        _overlapped(source=_read_batches(frames, in_path, size, batch_size, max_frames),
                    transform=lambda images: (images, predict_batch(predict_fn, images)),
                    sink=lambda pairs: _write_batches(
                        (overlay(images, maps, colors, alpha) for images, maps in pairs),
                        tmp_path, size, fps),
                    on_item=advance)
        if n_frames == 0:
            raise UserError(f"video {in_path} has no frames; check the file")
        _publish(tmp_path, out_path)
    finally:
        bar.close()
        frames.close()  # in case the reader stopped early or never started
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
    seconds = time.perf_counter() - start
    return {"frames": n_frames, "fps": float(fps), "size": size,
            "seconds": seconds, "frames_per_second": n_frames / seconds}


def _publish(tmp_path, out_path):
    """Give the finished temporary file its final name without replacing anything."""
    if not os.path.isfile(tmp_path) or os.path.getsize(tmp_path) == 0:
        raise RuntimeError(f"ffmpeg wrote nothing to {tmp_path}")
    try:
        os.link(tmp_path, out_path)  # atomic, and fails instead of replacing a file
    except FileExistsError:
        raise UserError(f"{out_path} appeared while the video was processed; "
                        f"choose another output name") from None
    except OSError:  # a file system without hard links
        if os.path.exists(out_path):
            raise UserError(f"{out_path} appeared while the video was processed; "
                            f"choose another output name") from None
        os.rename(tmp_path, out_path)


def make_test_video(path, n_frames, size=(160, 96), fps=12):
    """Write a synthetic clip for tests and benchmarks; returns ``path``.

    Left half red (220, 40, 40), right half green (40, 200, 40), and a grey (128, 128, 128)
    square moving along the top quarter so consecutive frames differ.
    """
    path = os.fspath(path)
    if os.path.exists(path):
        raise UserError(f"{path} already exists; choose another name")
    width, height = size
    side = max(2, height // 4)
    writer = _open_writer(path, (width, height), fps)
    try:
        for i in range(n_frames):
            frame = np.empty((height, width, 3), np.uint8)
            frame[:, :width // 2] = (220, 40, 40)
            frame[:, width // 2:] = (40, 200, 40)
            x = (i * 4) % max(1, width - side)
            frame[:side, x:x + side] = 128
            writer.send(frame)
    finally:
        writer.close()
    return path
