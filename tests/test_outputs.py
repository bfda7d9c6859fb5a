"""outputs.py: colours, overlays, run folders, sample PNGs and videos (no TensorFlow)."""
import re
import threading
from fractions import Fraction

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

import outputs
from errors import UserError
from schemes import IGNORE, get_scheme

COLORS = get_scheme("road4").colors
ROAD, VEHICLE, PED, LIGHT = (128, 64, 128), (0, 0, 142), (220, 20, 60), (250, 170, 30)
RED, GREEN = (220, 40, 40), (40, 200, 40)  # make_test_video's left / right halves


def red_is_road(images):
    """Fake model: road where the red channel is bright, vehicle where blue is, else 0."""
    maps = np.zeros(images.shape[:3], np.uint8)
    maps[images[..., 0] > 128] = 1
    maps[images[..., 2] > 128] = 2
    return maps


def read_video(path):
    """(metadata, uint8 frames (N, H, W, 3)) of a video file."""
    gen = imageio_ffmpeg.read_frames(str(path))
    meta = next(gen)
    width, height = meta["size"]
    frames = [np.frombuffer(raw, np.uint8).reshape(height, width, 3) for raw in gen]
    return meta, np.stack(frames)


def blend(image_rgb, color_rgb, alpha=0.5):
    return tuple(int(np.rint((1 - alpha) * i + alpha * c)) for i, c in zip(image_rgb, color_rgb))


# --------------------------------------------------------------------------- colours
def test_colorize_maps_each_class_to_its_colour_and_ignore_to_black():
    class_map = np.array([[0, 1, 2], [3, 4, IGNORE], [7, 1, 0]], np.uint8)
    out = outputs.colorize(class_map, COLORS)
    assert out.shape == (3, 3, 3) and out.dtype == np.uint8
    expected = [[(0, 0, 0), ROAD, VEHICLE], [PED, LIGHT, (0, 0, 0)], [(0, 0, 0), ROAD, (0, 0, 0)]]
    np.testing.assert_array_equal(out, np.array(expected, np.uint8))


def test_overlay_blends_half_and_leaves_background_and_ignore_untouched():
    image = np.zeros((2, 3, 3), np.uint8)
    image[:] = (100, 100, 100)
    image[1, 2] = (10, 200, 31)
    class_map = np.array([[0, 1, 2], [3, IGNORE, 4]], np.uint8)
    out = outputs.overlay(image, class_map, COLORS)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert tuple(out[0, 0]) == (100, 100, 100)            # background untouched
    assert tuple(out[0, 1]) == (114, 82, 114)             # (100 + 128) / 2, (100 + 64) / 2
    assert tuple(out[0, 2]) == (50, 50, 121)              # vehicle (0, 0, 142)
    assert tuple(out[1, 0]) == (160, 60, 80)              # pedestrian (220, 20, 60)
    assert tuple(out[1, 1]) == (100, 100, 100)            # IGNORE untouched
    assert tuple(out[1, 2]) == (130, 185, 30)             # light; 30.5 rounds half to even


def test_overlay_alpha_skip_classes_and_batches():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    maps = rng.integers(0, 5, (2, 4, 5), dtype=np.uint8)
    full = outputs.overlay(images, maps, COLORS, alpha=1.0, skip_classes=())
    np.testing.assert_array_equal(full, COLORS[maps])      # alpha 1: pure class colours
    quarter = outputs.overlay(images[0], maps[0], COLORS, alpha=0.25)
    for y, x in np.ndindex(4, 5):
        want = tuple(images[0, y, x]) if maps[0, y, x] == 0 else \
            blend(images[0, y, x], COLORS[maps[0, y, x]], 0.25)
        assert tuple(quarter[y, x]) == want
    batch = outputs.overlay(images, maps, COLORS)           # a batch equals one by one
    for i in range(2):
        np.testing.assert_array_equal(batch[i], outputs.overlay(images[i], maps[i], COLORS))
    with pytest.raises(ValueError):
        outputs.overlay(images[0], maps[0, :3], COLORS)


# --------------------------------------------------------------------------- run folders
def test_new_run_dir_never_reuses_a_folder(tmp_path):
    runs = tmp_path / "runs"
    first = outputs.new_run_dir(runs, "exp")
    (runs / "exp-1").write_text("a file, not a folder")    # any existing name is skipped
    second = outputs.new_run_dir(runs, "exp")
    third = outputs.new_run_dir(runs, "exp")
    assert [p.split("/")[-1] for p in (first, second, third)] == ["exp", "exp-2", "exp-3"]
    stamped = outputs.new_run_dir(runs)
    again = outputs.new_run_dir(runs)
    assert re.fullmatch(r"\d{8}-\d{6}", stamped.split("/")[-1])
    assert again != stamped and (runs / again.split("/")[-1]).is_dir()
    with pytest.raises(UserError, match="plain folder name"):
        outputs.new_run_dir(runs, "../elsewhere")


# --------------------------------------------------------------------------- sample PNGs
def make_images(folder):
    """Three PNGs, two sizes: left third red, a blue square, the rest grey."""
    paths = []
    for name, (h, w) in [("a", (48, 64)), ("b", (48, 64)), ("c", (40, 90))]:
        image = np.full((h, w, 3), 90, np.uint8)
        image[:, : w // 3] = RED
        image[5:15, w - 20:w - 10] = (30, 30, 200)
        path = folder / f"{name}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def test_save_inference_samples_core_writes_overlays_and_class_maps(tmp_path):
    paths = make_images(tmp_path)
    run_dir = outputs.new_run_dir(tmp_path / "runs", "samples")
    seen = []

    def predict(images):
        seen.append(images.shape)
        return red_is_road(images)

    written = outputs.save_inference_samples_core(run_dir, paths, predict, COLORS, batch_size=4)
    assert seen == [(2, 48, 64, 3), (1, 40, 90, 3)]          # same-size images share a batch
    assert [p.split("/")[-1] for p in written] == [
        "a.png", "a_classes.png", "b.png", "b_classes.png", "c.png", "c_classes.png"]
    for path in paths:
        original = np.asarray(Image.open(path))
        classes = np.asarray(Image.open(f"{run_dir}/{path.stem}_classes.png"))
        shown = np.asarray(Image.open(f"{run_dir}/{path.stem}.png"))
        assert classes.shape == original.shape[:2] and shown.shape == original.shape
        np.testing.assert_array_equal(classes, red_is_road(original[None])[0])
        h, w = classes.shape
        assert tuple(shown[h - 1, 0]) == blend(RED, ROAD)                # road over red
        assert tuple(shown[10, w - 15]) == blend((30, 30, 200), VEHICLE)  # vehicle over blue
        assert tuple(shown[h - 1, w - 1]) == (90, 90, 90)                 # background as is
    np.testing.assert_array_equal(np.unique(classes), [0, 1, 2])


def test_save_inference_samples_core_never_overwrites(tmp_path):
    paths = make_images(tmp_path)
    run_dir = outputs.new_run_dir(tmp_path / "runs", "samples")
    outputs.save_inference_samples_core(run_dir, paths[:1], red_is_road, COLORS)
    before = (tmp_path / "runs/samples/a.png").read_bytes()
    with pytest.raises(UserError, match="a.png already exists"):
        outputs.save_inference_samples_core(run_dir, paths[:1], lambda x: x[..., 0] * 0, COLORS)
    assert (tmp_path / "runs/samples/a.png").read_bytes() == before
    (tmp_path / "sub").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "sub/a.png")
    with pytest.raises(UserError, match="both be saved as a.png"):
        outputs.save_inference_samples_core(run_dir, [paths[0], tmp_path / "sub/a.png"],
                                            red_is_road, COLORS)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png"):
        outputs.save_inference_samples_core(run_dir, [tmp_path / "broken.png"], red_is_road,
                                            COLORS)


def test_predict_fn_must_keep_the_size(tmp_path):
    paths = make_images(tmp_path)
    run_dir = outputs.new_run_dir(tmp_path / "runs")
    with pytest.raises(ValueError, match="predict_fn returned"):
        outputs.save_inference_samples_core(run_dir, paths, lambda x: red_is_road(x)[:, ::2],
                                            COLORS)


# --------------------------------------------------------------------------- video
def test_process_video_keeps_frames_size_fps_and_rgb(tmp_path):
    src = outputs.make_test_video(tmp_path / "in.mp4", 30, size=(160, 96), fps=12)
    stats = outputs.process_video(src, tmp_path / "out.mp4", red_is_road, COLORS, batch_size=4)
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
    src = outputs.make_test_video(tmp_path / "in.mp4", 9, size=(121, 75), fps=Fraction(30000, 1001))
    stats = outputs.process_video(src, tmp_path / "out.mp4", red_is_road, COLORS, batch_size=4,
                                  max_frames=7)
    assert stats["frames"] == 7 and stats["size"] == (121, 75)
    assert stats["fps"] == pytest.approx(30000 / 1001, abs=1e-9)
    meta, frames = read_video(tmp_path / "out.mp4")
    assert meta["size"] == (121, 75) and frames.shape == (7, 75, 121, 3)
    assert meta["fps"] == pytest.approx(29.97, abs=0.01)
    np.testing.assert_allclose(frames[:, 40:70, 5:50].reshape(-1, 3).mean(0), blend(RED, ROAD),
                               atol=6)


def test_process_video_refuses_bad_input_and_existing_output(tmp_path):
    src = outputs.make_test_video(tmp_path / "in.mp4", 3, size=(64, 48), fps=10)
    existing = tmp_path / "taken.mp4"
    existing.write_bytes(b"keep me")
    with pytest.raises(UserError, match="taken.mp4 already exists"):
        outputs.process_video(src, existing, red_is_road, COLORS)
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(UserError, match=r"out\.avi must end in \.mp4"):
        outputs.process_video(src, tmp_path / "out.avi", red_is_road, COLORS)
    (tmp_path / "text.mp4").write_text("not a video")
    with pytest.raises(UserError, match="cannot read video .*text.mp4"):
        outputs.process_video(tmp_path / "text.mp4", tmp_path / "o1.mp4", red_is_road, COLORS)
    with pytest.raises(UserError, match="missing.mp4 does not exist"):
        outputs.process_video(tmp_path / "missing.mp4", tmp_path / "o2.mp4", red_is_road, COLORS)
    # A valid stream header followed by no frames at all.
    (tmp_path / "empty.y4m").write_text("YUV4MPEG2 W64 H48 F12:1 Ip A1:1 C420jpeg\n")
    with pytest.raises(UserError, match="empty.y4m has no frames"):
        outputs.process_video(tmp_path / "empty.y4m", tmp_path / "o3.mp4", red_is_road, COLORS)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "empty.y4m", "in.mp4", "taken.mp4", "text.mp4"]             # no output, no temp file


def test_process_video_errors_in_any_stage_propagate(tmp_path, monkeypatch):
    src = outputs.make_test_video(tmp_path / "in.mp4", 12, size=(64, 48), fps=10)
    baseline = threading.active_count()

    def model_fails(images):
        raise ZeroDivisionError("model broke")

    with pytest.raises(ZeroDivisionError, match="model broke"):
        outputs.process_video(src, tmp_path / "a.mp4", model_fails, COLORS, batch_size=2)

    def encoder_fails(*args):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(outputs, "_open_writer", encoder_fails)
        with pytest.raises(OSError, match="disk full"):
            outputs.process_video(src, tmp_path / "b.mp4", red_is_road, COLORS, batch_size=2)
    assert threading.active_count() == baseline                     # threads joined
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]  # nothing half written


def test_overlapped_keeps_order_and_propagates_reader_errors():
    got = []
    outputs._overlapped(iter(range(50)), lambda x: x * 2, lambda items: got.extend(items))
    assert got == [2 * x for x in range(50)]

    def source():
        yield from range(5)
        raise UserError("cannot decode video x.mp4")

    got.clear()
    with pytest.raises(UserError, match="x.mp4"):
        outputs._overlapped(source(), lambda x: x, lambda items: got.extend(items))
    assert got == list(range(len(got))) and len(got) <= 5


def test_publish_never_replaces_a_file(tmp_path):
    (tmp_path / ".out.mp4.part").write_bytes(b"new video")
    (tmp_path / "out.mp4").write_bytes(b"someone's file")
    with pytest.raises(UserError, match="out.mp4 appeared"):
        outputs._publish(str(tmp_path / ".out.mp4.part"), str(tmp_path / "out.mp4"))
    assert (tmp_path / "out.mp4").read_bytes() == b"someone's file"
    outputs._publish(str(tmp_path / ".out.mp4.part"), str(tmp_path / "new.mp4"))
    assert (tmp_path / "new.mp4").read_bytes() == b"new video"


def test_real_videos_first_frames(shared_data, tmp_path):
    videos = sorted((shared_data / "videos").glob("*.mp4"))
    assert videos, "no videos in ../shared/data/videos"
    for video in videos:
        in_meta = next(imageio_ffmpeg.read_frames(str(video)))
        out = tmp_path / video.name
        stats = outputs.process_video(video, out, lambda x: (x[..., 1] > 150).astype(np.uint8),
                                      COLORS, max_frames=20)
        meta, frames = read_video(out)
        assert stats["frames"] == 20 and frames.shape[0] == 20
        assert meta["size"] == in_meta["size"] == stats["size"]
        assert meta["fps"] == in_meta["fps"] == stats["fps"]
