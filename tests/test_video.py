"""video.py: overlaid videos keep frames, size, rate and colours; errors in any stage end cleanly."""
import threading
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
