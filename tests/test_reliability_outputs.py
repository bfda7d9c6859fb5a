"""Reliability of outputs and damaged inputs (issue 17; the table is docs/failures.md).

Every output is written under a hidden temporary name and gets its final name only when
complete: a full disk, a Ctrl-C or a kill leaves nothing half-written under a final name.
Damaged model files and odd output paths end in one ``error:`` line.  Outputs and
requirements are checked before anything is computed.

Full and read-only disks are simulated by making writes raise ``OSError(ENOSPC/EROFS)`` (or
by ``/dev/full`` for ffmpeg) and by stubbing ``os.access``: the tests run as root in CI,
where ``chmod`` does not stop a write.
"""
import errno
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from test_reliability import ROOT, cli, expect_error, train_frames, tree

from roadseg import datasets, inference, run_folders, video
from roadseg.errors import UserError

tf1 = tf.compat.v1
ENOSPC = OSError(errno.ENOSPC, "No space left on device")
# what TensorFlow says when a SavedModel does not fit: the reason, then an out-of-memory hint
TF_DISK_FULL = ("Graph execution error:\n\nDetected at node 'save/SaveV2':\n variables.data; No space "
                "left on device\n\t [[{{node save/SaveV2}}]]\n\nHint: If you want to see a list of "
                "allocated tensors when OOM happens, add report_tensor_allocations_upon_oom to RunOptions.")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """12 demo scenes of 64x128 in the Cityscapes layout (10 train, 2 val)."""
    from roadseg import demo_scenes
    root = tmp_path_factory.mktemp("tiny") / "cityscapes"
    demo_scenes.make_demo_data(str(root), n=12, seed=0, size=(64, 128))
    return root


@pytest.fixture(scope="module")
def trained_run(tiny, vgg_dir, tmp_path_factory):
    """A finished one-epoch run (5 steps of 2 images)."""
    from roadseg import trainer
    result = trainer.train(str(tiny), vgg_dir, runs_dir=str(tmp_path_factory.mktemp("runs")),
                           run="base", image_shape=[64, 128], epochs=1, batch_size=2,
                           log=lambda *a: None)
    return Path(result["run_dir"])


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    from roadseg import export
    return Path(export.export(str(trained_run), str(tmp_path_factory.mktemp("exp") / "exp")))


@pytest.fixture
def run_copy(trained_run, tmp_path):
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


@pytest.fixture
def export_copy(exported, tmp_path):
    return Path(shutil.copytree(exported, tmp_path / "exp"))


def nothing_hidden(folder):
    """No temporary leftovers (``.*.part``) in ``folder``."""
    return [p for p in os.listdir(folder) if p.startswith(".")] == []


def _truncate(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


def half_write(text):
    """A ``json.dump``-like function that writes ``text`` and then finds the disk full."""
    def dump(value, f, **kwargs):
        f.write(text)
        f.flush()
        raise ENOSPC
    return dump


def _no_predictor(*args, **kwargs):
    raise AssertionError("the model was loaded before the outputs were checked")


# ============================================================================= 4. outputs
def test_predict_on_a_full_disk_leaves_no_png(trained_run, tiny, tmp_path, monkeypatch, capsys):
    """The 3rd PNG hits a full disk half-way: one line, and nothing under --out."""
    real_save, calls = Image.Image.save, []

    def save(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 3:
            with open(fp, "wb") as f:
                f.write(b"\x89PNG half")
            raise ENOSPC
        return real_save(self, fp, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "out" / "pred"
    images = [f[0] for f in train_frames(tiny)[:3]]
    stem = images[1].name[:-4]   # calls: overlay 0, classes 0, overlay 1
    expect_error(capsys, "predict", "--model", trained_run, *images, "--out", out,
                 contains=[f"could not write {out / stem}", "No space left on device", "free disk space"])
    assert not out.exists() and nothing_hidden(tmp_path / "out")


def test_write_overlays_writes_complete_pngs_only(tmp_path, monkeypatch):
    """The library function alone (into an existing folder): a failed PNG leaves no file."""
    from roadseg import overlays
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    def save(self, fp, *args, **kwargs):
        half_write(b"\x89PNG")(None, open(fp, "wb"))
    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match="could not write .*a.png .No space left on device"):
        overlays.write_overlays(str(out), [image], lambda x: np.zeros(x.shape[:3], np.uint8), [(0, 0, 0)])
    assert os.listdir(out) == []


@pytest.mark.parametrize("failure", ["ffmpeg cannot write", "file cut short"])
def test_video_onto_a_full_disk_is_an_error_and_leaves_nothing(trained_run, tmp_path, monkeypatch,
                                                               capsys, failure):
    """ffmpeg does not tell imageio-ffmpeg it failed: its output is read back before it gets
    its final name.  'ffmpeg cannot write': it writes to /dev/full (every write is ENOSPC);
    'file cut short': the disk filled while the end of the file was written."""
    clip = video.make_test_video(tmp_path / "in.mp4", 8, size=(64, 48))
    real = imageio_ffmpeg.write_frames

    def write_frames(path, *args, **kwargs):
        if failure == "ffmpeg cannot write":
            return real("/dev/full", *args, **kwargs)
        gen = real(path, *args, **kwargs)

        class CutShort:
            def send(self, value):
                return gen.send(value)

            def close(self):
                gen.close()
                _truncate(Path(path), os.path.getsize(path) // 2)
        return CutShort()
    monkeypatch.setattr(imageio_ffmpeg, "write_frames", write_frames)
    out = tmp_path / "out.mp4"
    line = expect_error(capsys, "video", "--model", trained_run, clip, out,
                        contains=[f"could not write the video {out}", "free disk space"])
    if failure == "ffmpeg cannot write":
        assert f"{out} (No space left on device)" in line
    assert sorted(os.listdir(tmp_path)) == ["in.mp4"]


def test_evaluation_json_on_a_full_disk_leaves_nothing(trained_run, tiny, tmp_path, monkeypatch, capsys):
    from roadseg import metrics
    monkeypatch.setattr(metrics.json, "dump", half_write("{"))
    out = tmp_path / "eval.json"
    expect_error(capsys, "evaluate", "--model", trained_run, "--data", tiny, "--out", out,
                 contains=[f"could not write {out}", "No space left on device"])
    assert os.listdir(tmp_path) == []


def test_export_on_a_full_disk_leaves_nothing(trained_run, tmp_path, monkeypatch, capsys):
    """The variables are written, then the graph file does not fit."""
    real_save = tf1.saved_model.Builder.save

    def save(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        raise tf.errors.ResourceExhaustedError(None, None, TF_DISK_FULL)
    monkeypatch.setattr(tf1.saved_model.Builder, "save", save)
    out = tmp_path / "exp"
    expect_error(capsys, "export", "--model", trained_run, "--out", out,
                 contains=[f"could not write {out} (No space left on device)"])
    assert os.listdir(tmp_path) == []


def test_write_json_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "history.json"
    run_folders.write_json(str(path), [1])
    monkeypatch.setattr(run_folders.json, "dump", half_write("[1, 2"))
    with pytest.raises(UserError, match=r"could not write .*history.json \(No space left on device\)"):
        run_folders.write_json(str(path), [1, 2])
    assert json.loads(path.read_text()) == [1] and os.listdir(tmp_path) == ["history.json"]


def test_ctrl_c_during_predict_leaves_nothing(trained_run, tiny, tmp_path, monkeypatch, capsys):
    from roadseg import overlays
    real, calls = overlays.overlay, []

    def overlay(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(overlays, "overlay", overlay)
    out = tmp_path / "out"
    code, _, err = cli(capsys, "predict", "--model", trained_run, *[f[0] for f in train_frames(tiny)[:4]],
                       "--out", out, "--batch-size", 1)
    assert code == 130 and err.strip().splitlines()[-1] == "interrupted"
    assert os.listdir(tmp_path) == []


def test_sigkill_during_predict_leaves_no_final_folder_and_the_rerun_works(trained_run, tiny,
                                                                           tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    for i in range(200):
        shutil.copy(train_frames(tiny)[i % 10][0], images / f"img{i:03d}.png")
    out = tmp_path / "out"
    args = [sys.executable, "segment.py", "predict", "--model", str(trained_run), str(images),
            "--out", str(out), "--batch-size", "1"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(glob.glob(str(tmp_path / ".out.*" / "*.png"))) < 10 and time.time() < deadline:
        assert proc.poll() is None, "predict ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists()            # only the hidden temporary folder is left
    rerun = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert len(list(out.glob("*.png"))) == 400


# ============================================================================= 5. pairing
def test_cityscapes_pairs_by_city_and_reports_strays(tmp_path):
    """Two cities with frames of the same name: each image gets its own city's label."""
    from roadseg import demo_scenes
    root = tmp_path / "cs"
    demo_scenes.make_demo_data(str(root), n=4, seed=0, size=(64, 64), val_fraction=0.0)
    for kind in ("leftImg8bit", "gtFine"):
        shutil.copytree(root / kind / "train" / "demo", root / kind / "train" / "other")
    samples = datasets.find_dataset(root).splits["train"]
    assert len(samples) == 8
    for s in samples:
        assert Path(s.image).parent.name == Path(s.label).parent.name, s
    stray = root / "leftImg8bit" / "train" / "other" / "demo_000002_000019_leftImg8bit.png"
    for label in (root / "gtFine" / "train" / "other").glob("demo_000002_000019_*"):
        label.unlink()
    with pytest.raises(UserError, match=f"1 images without labels: {stray}"):
        datasets.find_dataset(root)


# ============================================================================= 6. check first
@pytest.mark.parametrize("case", ["cityscapes-out is a file", "official without labelIds",
                                  "out under a file", "read-only model folder"])
def test_evaluate_checks_outputs_and_requirements_before_computing(run_copy, tiny, tmp_path,
                                                                   monkeypatch, capsys, case):
    data = Path(shutil.copytree(tiny, tmp_path / "data"))
    monkeypatch.setattr(inference, "load_predictor", _no_predictor)
    args = ["evaluate", "--model", run_copy, "--data", data]
    if case == "cityscapes-out is a file":
        (tmp_path / "cs").write_text("mine")
        args += ["--out", tmp_path / "e.json", "--cityscapes-out", tmp_path / "cs"]
        want = ["--cityscapes-out", "is a file"]
    elif case == "official without labelIds":
        for ids in data.rglob("*_gtFine_labelIds.png"):
            ids.unlink()                       # colour labels only
        args += ["--out", tmp_path / "e.json", "--cityscapes-out", tmp_path / "cs", "--official"]
        want = ["--official needs Cityscapes gtFine", "_gtFine_color.png", "leave --official out"]
    elif case == "out under a file":
        (tmp_path / "f").write_text("mine")
        args += ["--out", tmp_path / "f" / "e.json"]
        want = [f"{tmp_path / 'f'} is a file, not a folder", "--out"]
    else:   # root ignores file modes: a read-only folder is os.access saying no
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: os.fspath(p) != str(run_copy)
                            and real_access(p, mode))
        want = [f"{run_copy} is read-only", "--out"]
    before = tree(tmp_path)
    code, out, err = cli(capsys, *args)
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1, err
    assert all(w in lines[0] for w in want), lines[0]
    assert out == "" and tree(tmp_path) == before


def test_predict_failing_on_image_3_leaves_nothing_and_the_rerun_works(trained_run, tiny,
                                                                       tmp_path, capsys):
    images = tmp_path / "in"
    images.mkdir()
    for i in range(4):
        shutil.copy(train_frames(tiny)[i][0], images / f"img{i}.png")
    good = (images / "img2.png").read_bytes()
    _truncate(images / "img2.png", 300)
    out = tmp_path / "out"
    expect_error(capsys, "predict", "--model", trained_run, images, "--out", out, "--batch-size", 1,
                 contains=["cannot decode image", "img2.png"])
    assert sorted(os.listdir(tmp_path)) == ["in"]
    (images / "img2.png").write_bytes(good)
    code, _, err = cli(capsys, "predict", "--model", trained_run, images, "--out", out)
    assert code == 0, err
    assert len(os.listdir(out)) == 8


# ============================================================================= 7. damaged files
def _break(kind, run, exp, vgg_copy):
    """Damage one file; returns (command args after the command name, texts of the message)."""
    if kind == "truncated best checkpoint":
        data = next((run / "best").glob("*.data-*"))
        _truncate(data, 1000)
        return ["--model", run], [f"checkpoint {run / 'best'}", "is damaged",
                                  f"move {run / 'best'} away"]
    if kind == "config.json not JSON":
        (run / "config.json").write_text("{not json")
        return ["--model", run], [f"{run / 'config.json'} is damaged: not valid JSON"]
    if kind == "config.json a list":
        (run / "config.json").write_text("[1, 2]")
        return ["--model", run], [f"{run / 'config.json'} is damaged", "not an object"]
    if kind == "config.json without scheme":
        config = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "scheme"}))
        return ["--model", run], [f"{run / 'config.json'} is damaged: it has no scheme;"]
    if kind == "export_info.json without image_shape":
        info = json.loads((exp / "export_info.json").read_text())
        del info["image_shape"]
        (exp / "export_info.json").write_text(json.dumps(info))
        return ["--model", exp], [f"{exp / 'export_info.json'} is damaged: it has no image_shape;",
                                  "export the run again"]
    if kind == "export without variables":
        shutil.rmtree(exp / "variables")
        return ["--model", exp], [f"exported model {exp} is incomplete", "export the run again"]
    if kind == "export_info.json not JSON":
        (exp / "export_info.json").write_text("")
        return ["--model", exp], [f"{exp / 'export_info.json'} is damaged", "export the run again"]
    if kind == "export saved_model.pb corrupt":
        (exp / "saved_model.pb").write_bytes(b"\x08\x01garbage" * 10)
        return ["--model", exp], [f"exported model {exp} is damaged", "saved_model.pb"]
    if kind == "VGG saved_model.pb corrupt":
        _truncate(vgg_copy / "saved_model.pb", 100)   # a cached OpenVINO conversion needs no VGG16:
        shutil.rmtree(run / "openvino_cache", ignore_errors=True)   # converting does
        config = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**config, "vgg": str(vgg_copy)}))
        return ["--model", run], [f"VGG16 model folder {vgg_copy} is damaged", "get-vgg"]
    raise ValueError(kind)


DAMAGED = [(command, kind) for kind in ("truncated best checkpoint", "config.json not JSON")
           for command in ("predict", "evaluate", "export")]
DAMAGED += [("export", "config.json a list"), ("evaluate", "config.json without scheme"),
            ("predict", "export_info.json without image_shape"), ("predict", "VGG saved_model.pb corrupt"),
            ("export", "VGG saved_model.pb corrupt")]
DAMAGED += [("predict", kind) for kind in ("export without variables", "export_info.json not JSON",
                                           "export saved_model.pb corrupt")]


@pytest.mark.parametrize("command, kind", DAMAGED)
def test_damaged_model_files_are_one_line(run_copy, export_copy, vgg_dir, tiny, tmp_path, capsys,
                                          command, kind):
    vgg_copy = Path(shutil.copytree(vgg_dir, tmp_path / "vgg"))
    model, want = _break(kind, run_copy, export_copy, vgg_copy)
    out = tmp_path / "out"
    extra = {"predict": [train_frames(tiny)[0][0], "--out", out],
             "evaluate": ["--data", tiny, "--out", tmp_path / "e.json"],
             "export": ["--out", out]}[command]
    expect_error(capsys, command, *model, *extra, contains=want)
    assert not out.exists() and not (tmp_path / "e.json").exists() and nothing_hidden(tmp_path)


def test_damaged_checkpoint_index_uses_the_files(run_copy, tiny, tmp_path, capsys):
    """A 0-byte best/checkpoint (a power cut): the checkpoint files there are used, with a warning."""
    (run_copy / "best" / "checkpoint").write_text("")
    code, out, err = cli(capsys, "predict", "--model", run_copy, train_frames(tiny)[0][0],
                         "--out", tmp_path / "out")
    assert code == 0, err
    assert f"warning: {run_copy / 'best' / 'checkpoint'} is damaged; using" in err


@pytest.mark.parametrize("command", ["predict", "evaluate", "export", "video"])
def test_output_under_a_path_that_is_a_file(trained_run, tiny, tmp_path, capsys, command):
    (tmp_path / "f").write_text("mine")
    target = tmp_path / "f" / "sub"
    args = {"predict": ["predict", "--model", trained_run, train_frames(tiny)[0][0], "--out", target],
            "evaluate": ["evaluate", "--model", trained_run, "--data", tiny, "--out", target / "e.json"],
            "export": ["export", "--model", trained_run, "--out", target],
            "video": ["video", "--model", trained_run, video.make_test_video(tmp_path / "in.mp4", 2),
                      target / "o.mp4"]}[command]
    expect_error(capsys, *args, contains=[f"{tmp_path / 'f'} is a file, not a folder"])
    assert (tmp_path / "f").read_text() == "mine"


def test_missing_parent_folders_are_created(trained_run, tiny, tmp_path, capsys):
    image = train_frames(tiny)[0][0]
    clip = video.make_test_video(tmp_path / "in.mp4", 2, size=(64, 48))
    for args in (["predict", "--model", trained_run, image, "--out", tmp_path / "a" / "b" / "pred"],
                 ["evaluate", "--model", trained_run, "--data", tiny, "--out", tmp_path / "c" / "e.json"],
                 ["export", "--model", trained_run, "--out", tmp_path / "d" / "e" / "exp"],
                 ["video", "--model", trained_run, clip, tmp_path / "g" / "o.mp4"]):
        code, _, err = cli(capsys, *args)
        assert code == 0, err
    assert (tmp_path / "a/b/pred").is_dir() and (tmp_path / "c/e.json").is_file()
    assert (tmp_path / "d/e/exp/saved_model.pb").is_file() and (tmp_path / "g/o.mp4").is_file()


def test_runs_that_is_a_file_or_read_only(trained_run, tiny, tmp_path, monkeypatch, capsys):
    image = train_frames(tiny)[0][0]
    runs = tmp_path / "runs"
    runs.write_text("mine")
    expect_error(capsys, "predict", "--model", trained_run, image, "--runs", runs,
                 contains=[f"{runs} is a file, not a folder"])
    with pytest.raises(UserError, match=f"cannot create folder {runs / 'x'}: {runs} is a file"):
        run_folders.new_run_dir(str(runs / "x"), "r")
    runs.unlink()
    runs.mkdir()

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))
    monkeypatch.setattr(os, "mkdir", read_only)
    with pytest.raises(UserError, match=rf"cannot create {runs / 'r'} \(Read-only file system\)"):
        run_folders.new_run_dir(str(runs), "r")
    monkeypatch.undo()
    real_access = os.access   # root ignores file modes: read-only is os.access saying no
    monkeypatch.setattr(os, "access", lambda p, mode: os.fspath(p) != str(runs) and real_access(p, mode))
    expect_error(capsys, "predict", "--model", trained_run, image, "--runs", runs,
                 contains=[f"{runs} is read-only"])
    assert os.listdir(runs) == []


# ============================================================================= 9. get-vgg
def test_get_vgg_course_with_junk_under_the_right_names(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    with zipfile.ZipFile(data / "vgg.zip", "w") as z:
        for name in ("saved_model.pb", "variables/variables.index",
                     "variables/variables.data-00000-of-00001"):
            z.writestr(f"vgg/{name}", b"junk")
    expect_error(capsys, "get-vgg", "--source", "course", "--data", data,
                 contains=[f"VGG16 model folder {data / 'vgg'} does not load", "removed again",
                           f"delete {data / 'vgg.zip'}", "get-vgg"])
    assert sorted(os.listdir(data)) == ["vgg.zip"]


def test_verify_vgg_savedmodel_accepts_a_good_model_and_names_a_junk_one(vgg_dir, tmp_path):
    from roadseg import vgg
    assert vgg.verify_vgg_savedmodel(vgg_dir) == vgg_dir
    bad = Path(shutil.copytree(vgg_dir, tmp_path / "vgg"))
    _truncate(bad / "variables" / "variables.data-00000-of-00001", 100)
    with pytest.raises(UserError, match=f"VGG16 model folder {bad} does not load"):
        vgg.verify_vgg_savedmodel(str(bad))


# ============================================================================= 10. messages
def test_check_data_on_a_file_says_it_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    expect_error(capsys, "check-data", tmp_path / "f", contains=["is a file, not a folder"])


def test_bad_file_errors_name_only_options_the_command_has(trained_run, tiny, tmp_path, capsys):
    data = Path(shutil.copytree(tiny, tmp_path / "data"))
    image, ids, _ = train_frames(data, "val")[0]
    _truncate(image, 300)
    for args in (["predict", "--model", trained_run, image, "--out", tmp_path / "p"],
                 ["evaluate", "--model", trained_run, "--data", data, "--out", tmp_path / "e.json"]):
        line = expect_error(capsys, *args, contains=["cannot decode image", "replace the file"])
        assert "--skip-bad" not in line
    line = expect_error(capsys, "check-data", data, contains=["cannot decode image"])
    assert line.endswith("replace the file or pass --skip-bad to leave bad files out")


def test_errors_are_not_printed_onto_a_progress_bar(trained_run, tiny, tmp_path, capsys):
    """evaluate meets a bad image half-way through its progress bar."""
    data = Path(shutil.copytree(tiny, tmp_path / "data"))
    _truncate(train_frames(data, "val")[1][0], 300)
    code, _, err = cli(capsys, "evaluate", "--model", trained_run, "--data", data, "--out",
                       tmp_path / "e.json")
    assert code == 2
    assert err.splitlines()[-1].startswith("error: cannot decode image"), repr(err[-400:])


@pytest.mark.parametrize("args", [["predict", "--batch-size", "0"], ["evaluate", "--batch-size", "0"],
                                  ["video", "--batch-size", "-1"], ["video", "--max-frames", "0"]])
def test_counts_below_one_are_refused(trained_run, tiny, tmp_path, capsys, args):
    command, flag, value = args
    rest = {"predict": [train_frames(tiny)[0][0], "--out", tmp_path / "p"],
            "evaluate": ["--data", tiny, "--out", tmp_path / "e.json"],
            "video": [video.make_test_video(tmp_path / "in.mp4", 2), tmp_path / "o.mp4"]}[command]
    expect_error(capsys, command, "--model", trained_run, *rest, flag, value,
                 contains=[f"{flag} must be at least 1, not {value}"])


def test_model_folder_that_is_neither_run_nor_export(trained_run, tiny, exported, tmp_path, capsys):
    (tmp_path / "m").mkdir()
    expect_error(capsys, "predict", "--model", tmp_path / "m", train_frames(tiny)[0][0],
                 contains=["is neither a training run (no config.json) nor an exported model"])
    expect_error(capsys, "export", "--model", exported, "--out", tmp_path / "again",
                 contains=[f"{exported} is an exported model already", "training run"])
    assert sorted(os.listdir(tmp_path)) == ["m"]


# ============================================================================= other outputs
def test_vgg_folder_that_is_a_file(tiny, tmp_path, capsys):
    (tmp_path / "vgg").write_text("mine")
    expect_error(capsys, "train", "--data", tiny, "--vgg", tmp_path / "vgg", "--runs", tmp_path / "runs",
                 contains=[f"VGG16 model folder {tmp_path / 'vgg'} is a file, not a folder"])
    assert not (tmp_path / "runs").exists()


def test_make_demo_data_on_a_full_disk_or_a_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "f").write_text("mine")
    expect_error(capsys, "make-demo-data", tmp_path / "f", "--n", 2, "--size", 64, 64,
                 contains=["is a file, not a folder"])
    real_save, calls = Image.Image.save, []

    def save(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 5:
            half_write(b"\x89PNG")(None, open(fp, "wb"))
        return real_save(self, fp, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "save", save)
    expect_error(capsys, "make-demo-data", tmp_path / "demo", "--n", 4, "--size", 64, 64,
                 contains=[f"could not write {tmp_path / 'demo'}", "No space left on device"])
    assert sorted(os.listdir(tmp_path)) == ["f"]


def test_get_vgg_out_under_a_file_or_onto_a_full_disk(tmp_path, monkeypatch, capsys):
    (tmp_path / "f").write_text("mine")
    args = ["get-vgg", "--source", "random", "--width", "0.0625"]
    expect_error(capsys, *args, "--out", tmp_path / "f" / "vgg",
                 contains=[f"{tmp_path / 'f'} is a file, not a folder"])

    def save(self, *a, **k):
        raise tf.errors.ResourceExhaustedError(None, None, TF_DISK_FULL)
    monkeypatch.setattr(tf1.saved_model.Builder, "save", save)
    expect_error(capsys, *args, "--out", tmp_path / "vgg",
                 contains=[f"could not write {tmp_path / 'vgg'} (No space left on device)"])
    assert sorted(os.listdir(tmp_path)) == ["f"]


def test_a_fix_naming_an_option_gives_way_where_the_command_lacks_it():
    """Bad files offer --skip-bad and a missing scheme mapping --scheme only where the
    command has them (evaluate and predict have neither: the model fixes the scheme)."""
    from roadseg.cli import build_parser, command_options
    from roadseg.schemes import get_scheme
    evaluate = command_options(build_parser().parse_args(
        ["evaluate", "--model", "m", "--data", "d"]).command_parser)
    train = command_options(build_parser().parse_args(["train", "--data", "d"]).command_parser)
    with pytest.raises(UserError) as caught:
        get_scheme("camvid11").color_table("kitti")
    assert caught.value.line(train).endswith("scheme; pass --scheme road4 or kitti2")
    assert caught.value.line(evaluate).endswith("scheme; use a model trained with scheme road4 or kitti2")
    bad = UserError("cannot decode image 'x.png' (truncated); replace the file", *datasets.SKIP_BAD)
    assert bad.line(evaluate) == "cannot decode image 'x.png' (truncated); replace the file"
    assert str(bad) == bad.line(train) == bad.line(evaluate) + " or pass --skip-bad to leave bad files out"
