"""video.py: overlaid videos keep frames, size, rate and colours; errors in any stage end cleanly."""
import os
import subprocess
import threading
import time
from fractions import Fraction

import imageio_ffmpeg
import numpy as np
import pytest
from fakes import COLORS, GREEN, RED, ROAD, blend, read_video, red_is_road  # noqa: F401

from roadseg import cli, video
from roadseg.errors import UserError
from roadseg.overlays import _palette, overlay
from roadseg.schemes import get_scheme


def test_process_video_keeps_frames_size_fps_and_rgb(tmp_path):
    src = video.make_test_video(tmp_path / "in.mp4", 30, size=(160, 96), fps=12)
    stats = video.process_video(src, tmp_path / "out.mp4", red_is_road, COLORS, batch_size=4)
    assert stats["frames"] == 30 and stats["fps"] == 12 and stats["size"] == (160, 96)
    assert stats["frames_per_second"] > 0
    meta, frames = read_video(tmp_path / "out.mp4")
    assert meta["size"] == (160, 96) and meta["fps"] == 12 and len(frames) == 30
    left = frames[:, 60:90, 10:70].reshape(-1, 3).mean(0)      # red -> road overlay
    right = frames[:, 60:90, 90:150].reshape(-1, 3).mean(0)    # green, background: as is
    np.testing.assert_allclose(left, blend(RED, ROAD), atol=6)
    np.testing.assert_allclose(right, GREEN, atol=6)
    assert left[0] > left[2] + 60                               # still red, not BGR-swapped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mp4"]  # no temp left


def test_process_video_odd_size_ntsc_rate_and_max_frames(tmp_path):
    src = video.make_test_video(tmp_path / "in.mp4", 9, size=(121, 75), fps=Fraction(30000, 1001))
    stats = video.process_video(src, tmp_path / "out.mp4", red_is_road, COLORS, batch_size=4,
                                  max_frames=7)
    assert stats["frames"] == 7 and stats["size"] == (121, 75)
    assert stats["fps"] == pytest.approx(30000 / 1001, abs=1e-9)
    meta, frames = read_video(tmp_path / "out.mp4")
    assert meta["size"] == (121, 75) and frames.shape == (7, 75, 121, 3)
    assert meta["fps"] == pytest.approx(29.97, abs=0.01)
    np.testing.assert_allclose(frames[:, 40:70, 5:50].reshape(-1, 3).mean(0), blend(RED, ROAD),
                               atol=6)


def test_process_video_refuses_bad_input_and_existing_output(tmp_path):
    src = video.make_test_video(tmp_path / "in.mp4", 3, size=(64, 48), fps=10)
    existing = tmp_path / "taken.mp4"
    existing.write_bytes(b"keep me")
    with pytest.raises(UserError, match="taken.mp4 already exists"):
        video.process_video(src, existing, red_is_road, COLORS)
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(UserError, match=r"out\.avi must end in \.mp4"):
        video.process_video(src, tmp_path / "out.avi", red_is_road, COLORS)
    (tmp_path / "text.mp4").write_text("not a video")
    with pytest.raises(UserError, match="cannot read video .*text.mp4"):
        video.process_video(tmp_path / "text.mp4", tmp_path / "o1.mp4", red_is_road, COLORS)
    with pytest.raises(UserError, match="missing.mp4 does not exist"):
        video.process_video(tmp_path / "missing.mp4", tmp_path / "o2.mp4", red_is_road, COLORS)
    # A valid stream header followed by no frames at all.
    (tmp_path / "empty.y4m").write_text("YUV4MPEG2 W64 H48 F12:1 Ip A1:1 C420jpeg\n")
    with pytest.raises(UserError, match="empty.y4m has no frames"):
        video.process_video(tmp_path / "empty.y4m", tmp_path / "o3.mp4", red_is_road, COLORS)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "empty.y4m", "in.mp4", "taken.mp4", "text.mp4"]             # no output, no temp file


def test_process_video_errors_in_any_stage_propagate(tmp_path, monkeypatch):
    src = video.make_test_video(tmp_path / "in.mp4", 12, size=(64, 48), fps=10)

    def model_fails(images):
        raise ZeroDivisionError("model broke")

    def pipeline_threads():
        """The pipeline's own threads (libraries' threads -- tqdm's monitor, imageio-ffmpeg's
        log reader -- end on their own schedule and are not counted)."""
        return [t.name for t in threading.enumerate() if t.name.startswith("video-")]

    with pytest.raises(ZeroDivisionError, match="model broke"):
        video.process_video(src, tmp_path / "a.mp4", model_fails, COLORS, batch_size=2)
    assert pipeline_threads() == []                                 # joined before raising
    with pytest.raises(ZeroDivisionError, match="model broke"):     # the camera waits for a first
        video.process_video(src, tmp_path / "a.mp4", model_fails, COLORS, realtime=True)  # overlay
    assert pipeline_threads() == []

    def encoder_fails(*args):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(video, "_open_writer", encoder_fails)
        with pytest.raises(OSError, match="disk full"):
            video.process_video(src, tmp_path / "b.mp4", red_is_road, COLORS, batch_size=2)
    assert pipeline_threads() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]  # nothing half written


def test_a_temporary_file_deleted_while_written_is_named_not_blamed_on_the_disk(tmp_path):
    """Another job cleaning the same folder deletes the file being encoded: ffmpeg goes on
    into the deleted file, so the error must not send the user to free disk space."""
    out = tmp_path / ".partial-x-clip.mp4"

    def batches():
        yield np.zeros((2, 48, 64, 3), np.uint8)
        deadline = time.monotonic() + 60
        while not out.exists():   # ffmpeg, started by the first batch, creates its file
            assert time.monotonic() < deadline, "ffmpeg did not create its file"
            time.sleep(0.01)
        out.unlink()
        for i in range(1, 6):
            yield np.full((2, 48, 64, 3), 40 * i, np.uint8)

    with pytest.raises(UserError) as caught:
        video._write_batches(batches(), str(out), (64, 48), 12, name="out/clip.mp4")
    assert str(caught.value) == (f"could not write the video out/clip.mp4: its temporary file {out} "
                                 f"was deleted while it was being written; let one job at a time "
                                 f"write into {tmp_path}")
    assert list(tmp_path.iterdir()) == []


def test_overlapped_keeps_order_and_propagates_reader_errors():
    got = []
    video._overlapped(iter(range(50)), lambda x: x * 2, lambda items: got.extend(items))
    assert got == [2 * x for x in range(50)]

    def source():
        yield from range(5)
        raise UserError("cannot decode video x.mp4")

    got.clear()
    with pytest.raises(UserError, match="x.mp4"):
        video._overlapped(source(), lambda x: x, lambda items: got.extend(items))
    assert got == list(range(len(got))) and len(got) <= 5


def test_real_videos_first_frames(shared_data, tmp_path):
    videos = sorted((shared_data / "videos").glob("*.mp4"))
    assert videos, "no videos in ../shared/data/videos"
    for clip in videos:
        in_meta = next(imageio_ffmpeg.read_frames(str(clip)))
        out = tmp_path / clip.name
        stats = video.process_video(clip, out, lambda x: (x[..., 1] > 150).astype(np.uint8),
                                      COLORS, max_frames=20)
        meta, frames = read_video(out)
        assert stats["frames"] == 20 and frames.shape[0] == 20
        assert meta["size"] == in_meta["size"] == stats["size"]
        assert meta["fps"] == in_meta["fps"] == stats["fps"]


def _index_clip(path, n_frames, fps=12, size=(160, 96)):
    """A clip whose frame i shows i in binary: 8 vertical bands, band k white when bit k is set
    (wide bands survive H.264 intact), so a decoded frame says which frame it is."""
    width, height = size
    band = width // 8

    def frame(i):
        image = np.zeros((height, width, 3), np.uint8)
        for k in range(8):
            if i >> k & 1:
                image[:, k * band:(k + 1) * band] = 255
        return image

    return video.write_video(path, (frame(i) for i in range(n_frames)), fps)


def _indices(frames):
    band = frames.shape[2] // 8
    bits = frames[:, :, band // 2::band][:, :, :8].mean(axis=(1, 3)) > 128
    return [int(sum(1 << k for k in range(8) if b[k])) for b in bits]


@pytest.mark.parametrize("fps", [12, Fraction(30000, 1001)])
def test_frame_ranges_from_their_seek_points_equal_sequential_decoding(tmp_path, fps):
    clip = _index_clip(tmp_path / "index.mp4", 50, fps=fps)
    size, exact_fps, estimate = video.probe_video(clip)
    assert size == (160, 96) and exact_fps == fps and estimate == 50
    _, sequential = read_video(clip)
    assert _indices(sequential) == list(range(50))
    for start, count in [(0, 12), (1, 5), (12, 12), (13, 7), (37, 12), (44, None), (48, 10)]:
        got = np.concatenate(list(video.read_frame_batches(clip, 4, start, count)))
        end = 50 if count is None else min(50, start + count)
        assert _indices(got) == list(range(start, end)), (start, count)
        np.testing.assert_array_equal(got, sequential[start:end])     # the very same pixels


def test_render_overlay_memory_stays_flat_with_video_length(tmp_path):
    """Peak Python/numpy memory of the three-stage pipeline for a clip 5x longer: the same
    (bounded queues; nothing holds the whole video)."""
    import tracemalloc

    peaks = []
    for n in (64, 256):   # 64: the queues already fill up
        clip = video.make_test_video(tmp_path / f"in{n}.mp4", n, size=(160, 96), fps=12)
        size, fps, _ = video.probe_video(clip)
        tracemalloc.start()
        count = video.render_overlay(video.read_frame_batches(clip, 4), red_is_road,
                                     str(tmp_path / f"out{n}.mp4"), size, fps, COLORS)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert count == n
    video_bytes = 256 * 160 * 96 * 3   # 11.8 MB decoded
    assert peaks[1] < 1.3 * peaks[0] and peaks[1] < video_bytes / 2, peaks


def _zeros(images):
    """Fake model: class 0 everywhere, which is not painted: the overlay is the frame itself."""
    return np.zeros(images.shape[:3], np.uint8)


def _sleeping(seconds, model=_zeros):
    """A fake model that takes at least ``seconds`` a call, whatever the batch."""
    def predict(images):
        time.sleep(seconds)
        return model(images)
    return predict


def _check_output(path, n_frames, processed):
    """The output holds a frame for each of the ``n_frames`` input frames: at slot i the
    frame of the newest processed index <= i (dropped frames repeat the one before them)."""
    _, frames = read_video(path)
    shown = _indices(frames)
    assert len(shown) == n_frames and shown[0] == 0
    assert all(a <= b <= i for i, (a, b) in enumerate(zip(shown, shown[1:]), start=1))
    assert len(set(shown)) == processed
    return shown


def test_realtime_keeps_every_frame_when_the_model_keeps_up(tmp_path):
    """A model far faster than the clip (8 frames/s; up to 8 frames may wait, 1 s of slack):
    nothing dropped, every frame's own overlay, latency figures sane."""
    clip = _index_clip(tmp_path / "in.mp4", 24, fps=8)
    stats = video.process_video(clip, tmp_path / "out.mp4", _zeros, COLORS, batch_size=8,
                                realtime=True)
    assert (stats["frames"], stats["processed"], stats["dropped"]) == (24, 24, 0)
    assert stats["realtime"] and 0 < stats["latency_p50"] <= stats["latency_p95"]
    assert _check_output(tmp_path / "out.mp4", 24, 24) == list(range(24))
    # paced as a camera: the 23 frames after the first come 1/8 s apart
    assert stats["seconds"] >= 22 / 8


def test_realtime_drops_frames_when_the_model_is_behind_and_counts_them(tmp_path):
    """A model that takes >= 0.5 s a call (<= 2 frames/s at batch 1) on a 20 fps clip: the
    29 frames after the first arrive over 1.4 s, in which at most 4 calls fit (5 with the
    first), so about 25 of the 30 are dropped; >= 20 leaves room for a reader 2 s late.
    The video still has 30 frames, the overlay before each dropped one repeated."""
    clip = _index_clip(tmp_path / "in.mp4", 30, fps=20)
    stats = video.process_video(clip, tmp_path / "out.mp4", _sleeping(0.5), COLORS,
                                batch_size=1, realtime=True)
    assert stats["frames"] == 30 and stats["processed"] + stats["dropped"] == 30
    assert stats["dropped"] >= 20 and stats["processed"] >= 2
    assert 0.5 <= stats["latency_p50"] <= stats["latency_p95"]   # each waited for its call
    shown = _check_output(tmp_path / "out.mp4", 30, stats["processed"])
    assert shown[-1] == 29    # the last frame is never dropped: nothing comes after it
    line = cli.video_summary("out.mp4", stats)   # segment.py video's closing line says so
    assert f"realtime: {stats['dropped']} of 30 frames dropped" in line, line
    assert f"p95 {1000 * stats['latency_p95']:.0f} ms" in line and "30 frames at 20.00 fps" in line


def test_realtime_batches_what_waits(tmp_path):
    """Behind (>= 0.5 s a call, 10 frames arrive meanwhile) with room for 3 waiting frames:
    each call takes all that wait, 3 once it is behind; the first call has frame 0 alone
    (the camera starts once its overlay is on its way)."""
    clip = _index_clip(tmp_path / "in.mp4", 30, fps=20)
    sizes = []

    def model(images):
        sizes.append(len(images))
        time.sleep(0.5)
        return _zeros(images)

    stats = video.process_video(clip, tmp_path / "out.mp4", model, COLORS, batch_size=3,
                                realtime=True)
    assert max(sizes) == 3 and sizes[0] == 1 and sum(sizes) == stats["processed"]
    assert stats["dropped"] >= 10 and stats["processed"] + stats["dropped"] == 30
    _check_output(tmp_path / "out.mp4", 30, stats["processed"])


def test_non_realtime_output_is_every_frames_overlay(tmp_path):
    """Without --realtime nothing is dropped, however slow the model: the video is exactly
    (byte for byte) the overlays of every frame encoded by ``write_video``."""
    clip = video.make_test_video(tmp_path / "in.mp4", 14, size=(160, 96), fps=12)
    stats = video.process_video(clip, tmp_path / "out.mp4", _sleeping(0.05, red_is_road), COLORS,
                                batch_size=4)
    assert (stats["frames"], stats["processed"], stats["dropped"]) == (14, 14, 0)
    assert not stats["realtime"] and 0 < stats["latency_p50"] <= stats["latency_p95"]
    assert stats["latency_p95"] >= 0.05 and stats["cpu_seconds"] > 0
    _, frames = read_video(clip)
    video.write_video(tmp_path / "expected.mp4", overlay(frames, red_is_road(frames), COLORS))
    assert (tmp_path / "out.mp4").read_bytes() == (tmp_path / "expected.mp4").read_bytes()
    assert "slower than the clip's frame rate" not in cli.video_summary("out.mp4", dict(
        stats, frames_per_second=stats["fps"]))
    assert "slower than the clip's frame rate: --realtime drops" in cli.video_summary("out.mp4", dict(
        stats, frames_per_second=stats["fps"] / 2))


def test_overlay_table_equals_the_float_blend():
    """``overlay`` looks the blend up in a table: the same bytes as computing it in float32,
    for every class id, value, alpha and skipped classes."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 256, 64, 3), np.uint8)
    images[0] = np.arange(256, dtype=np.uint8)[:, None, None]       # every value in each channel
    maps = rng.integers(0, 256, images.shape[:3], np.uint8)         # every id, IGNORE included
    for colors, alpha, skip in [(get_scheme("road4"), 0.5, None), (get_scheme("camvid11"), 0.3, None),
                                (COLORS, 0.77, ()), (COLORS, 1.0, (0, 2)), (COLORS, np.float64(0.4), None)]:
        palette = getattr(colors, "colors", colors)
        painted = np.zeros(256, bool)
        painted[:len(palette)] = True
        painted[list(getattr(colors, "unpainted", (0,)) if skip is None else skip)] = False
        blend = images.astype(np.float32)
        blend *= 1.0 - alpha
        blend += np.take(_palette(palette).astype(np.float32) * alpha, maps, axis=0)
        expected = np.where(painted[maps][..., None], np.rint(blend).astype(np.uint8), images)
        np.testing.assert_array_equal(overlay(images, maps, colors, alpha, skip), expected)
        np.testing.assert_array_equal(overlay(images[1], maps[1], colors, alpha, skip), expected[1])


def test_video_from_standard_input_or_a_fifo(tmp_path, monkeypatch):
    """``-`` reads a stream (here matroska) from standard input -- a pipe -- as ffmpeg gives
    it; with --realtime a stream is not paced (it comes at its own rate); a FIFO the same;
    a terminal on standard input is one line."""
    clip = _index_clip(tmp_path / "in.mp4", 20, fps=10)
    mkv = tmp_path / "in.mkv"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(clip), "-c", "copy",
                    "-f", "matroska", str(mkv)], check=True)
    for realtime in (False, True):
        read, write = os.pipe()
        saved = os.dup(0)
        os.dup2(read, 0)
        os.close(read)
        feeder = threading.Thread(target=lambda: (os.write(write, mkv.read_bytes()), os.close(write)))
        feeder.start()
        try:
            out = tmp_path / f"out_{realtime}.mp4"
            stats = video.process_video("-", out, _zeros, COLORS, batch_size=8, realtime=realtime)
        finally:
            os.dup2(saved, 0)
            os.close(saved)
            feeder.join()
        assert stats["frames"] == 20 and stats["fps"] == 10
        assert stats["processed"] + stats["dropped"] == 20 and stats["processed"] >= 1
        if not realtime:   # (realtime: the stream comes as fast as the pipe, so some may drop)
            assert stats["processed"] == 20
            assert _check_output(out, 20, 20) == list(range(20))
    fifo = tmp_path / "camera"   # a named pipe is a stream too
    os.mkfifo(fifo)
    feeder = threading.Thread(target=lambda: fifo.write_bytes(mkv.read_bytes()))
    feeder.start()
    try:
        stats = video.process_video(fifo, tmp_path / "out_fifo.mp4", _zeros, COLORS)
    finally:
        feeder.join()
    assert (stats["frames"], stats["processed"]) == (20, 20)
    assert _check_output(tmp_path / "out_fifo.mp4", 20, 20) == list(range(20))
    with monkeypatch.context() as m:
        m.setattr(os, "isatty", lambda fd: True)
        with pytest.raises(UserError, match="standard input .* is a terminal; pipe a video"):
            video.process_video("-", tmp_path / "never.mp4", _zeros, COLORS)
