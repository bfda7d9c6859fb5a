"""OpenVINO export and predictor (issue 23): the TensorFlow path's class maps in fp32, close
ones in int8 and bf16, every --model command through ``load_predictor``, and damaged or
missing files refused in one line (``small_run``: the width-1/16 VGG trained on demo scenes).
The exports are made once for the module."""
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from fakes import class_maps, val_mious
from PIL import Image

from roadseg import cli, datasets, inference, openvino_model, precision, trainer, video

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def exports(export_formats):
    """The run as a SavedModel and as OpenVINO models (none / int8)."""
    return export_formats(openvino_model.export_openvino, openvino_model.QUANTIZE)


def test_folder_is_complete_and_says_what_it_is(exports, small_run):
    for quantize in openvino_model.QUANTIZE:
        folder = Path(exports[quantize])
        assert sorted(os.listdir(folder)) == ["export_info.json", "model.bin", "model.xml"]
        info = json.loads((folder / "export_info.json").read_text())
        assert info["format"] == "openvino" and info["quantize"] == quantize
        assert info["scheme"] == "road4" and info["image_shape"] == [128, 256]
        assert info["run"] == os.path.abspath(small_run)
    assert json.loads((Path(exports["int8"]) / "export_info.json").read_text())["calibration"]["images"] == 10
    sizes = {q: os.path.getsize(os.path.join(exports[q], "model.bin")) for q in openvino_model.QUANTIZE}
    saved = sum(f.stat().st_size for f in (Path(exports["savedmodel"]) / "variables").iterdir())
    assert sizes["none"] > 0.9 * saved            # float32 weights, not save_model's float16
    assert sizes["int8"] < 0.35 * sizes["none"]


def test_fp32_gives_tensorflows_class_maps(exports, demo_images):
    reference = class_maps(exports["savedmodel"], demo_images)
    assert len(np.unique(reference)) >= 3
    agree = np.mean(class_maps(exports["none"], demo_images) == reference)
    assert agree >= 0.995, agree                      # measured 1.0
    odd = np.ascontiguousarray(demo_images[:2, :100, :150])   # any size: resized inside, maps at its size
    with inference.load_predictor(exports["none"]) as predictor:
        assert isinstance(predictor, openvino_model.OpenVINOPredictor)
        got = predictor.predict(odd)
        assert got.shape == (2, 100, 150) and got.dtype == np.uint8
        assert predictor.predict(demo_images[0]).shape == demo_images.shape[1:3]
        probs = predictor.predict_proba(demo_images[:2])
    assert np.mean(got == class_maps(exports["savedmodel"], odd)) >= 0.995
    with inference.load_predictor(exports["savedmodel"]) as tf_predictor:
        np.testing.assert_allclose(probs, tf_predictor.predict_proba(demo_images[:2]), atol=1e-4)
    flip_tf = class_maps(exports["savedmodel"], demo_images[:4], tta="flip")
    flip_ov = class_maps(exports["none"], demo_images[:4], tta="flip")
    assert np.mean(flip_ov == flip_tf) >= 0.995


def test_int8_predicts_close_to_fp32(exports, demo_images, demo_root):
    reference = class_maps(exports["none"], demo_images)
    maps = class_maps(exports["int8"], demo_images)
    assert maps.shape == demo_images.shape[:3] and maps.dtype == np.uint8 and maps.max() < 5
    agree = np.mean(maps == reference)
    print(f"int8 pixels as fp32: {agree:.4f}")
    assert agree >= 0.95, agree                       # measured 0.989 (a tiny, briefly trained model)
    scores = val_mious({name: exports[name] for name in ("none", "int8")}, demo_root)
    assert abs(scores["int8"] - scores["none"]) < 0.03, scores


@pytest.mark.skipif(not precision.native_bf16(), reason="needs a CPU with native bfloat16 "
                    "(avx512_bf16 or amx_bf16 in /proc/cpuinfo); this one has neither")
def test_bf16_sets_openvinos_inference_precision(exports, demo_images):
    with inference.load_predictor(exports["none"], precision="bf16") as predictor:
        assert predictor.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "bf16"
        maps = predictor.predict(demo_images)
    agree = np.mean(maps == class_maps(exports["none"], demo_images))
    assert 0.98 <= agree < 1.0, agree                 # measured 0.999: bf16 ran, and is close


def test_fp32_is_asked_for_explicitly(exports):
    """OpenVINO would run bf16 on an AMX / AVX512_BF16 CPU unless told f32."""
    with inference.load_predictor(exports["none"]) as predictor:
        assert predictor.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"


def test_cli_export_predict_evaluate_video(exports, small_run, demo_root, tmp_path, capsys):
    out = tmp_path / "export"
    assert cli.main(["export", "--model", small_run, "--out", str(out), "--format", "openvino"]) == 0
    assert "model.xml" in capsys.readouterr().out
    paths = [s.image for s in datasets.find_dataset(demo_root).splits["val"]]
    for name, model in (("run", small_run), ("ov", str(out)), ("xml", str(out / "model.xml"))):
        assert cli.main(["predict", "--model", model, *paths, "--out", str(tmp_path / name)]) == 0
        assert cli.main(["evaluate", "--model", model, "--data", demo_root, "--split", "val",
                         "--out", str(tmp_path / f"{name}.json")]) == 0
    for png in (tmp_path / "run").glob("*_classes.png"):
        a, b = (np.asarray(Image.open(d / png.name)) for d in (tmp_path / "run", tmp_path / "ov"))
        assert np.mean(a == b) >= 0.995
    ious = [json.load(open(tmp_path / f"{n}.json"))["mean_iou"] for n in ("run", "ov", "xml")]
    assert ious[1] == pytest.approx(ious[0], abs=1e-3) and ious[2] == ious[1]
    clip = video.make_test_video(tmp_path / "in.mp4", 4, size=(128, 64))
    assert cli.main(["video", "--model", str(out), str(clip), str(tmp_path / "ov.mp4"), "--tta", "flip"]) == 0
    assert len(video.read_frames(str(tmp_path / "ov.mp4"), range(4))) == 4


def _one_line_error(capsys, *args):
    code = cli.main([str(a) for a in args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error:"), (code, err)
    return err[0]


def _copy(exports, tmp_path, name):
    folder = tmp_path / name
    shutil.copytree(exports["none"], folder)
    return folder


def test_missing_or_damaged_files_are_one_line(exports, demo_root, tmp_path, capsys):
    image = datasets.find_dataset(demo_root).splits["val"][0].image
    cases = {
        "no_xml": (lambda f: (f / "model.xml").unlink(), "model.xml is missing"),
        "no_bin": (lambda f: (f / "model.bin").unlink(), "model.bin is missing"),
        "no_info": (lambda f: (f / "export_info.json").unlink(), "has no export_info.json"),
        "bad_xml": (lambda f: (f / "model.xml").write_text("garbage"), "model.xml is not IR XML"),
        "cut_xml": (lambda f: (f / "model.xml").write_text((f / "model.xml").read_text()[:5000]),
                    "is damaged"),
        "cut_bin": (lambda f: (f / "model.bin").write_bytes((f / "model.bin").read_bytes()[:1000]),
                    "Incorrect weights in bin file"),
        "bad_info": (lambda f: (f / "export_info.json").write_text("{not json"), "not valid JSON"),
        "info_no_scheme": (lambda f: (f / "export_info.json").write_text("{}"), "has no scheme"),
    }
    for name, (damage, message) in cases.items():
        folder = _copy(exports, tmp_path, name)
        damage(folder)
        line = _one_line_error(capsys, "predict", "--model", folder, image, "--out", tmp_path / f"p_{name}")
        assert message in line and str(folder) in line, (name, line)
        assert "export --format openvino" in line or "JSON" in line or "scheme" in line, line
        assert not (tmp_path / f"p_{name}").exists()


def test_bf16_refused_on_a_cpu_without_it(exports, demo_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    image = datasets.find_dataset(demo_root).splits["val"][0].image
    line = _one_line_error(capsys, "predict", "--model", exports["none"], image, "--precision", "bf16",
                           "--out", tmp_path / "p")
    assert "no native bfloat16" in line and not (tmp_path / "p").exists()
    line = _one_line_error(capsys, "evaluate", "--model", exports["none"], "--data", demo_root,
                           "--split", "val", "--precision", "fp16", "--out", tmp_path / "e.json")
    assert "does not apply to OpenVINO models" in line


def test_export_mistakes_are_one_line(exports, small_run, tmp_path, capsys, monkeypatch):
    line = _one_line_error(capsys, "export", "--model", small_run, "--out", tmp_path / "q",
                           "--format", "openvino", "--quantize", "float16")
    assert "none, int8" in line and not (tmp_path / "q").exists()
    monkeypatch.setitem(sys.modules, "openvino", None)   # as if not installed
    line = _one_line_error(capsys, "export", "--model", small_run, "--out", tmp_path / "q",
                           "--format", "openvino")
    assert "pip install" in line and "openvino" in line and not (tmp_path / "q").exists()


def test_batch_predict_opens_openvino_and_litert_models(exports, small_run, demo_root, tmp_path):
    """batch-predict (Apache Beam) takes an OpenVINO folder and a LiteRT one as --model, and
    runs a run folder through its cached OpenVINO conversion: its class-map PNGs are the ones
    that model's predictor gives."""
    pytest.importorskip("apache_beam")
    from roadseg import batch_predict, litert
    tflite = litert.export_tflite(small_run, str(tmp_path / "tflite"), log=lambda *a: None)
    paths = [s.image for s in datasets.find_dataset(demo_root).splits["val"]][:3]
    for name, model in (("openvino", exports["none"]), ("litert", tflite), ("run", small_run)):
        out, lines = tmp_path / f"bp_{name}", []
        result = batch_predict.batch_predict(model, paths, str(out), log=lines.append)
        assert name != "run" or lines[0].startswith("backend: OpenVINO fp32"), lines
        assert result["ok"] == len(paths) and result["failed"] == 0
        expected = class_maps(model, np.stack([datasets.load_image(p) for p in paths]))
        for path, want in zip(paths, expected):
            got = np.asarray(Image.open(out / f"{Path(path).stem}_classes.png"))
            assert np.array_equal(got, want), name


# ============================================================================ a run folder in OpenVINO
def _quiet(*args):
    pass


def _fresh_copy(small_run, tmp_path, name="run"):
    """A copy of ``small_run`` under ``tmp_path/runs`` without its OpenVINO conversions."""
    return str(shutil.copytree(small_run, tmp_path / "runs" / name,
                               ignore=shutil.ignore_patterns(openvino_model.CACHE_DIR)))


def _count_conversions(monkeypatch):
    calls = []
    real = openvino_model.convert
    monkeypatch.setattr(openvino_model, "convert", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_a_run_folder_runs_in_openvino_with_tensorflows_class_maps(small_run, demo_images):
    """``--backend auto`` (the default) runs a run folder in OpenVINO at fp32: TensorFlow's
    class maps (measured: every pixel, probabilities within 1.1e-6 on the AVX2 EPYC), with
    ``--tta flip`` too; bf16 / fp16 stay on TensorFlow."""
    with inference.load_predictor(small_run, backend="tensorflow") as tf_path:
        assert type(tf_path) is inference.Predictor
        ref, ref_probs = tf_path.predict(demo_images), tf_path.predict_proba(demo_images)
    assert len(np.unique(ref)) >= 3
    with inference.load_predictor(small_run) as predictor:
        assert isinstance(predictor, openvino_model.OpenVINOPredictor) and predictor.source == small_run
        assert predictor.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"
        maps, probs = predictor.predict(demo_images), predictor.predict_proba(demo_images)
    diff, agree = float(np.abs(probs - ref_probs).max()), float(np.mean(maps == ref))
    print(f"OpenVINO run folder vs TensorFlow: {agree:.6f} of pixels, max prob diff {diff:.2e}")
    assert diff < 1e-4 and agree >= 0.9999, (agree, diff)   # a pixel may differ only at a tie
    flip = class_maps(small_run, demo_images[:4], tta="flip")
    assert np.mean(flip == class_maps(small_run, demo_images[:4], tta="flip", backend="tensorflow")) >= 0.9999
    assert inference.run_backend("auto") == ("openvino", inference.run_backend()[1])
    for asked in ("bf16", "fp16"):
        assert inference.run_backend("auto", asked)[0] == "tensorflow"
    auto = "openvino" if precision.resolve("auto") == "fp32" else "tensorflow"   # by the CPU
    assert inference.run_backend("auto", "auto")[0] == auto


def test_the_conversion_is_cached_and_rebuilt_when_the_checkpoint_changes(small_run, demo_images,
                                                                          tmp_path, monkeypatch):
    run = _fresh_copy(small_run, tmp_path)
    cache = Path(run) / openvino_model.CACHE_DIR
    calls = _count_conversions(monkeypatch)
    for _ in range(2):
        first = class_maps(run, demo_images[:4], which="latest")
    assert len(calls) == 1                               # the second load converted nothing
    (old,) = os.listdir(cache)
    assert old.startswith("latest-128x256-")
    info = json.loads((cache / old / "export_info.json").read_text())
    assert info["checkpoint"] == "model.ckpt-60" and info["which"] == "latest"
    # one more epoch: a new latest checkpoint
    trainer.train(runs_dir=str(tmp_path / "runs"), run="run", resume=True, epochs=21, log=_quiet)
    with inference.load_predictor(run, which="latest") as predictor:
        probs = predictor.predict_proba(demo_images[:4])
    with inference.load_predictor(run, which="latest", backend="tensorflow") as tf_path:
        np.testing.assert_allclose(probs, tf_path.predict_proba(demo_images[:4]), atol=1e-4)
    assert len(calls) == 2
    (new,) = os.listdir(cache)                           # the outdated conversion is gone
    assert new != old
    assert json.loads((cache / new / "export_info.json").read_text())["checkpoint"] == "model.ckpt-63"
    (cache / new / "model.bin").write_bytes(b"")         # a damaged conversion: converted again
    assert np.array_equal(class_maps(run, demo_images[:4], which="latest"),
                          class_maps(run, demo_images[:4], which="latest", backend="tensorflow"))
    assert len(calls) == 3 and first.shape == (4, 128, 256)


def test_a_read_only_run_folder_converts_into_a_temporary_folder(small_run, demo_images, tmp_path,
                                                                monkeypatch):
    run = _fresh_copy(small_run, tmp_path)
    real_access = os.access   # root ignores file modes: a read-only folder is os.access saying no
    monkeypatch.setattr(os, "access", lambda p, mode: os.fspath(p) != run and real_access(p, mode))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    lines = []
    with inference.load_predictor(run, log=lines.append) as predictor:
        assert isinstance(predictor, openvino_model.OpenVINOPredictor)
        maps = predictor.predict(demo_images[:4])
    assert np.array_equal(maps, class_maps(small_run, demo_images[:4]))
    assert any(f"{run} is read-only" in line and "temporary folder" in line for line in lines), lines
    assert not (Path(run) / openvino_model.CACHE_DIR).exists() and not os.listdir(tmp_path / "tmp")


def test_two_loads_converting_at_once_go_on_with_the_first_conversion(small_run, tmp_path,
                                                                      monkeypatch, demo_images):
    """Two Beam workers or two commands converting one checkpoint at once: the one that
    finishes second (here: the outer one) goes on with the folder that landed first."""
    run = _fresh_copy(small_run, tmp_path)
    real_save, other = openvino_model._save, []

    def save(out_dir, *args):
        if not other:   # the other process converts and finishes first
            other.append(None)
            other[0] = openvino_model.run_model(run, log=_quiet)
        real_save(out_dir, *args)
    monkeypatch.setattr(openvino_model, "_save", save)
    folder = openvino_model.run_model(run, log=_quiet)
    assert folder == other[0] and os.listdir(Path(run) / openvino_model.CACHE_DIR) == [Path(folder).name]
    assert sorted(os.listdir(folder)) == ["export_info.json", "model.bin", "model.xml"]
    assert np.array_equal(class_maps(run, demo_images[:2]), class_maps(small_run, demo_images[:2]))


def test_backend_option(small_run, small_export, demo_root, tmp_path, capsys, monkeypatch):
    image = datasets.find_dataset(demo_root).splits["val"][0].image
    assert cli.main(["predict", "--model", small_run, image, "--out", str(tmp_path / "auto")]) == 0
    assert f"backend: OpenVINO fp32 for {small_run} (auto: OpenVINO is installed" in capsys.readouterr().out
    line = _one_line_error(capsys, "predict", "--model", small_export, image, "--backend", "openvino",
                           "--out", tmp_path / "p")
    assert "--backend openvino does not apply to" in line and "SavedModel" in line
    line = _one_line_error(capsys, "evaluate", "--model", small_run, "--data", demo_root, "--backend",
                           "openvino", "--precision", "fp16", "--out", tmp_path / "e.json")
    assert "does not apply to OpenVINO models" in line

    def no_openvino(*args, **kwargs):
        raise AssertionError("OpenVINO was used")
    monkeypatch.setattr(openvino_model, "run_predictor", no_openvino)   # today's TensorFlow path
    assert cli.main(["predict", "--model", small_run, image, "--out", str(tmp_path / "tf"),
                     "--backend", "tensorflow"]) == 0
    assert "backend: TensorFlow fp32" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "openvino", None)   # as if not installed: auto is TensorFlow
    assert cli.main(["predict", "--model", small_run, image, "--out", str(tmp_path / "none")]) == 0
    assert "backend: TensorFlow fp32" in capsys.readouterr().out
    line = _one_line_error(capsys, "predict", "--model", small_run, image, "--backend", "openvino",
                           "--out", tmp_path / "p")
    assert "--backend openvino needs OpenVINO" in line and "pip install" in line
    for name in ("auto", "tf", "none"):
        (png,) = (tmp_path / name).glob("*_classes.png")
        assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(
            tmp_path / "auto" / png.name)))


@pytest.mark.parametrize("native, hint", [(False, "f32"), (True, "bf16")])
def test_auto_precision_on_openvino_follows_the_cpu(monkeypatch, native, hint):
    monkeypatch.setattr(precision, "has_gpu", lambda: False)
    monkeypatch.setattr(precision, "native_bf16", lambda: native)
    assert openvino_model.check_precision("auto") == hint
    assert openvino_model.check_precision(None) == "f32"
