"""``segment.py batch-predict``: Apache Beam RunInference (in-process FnApiRunner, offline)
writes what ``segment.py predict`` writes, byte for byte."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from roadseg import demo_scenes, export, trainer
from roadseg.cli import main as cli_main

pytest.importorskip("apache_beam")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory, vgg_dir):
    root = tmp_path_factory.mktemp("bp")
    data = root / "cityscapes"
    demo_scenes.make_demo_data(str(data), n=8, seed=1, size=(64, 128))
    result = trainer.train(str(data), vgg_dir, runs_dir=str(root / "runs"), run="r", epochs=1,
                           image_shape=[64, 128], batch_size=2, lr=1e-3, keep_prob=1.0,
                           skip_scales=[], log=lambda *a: None)
    images = sorted((data / "leftImg8bit").rglob("*.png"))
    return dict(root=root, run=result["run_dir"], images=images,
                export=export.export(result["run_dir"], str(root / "export")))


def _files(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir()}


def test_batch_predict_writes_what_predict_writes(setup, tmp_path, capsys):
    images = setup["images"]
    folder = images[0].parent
    assert cli_main(["predict", "--model", setup["run"], *map(str, images), "--out",
                     str(tmp_path / "predict")]) == 0
    expected = _files(tmp_path / "predict")
    assert len(expected) == 2 * len(images)
    # an export, a folder + a glob; then the run folder itself (exported on the fly)
    others = [str(p) for p in images if p.parent != folder]
    glob = str(others[0].rsplit(os.sep, 1)[0]) + "/*.png" if others else None
    for model, inputs, out in [(setup["export"], [str(folder)] + ([glob] if glob else []), "beam_export"),
                               (setup["run"], list(map(str, images)), "beam_run")]:
        assert cli_main(["batch-predict", "--model", model, *inputs, "--out",
                         str(tmp_path / out)]) == 0, capsys.readouterr().err
        assert _files(tmp_path / out) == expected


def test_batch_predict_refuses_before_running(setup, tmp_path, capsys):
    image = str(setup["images"][0])
    taken = tmp_path / "taken"
    taken.mkdir()
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / Path(image).name).write_bytes(Path(image).read_bytes())
    cases = [([image, "--out", str(taken)], "already exists"),
             ([str(tmp_path / "nope.png"), "--out", str(tmp_path / "o1")], "does not exist"),
             ([image, str(twin / Path(image).name), "--out", str(tmp_path / "o2")], "would both be saved"),
             ([str(tmp_path / "empty*.png"), "--out", str(tmp_path / "o3")], "does not exist")]
    damaged = Path(shutil.copytree(setup["export"], tmp_path / "damaged"))
    (damaged / "export_info.json").write_text("{not json")
    for args, message in cases + [([image, "--out", str(tmp_path / "o4")], "is damaged")]:
        model = damaged if message == "is damaged" else setup["export"]
        assert cli_main(["batch-predict", "--model", str(model), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    with pytest.raises(SystemExit):   # only batch-predict passes options it does not know on
        cli_main(["predict", "--model", setup["export"], image, "--project=x"])
    assert "unrecognized arguments: --project=x" in capsys.readouterr().err


def test_undecodable_image_is_one_line_and_leaves_no_output(setup, tmp_path, capsys):
    bad = tmp_path / "in" / "bad.png"
    bad.parent.mkdir()
    bad.write_bytes(b"not a png")
    out = tmp_path / "out"
    assert cli_main(["batch-predict", "--model", setup["export"], str(bad.parent), "--out",
                     str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot decode image" in err and "bad.png" in err and "Traceback" not in err
    assert not out.exists()


def test_beam_is_imported_by_batch_predict_only():
    code = "import sys, roadseg.cli; print('apache_beam' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert out.stdout.strip() == "False", out.stderr[-2000:]
