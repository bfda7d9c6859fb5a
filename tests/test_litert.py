"""LiteRT export and the LiteRT predictor: the same class maps as the SavedModel export
(float32), close ones when quantised, every command through ``load_predictor``, and the bad
inputs refused in one line (``small_run``: the width-1/16 VGG trained on demo scenes)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from fakes import class_maps, val_mious
from PIL import Image

from roadseg import cli, datasets, fcn, inference, litert, video


@pytest.fixture(scope="module")
def exports(export_formats):
    """The run as a SavedModel and as LiteRT models (none / float16 / int8)."""
    return export_formats(litert.export_tflite, litert.QUANTIZE)


def test_tflite_folder_is_complete_and_says_what_it_is(exports, small_run):
    folder = Path(exports["int8"])
    assert sorted(os.listdir(folder)) == ["export_info.json", "model.tflite"]
    info = json.loads((folder / "export_info.json").read_text())
    assert info["format"] == "tflite" and info["quantize"] == "int8"
    assert info["scheme"] == "road4" and info["image_shape"] == [128, 256]
    assert info["calibration"]["images"] > 0 and info["run"] == os.path.abspath(small_run)
    sizes = {q: os.path.getsize(os.path.join(exports[q], "model.tflite")) for q in litert.QUANTIZE}
    assert sizes["int8"] < 0.35 * sizes["none"] and sizes["float16"] < 0.6 * sizes["none"]


def test_float_tflite_gives_the_savedmodels_class_maps(exports, demo_images):
    reference = class_maps(exports["savedmodel"], demo_images)
    assert len(np.unique(reference)) >= 3
    agree = np.mean(class_maps(exports["none"], demo_images) == reference)
    assert agree >= 0.999, agree                       # measured 1.0
    agree16 = np.mean(class_maps(os.path.join(exports["float16"], "model.tflite"), demo_images) == reference)
    assert agree16 >= 0.995, agree16                   # measured 0.99992
    with inference.load_predictor(exports["none"]) as predictor:
        odd = np.ascontiguousarray(demo_images[:2, :100, :150])   # any size: resized, maps at its size
        assert predictor.predict(odd).shape == (2, 100, 150)
        assert predictor.predict(demo_images[0]).shape == demo_images.shape[1:3]
        probs = predictor.predict_proba(demo_images[:1])
        assert probs.shape == (1, *demo_images.shape[1:3], predictor.scheme.num_classes)
        np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)


def test_int8_tflite_is_close_to_float(exports, demo_images, demo_root):
    reference = class_maps(exports["savedmodel"], demo_images)
    agree = np.mean(class_maps(exports["int8"], demo_images) == reference)
    assert agree >= 0.9, agree                         # measured 0.959 (a tiny, briefly trained model)
    scores = val_mious({name: exports[name] for name in ("savedmodel", "int8")}, demo_root)
    assert abs(scores["int8"] - scores["savedmodel"]) < 0.03, scores   # measured 0.005


def test_int8_model_has_no_preprocessing_ops_that_lose_its_scale(exports):
    """LiteRT's int8 REVERSE_V2 ignores its output's quantisation (CamVid: test mIoU 0.67 ->
    0.36): the preprocessing is one 1x1 convolution instead."""
    ops = {op["op_name"] for op in litert.interpreter(
        os.path.join(exports["int8"], "model.tflite"))._get_ops_details()}
    assert "REVERSE_V2" not in ops and "SUB" not in ops and "CONV_2D" in ops


def test_input_affine_is_the_encoders_preprocessing(vgg_dir):
    import tensorflow as tf
    tf1 = tf.compat.v1
    with tf.Graph().as_default(), tf1.Session() as sess:
        x = tf1.placeholder(tf.float32, [1, 32, 64, 3])
        fcn.load_vgg(sess, vgg_dir, input_map={"image_input:0": x})
        conv1 = next(op for op in sess.graph.get_operations() if op.type == "Conv2D")
        affine = litert.input_affine(sess, x, conv1.inputs[0])
        image = np.random.default_rng(1).integers(0, 256, (1, 32, 64, 3)).astype(np.float32)
        want, got = sess.run([conv1.inputs[0], affine], {x: image})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_calibration_images_are_spread_over_the_training_split(demo_root, tmp_path):
    train = [s.image for s in datasets.find_dataset(demo_root).splits["train"]]
    assert litert.calibration_images(demo_root) == train
    assert litert.calibration_images(demo_root, 3) == [train[0], train[3], train[6]]
    plain = tmp_path / "plain" / "deeper"
    plain.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(plain / "a.png")
    assert litert.calibration_images(str(tmp_path / "plain")) == [str(plain / "a.png")]


def test_cli_round_trip_gives_the_same_files(exports, small_run, demo_root, tmp_path, capsys):
    out = tmp_path / "tfl"
    assert cli.main(["export", "--model", small_run, "--out", str(out), "--format", "tflite"]) == 0
    assert "model.tflite" in capsys.readouterr().out
    val = datasets.find_dataset(demo_root).splits["val"]
    paths = [s.image for s in val]
    for name, model in (("run", small_run), ("tflite", str(out / "model.tflite"))):
        assert cli.main(["predict", "--model", model, *paths, "--out", str(tmp_path / name)]) == 0
        assert cli.main(["evaluate", "--model", model, "--data", demo_root, "--split", "val",
                         "--out", str(tmp_path / f"{name}.json")]) == 0
    assert sorted(os.listdir(tmp_path / "run")) == sorted(os.listdir(tmp_path / "tflite"))
    for png in (tmp_path / "run").glob("*_classes.png"):
        a, b = (np.asarray(Image.open(d / png.name)) for d in (tmp_path / "run", tmp_path / "tflite"))
        assert np.mean(a == b) >= 0.999
    ious = [json.load(open(tmp_path / f"{n}.json"))["mean_iou"] for n in ("run", "tflite")]
    assert ious[0] == pytest.approx(ious[1], abs=1e-3)
    clip = video.make_test_video(tmp_path / "in.mp4", 4, size=(128, 64))
    for name, model in (("run", small_run), ("tflite", str(out))):
        assert cli.main(["video", "--model", model, str(clip), str(tmp_path / f"{name}.mp4")]) == 0
    run, tfl = (video.read_frames(str(tmp_path / f"{n}.mp4"), range(4)) for n in ("run", "tflite"))
    assert len(run) == len(tfl) == 4
    assert np.abs(np.asarray(run, float) - np.asarray(tfl, float)).mean() < 1.0   # H.264 noise


def _one_line_error(capsys, *args):
    code = cli.main([str(a) for a in args])
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.startswith("error:")]
    assert code == 2 and len(err) == 1, (code, err)
    return err[0]


def test_bad_inputs_are_one_line_errors(exports, small_run, demo_root, tmp_path, capsys):
    image = datasets.find_dataset(demo_root).splits["val"][0].image
    line = _one_line_error(capsys, "predict", "--model", exports["none"], image, "--precision", "bf16",
                           "--out", tmp_path / "p")
    assert "--precision does not apply" in line and not (tmp_path / "p").exists()
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "model.tflite").write_text("not a model")
    (fake / "export_info.json").write_text((Path(exports["none"]) / "export_info.json").read_text())
    line = _one_line_error(capsys, "evaluate", "--model", fake / "model.tflite", "--data", demo_root,
                           "--split", "val", "--out", tmp_path / "e.json")
    assert "is not a LiteRT (.tflite) model" in line and not (tmp_path / "e.json").exists()
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no images here")
    line = _one_line_error(capsys, "export", "--model", small_run, "--out", tmp_path / "q",
                           "--format", "tflite", "--quantize", "int8", "--calibration", empty)
    assert "has no images" in line and not (tmp_path / "q").exists()
    line = _one_line_error(capsys, "export", "--model", small_run, "--out", tmp_path / "q",
                           "--quantize", "int8")
    assert "--format tflite" in line
    (tmp_path / "model.bin").write_text("x")
    line = _one_line_error(capsys, "predict", "--model", tmp_path / "model.bin", image)
    assert "not a .tflite model" in line


@pytest.mark.parametrize("fmt", ["tflite", "openvino"])
def test_every_export_format_checks_the_shared_options_first(fmt, small_run, demo_root, tmp_path,
                                                             capsys):
    """``export.check_options``, before anything is built: --calibration without int8, and an
    --out that exists (nothing is overwritten)."""
    if fmt == "openvino":
        pytest.importorskip("openvino")
    line = _one_line_error(capsys, "export", "--model", small_run, "--out", tmp_path / "q",
                           "--format", fmt, "--calibration", demo_root)
    assert "--quantize int8 only" in line and not (tmp_path / "q").exists()
    (tmp_path / "taken").mkdir()
    line = _one_line_error(capsys, "export", "--model", small_run, "--out", tmp_path / "taken",
                           "--format", fmt)
    assert "already exists" in line and os.listdir(tmp_path / "taken") == []
