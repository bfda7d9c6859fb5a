"""overlays.py: colours, overlays, sample PNGs and class maps (no TensorFlow)."""

import numpy as np
import pytest
from fakes import COLORS, LIGHT, PED, RED, ROAD, VEHICLE, blend, red_is_road  # noqa: F401
from PIL import Image

from roadseg import overlays, run_folders
from roadseg.errors import UserError
from roadseg.schemes import IGNORE


def test_colorize_maps_each_class_to_its_colour_and_ignore_to_black():
    class_map = np.array([[0, 1, 2], [3, 4, IGNORE], [7, 1, 0]], np.uint8)
    out = overlays.colorize(class_map, COLORS)
    assert out.shape == (3, 3, 3) and out.dtype == np.uint8
    expected = [[(0, 0, 0), ROAD, VEHICLE], [PED, LIGHT, (0, 0, 0)], [(0, 0, 0), ROAD, (0, 0, 0)]]
    np.testing.assert_array_equal(out, np.array(expected, np.uint8))


def test_overlay_blends_half_and_leaves_background_and_ignore_untouched():
    image = np.zeros((2, 3, 3), np.uint8)
    image[:] = (100, 100, 100)
    image[1, 2] = (10, 200, 31)
    class_map = np.array([[0, 1, 2], [3, IGNORE, 4]], np.uint8)
    out = overlays.overlay(image, class_map, COLORS)
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
    full = overlays.overlay(images, maps, COLORS, alpha=1.0, skip_classes=())
    np.testing.assert_array_equal(full, COLORS[maps])      # alpha 1: pure class colours
    quarter = overlays.overlay(images[0], maps[0], COLORS, alpha=0.25)
    for y, x in np.ndindex(4, 5):
        want = tuple(images[0, y, x]) if maps[0, y, x] == 0 else \
            blend(images[0, y, x], COLORS[maps[0, y, x]], 0.25)
        assert tuple(quarter[y, x]) == want
    batch = overlays.overlay(images, maps, COLORS)           # a batch equals one by one
    for i in range(2):
        np.testing.assert_array_equal(batch[i], overlays.overlay(images[i], maps[i], COLORS))
    with pytest.raises(ValueError):
        overlays.overlay(images[0], maps[0, :3], COLORS)


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


def test_write_overlays_writes_overlays_and_class_maps(tmp_path):
    paths = make_images(tmp_path)
    run_dir = run_folders.new_run_dir(tmp_path / "runs", "samples")
    seen = []

    def predict(images):
        seen.append(images.shape)
        return red_is_road(images)

    written = overlays.write_overlays(run_dir, paths, predict, COLORS, batch_size=4)
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


def test_write_overlays_never_overwrites(tmp_path):
    paths = make_images(tmp_path)
    run_dir = run_folders.new_run_dir(tmp_path / "runs", "samples")
    overlays.write_overlays(run_dir, paths[:1], red_is_road, COLORS)
    before = (tmp_path / "runs/samples/a.png").read_bytes()
    with pytest.raises(UserError, match="a.png already exists"):
        overlays.write_overlays(run_dir, paths[:1], lambda x: x[..., 0] * 0, COLORS)
    assert (tmp_path / "runs/samples/a.png").read_bytes() == before
    (tmp_path / "sub").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "sub/a.png")
    with pytest.raises(UserError, match="both be saved as a.png"):
        overlays.write_overlays(run_dir, [paths[0], tmp_path / "sub/a.png"],
                                            red_is_road, COLORS)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png"):
        overlays.write_overlays(run_dir, [tmp_path / "broken.png"], red_is_road,
                                            COLORS)


def test_predict_fn_must_keep_the_size(tmp_path):
    paths = make_images(tmp_path)
    run_dir = run_folders.new_run_dir(tmp_path / "runs")
    with pytest.raises(ValueError, match="predict_fn returned"):
        overlays.write_overlays(run_dir, paths, lambda x: red_is_road(x)[:, ::2],
                                            COLORS)
