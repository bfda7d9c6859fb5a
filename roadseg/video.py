"""Video in and out: one reader, one writer, and the overlaid copy of a video.

* ``process_video``     -> an overlaid H.264 copy of a video; decoding, inference and
                           encoding overlap in three threads; ``realtime``: paced as a
                           camera, dropping frames the model cannot keep up with
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
import resource
import tempfile
import threading
import time
import typing
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
# libx264's speed presets, fastest first.  The default, veryfast, encodes a 960x540 overlay
# in 21-29 CPU ms against medium's (x264's own default) 47-69, its PSNR 0.4 dB lower and its
# file no larger (bench/README.md, "The video path at frame rate").
PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower",
           "veryslow")
PRESET = "veryfast"
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


def _ffmpeg_input(path):
    """``(what ffmpeg opens, live)`` for a video path; ``live``: a stream that comes at its own
    pace and has no end known in advance -- ``-`` (this process's standard input), a FIFO or
    a device -- rather than a file.  A missing path is a UserError naming it."""
    if path == "-":
        stdin = f"/proc/{os.getpid()}/fd/0"   # ffmpeg reads our stdin (its own is a pipe to us)
        if not os.path.exists(stdin):
            raise UserError("reading a video from standard input ('-') needs Linux's /proc; "
                            "pass a file")
        if os.isatty(0):
            raise UserError("standard input ('-') is a terminal; pipe a video stream into it "
                            "(e.g. ffmpeg ... -f matroska - | segment.py video ... - out.mp4)")
        return stdin, True
    if not os.path.exists(path):
        raise UserError(f"video {path} does not exist; check the path")
    return path, not os.path.isfile(path)


def check_input(path):
    """A UserError in one line when ``path`` cannot be a video input (missing, a terminal)."""
    _ffmpeg_input(os.fspath(path))


def _open_reader(path, seek_seconds=None):
    """``(raw frame generator, metadata)`` of a video, or a UserError naming the file;
    ``seek_seconds``: decoding starts there (ffmpeg's input ``-ss``)."""
    source, live = _ffmpeg_input(path)
    seek = ["-ss", f"{seek_seconds:.6f}"] if seek_seconds else None
    frames = imageio_ffmpeg.read_frames(source, pix_fmt="rgb24", input_params=seek)
    try:
        meta = next(frames)
    except (OSError, RuntimeError, IndexError, AttributeError, StopIteration) as err:
        frames.close()
        what = "a video stream (mkv, mpegts, nut or y4m: an mp4 needs a file)" if live else "a video file"
        raise UserError(f"cannot read video {path} ({reason(err)}); is it {what}?") from None
    return frames, meta


class Frames(typing.NamedTuple):
    """Consecutive or not (``realtime`` drops some) frames of a video, with their indices in
    it and when each was decoded (``time.perf_counter``)."""
    indices: np.ndarray   # int (N,)
    images: np.ndarray    # uint8 (N, H, W, 3) RGB
    times: np.ndarray     # float (N,)


def _decoded(frames, path, size, max_frames=None):
    """Yield ``(index, uint8 (H, W, 3) RGB frame, when it was decoded)`` from a ``read_frames``
    generator (the first ``max_frames``), then close it."""
    width, height = size
    try:
        for i, raw in enumerate(frames):
            if max_frames is not None and i >= max_frames:
                break
            yield i, np.frombuffer(raw, np.uint8).reshape(height, width, 3), time.perf_counter()
    except (OSError, RuntimeError) as err:
        raise UserError(f"cannot decode video {path}: {reason(err)}") from None
    finally:
        frames.close()  # stops ffmpeg


def _batched(decoded, batch_size):
    """``Frames`` of up to ``batch_size`` consecutive frames from ``_decoded``."""
    batch = []
    for item in itertools.chain(decoded, [None]):
        if item is not None:
            batch.append(item)
        if batch and (item is None or len(batch) == batch_size):
            indices, images, times = zip(*batch)
            yield Frames(np.array(indices), np.stack(images), np.array(times))
            batch = []


def _read_batches(frames, path, size, batch_size, max_frames=None):
    """Yield uint8 (N, H, W, 3) RGB batches from a ``read_frames`` generator, then close it."""
    for batch in _batched(_decoded(frames, path, size, max_frames), batch_size):
        yield batch.images


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


def _open_writer(path, size, fps, log, preset=PRESET):
    """An imageio-ffmpeg writer (a generator: ``.send(frame)``, ``.close()``) for RGB frames.

    H.264 at exactly ``size`` (W, H), libx264 at ``CRF`` and ``preset``.  yuv420p, which
    every player supports, needs even sides; odd sizes are written as yuv444p rather than
    rescaled.  ffmpeg's own messages go
    to the file ``log`` (not onto our stderr), to say why a write failed.
    """
    even = size[0] % 2 == 0 and size[1] % 2 == 0
    writer = imageio_ffmpeg.write_frames(
        path, size, fps=fps, codec="libx264", pix_fmt_in="rgb24",
        pix_fmt_out="yuv420p" if even else "yuv444p", macro_block_size=1,
        quality=None, output_params=["-crf", str(CRF), "-preset", preset, "-f", "mp4"],
        ffmpeg_log_level="error")
    saved = os.dup(2)   # ffmpeg inherits stderr when it starts: point it at the log meanwhile
    try:
        os.dup2(log.fileno(), 2)
        writer.send(None)  # start ffmpeg
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    return writer


def _write_batches(batches, path, size, fps, name=None, preset=PRESET):
    """Encode every frame of every batch; ffmpeg starts at the first batch.  Returns the
    number of frames.

    ffmpeg does not report its failures (a full disk, say) to imageio-ffmpeg, which only sees
    a broken pipe or nothing at all; so the file is read back at the end and must hold every
    frame, else a UserError naming ``name`` (the final name of ``path``) says what ffmpeg said.
    """
    writer, frames, failed = None, 0, False
    with tempfile.TemporaryFile() as log:
        try:
            for batch in batches:
                writer = writer or _open_writer(path, size, fps, log, preset)
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
        text = log.read().decode(errors="replace").strip()
        said = reason(text) if writer is not None and text else ""   # ffmpeg's word, if any
        if writer is not None and not os.path.exists(path) and not failed and not said:
            # ffmpeg wrote and said nothing wrong, yet the file is gone: someone else removed it
            raise UserError(f"could not write the video {name or path}: its temporary file "
                            f"{path} was deleted while it was being written; let one job at a "
                            f"time write into {os.path.dirname(os.path.abspath(path))}")
        if writer is not None and (failed or _count_frames(path) != frames):
            raise UserError(f"could not write the video {name or path} "
                            f"({said or 'ffmpeg wrote an incomplete file'}); {WRITE_FIX}")
    return frames


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


class _Queue:
    """A bounded FIFO between two stages of ``_overlapped``: ``put`` waits for room."""

    def __init__(self, size):
        self._queue = queue.Queue(size)

    def put(self, item, stop):
        return put_until_stopped(self._queue, item, stop)

    def end(self, stop):
        put_until_stopped(self._queue, _END, stop)

    def items(self, stop):
        return _drain(self._queue, stop)


class NewestFrames:
    """The realtime inbox of the model: at most ``capacity`` frames (``Frames`` of one) wait;
    one arriving when it is full pushes the oldest out (dropped: the model is behind, and the
    newest frames are the ones worth showing).  ``items`` gives every waiting frame at
    once as one batch, without waiting for more: a batch of one while the model keeps up."""

    def __init__(self, capacity):
        self.capacity = capacity
        self._waiting, self._ended = collections.deque(), False
        self._changed = threading.Condition()

    def put(self, frames, stop):
        with self._changed:
            if len(self._waiting) == self.capacity:
                self._waiting.popleft()
            self._waiting.append(frames)
            self._changed.notify()
        return True

    def end(self, stop):
        with self._changed:
            self._ended = True
            self._changed.notify()

    def items(self, stop):
        while True:
            with self._changed:
                while not (self._waiting or self._ended or stop.is_set()):
                    self._changed.wait(0.1)
                if stop.is_set() or not self._waiting:
                    return
                taken = list(self._waiting)
                self._waiting.clear()
            yield Frames(*(np.concatenate(part) for part in zip(*taken)))


def _overlapped(source, transform, sink, on_item=lambda item: None, inbox=None, stop=None):
    """``sink(transform(x) for x in source)`` with the three stages in three threads.

    ``source`` is iterated in a reader thread, ``transform`` runs in this thread and
    ``sink`` consumes the results in a writer thread; bounded queues connect them (``inbox``
    between the reader and this thread: default a FIFO of ``QUEUE_BATCHES``).  The first
    error of any stage sets ``stop``, which stops the others, and is raised here; threads
    are always joined.
    """
    inbox, outbox = inbox or _Queue(QUEUE_BATCHES), _Queue(QUEUE_BATCHES)
    stop, errors = stop or threading.Event(), []

    def run(stage, *args):
        try:
            stage(*args)
        except BaseException as err:
            errors.append(err)
            stop.set()

    def read():
        for item in source:
            if not inbox.put(item, stop):
                return
        inbox.end(stop)

    reader = threading.Thread(target=run, args=(read,), name="video-reader", daemon=True)
    writer = threading.Thread(target=run, args=(sink, outbox.items(stop)), name="video-writer",
                              daemon=True)
    reader.start()
    writer.start()
    try:
        for item in inbox.items(stop):
            result = transform(item)
            if not outbox.put(result, stop):
                break
            on_item(item)
        outbox.end(stop)
        writer.join()  # normal end: the writer empties the queue and finishes
    finally:
        stop.set()  # after an error: releases both threads from their queues
        reader.join()
        writer.join()
    if errors:
        raise errors[0]


class _Tally:
    """What one render did: frames ``read`` (decoded), ``processed`` (by the model);
    ``latencies``: per processed frame, seconds from its decoding to its overlay being
    handed to the encoder; ``started`` is set once the first overlay has been; ``stop``
    stops the pipeline's threads."""

    def __init__(self):
        self.read = self.processed = 0
        self.latencies = []
        self.started, self.stop = threading.Event(), threading.Event()

    def count(self, decoded):
        """Count the frames of a ``_decoded`` stream as they are read."""
        for item in decoded:
            self.read += 1
            yield item


def _camera(decoded, fps, tally, live):
    """``Frames`` of one frame each, as a camera gives them: frame i >= 1 comes (i - 1) / fps
    after the first overlay has gone to the encoder (the model and the encoder are running),
    and counts as decoded then.  A ``live`` stream (pipe, device) comes at its own pace."""
    start = None
    for i, image, decoded_at in decoded:
        if i and not live:
            if start is None:
                while not tally.started.wait(0.1):
                    if tally.stop.is_set():
                        return
                start = time.perf_counter() - 1 / fps
            if tally.stop.wait(max(0.0, start + i / fps - time.perf_counter())):
                return
            decoded_at = time.perf_counter()
        yield Frames(np.array([i]), image[None], np.array([decoded_at]))


def _overlay_frames(pairs, scheme, alpha, tally):
    """Each frame's overlay, one frame a batch, from ``(Frames, class maps)`` in order; a
    dropped frame (an index missing) gets the overlay before it again, so the video keeps
    every frame's time; its latency is taken as each overlay is handed on."""
    last, previous = -1, None
    for frames, maps in pairs:
        for index, frame, class_map, decoded_at in zip(frames.indices, frames.images, maps, frames.times):
            image = overlay(frame, class_map, scheme, alpha)   # a frame at a time: in the cache
            for _ in range(index - last - 1):
                yield [image if previous is None else previous]
            tally.latencies.append(time.perf_counter() - decoded_at)
            yield [image]
            tally.started.set()
            last, previous = index, image
    for _ in range(tally.read - last - 1):   # dropped after the last one processed
        yield [previous]


def _render(source, maps_fn, out_path, size, fps, scheme, tally, alpha=0.5, name=None,
            on_batch=None, preset=PRESET, inbox=None):
    """The overlapped pipeline of ``render_overlay`` on ``Frames`` from ``source``."""
    def segment(frames):
        maps = maps_fn(frames.images)
        tally.processed += len(frames.indices)
        if on_batch is not None:
            on_batch(frames, maps)
        return frames, maps

    def encode(pairs):
        if out_path is None:
            for _ in pairs:   # drain: the maps were all that was wanted
                tally.started.set()
        else:
            _write_batches(_overlay_frames(pairs, scheme, alpha, tally), out_path, size, fps,
                           name, preset)

    _overlapped(source=source, transform=segment, sink=encode, inbox=inbox, stop=tally.stop)


def _check_new_mp4(out_path):
    if not out_path.lower().endswith(".mp4"):
        raise UserError(f"output video {out_path} must end in .mp4 (H.264 in an mp4 file)")
    refuse_existing(out_path, "choose another output name")
    check_can_create(out_path, "output name")


def process_video(in_path, out_path, predict_fn, scheme, batch_size=4, alpha=0.5,
                  max_frames=None, realtime=False, preset=PRESET):
    """Write an H.264 mp4 of ``in_path`` with the predicted classes of ``scheme`` overlaid.

    Same frame count (or the first ``max_frames``), size and frame rate as the input; RGB
    end to end.  Decoding, inference (this thread) and overlay + encoding (libx264 at
    ``preset``) overlap (``render_overlay``).  ``in_path`` may be ``-`` (standard input), a
    FIFO or a device: a stream (``_ffmpeg_input``).  The video goes to a hidden temporary
    file next to ``out_path`` that gets its name only when complete; an existing
    ``out_path`` is refused.

    ``realtime``: frames come as a camera gives them (``_camera``: a file at its frame rate),
    the model takes whatever waits, up to ``batch_size`` frames, and frames that arrive when
    ``batch_size`` already wait are dropped (``NewestFrames``); each dropped frame's place in
    the video holds the overlay before it, so the video keeps the input's frame count and
    duration.  Without it, every frame is segmented, however long that takes.

    Returns ``{"frames" (in the video), "processed", "dropped", "fps", "size", "seconds",
    "frames_per_second" (processed, wall clock), "latency_p50", "latency_p95" (seconds from a
    frame's decoding to its overlay going to the encoder), "realtime", "cpu_seconds" (this
    process's and ffmpeg's)}``.
    """
    in_path, out_path = os.fspath(in_path), os.fspath(out_path)
    if max_frames is not None and max_frames < 1:
        raise UserError(f"max_frames must be at least 1, got {max_frames}")
    _check_new_mp4(out_path)
    if preset not in PRESETS:
        raise UserError(f"unknown libx264 preset {preset!r}; use one of {', '.join(PRESETS)}")
    live = _ffmpeg_input(in_path)[1]
    frames, meta = _open_reader(in_path)
    size, fps, total = _video_format(meta)
    total = None if live else total
    if max_frames is not None:
        total = min(total or max_frames, max_frames)
    tally = _Tally()
    decoded = tally.count(_decoded(frames, in_path, size, max_frames))
    source = _camera(decoded, fps, tally, live) if realtime else _batched(decoded, batch_size)
    bar = tqdm(total=total, desc="stdin" if in_path == "-" else os.path.basename(in_path), unit="frame")
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    try:
        with staged_file(out_path) as tmp_path:
            _render(source, lambda images: predict_batch(predict_fn, images), tmp_path, size, fps,
                    scheme, tally, alpha, name=out_path, preset=preset,
                    on_batch=lambda batch, maps: bar.update(batch.indices[-1] + 1 - bar.n),
                    inbox=NewestFrames(batch_size) if realtime else None)
            if tally.read == 0:
                raise UserError(f"video {in_path} has no frames; check the file")
    finally:
        bar.close()
        frames.close()  # in case the reader stopped early or never started
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    p50, p95 = np.percentile(tally.latencies, [50, 95])
    return {"frames": tally.read, "processed": tally.processed,
            "dropped": tally.read - tally.processed, "fps": float(fps), "size": size,
            "seconds": seconds, "frames_per_second": tally.processed / seconds,
            "latency_p50": float(p50), "latency_p95": float(p95), "realtime": realtime,
            "cpu_seconds": cpu}


def _cpu_seconds():
    """CPU seconds used so far by this process (every thread) and its ended children
    (ffmpeg's reader and encoder once they have finished)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def render_overlay(batches, maps_fn, out_path, size, fps, scheme, alpha=0.5, name=None,
                   on_batch=None, preset=PRESET):
    """The overlaid H.264 video of ``batches`` (uint8 RGB ``(N, H, W, 3)``) in the new file
    ``out_path`` (None: no video, only ``on_batch``); returns the number of frames.

    ``maps_fn(images) -> class maps (N, H, W)`` runs in this thread while ``batches`` is read
    in a reader thread and the overlays are encoded in a writer thread (``_overlapped``);
    ``on_batch(images, maps)`` is called here after each batch.  The one renderer of
    ``segment.py video`` and ``batch-predict``, so both write the same frames (bytes, even).
    """
    tally = _Tally()

    def stamped():
        for images in batches:
            first = tally.read
            tally.read += len(images)
            yield Frames(np.arange(first, tally.read), images, np.full(len(images), time.perf_counter()))

    _render(stamped(), maps_fn, out_path, size, fps, scheme, tally, alpha, name, preset=preset,
            on_batch=None if on_batch is None else lambda frames, maps: on_batch(frames.images, maps))
    return tally.processed


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
