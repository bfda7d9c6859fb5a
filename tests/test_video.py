"""video.py: overlaid videos keep frames, size, rate and colours; errors in any stage end cleanly."""
import threading
import time
from fractions import Fraction

import imageio_ffmpeg
import numpy as np
import pytest
from fakes import COLORS, GREEN, RED, ROAD, blend, read_video, red_is_road  # noqa: F401

from roadseg import video
from roadseg.errors import UserError


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
