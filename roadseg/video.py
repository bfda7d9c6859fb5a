"""Video in and out: one reader, one writer, and the overlaid copy of a video.

* ``process_video``     -> an overlaid H.264 copy of a video; decoding, inference and
                           encoding overlap in three threads
* ``render_overlay``    -> its core: batches of frames + a class-map function -> the overlaid
                           mp4 (also ``batch-predict``'s, so both write the same frames)
* ``probe_video``       -> size, exact frame rate and estimated frame count of a video
* ``read_frame_batches`` -> frames ``[start, start + count)`` as RGB batches, decoded from
                           their own seek point (frame-exact: equal to sequential decoding)
* ``read_frames``       -> chosen frames of a video as RGB arrays
* ``write_video``       -> RGB frames as an H.264 mp4 (a new file)
* ``make_test_video``   -> a small synthetic clip with known colour regions
* ``pan_clip_frames``   -> frames of a slow pan across images (a clip of still scenes)

Frames are RGB uint8 end to end; files are written under a hidden temporary name and
get their final name only when complete.
"""
import collections
import itertools
import os
import queue
import tempfile
import threading
import time
from fractions import Fraction

import imageio_ffmpeg
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from roadseg.errors import UserError, reason
from roadseg.inference import predict_batch
from roadseg.overlays import overlay
from roadseg.run_folders import WRITE_FIX, check_can_create, refuse_existing, staged_file

CRF = 18          # libx264 constant rate factor: 18 is close to visually lossless
QUEUE_BATCHES = 4  # batches buffered between the reader, the model and the writer
# A range starting at frame i is decoded from ffmpeg's input seek to (i - SEEK_LEAD) / fps:
# ffmpeg seeks to the keyframe before it and decodes forward, dropping frames earlier than
# that time, so frame i (at i / fps) is the first one kept even when timestamps are rounded.
SEEK_LEAD = 0.25


def _exact_fps(fps):
    """ffmpeg prints rates rounded (29.97); restore the NTSC fractions such as 30000/1001."""
    ntsc = round(fps * 1.001)
    if fps != int(fps) and abs(fps - ntsc / 1.001) < 0.005:
        return Fraction(ntsc * 1000, 1001)
    return Fraction(fps).limit_denominator(1001)


def _open_reader(path, seek_seconds=None):
    """``(raw frame generator, metadata)`` of a video, or a UserError naming the file;
    ``seek_seconds``: decoding starts there (ffmpeg's input ``-ss``)."""
    if not os.path.isfile(path):
        raise UserError(f"video {path} does not exist; check the path")
    seek = ["-ss", f"{seek_seconds:.6f}"] if seek_seconds else None
    frames = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24", input_params=seek)
    try:
        meta = next(frames)
    except (OSError, RuntimeError, IndexError, AttributeError, StopIteration) as err:
        frames.close()
        raise UserError(f"cannot read video {path} ({reason(err)}); "
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
        raise UserError(f"cannot decode video {path}: {reason(err)}") from None
    finally:
        frames.close()  # stops ffmpeg
    if batch:
        yield np.stack(batch)


def _video_format(meta):
    """(size (W, H), exact fps, estimated frame count or None) from a reader's metadata."""
    fps = _exact_fps(meta["fps"] or 25.0)
    return tuple(meta["size"]), fps, round(meta.get("duration", 0) * float(fps)) or None


def probe_video(path):
    """``(size (W, H), exact fps, estimated frame count or None)`` of the video at ``path``
    (from its header: nothing is decoded); an unreadable file is a UserError naming it."""
    frames, meta = _open_reader(os.fspath(path))
    frames.close()
    return _video_format(meta)


def read_frame_batches(path, batch_size, start=0, count=None):
    """Frames ``[start, start + count)`` (``count`` None: to the end) of the video at ``path``
    as uint8 RGB batches ``(N, H, W, 3)`` of up to ``batch_size``.

    A range not at the start is decoded from its own seek point (``SEEK_LEAD``), not by
    decoding everything before it: the frames are those sequential decoding gives at these
    indices (tests/test_video.py checks it frame by frame).  ffmpeg stops when the range is done.
    """
    path = os.fspath(path)
    seek = None
    if start:
        _, fps, _ = probe_video(path)
        seek = (start - SEEK_LEAD) / float(fps)
    frames, meta = _open_reader(path, seek)
    yield from _read_batches(frames, path, tuple(meta["size"]), batch_size, count)


def _open_writer(path, size, fps, log):
    """An imageio-ffmpeg writer (a generator: ``.send(frame)``, ``.close()``) for RGB frames.

    H.264 at exactly ``size`` (W, H).  yuv420p, which every player supports, needs even
    sides; odd sizes are written as yuv444p rather than rescaled.  ffmpeg's own messages go
    to the file ``log`` (not onto our stderr), to say why a write failed.
    """
    even = size[0] % 2 == 0 and size[1] % 2 == 0
    writer = imageio_ffmpeg.write_frames(
        path, size, fps=fps, codec="libx264", pix_fmt_in="rgb24",
        pix_fmt_out="yuv420p" if even else "yuv444p", macro_block_size=1,
        quality=None, output_params=["-crf", str(CRF), "-f", "mp4"], ffmpeg_log_level="error")
    saved = os.dup(2)   # ffmpeg inherits stderr when it starts: point it at the log meanwhile
    try:
        os.dup2(log.fileno(), 2)
        writer.send(None)  # start ffmpeg
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    return writer


def _write_batches(batches, path, size, fps, name=None):
    """Encode every frame of every batch; ffmpeg starts at the first batch.

    ffmpeg does not report its failures (a full disk, say) to imageio-ffmpeg, which only sees
    a broken pipe or nothing at all; so the file is read back at the end and must hold every
    frame, else a UserError naming ``name`` (the final name of ``path``) says what ffmpeg said.
    """
    writer, frames, failed = None, 0, False
    with tempfile.TemporaryFile() as log:
        try:
            for batch in batches:
                writer = writer or _open_writer(path, size, fps, log)
                try:
                    for frame in batch:
                        writer.send(np.ascontiguousarray(frame))
                        frames += 1
                except OSError:   # ffmpeg stopped taking frames: it failed, say why below
                    failed = True
                    break
        finally:
            if writer is not None:
                writer.close()  # waits until ffmpeg has finished the file
        log.seek(0)
        said = reason(log) if writer is not None and log.read().strip() else ""   # ffmpeg's word
        if writer is not None and not os.path.exists(path) and not failed and not said:
            # ffmpeg wrote and said nothing wrong, yet the file is gone: someone else removed it
            raise UserError(f"could not write the video {name or path}: its temporary file "
                            f"{path} was deleted while it was being written; let one job at a "
                            f"time write into {os.path.dirname(os.path.abspath(path))}")
        if writer is not None and (failed or _count_frames(path) != frames):
            raise UserError(f"could not write the video {name or path} "
                            f"({said or 'ffmpeg wrote an incomplete file'}); {WRITE_FIX}")


def _count_frames(path):
    """Frames in the video file at ``path`` (None when it does not read as a video)."""
    try:
        return imageio_ffmpeg.count_frames_and_secs(path)[0]
    except (OSError, RuntimeError, ValueError):
        return None


_END = object()  # end-of-stream marker passed through the queues


def put_until_stopped(q, item, stop):
    """``q.put(item)`` that gives up (returns False) once ``stop`` is set (a ``threading.Event``)."""
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
            if not put_until_stopped(inbox, item, stop):
                return
        put_until_stopped(inbox, _END, stop)

    reader = threading.Thread(target=run, args=(read,), name="video-reader", daemon=True)
    writer = threading.Thread(target=run, args=(sink, _drain(outbox, stop)), name="video-writer",
                              daemon=True)
    reader.start()
    writer.start()
    try:
        for item in _drain(inbox, stop):
            result = transform(item)
            if not put_until_stopped(outbox, result, stop):
                break
            on_item(item)
        put_until_stopped(outbox, _END, stop)
        writer.join()  # normal end: the writer empties the queue and finishes
    finally:
        stop.set()  # after an error: releases both threads from their queues
        reader.join()
        writer.join()
    if errors:
        raise errors[0]


def _check_new_mp4(out_path):
    if not out_path.lower().endswith(".mp4"):
        raise UserError(f"output video {out_path} must end in .mp4 (H.264 in an mp4 file)")
    refuse_existing(out_path, "choose another output name")
    check_can_create(out_path, "output name")


def process_video(in_path, out_path, predict_fn, scheme, batch_size=4, alpha=0.5,
                  max_frames=None):
    """Write an H.264 mp4 of ``in_path`` with the predicted classes of ``scheme`` overlaid.

    Same frame count (or the first ``max_frames``), size and frame rate as the input; RGB
    end to end.  Decoding, inference (this thread) and overlay + encoding overlap
    (``render_overlay``), so the rate is close to ``predict_fn``'s own.  The video goes to a
    hidden temporary file next to ``out_path`` that gets its name only when complete; an
    existing ``out_path`` is refused.

    Returns ``{"frames", "fps", "size", "seconds", "frames_per_second"}`` (wall-clock rate).
    """
    in_path, out_path = os.fspath(in_path), os.fspath(out_path)
    if max_frames is not None and max_frames < 1:
        raise UserError(f"max_frames must be at least 1, got {max_frames}")
    _check_new_mp4(out_path)
    frames, meta = _open_reader(in_path)
    size, fps, total = _video_format(meta)
    if max_frames is not None:
        total = min(total or max_frames, max_frames)
    start = time.perf_counter()
    bar = tqdm(total=total, desc=os.path.basename(in_path), unit="frame")
    try:
        with staged_file(out_path) as tmp_path:
            n_frames = render_overlay(
                _read_batches(frames, in_path, size, batch_size, max_frames),
                lambda images: predict_batch(predict_fn, images), tmp_path, size, fps, scheme,
                alpha, name=out_path, on_batch=lambda images, maps: bar.update(len(images)))
            if n_frames == 0:
                raise UserError(f"video {in_path} has no frames; check the file")
    finally:
        bar.close()
        frames.close()  # in case the reader stopped early or never started
    seconds = time.perf_counter() - start
    return {"frames": n_frames, "fps": float(fps), "size": size,
            "seconds": seconds, "frames_per_second": n_frames / seconds}


def render_overlay(batches, maps_fn, out_path, size, fps, scheme, alpha=0.5, name=None,
                   on_batch=None):
    """The overlaid H.264 video of ``batches`` (uint8 RGB ``(N, H, W, 3)``) in the new file
    ``out_path`` (None: no video, only ``on_batch``); returns the number of frames.

    ``maps_fn(images) -> class maps (N, H, W)`` runs in this thread while ``batches`` is read
    in a reader thread and the overlays are encoded in a writer thread (``_overlapped``);
    ``on_batch(images, maps)`` is called here after each batch.  The one renderer of
    ``segment.py video`` and ``batch-predict``, so both write the same frames (bytes, even).
    """
    count = 0

    def segment(images):
        nonlocal count
        maps = maps_fn(images)
        count += len(images)
        if on_batch is not None:
            on_batch(images, maps)
        return images, maps

    def encode(pairs):
        if out_path is None:
            collections.deque(pairs, maxlen=0)   # drain: the maps were all that was wanted
        else:
            _write_batches((overlay(images, maps, scheme, alpha) for images, maps in pairs),
                           out_path, size, fps, name)

    _overlapped(source=batches, transform=segment, sink=encode)
    return count


def write_video(out_path, frames, fps=12):
    """Write RGB uint8 frames (an iterable of equal-size arrays) as the new mp4 ``out_path``."""
    out_path = os.fspath(out_path)
    _check_new_mp4(out_path)
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise UserError(f"no frames to write to {out_path}")
    height, width = first.shape[:2]
    with staged_file(out_path) as tmp_path:
        _write_batches(itertools.chain([[first]], ([f] for f in frames)), tmp_path,
                       (width, height), fps, out_path)
    return out_path


def read_frames(path, indices):
    """The frames of the video at ``path`` with the given indices, as RGB arrays."""
    frames, meta = _open_reader(os.fspath(path))
    wanted, found = set(indices), {}
    width, height = meta["size"]
    try:
        for i, raw in enumerate(frames):
            if i in wanted:
                found[i] = np.frombuffer(raw, np.uint8).reshape(height, width, 3)
            if len(found) == len(wanted):
                break
    finally:
        frames.close()
    return [found[i] for i in indices if i in found]


def make_test_video(path, n_frames, size=(160, 96), fps=12):
    """Write a synthetic clip for tests and benchmarks; returns ``path``.

    Left half red (220, 40, 40), right half green (40, 200, 40), and a grey (128, 128, 128)
    square moving along the top quarter so consecutive frames differ.
    """
    width, height = size
    side = max(2, height // 4)

    def frame(i):
        image = np.empty((height, width, 3), np.uint8)
        image[:, :width // 2] = (220, 40, 40)
        image[:, width // 2:] = (40, 200, 40)
        x = (i * 4) % max(1, width - side)
        image[:side, x:x + side] = 128
        return image

    return write_video(path, (frame(i) for i in range(n_frames)), fps)


def pan_clip_frames(images, n_frames, size):
    """``n_frames`` RGB frames of ``size`` (H, W): a slow pan across each of ``images``
    (RGB arrays) in turn -- a clip made of still scenes, for demos."""
    h, w = size
    frames = []
    per_scene = max(1, -(-n_frames // max(1, len(images))))
    for image in images:
        big = np.asarray(Image.fromarray(image).resize((w + w // 8, h), Image.BILINEAR))
        for k in range(per_scene):
            x = int(round(k * (w // 8) / max(1, per_scene - 1)))
            frames.append(big[:, x:x + w])
            if len(frames) == n_frames:
                return frames
    return frames
