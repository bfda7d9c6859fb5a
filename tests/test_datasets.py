"""datasets.py: layout detection, label mapping per scheme, bad data, statistics.

Fixtures are tiny PNGs written into tmp_path by the tests themselves.
"""
import io
import os
import re
import struct
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from roadseg import datasets
from roadseg.datasets import Sample
from roadseg.errors import UserError
from roadseg.schemes import IGNORE, get_scheme

ROAD, SIDEWALK, CAR, PERSON, LIGHT = (128, 64, 128), (244, 35, 232), (0, 0, 142), (220, 20, 60), \
    (250, 170, 30)


def png(path, array):
    """Write ``array`` as a PNG at ``path`` (parents created); return the path as str."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array)).save(path)
    return str(path)


def rgb(h=4, w=6, value=100):
    return np.full((h, w, 3), value, np.uint8)


def ids(h=4, w=6, value=7):
    return np.full((h, w), value, np.uint8)


def png16_rgb(path, array):
    """A 16-bit RGB PNG written by hand (PIL cannot write them)."""
    h, w, _ = array.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # 16 bits, RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return str(path)


# ---------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------
def make_cityscapes(root, frames=("a_000000_000019", "a_000001_000019")):
    for split in ("train", "val"):
        for f in frames:
            png(root / "leftImg8bit" / split / "aachen" / f"{f}_leftImg8bit.png", rgb())
            png(root / "gtFine" / split / "aachen" / f"{f}_gtFine_color.png", rgb(value=0))
            if split == "train":
                png(root / "gtFine" / split / "aachen" / f"{f}_gtFine_labelIds.png", ids())
    png(root / "leftImg8bit" / "test" / "berlin" / "b_000000_000019_leftImg8bit.png", rgb())
    return root


def test_cityscapes_layout(tmp_path):
    ds = datasets.find_dataset(make_cityscapes(tmp_path / "cs"))
    assert ds.layout == "cityscapes"
    assert sorted(ds.splits) == ["test", "train", "val"]
    train, val, test = ds.splits["train"], ds.splits["val"], ds.splits["test"]
    assert len(train) == len(val) == 2 and len(test) == 1
    # labelIds preferred over colour; colour used when it is the only label.
    assert all(s.kind == "ids" and s.label.endswith("_gtFine_labelIds.png") for s in train)
    assert all(s.kind == "color" and s.label.endswith("_gtFine_color.png") for s in val)
    assert test[0].label is None and test[0].image.endswith("b_000000_000019_leftImg8bit.png")
    assert {s.dataset for s in train + val + test} == {"cityscapes"}
    assert train[0].image.endswith("a_000000_000019_leftImg8bit.png")
    assert "a_000000_000019_gtFine" in train[0].label


def test_seed_layout(tmp_path):
    root = tmp_path / "seed"
    for f in ("um_a", "um_b"):
        png(root / "training" / "image" / f"{f}_leftImg8bit.png", rgb())
        png(root / "training" / "gt_image" / f"{f}_gtFine_color.png", rgb(value=0))
    png(root / "testing" / "image" / "x.png", rgb())
    ds = datasets.find_dataset(root)
    assert ds.layout == "seed" and sorted(ds.splits) == ["test", "train"]
    assert [s.kind for s in ds.splits["train"]] == ["color", "color"]
    assert ds.splits["train"][1].label.endswith("um_b_gtFine_color.png")
    assert ds.splits["test"][0].label is None


def make_camvid(root, n=3, lists=False, absolute=False):
    for split in ("train", "test"):
        lines = []
        for i in range(n):
            png(root / split / f"f{i}.png", rgb(value=10 * i))
            png(root / f"{split}annot" / f"f{i}.png", ids(value=i))
            prefix = "/SegNet/CamVid/" if absolute else ""
            lines.append(f"{prefix}{split}/f{i}.png {prefix}{split}annot/f{i}.png")
        if lists:
            (root / f"{split}.txt").write_text("\n".join(lines[:-1]) + "\n")  # lists skip one
    return root


def test_camvid_layout_from_folders(tmp_path):
    ds = datasets.find_dataset(make_camvid(tmp_path / "camvid"))
    assert ds.layout == "camvid" and sorted(ds.splits) == ["test", "train"]
    assert [len(v) for v in ds.splits.values()] == [3, 3]
    s = ds.splits["train"][2]
    assert (s.kind, s.dataset) == ("ids", "camvid")
    assert s.image.endswith("train/f2.png") and s.label.endswith("trainannot/f2.png")


@pytest.mark.parametrize("absolute", [False, True])
def test_camvid_layout_prefers_lists(tmp_path, absolute):
    """SegNet's lists hold /SegNet/CamVid/... paths; their last two parts are used."""
    ds = datasets.find_dataset(make_camvid(tmp_path / "camvid", lists=True, absolute=absolute))
    assert [len(v) for v in ds.splits.values()] == [2, 2]  # only what the lists name
    assert datasets.load_image(ds.splits["test"][1].image)[0, 0, 0] == 10


def test_camvid_list_with_missing_file(tmp_path):
    root = make_camvid(tmp_path / "camvid", lists=True)
    (root / "train.txt").write_text("train/f0.png trainannot/f0.png\n"
                                    "train/nope.png trainannot/f1.png\n")
    with pytest.raises(UserError, match=r"train.txt lists 1 missing files: train/nope.png"):
        datasets.find_dataset(root)


def make_kitti(root):
    base = root / "data_road"
    for stem in ("um_000000", "uu_000003"):
        cat, num = stem.split("_")
        png(base / "training" / "image_2" / f"{stem}.png", rgb())
        png(base / "training" / "gt_image_2" / f"{cat}_road_{num}.png", rgb(value=0))
    png(base / "training" / "gt_image_2" / "um_lane_000000.png", rgb(value=0))  # ignored
    png(base / "testing" / "image_2" / "um_000009.png", rgb())
    return root


@pytest.mark.parametrize("sub", ["", "data_road"])
def test_kitti_layout(tmp_path, sub):
    ds = datasets.find_dataset(make_kitti(tmp_path / "kitti") / sub)
    assert ds.layout == "kitti" and sorted(ds.splits) == ["test", "train"]
    train = ds.splits["train"]
    names = [s.label.rsplit("/", 1)[1] for s in train]
    assert names == ["um_road_000000.png", "uu_road_000003.png"]
    assert {(s.kind, s.dataset) for s in train} == {("color", "kitti")}
    assert ds.splits["test"][0].label is None


@pytest.mark.parametrize("split, name", [("training", "train"), ("testing", "test")])
def test_kitti_split_folder_as_the_course_passes_it(tmp_path, split, name):
    folder = make_kitti(tmp_path / "kitti") / "data_road" / split
    layout, got, samples = datasets.find_split_folder(folder)
    assert (layout, got) == ("kitti", name)
    assert samples == datasets.find_dataset(tmp_path / "kitti").splits[name]


def test_seed_split_folder_as_the_seed_passes_it(tmp_path):
    root = tmp_path / "data"
    png(root / "training" / "image" / "a_000000_000019_leftImg8bit.png", rgb())
    png(root / "training" / "gt_image" / "a_000000_000019_gtFine_color.png", rgb(value=0))
    png(root / "testing" / "image" / "b_000000_000019_leftImg8bit.png", rgb())
    layout, split, samples = datasets.find_split_folder(root / "training")
    assert (layout, split, [s.kind for s in samples]) == ("seed", "train", ["color"])
    assert datasets.find_split_folder(root / "testing")[2][0].label is None
    assert datasets.find_split_folder(root) is None     # a root is not a split folder


# ---------------------------------------------------------------------------------
# Layout errors
# ---------------------------------------------------------------------------------
def test_missing_root(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        datasets.find_dataset(tmp_path / "nowhere")


def test_unknown_layout_names_what_was_tried_and_found(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError) as err:
        datasets.find_dataset(tmp_path)
    msg = str(err.value)
    assert "photos/" in msg and "notes.txt" in msg
    for layout in ("cityscapes", "seed", "camvid", "kitti"):
        assert layout in msg
    assert "\n" not in msg


def test_empty_split(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    (root / "leftImg8bit" / "val" / "empty_city").mkdir()
    for p in (root / "leftImg8bit" / "val" / "aachen").iterdir():
        p.unlink()
    with pytest.raises(UserError, match="split 'val' .* has no images"):
        datasets.find_dataset(root)


def test_images_without_labels(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    for i in range(5):
        png(root / "leftImg8bit" / "train" / "aachen" / f"z_00000{i}_000019_leftImg8bit.png", rgb())
    with pytest.raises(UserError) as err:
        datasets.find_dataset(root)
    msg = str(err.value)
    assert "5 images without labels" in msg and "(5 in all)" in msg
    assert msg.count("z_0000") == 3  # up to three examples
    assert "labels without images" not in msg


def _unreadable(monkeypatch, folder):
    """``folder`` as chmod 000 makes it for a user who is not root (tests run as root, where it
    does not stop reads): listing it raises PermissionError, however it is listed."""
    import glob
    import os
    folder = os.path.abspath(folder)

    def refuse(real):
        def listing(path=".", *args, **kwargs):
            if os.path.abspath(os.fspath(path)) == folder:
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real(path, *args, **kwargs)
        return listing
    monkeypatch.setattr(os, "scandir", refuse(os.scandir))
    monkeypatch.setattr(os, "listdir", refuse(os.listdir))
    monkeypatch.setattr(glob, "_iterdir", refuse(glob._iterdir)) if hasattr(glob, "_iterdir") else None


@pytest.mark.parametrize("unreadable", ["gtFine/train/aachen", "gtFine/train", "leftImg8bit/val", "."])
def test_an_unreadable_folder_is_named_not_reported_as_strays(tmp_path, monkeypatch, unreadable):
    make_cityscapes(tmp_path)
    folder = tmp_path / unreadable
    _unreadable(monkeypatch, folder)
    with pytest.raises(UserError) as err:
        datasets.find_dataset(tmp_path)
    line = str(err.value)
    assert f"cannot read folder '{folder}' (Permission denied)" in line, line
    assert "without labels" not in line and "\n" not in line


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0,
                    reason="root (as in CI containers) reads a chmod 000 folder anyway")
def test_a_chmod_000_label_folder_is_named(tmp_path):
    make_cityscapes(tmp_path)
    folder = tmp_path / "gtFine" / "train" / "aachen"
    folder.chmod(0)
    try:
        with pytest.raises(UserError, match=f"cannot read folder '{folder}'"):
            datasets.find_dataset(tmp_path)
    finally:
        folder.chmod(0o755)


def test_labels_without_images(tmp_path):
    root = make_camvid(tmp_path / "camvid")
    png(root / "trainannot" / "lonely.png", ids())
    with pytest.raises(UserError, match=r"1 labels without images: .*trainannot/lonely.png"):
        datasets.find_dataset(root)


def test_train_split_without_any_labels(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    for p in (root / "gtFine" / "val" / "aachen").iterdir():
        p.unlink()
    with pytest.raises(UserError, match="split 'val' .* 2 images without labels"):
        datasets.find_dataset(root)


def test_test_split_with_some_labels_must_be_complete(tmp_path):
    root = make_kitti(tmp_path / "kitti")
    png(root / "data_road" / "testing" / "gt_image_2" / "um_road_000001.png", rgb(value=0))
    with pytest.raises(UserError, match="1 images without labels.*1 labels without images"):
        datasets.find_dataset(root)


# ---------------------------------------------------------------------------------
# Scheme mappings on hand-made labels
# ---------------------------------------------------------------------------------
CS_IDS = [0, 1, 4, 7, 8, 11, 19, 24, 25, 26, 27, 33]


@pytest.mark.parametrize("scheme, expected", [
    # unlabeled, ego, static, road, sidewalk, building, light, person, rider, car, truck, bicycle
    ("road4", [IGNORE, IGNORE, 0, 1, 0, 0, 4, 3, 3, 2, 2, 2]),
    ("seed4", [0, 0, 0, 1, 0, 0, 4, 3, 0, 2, 0, 0]),
    ("cityscapes19", [IGNORE, IGNORE, IGNORE, 0, 1, 2, 6, 11, 12, 13, 14, 18]),
])
def test_cityscapes_ids_per_scheme(tmp_path, scheme, expected):
    label = png(tmp_path / "x_gtFine_labelIds.png", np.array([CS_IDS], np.uint8))
    out = datasets.load_label(Sample("unused", label, "ids", "cityscapes"), get_scheme(scheme))
    assert out.dtype == np.uint8 and out.shape == (1, len(CS_IDS))
    assert out[0].tolist() == expected


def test_cityscapes_colors_with_boundary_and_void(tmp_path, capsys):
    blend = (64, 32, 135)  # an anti-aliased road/car boundary pixel: no such class colour
    colours = [ROAD, CAR, PERSON, LIGHT, SIDEWALK, (0, 0, 0), blend, blend]
    label = png(tmp_path / "x_gtFine_color.png", np.array([colours], np.uint8))
    sample = Sample("unused", label, "color", "cityscapes")
    out = datasets.load_label(sample, get_scheme("road4"))
    assert re.fullmatch(r"2 pixels of .*x_gtFine_color.png.* colours outside .*\n", capsys.readouterr().err)
    # black is both 'unlabeled' (ignored) and 'static' (background): ambiguous -> IGNORE
    assert out[0].tolist() == [1, 2, 3, 4, 0, IGNORE, IGNORE, IGNORE]


def test_camvid_ids_to_road4(tmp_path):
    label = png(tmp_path / "l.png", np.arange(12, dtype=np.uint8)[None])
    out = datasets.load_label(Sample("unused", label, "ids", "camvid"), get_scheme("road4"))
    # Sky Building Pole Road Pavement Tree Sign Fence Car Pedestrian Bicyclist Unlabelled
    assert out[0].tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 2, 3, 3, IGNORE]


def test_camvid_ids_to_camvid11_one_to_one(tmp_path):
    label = png(tmp_path / "l.png", np.arange(12, dtype=np.uint8)[None])
    scheme = get_scheme("camvid11")
    out = datasets.load_label(Sample("unused", label, "ids", "camvid"), scheme)
    assert out[0].tolist() == list(range(11)) + [IGNORE]        # Unlabelled is ignored
    assert scheme.unpainted == () and len(scheme.colors) == 11   # every class is painted
    # Cityscapes labels map in too: road, sidewalk, car, person, rider, traffic light -> sign
    lut = scheme.lut("cityscapes")
    assert [int(lut[i]) for i in (7, 8, 26, 24, 25, 19, 0)] == [3, 4, 8, 9, 10, 6, IGNORE]


def test_scheme_without_a_mapping_for_the_dataset_names_the_fix(tmp_path):
    label = png(tmp_path / "um_road_000000.png", np.zeros((1, 2, 3), np.uint8))
    with pytest.raises(UserError, match="no mapping into the 'camvid11' scheme; pass --scheme road4"):
        datasets.load_label(Sample("unused", label, "color", "kitti"), get_scheme("camvid11"))


def test_hold_out_sequence_picks_a_whole_sequence_near_a_quarter():
    names = ["A_1", "A_2", "B_1", "B_2", "B_3", "C_1", "C_2", "C_3", "C_4", "C_5", "C_6", "C_7"]
    samples = [Sample(f"x/{n}.png", f"y/{n}.png", "ids", "camvid") for n in names]
    assert [datasets.sequence_name(s) for s in samples[:3]] == ["A", "A", "B"]
    assert datasets.hold_out_sequence(samples) == "B"                 # 3 of 12 = a quarter
    assert datasets.hold_out_sequence(samples[2:]) is None            # two sequences only
    city = Sample("leftImg8bit/train/ulm/ulm_000001_000019_leftImg8bit.png", "l", "ids")
    assert datasets.sequence_name(city) == "ulm"


def test_kitti_colors_to_road4(tmp_path, capsys):
    label = png(tmp_path / "um_road_000000.png",
                np.array([[(255, 0, 255), (255, 0, 0), (0, 0, 0), (255, 0, 254)]], np.uint8))
    out = datasets.load_label(Sample("unused", label, "color", "kitti"), get_scheme("road4"))
    assert capsys.readouterr().err.startswith("1 pixels of")
    assert out[0].tolist() == [1, 0, IGNORE, IGNORE]


def test_kitti_colors_to_kitti2(tmp_path):
    """The course's own task: road (magenta) 1, not road (red) 0, black void ignored."""
    label = png(tmp_path / "um_road_000000.png",
                np.array([[(255, 0, 255), (255, 0, 0), (0, 0, 0)]], np.uint8))
    out = datasets.load_label(Sample("unused", label, "color", "kitti"), get_scheme("kitti2"))
    assert out[0].tolist() == [1, 0, IGNORE]
    assert get_scheme("kitti2").class_names == ("not road", "road")
    lut = get_scheme("kitti2").lut("cityscapes")          # Cityscapes maps in too
    assert [int(lut[i]) for i in (7, 8, 26, 0)] == [1, 0, 0, IGNORE]


def test_seed5_is_seed4_in_the_seeds_channel_order():
    seed4, seed5 = get_scheme("seed4"), get_scheme("seed5")
    assert seed5.class_names == ("road", "car", "person", "traffic light", "background")
    order = np.full(256, IGNORE, np.uint8)
    order[:5] = [4, 0, 1, 2, 3]                            # seed4 id -> seed5 id
    np.testing.assert_array_equal(order[seed4.lut("cityscapes")], seed5.lut("cityscapes"))
    assert seed5.unpainted == (4,)


def test_palette_and_16bit_id_labels_use_the_stored_ids(tmp_path):
    pal = Image.fromarray(np.array([[3, 8, 11]], np.uint8), "P")
    pal.putpalette([255, 0, 0] * 256)  # colours must not matter for id labels
    pal.save(tmp_path / "p.png")
    out = datasets.load_label(Sample("", str(tmp_path / "p.png"), "ids", "camvid"),
                              get_scheme("road4"))
    assert out[0].tolist() == [1, 2, IGNORE]
    Image.fromarray(np.array([[7, 26]], np.uint16)).save(tmp_path / "i16.png")
    out = datasets.load_label(Sample("", str(tmp_path / "i16.png"), "ids", "cityscapes"),
                              get_scheme("road4"))
    assert out[0].tolist() == [1, 2]


# ---------------------------------------------------------------------------------
# Bad data and conversions
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset, bad", [("cityscapes", [34, 200]), ("camvid", [12])])
def test_unknown_label_ids(tmp_path, dataset, bad):
    label = png(tmp_path / "bad_ids.png", np.array([[0, 7] + bad], np.uint8))
    with pytest.raises(UserError) as err:
        datasets.load_label(Sample("", label, "ids", dataset), get_scheme("road4"))
    assert "bad_ids.png" in str(err.value) and str(bad) in str(err.value)


def test_16bit_id_label_beyond_255_is_unknown(tmp_path):
    Image.fromarray(np.array([[7, 300]], np.uint16)).save(tmp_path / "i16.png")
    with pytest.raises(UserError, match=r"ids \[300\]"):
        datasets.load_label(Sample("", str(tmp_path / "i16.png"), "ids", "cityscapes"),
                            get_scheme("road4"))


def test_colour_file_given_as_ids(tmp_path):
    label = png(tmp_path / "c.png", np.array([[ROAD, CAR]], np.uint8))
    with pytest.raises(UserError, match="c.png' is a colour image"):
        datasets.load_label(Sample("", label, "ids", "cityscapes"), get_scheme("road4"))


def test_undecodable_png(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not image data")
    with pytest.raises(UserError) as err:
        datasets.load_image(str(path))
    assert "broken.png" in str(err.value) and "--skip-bad" in str(err.value)


def test_size_mismatch_names_both_files(tmp_path):
    s = Sample(png(tmp_path / "img.png", rgb(4, 6)), png(tmp_path / "lab.png", ids(4, 5)),
               "ids", "cityscapes")
    with pytest.raises(UserError) as err:
        datasets.load_pair(s, get_scheme("road4"))
    assert "img.png' is 6x4" in str(err.value) and "lab.png' is 5x4" in str(err.value)


def test_load_pair(tmp_path):
    s = Sample(png(tmp_path / "img.png", rgb(4, 6, 9)), png(tmp_path / "lab.png", ids(4, 6, 26)),
               "ids", "cityscapes")
    image, label = datasets.load_pair(s, get_scheme("road4"))
    assert image.shape == (4, 6, 3) and image.dtype == np.uint8 and (image == 9).all()
    assert label.shape == (4, 6) and (label == 2).all()
    assert datasets.load_pair(Sample(s.image, None), get_scheme("road4"))[1] is None


def test_image_conversions(tmp_path):
    grey = np.array([[0, 100, 255]], np.uint8)
    out = datasets.load_image(png(tmp_path / "grey.png", grey))
    assert out.shape == (1, 3, 3) and out.dtype == np.uint8
    assert out[0, :, 1].tolist() == [0, 100, 255]
    assert (out == out[..., :1]).all()

    rgba = np.array([[[10, 20, 30, 0], [40, 50, 60, 255]]], np.uint8)  # alpha dropped, no blending
    out = datasets.load_image(png(tmp_path / "rgba.png", rgba))
    assert out.tolist() == [[[10, 20, 30], [40, 50, 60]]]

    pal = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    pal.putpalette([9, 8, 7, 200, 100, 50] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    assert datasets.load_image(str(tmp_path / "pal.png")).tolist() == [[[9, 8, 7], [200, 100, 50]]]

    Image.fromarray(np.array([[0, 256, 65535]], np.uint16)).save(tmp_path / "g16.png")
    out = datasets.load_image(str(tmp_path / "g16.png"))
    assert out.dtype == np.uint8 and out[0, :, 0].tolist() == [0, 1, 255]
    assert (out == out[..., :1]).all()

    out = datasets.load_image(png16_rgb(tmp_path / "rgb16.png",
                                        np.array([[[65535, 512, 0], [256, 0, 4000]]], np.uint16)))
    assert out.dtype == np.uint8 and out.tolist() == [[[255, 2, 0], [1, 0, 15]]]


# ---------------------------------------------------------------------------------
# check_dataset and statistics
# ---------------------------------------------------------------------------------
def small_labelled(root):
    """Cityscapes layout, train: two 2x4 frames with known classes, val: one colour frame."""
    frames = {"a_000000_000019": [[7, 7, 7, 26], [24, 0, 0, 11]],   # road 3, car, person, 2 ign
              "a_000001_000019": [[7, 7, 7, 7], [11, 11, 11, 11]]}  # road 4, background 4
    for f, lab in frames.items():
        png(root / "leftImg8bit/train/a" / f"{f}_leftImg8bit.png", rgb(2, 4))
        png(root / "gtFine/train/a" / f"{f}_gtFine_labelIds.png", np.array(lab, np.uint8))
    png(root / "leftImg8bit/val/a/a_000002_000019_leftImg8bit.png", rgb(1, 2))
    png(root / "gtFine/val/a/a_000002_000019_gtFine_color.png",
        np.array([[ROAD, (1, 2, 3)]], np.uint8))
    return root


def test_check_dataset_report(tmp_path):
    report = datasets.check_dataset(small_labelled(tmp_path / "cs"), "road4")
    assert report["layout"] == "cityscapes" and report["problems"] == []
    train = report["splits"]["train"]
    assert (train["images"], train["labelled"]) == (2, 2)
    share = train["class_share"]
    assert share["road"] == pytest.approx(7 / 16) and share["background"] == pytest.approx(5 / 16)
    assert share["vehicle"] == share["pedestrian"] == pytest.approx(1 / 16)
    assert share["traffic light"] == 0 and train["ignore_share"] == pytest.approx(2 / 16)
    assert "class 'traffic light' never occurs in split 'train'" in train["warnings"]
    val = report["splits"]["val"]
    assert val["class_share"]["road"] == 0.5 and val["ignore_share"] == 0.5
    assert any("1 pixels of unknown colour" in w for w in val["warnings"])
    text = datasets.format_report(report)
    assert "road" in text and "43.75%" in text and "problems: 0" in text


def test_check_dataset_bad_files(tmp_path):
    root = small_labelled(tmp_path / "cs")
    (root / "leftImg8bit/train/a/a_000001_000019_leftImg8bit.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match="a_000001_000019_leftImg8bit.png"):
        datasets.check_dataset(root, "road4")
    report = datasets.check_dataset(root, "road4", skip_bad=True)
    assert len(report["problems"]) == 1 and "cannot decode" in report["problems"][0]
    train = report["splits"]["train"]
    assert (train["images"], train["labelled"]) == (2, 1)
    assert train["class_share"]["road"] == pytest.approx(3 / 8)
    assert "problems: 1" in datasets.format_report(report)


def test_median_frequency_weights_known_case(tmp_path):
    # image A: 2 background, 2 road, 2 ignored; image B: 4 background.
    a = png(tmp_path / "a.png", np.array([[11, 11, 7, 7, 0, 0]], np.uint8))
    b = png(tmp_path / "b.png", np.array([[11, 11, 11, 11]], np.uint8))
    samples = [Sample("", a, "ids", "cityscapes"), Sample("", b, "ids", "cityscapes"),
               Sample("unlabelled.png", None)]
    counts = datasets.class_pixel_counts(samples, get_scheme("road4"))
    assert counts.pixels.tolist() == [6, 2, 0, 0, 0]
    assert counts.image_pixels.tolist() == [8, 4, 0, 0, 0]   # IGNORE pixels not counted
    weights = datasets.median_frequency_weights(counts)
    # freq: background 6/8, road 2/4; median 0.625; unseen classes weigh 0
    assert weights == pytest.approx([0.625 / 0.75, 0.625 / 0.5, 0, 0, 0])


def test_get_cityscapes_without_credentials_is_a_clear_error(tmp_path, monkeypatch):
    import requests
    monkeypatch.delenv("CITYSCAPES_USERNAME", raising=False)
    monkeypatch.delenv("CITYSCAPES_PASSWORD", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))  # no stored credentials file
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))        # not a terminal: no prompt
    monkeypatch.setattr(requests, "Session", lambda: pytest.fail("network used"))
    with pytest.raises(UserError, match="CITYSCAPES_USERNAME and CITYSCAPES_PASSWORD"):
        datasets.get_cityscapes(tmp_path / "cityscapes")


def test_get_cityscapes_bad_credentials_from_environment(tmp_path, monkeypatch):
    import requests

    class Response:
        status_code = 200  # a failed login is not redirected

        def raise_for_status(self):
            pass

    class FakeSession:
        def get(self, url, **kw):
            return Response()

        def post(self, url, data, **kw):
            assert (data["username"], data["password"]) == ("me", "secret")
            return Response()
    monkeypatch.setenv("CITYSCAPES_USERNAME", "me")
    monkeypatch.setenv("CITYSCAPES_PASSWORD", "secret")
    monkeypatch.setattr(requests, "Session", FakeSession)
    with pytest.raises(UserError, match="login failed: bad CITYSCAPES_USERNAME"):
        datasets.get_cityscapes(tmp_path / "cityscapes")


def test_get_cityscapes_unzips_existing_packages_without_login(tmp_path, monkeypatch):
    import zipfile
    dest = tmp_path / "cs"
    dest.mkdir()
    with zipfile.ZipFile(dest / "gtFine_trainvaltest.zip", "w") as zf:
        zf.writestr("gtFine/train/a/x_gtFine_labelIds.png", b"new")
        zf.writestr("README", b"readme")
    (dest / "README").write_text("mine")  # already there: left alone
    monkeypatch.setattr(datasets, "_cityscapes_session", lambda d: pytest.fail("login attempted"))
    datasets.get_cityscapes(dest, packages=("gtFine_trainvaltest.zip",))
    assert (dest / "gtFine/train/a/x_gtFine_labelIds.png").read_bytes() == b"new"
    assert (dest / "README").read_text() == "mine"


@pytest.mark.parametrize("entry", ["../evil.txt", "gtFine/../../evil.txt", "/tmp/evil.txt", "symlink"])
def test_get_cityscapes_unzip_refuses_unsafe_entries(entry, tmp_path, monkeypatch):
    """The datasets' unzip is acquire.extract_missing: zip-slip and symlink entries are refused
    before anything is written (zipfile alone would write '../evil.txt' as 'evil.txt')."""
    import stat
    import zipfile
    dest = tmp_path / "cs"
    dest.mkdir()
    with zipfile.ZipFile(dest / "gtFine_trainvaltest.zip", "w") as zf:
        zf.writestr("gtFine/train/a/x_gtFine_labelIds.png", b"ok")
        if entry == "symlink":
            info = zipfile.ZipInfo("gtFine/link")
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
        else:
            zf.writestr(entry, b"evil")
    monkeypatch.setattr(datasets, "_cityscapes_session", lambda d: pytest.fail("login attempted"))
    with pytest.raises(UserError, match=r"gtFine_trainvaltest.zip holds an unsafe entry"):
        datasets.get_cityscapes(dest, packages=("gtFine_trainvaltest.zip",))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["cs", "gtFine_trainvaltest.zip"]


def test_get_cityscapes_downloads_through_the_one_downloader(tmp_path, monkeypatch):
    """Package list and md5 read with the logged-in session, the zip fetched by
    acquire.download with its cookies (https, md5 checked), then unzipped; a zip whose md5
    differs is not kept under its name."""
    import hashlib
    import io
    import json
    import zipfile

    import requests
    from local_server import https_server
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("gtFine/train/a/x_gtFine_labelIds.png", b"label")
    package = buffer.getvalue()
    listing = [{"name": "gtFine_trainvaltest.zip", "packageID": "1", "size": "1KB"},
               {"name": "leftImg8bit_trainvaltest.zip", "packageID": "3", "size": "1KB"}]
    routes = {"/downloads/?list": ("ok", json.dumps(listing).encode()),
              "/md5-sum/?packageID=1": ("ok", hashlib.md5(package).hexdigest().encode() + b"  gt.zip"),
              "/file-handling/?packageID=1": ("ok", package),
              "/md5-sum/?packageID=3": ("ok", b"0" * 32 + b"  left.zip"),
              "/file-handling/?packageID=3": ("ok", b"not the package")}
    dest = tmp_path / "cs"
    with https_server(str(tmp_path), routes) as server:
        session = requests.Session()
        session.cookies.set("PHPSESSID", "logged-in")
        monkeypatch.setattr(datasets, "CITYSCAPES_SITE", server.url)
        monkeypatch.setattr(datasets, "_cityscapes_session", lambda d: session)
        assert datasets.get_cityscapes(dest, packages=("gtFine_trainvaltest.zip",)) == str(dest)
        assert (dest / "gtFine/train/a/x_gtFine_labelIds.png").read_bytes() == b"label"
        assert (dest / "gtFine_trainvaltest.zip").read_bytes() == package
        assert server.cookies["/file-handling/?packageID=1"] == ["PHPSESSID=logged-in"]
        with pytest.raises(UserError, match="md5 is [0-9a-f]{32}, expected 0{32}; nothing was saved"):
            datasets.get_cityscapes(dest)
        assert server.hits["/file-handling/?packageID=1"] == 1   # already there: not fetched again
        assert server.hits["/file-handling/?packageID=3"] == 1   # a wrong md5 is not retried
    assert sorted(p.name for p in dest.iterdir()) == ["gtFine", "gtFine_trainvaltest.zip"]


# ---------------------------------------------------------------------------------
# Real data (../shared/data)
# ---------------------------------------------------------------------------------
def test_real_camvid(shared_data):
    ds = datasets.find_dataset(shared_data / "camvid")
    assert ds.layout == "camvid"
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 367, "test": 233}
    counts = datasets.class_pixel_counts(ds.splits["train"], get_scheme("road4"))
    share = counts.pixels / counts.pixels.sum()
    background, road, vehicle, pedestrian, light = share
    assert 0.2 < road < 0.45 and 0.4 < background < 0.7
    assert 0.02 < vehicle < 0.1 and 0.003 < pedestrian < 0.03 and light == 0
    weights = datasets.median_frequency_weights(counts)
    assert weights[3] > weights[2] > weights[1] and weights[4] == 0
    # validation by whole sequence: 0006R0 (101 of 367 frames) is nearest a quarter
    assert datasets.hold_out_sequence(ds.splits["train"]) == "0006R0"
    counts11 = datasets.class_pixel_counts(ds.splits["train"], get_scheme("camvid11"))
    assert (counts11.pixels > 0).all() and counts11.pixels.sum() == counts.pixels.sum()


def test_real_cityscapes_sample(shared_data):
    ds = datasets.find_dataset(shared_data / "cityscapes_sample")
    assert ds.layout == "cityscapes" and list(ds.splits) == ["val"]
    (sample,) = ds.splits["val"]
    assert sample.kind == "ids" and sample.label.endswith("_gtFine_labelIds.png")
    image, label = datasets.load_pair(sample, get_scheme("road4"))
    assert image.shape == (128, 256, 3) and label.shape == (128, 256)
    present = set(np.unique(label).tolist())
    assert {1, 2, 3} <= present and 4 not in present
