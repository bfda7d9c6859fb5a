"""demo_scenes.py: valid Cityscapes layout, every class present, deterministic, safe to rerun."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from roadseg import datasets, demo_scenes
from roadseg.errors import UserError
from roadseg.schemes import get_scheme

SIZE = (64, 128)


def arrays(root):
    """Every PNG under root as {relative path: array}."""
    root = Path(root)
    return {str(p.relative_to(root)): np.asarray(Image.open(p))
            for p in sorted(root.rglob("*.png"))}


def test_layout_and_labels_are_valid(demo_root):
    ds = datasets.find_dataset(demo_root)
    assert ds.layout == "cityscapes"
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 10, "val": 2}  # n=12, 20% val
    scheme = get_scheme("road4")
    allowed = {demo_scenes.EGO, demo_scenes.ROAD, demo_scenes.SIDEWALK, demo_scenes.BUILDING,
               demo_scenes.POLE, demo_scenes.LIGHT, demo_scenes.VEGETATION, demo_scenes.SKY,
               demo_scenes.PERSON, demo_scenes.CAR, demo_scenes.TRUCK, demo_scenes.BUS}
    for s in ds.splits["train"] + ds.splits["val"]:
        assert s.kind == "ids" and "/demo/demo_" in s.image
        image, label = datasets.load_pair(s, scheme)
        assert image.shape == (128, 256, 3) and image.dtype == np.uint8
        assert set(np.unique(np.asarray(Image.open(s.label))).tolist()) <= allowed
        # the colour PNG decodes to exactly the same classes as the labelIds PNG
        color = s.label.replace("_labelIds.png", "_color.png")
        from_color = datasets.load_label(datasets.Sample(s.image, color, "color"), scheme)
        np.testing.assert_array_equal(from_color, label)
    assert datasets.check_dataset(demo_root, "cityscapes19")["problems"] == []


def test_every_road4_class_is_present_and_learnable(demo_root):
    scheme = get_scheme("road4")
    samples = [s for split in datasets.find_dataset(demo_root).splits.values() for s in split]
    counts = datasets.class_pixel_counts(samples, scheme)
    assert (counts.pixels > 0).all(), dict(zip(scheme.class_names, counts.pixels))
    share = counts.pixels / counts.pixels.sum()
    assert 0.1 < share[1] < 0.4                     # road
    per_scene = np.array([np.bincount(datasets.load_label(s, scheme).ravel(), minlength=256)[:5]
                          for s in samples])
    # pedestrians and traffic lights are in most scenes, not just somewhere
    assert (per_scene[:, 3] >= 10).mean() >= 0.75
    assert (per_scene[:, 4] >= 10).mean() >= 0.75


def test_deterministic_by_seed(tmp_path):
    a = arrays(demo_scenes.make_demo_data(tmp_path / "a", n=3, seed=5, size=SIZE))
    b = arrays(demo_scenes.make_demo_data(tmp_path / "b", n=3, seed=5, size=SIZE))
    c = arrays(demo_scenes.make_demo_data(tmp_path / "c", n=3, seed=6, size=SIZE))
    assert len(a) == 9 and a.keys() == b.keys() == c.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not any(np.array_equal(a[k], c[k]) for k in a if "leftImg8bit" in k)
    # scenes differ from each other too
    images = [v for k, v in a.items() if "leftImg8bit" in k]
    assert not np.array_equal(images[0], images[1])


def test_complete_set_is_reused_and_other_folders_are_refused(tmp_path):
    root = tmp_path / "demo"
    demo_scenes.make_demo_data(root, n=2, seed=0, size=SIZE)
    info = json.loads((root / demo_scenes.INFO_FILE).read_text())
    assert info["n"] == 2 and info["size"] == list(SIZE)
    first = next(root.rglob("*_leftImg8bit.png"))
    stamp = first.stat().st_mtime_ns
    assert demo_scenes.make_demo_data(root, n=2, seed=0, size=SIZE) == str(root)
    assert first.stat().st_mtime_ns == stamp                # reused, not rewritten
    with pytest.raises(UserError, match="not a complete demo set with n=3"):
        demo_scenes.make_demo_data(root, n=3, seed=0, size=SIZE)
    first.unlink()                                          # incomplete set: refused too
    with pytest.raises(UserError, match="not empty"):
        demo_scenes.make_demo_data(root, n=2, seed=0, size=SIZE)

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="mine' is not empty"):
        demo_scenes.make_demo_data(mine, n=2, size=SIZE)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_empty_existing_folder_is_used(tmp_path):
    (tmp_path / "empty").mkdir()
    demo_scenes.make_demo_data(tmp_path / "empty", n=1, size=SIZE)
    ds = datasets.find_dataset(tmp_path / "empty")
    assert list(ds.splits) == ["train"] and len(ds.splits["train"]) == 1


def test_bad_parameters(tmp_path):
    with pytest.raises(UserError, match="n >= 1"):
        demo_scenes.make_demo_data(tmp_path / "x", n=0)
    with pytest.raises(UserError, match="val_fraction"):
        demo_scenes.make_demo_data(tmp_path / "x", n=4, val_fraction=1.0)
