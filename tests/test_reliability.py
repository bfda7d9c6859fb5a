"""Reliability: what happens when things go wrong (issue 7; the table is docs/failures.md).

Every mistake a user can make ends in exit code 2 and one line on stderr that names the
file or value and the fix, with nothing written half-way and nothing overwritten.
Training survives SIGKILL (resume from the last checkpoint with the same step counter
and Adam state), saves and exits with code 130 on SIGINT/SIGTERM, keeps the previous
checkpoint when a save fails, and stops on NaN/Inf keeping only finite checkpoints.
Nothing in the project unpickles or evals what it loads.

Everything runs on 64x128 demo scenes and a width-1/16 random VGG.  The CLI is called
in-process (``cli.main``) except where a real process has to be killed.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from roadseg import memory, video
from roadseg.cli import main as cli_main

tf1 = tf.compat.v1
ROOT = Path(__file__).resolve().parent.parent
SHAPE = ["--image-shape", "64", "128"]
N_TRAIN = 10        # demo scenes n=12: 10 train, 2 val


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """12 demo scenes of 64x128 in the Cityscapes layout (10 train, 2 val)."""
    from roadseg import demo_scenes
    root = tmp_path_factory.mktemp("tiny") / "cityscapes"
    demo_scenes.make_demo_data(str(root), n=12, seed=0, size=(64, 128))
    return root


@pytest.fixture
def data(tiny, tmp_path):
    """A private copy of ``tiny`` to break."""
    return Path(shutil.copytree(tiny, tmp_path / "data"))


@pytest.fixture(scope="module")
def trained_run(tiny, vgg_dir, tmp_path_factory):
    """A finished one-epoch run (5 steps of 2 images, checkpoints at steps 2, 4, 5)."""
    from roadseg import trainer
    runs = tmp_path_factory.mktemp("runs")
    result = trainer.train(str(tiny), vgg_dir, runs_dir=str(runs), run="base", image_shape=[64, 128],
                         epochs=1, batch_size=2, checkpoint_every=2, log=lambda *a: None)
    assert result["status"] == "finished" and result["steps"] == 5
    return Path(result["run_dir"])


def train_frames(root, split="train"):
    """[(image, labelIds, color)] paths of a demo split, in order."""
    images = sorted((root / "leftImg8bit" / split / "demo").glob("*_leftImg8bit.png"))
    return [(p, p.parent.parent.parent.parent / "gtFine" / split / "demo" /
             p.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png"),
             p.parent.parent.parent.parent / "gtFine" / split / "demo" /
             p.name.replace("_leftImg8bit.png", "_gtFine_color.png")) for p in images]


def cli(capsys, *args):
    """Run ``segment.py`` in-process: (exit code, stdout, stderr)."""
    code = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def command_options(command):
    """Every option string of a ``segment.py`` command."""
    from roadseg.cli import build_parser, command_options
    return command_options(build_parser().parse_args([command, *REQUIRED.get(command, [])])
                           .command_parser)


REQUIRED = {"make-demo-data": ["d"], "check-data": ["d"], "train": ["--data", "d"],
            "evaluate": ["--model", "m", "--data", "d"], "predict": ["--model", "m", "i"],
            "video": ["--model", "m", "i", "o"], "export": ["--model", "m", "--out", "o"]}


def expect_error(capsys, *args, contains=()):
    """Exit code 2 and exactly one ``error:`` line holding every text of ``contains``; every
    ``--option`` the line names (as a fix) is an option of that command."""
    code, out, err = cli(capsys, *args)
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err
    for text in contains:
        assert text in lines[0], lines[0]
    named = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", lines[0]))
    assert named <= command_options(str(args[0])), (named, lines[0])
    return lines[0]


def train_args(data, vgg, runs, run, *extra, epochs=1, batch=2):
    return ["train", "--data", data, "--vgg", vgg, *SHAPE, "--epochs", epochs, "--batch-size",
            batch, "--runs", runs, "--run", run, *extra]


def tree(path):
    """{relative path: bytes} of every file below ``path`` (to prove nothing changed)."""
    path = Path(path)
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def ckpt_step(prefix):
    return int(tf.train.load_checkpoint(str(prefix)).get_tensor("train_state/step"))


def ckpt_steps(ckpt_dir):
    """Steps of the checkpoints listed in ``ckpt_dir/checkpoint``, oldest first."""
    state = tf1.train.get_checkpoint_state(str(ckpt_dir))
    return [int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths] if state else []


# ============================================================================= 1. bad input
def test_missing_data_root(tmp_path, vgg_dir, capsys):
    runs = tmp_path / "runs"
    missing = tmp_path / "nowhere"
    expect_error(capsys, "check-data", missing, contains=[str(missing), "does not exist"])
    expect_error(capsys, *train_args(missing, vgg_dir, runs, "r"),
                 contains=[str(missing), "does not exist"])
    assert not runs.exists()


def test_split_without_images(data, capsys):
    for image, _, _ in train_frames(data):
        image.unlink()
    expect_error(capsys, "check-data", data, contains=["split 'train'", "has no images"])


@pytest.mark.parametrize("remove, what", [(0, "images without labels"),
                                          (1, "labels without images")])
def test_images_without_labels_and_labels_without_images(data, capsys, remove, what):
    image, ids, color = train_frames(data)[4]
    if remove == 0:
        ids.unlink()
        color.unlink()
        named = image
    else:
        image.unlink()
        named = ids                                # labelIds are preferred to colour
    expect_error(capsys, "check-data", data, contains=[f"1 {what}", str(named)])


def _break_png(path):
    """Keep the first 300 bytes of a PNG: the header decodes, the pixels do not."""
    path.write_bytes(path.read_bytes()[:300])


def _mismatch(label_path):
    """Replace a label by one of half the width."""
    Image.open(label_path).resize((64, 64), Image.NEAREST).save(label_path)


def test_undecodable_png_in_the_middle_of_a_split(data, vgg_dir, tmp_path, capsys):
    bad = train_frames(data)[4][0]
    _break_png(bad)
    runs = tmp_path / "runs"
    expect_error(capsys, "check-data", data, contains=[f"cannot decode image '{bad}'",
                                                       "--skip-bad"])
    # Training meets it inside the tf.data pipeline, after steps have run: the same line,
    # and the new run folder (no checkpoint yet) is removed again.
    expect_error(capsys, *train_args(data, vgg_dir, runs, "bad", "--checkpoint-every", "0"),
                 contains=[f"cannot decode image '{bad}'", "--skip-bad"])
    assert not (runs / "bad").exists()


def test_skip_bad_leaves_bad_files_out_and_counts_them(data, vgg_dir, tmp_path, capsys):
    frames = train_frames(data)
    _break_png(frames[2][0])
    _mismatch(frames[7][1])
    code, out, _ = cli(capsys, "check-data", data, "--skip-bad")
    assert code == 1                               # problems found, all listed
    assert "problems: 2" in out
    assert str(frames[2][0]) in out and str(frames[7][1]) in out
    runs = tmp_path / "runs"
    code, out, err = cli(capsys, *train_args(data, vgg_dir, runs, "skip", "--skip-bad",
                                             "--val-split", "none"))
    assert code == 0, err[-2000:]
    assert "skipped 2 of 10 train samples" in out
    assert "finished: 4 steps" in out              # 8 good images in batches of 2


def test_image_label_size_mismatch(data, vgg_dir, tmp_path, capsys):
    image, ids, _ = train_frames(data)[3]
    _mismatch(ids)
    want = [f"image '{image}' is 128x64 but label '{ids}' is 64x64"]
    expect_error(capsys, "check-data", data, contains=want)
    runs = tmp_path / "runs"
    expect_error(capsys, *train_args(data, vgg_dir, runs, "mm"), contains=want)
    assert not (runs / "mm").exists()


def test_unknown_label_ids_are_an_error(data, capsys):
    _, ids, _ = train_frames(data)[1]
    array = np.array(Image.open(ids))
    array[:4, :4] = 200                            # not a Cityscapes label id
    Image.fromarray(array).save(ids)
    expect_error(capsys, "check-data", data, contains=[str(ids), "ids [200]"])


def test_unknown_label_colours_are_ignored_with_a_warning(data, capsys):
    _, ids, color = train_frames(data)[1]
    ids.unlink()                                   # this frame now uses its colour label
    array = np.array(Image.open(color).convert("RGB"))
    array[:5, :6] = (1, 2, 3)                      # not in the Cityscapes colour table
    Image.fromarray(array).save(color)
    code, out, _ = cli(capsys, "check-data", data)
    assert code == 0
    assert f"warning: 30 pixels of unknown colour in {color}" in out


def test_grey_rgba_palette_and_16bit_pngs_train_and_predict(data, vgg_dir, tmp_path, capsys):
    """Each odd PNG is converted to the RGB image it shows: its class map equals that of
    the plain RGB file."""
    frames = train_frames(data)
    twins = tmp_path / "twins"
    twins.mkdir()
    odd = []
    for (image, _, _), mode in zip(frames[:4], ("L", "RGBA", "P", "I;16")):
        rgb = np.array(Image.open(image).convert("RGB"))
        grey = np.array(Image.fromarray(rgb).convert("L"))
        if mode == "L":
            Image.fromarray(grey).save(image)
            twin = np.repeat(grey[..., None], 3, axis=2)
        elif mode == "RGBA":
            Image.fromarray(np.dstack([rgb, np.full(grey.shape, 77, np.uint8)])).save(image)
            twin = rgb
        elif mode == "P":
            Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=64).save(image)
            twin = np.array(Image.open(image).convert("RGB"))
        else:
            Image.fromarray(grey.astype(np.uint16) * 257).save(image)   # 16-bit grey
            twin = np.repeat(grey[..., None], 3, axis=2)
        assert Image.open(image).mode == {"I;16": "I;16"}.get(mode, mode)
        Image.fromarray(twin).save(twins / f"twin{len(odd)}.png")
        odd.append(image)
    runs = tmp_path / "runs"
    code, out, err = cli(capsys, *train_args(data, vgg_dir, runs, "odd", "--val-split", "none"))
    assert code == 0, err[-2000:]
    assert "finished: 5 steps" in out
    out_dir = tmp_path / "pred"
    code, _, err = cli(capsys, "predict", "--model", runs / "odd", *odd, twins, "--out", out_dir,
                       "--batch-size", 1)
    assert code == 0, err[-2000:]
    for i, image in enumerate(odd):
        stem = image.name[:-4]
        ours = np.array(Image.open(out_dir / f"{stem}_classes.png"))
        assert ours.shape == (64, 128)
        assert np.array_equal(ours, np.array(Image.open(out_dir / f"twin{i}_classes.png")))
        assert Image.open(out_dir / f"{stem}.png").size == (128, 64)


def test_image_shape_not_divisible_by_32(tiny, vgg_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    expect_error(capsys, "train", "--data", tiny, "--vgg", vgg_dir, "--image-shape", 60, 128,
                 "--runs", runs, contains=["60x128", "divisible by 32", "64 128"])
    assert not runs.exists()


def test_memory_estimate_is_linear_in_pixels_and_batch():
    one = memory.estimate_training_memory([256, 512], 1, width=1.0)
    four = memory.estimate_training_memory([256, 512], 4, width=1.0)
    big = memory.estimate_training_memory([512, 1024], 1, width=1.0)
    assert four - one == pytest.approx(big - one, rel=1e-6)   # 4x the pixels = 4 images
    assert 0.9e9 < four - one < 1.1e9                           # 3 images: ~0.32 GB each
    # peak resident memory measured for 'segment.py train' at 256x512, batch 4:
    assert four == pytest.approx(4.01e9, rel=0.2)                                   # width 1
    assert memory.estimate_training_memory([256, 512], 4, width=0.25) == pytest.approx(1.13e9,
                                                                                     rel=0.2)


def test_image_shape_too_large_for_memory_is_refused_before_allocating(tiny, vgg_dir, tmp_path,
                                                                       capsys):
    runs = tmp_path / "runs"
    line = expect_error(capsys, *train_args(tiny, vgg_dir, runs, "huge", "--image-shape", 8192,
                                            16384, batch=64),
                        contains=["8192x16384", "batch 64", "GB", "--image-shape", "--batch-size"])
    assert re.search(r"about [\d.]+ GB", line)
    assert not runs.exists()


def test_memory_warning_when_more_than_half_is_needed(tiny, vgg_dir, tmp_path, monkeypatch):
    from roadseg import trainer
    need = memory.estimate_training_memory([64, 128], 2, width=1 / 16)
    monkeypatch.setattr(memory, "available_memory", lambda: int(need * 1.5))
    from roadseg.errors import UserError
    lines = []
    with pytest.raises(UserError, match="no-such-split"):   # stops right after the check
        trainer.train(str(tiny), vgg_dir, runs_dir=str(tmp_path / "runs"), image_shape=[64, 128],
                    batch_size=2, epochs=1, log=lines.append, val_split="no-such-split")
    assert lines[0] == (f"warning: training at 64x128 with batch 2 needs about {need / 1e9:.1f} GB "
                        f"of the {need * 1.5 / 1e9:.1f} GB available; other programs may run short")


def test_incomplete_vgg_folder(tiny, vgg_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                    # the default VGG lives in ./data/vgg
    shutil.copytree(vgg_dir, "data/vgg")
    os.remove("data/vgg/variables/variables.data-00000-of-00001")
    expect_error(capsys, "train", "--data", tiny, *SHAPE, "--runs", "runs",
                 contains=["data/vgg is incomplete", "variables.data-00000-of-00001 is missing",
                           "get-vgg"])
    expect_error(capsys, "train", "--data", tiny, "--vgg", "data/vgg", *SHAPE, "--runs", "runs",
                 contains=["data/vgg is incomplete"])
    assert not Path("runs").exists()
    assert Path("data/vgg/saved_model.pb").exists()   # reported, never deleted


@pytest.mark.parametrize("kind", ["corrupt", "escaping"])
def test_bad_vgg_zip_through_the_cli(tmp_path, capsys, kind):
    """The CLI end of tests/test_vgg.py's zip checks: a vgg.zip already in the data folder."""
    data = tmp_path / "data"
    data.mkdir()
    zip_path = data / "vgg.zip"
    if kind == "corrupt":
        zip_path.write_bytes(b"PK\x03\x04 this is not really a zip")
        want = "is not a complete zip file"
    else:
        with zipfile.ZipFile(zip_path, "w") as z:
            z.writestr("vgg/saved_model.pb", b"x")
            z.writestr("../evil.txt", b"x")
        want = "unsafe entry '../evil.txt'"
    expect_error(capsys, "get-vgg", "--source", "course", "--data", data,
                 contains=[str(zip_path), want])
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["data", "vgg.zip"]


@pytest.mark.parametrize("kind", ["not a video", "zero frames", "missing"])
def test_unreadable_or_empty_video(trained_run, tmp_path, capsys, kind):
    video = tmp_path / "in.mp4"
    if kind == "not a video":
        video.write_text("hello")
    elif kind == "zero frames":
        import imageio_ffmpeg
        writer = imageio_ffmpeg.write_frames(str(video), (64, 48), macro_block_size=1)
        writer.send(None)
        writer.close()                             # ffmpeg leaves an mp4 without frames
        assert video.exists()
    out = tmp_path / "out.mp4"
    expect_error(capsys, "video", "--model", trained_run, video, out,
                 contains=[f"video {video}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if kind == "missing" else ["in.mp4"])


def test_existing_outputs_are_never_overwritten(trained_run, tiny, tmp_path, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "mine.txt").write_text("keep me")
    clip = video.make_test_video(tmp_path / "in.mp4", 3, size=(64, 48))
    old_video = tmp_path / "old.mp4"
    old_video.write_bytes(b"my video")
    old_json = tmp_path / "old.json"
    old_json.write_text("{}")
    before = tree(tmp_path)
    image = train_frames(tiny)[0][0]
    expect_error(capsys, "export", "--model", trained_run, "--out", existing,
                 contains=[str(existing), "already exists"])
    expect_error(capsys, "predict", "--model", trained_run, image, "--out", existing,
                 contains=[str(existing), "already exists"])
    expect_error(capsys, "video", "--model", trained_run, clip, old_video,
                 contains=[str(old_video), "already exists"])
    expect_error(capsys, "evaluate", "--model", trained_run, "--data", tiny, "--out", old_json,
                 contains=[str(old_json), "already exists"])
    # A second output that is taken: refused before the first one is written.
    new_json = tmp_path / "new.json"
    expect_error(capsys, "evaluate", "--model", trained_run, "--data", tiny, "--out", new_json,
                 "--cityscapes-out", existing, contains=[str(existing), "not empty"])
    assert tree(tmp_path) == before


def test_existing_run_name_is_not_reused(trained_run, tiny, vgg_dir, capsys):
    before = tree(trained_run)
    expect_error(capsys, "train", "--data", tiny, "--vgg", vgg_dir, *SHAPE, "--runs",
                 trained_run.parent, "--run", trained_run.name,
                 contains=[f"run folder {trained_run} already exists", "--resume"])
    assert tree(trained_run) == before


@pytest.fixture(scope="module")
def wider_vgg(tmp_path_factory):
    from roadseg import vgg
    out = tmp_path_factory.mktemp("vgg8") / "vgg"
    vgg.build_vgg_savedmodel(str(out), source="random", width=1 / 8, seed=0)
    return str(out)


@pytest.mark.parametrize("change, wanted", [
    ("scheme", "scheme=road4, now scheme=cityscapes19"),
    ("width", "vgg_info=source random/width 0.0625/seed 0, now vgg_info=source random/width 0.125"),
])
def test_resume_with_another_scheme_or_width_is_refused(trained_run, tiny, vgg_dir, wider_vgg,
                                                        capsys, change, wanted):
    before = tree(trained_run)
    args = ["train", "--data", tiny, "--vgg", wider_vgg if change == "width" else vgg_dir, *SHAPE,
            "--runs", trained_run.parent, "--run", trained_run.name, "--resume"]
    if change == "scheme":
        args += ["--scheme", "cityscapes19"]
    expect_error(capsys, *args, contains=[f"cannot resume {trained_run}", wanted,
                                          "start a new --run"])
    assert tree(trained_run) == before


# ============================================================================= 2. killed training
def _start_training(tiny, vgg_dir, runs, run, epochs, every, log_dir):
    """``segment.py train`` as a real process, output to files (a full pipe would block it)."""
    out, err = open(log_dir / f"{run}.out", "w"), open(log_dir / f"{run}.err", "w")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen(
        [sys.executable, "segment.py", "train", "--data", str(tiny), "--vgg", vgg_dir, *SHAPE,
         "--batch-size", "1", "--epochs", str(epochs), "--checkpoint-every", str(every),
         "--val-split", "none", "--runs", str(runs), "--run", run],
        cwd=ROOT, stdout=out, stderr=err, env=env)
    out.close(), err.close()
    return proc


def _wait_for_checkpoint(proc, ckpt_dir, min_step, log, timeout=120):
    """Poll the ``checkpoint`` index until it names a step >= min_step."""
    index = ckpt_dir / "checkpoint"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training ended early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        if index.exists():
            found = re.search(r'^model_checkpoint_path: ".*-(\d+)"', index.read_text(), re.M)
            if found and int(found.group(1)) >= min_step:
                return int(found.group(1))
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no checkpoint >= {min_step} after {timeout}s")


def _last_shown_step(stderr_text, steps_per_epoch):
    """The last global step the progress bar showed ('epoch E/..: ... n/N')."""
    shown = re.findall(r"epoch (\d+)/\d+:.*?\| *(\d+)/\d+", stderr_text)
    epoch, n = shown[-1]
    return (int(epoch) - 1) * steps_per_epoch + int(n)


def test_sigkill_then_resume_continues_with_step_and_adam_state(tiny, vgg_dir, tmp_path,
                                                                 monkeypatch, capsys):
    runs, every, epochs = tmp_path / "runs", 2, 3
    ckpt_dir = runs / "killed" / "checkpoints"
    proc = _start_training(tiny, vgg_dir, runs, "killed", epochs, every, tmp_path)
    _wait_for_checkpoint(proc, ckpt_dir, 12, tmp_path / "killed.err")  # mid epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    latest = tf1.train.latest_checkpoint(str(ckpt_dir))
    step = ckpt_step(latest)
    assert latest.endswith(f"model.ckpt-{step}") and 12 <= step < epochs * N_TRAIN
    steps = ckpt_steps(ckpt_dir)
    assert all(b - a <= every for a, b in zip(steps, steps[1:])), steps
    shown = _last_shown_step((tmp_path / "killed.err").read_text(), N_TRAIN)
    assert shown - step <= every                   # lost at most one checkpoint interval
    reader = tf.train.load_checkpoint(latest)
    slot = sorted(k for k in reader.get_variable_to_shape_map() if k.endswith("/Adam_1"))[-1]
    saved_slot = reader.get_tensor(slot)
    assert np.abs(saved_slot).max() > 0            # a real optimizer state to compare

    restored = {}
    real_restore = tf1.train.Saver.restore

    def spy(self, sess, path):
        real_restore(self, sess, path)
        if "checkpoints" in path:
            variables = {v.op.name: v for v in sess.graph.get_collection("variables")}
            restored.update(path=path, step=sess.run(variables["train_state/step"]),
                            slot=sess.run(variables[slot]))
    monkeypatch.setattr(tf1.train.Saver, "restore", spy)
    code, out, err = cli(capsys, "train", "--data", tiny, "--vgg", vgg_dir, *SHAPE,
                         "--runs", runs, "--run", "killed", "--resume")
    assert code == 0, err[-2000:]
    assert restored["path"] == latest and restored["step"] == step
    assert np.array_equal(restored["slot"], saved_slot)
    assert f"finished: {epochs * N_TRAIN} steps" in out   # continued, did not start over
    history = json.loads((runs / "killed" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert ckpt_step(tf1.train.latest_checkpoint(str(ckpt_dir))) == epochs * N_TRAIN


def test_sigint_and_sigterm_save_and_exit_130(tiny, vgg_dir, tmp_path):
    """Both signals at once, in two processes started together (saves a start-up)."""
    runs = tmp_path / "runs"
    procs = {sig: _start_training(tiny, vgg_dir, runs, sig.name, 50, 5, tmp_path)
             for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for sig, proc in procs.items():
            name, ckpt_dir = sig.name, runs / sig.name / "checkpoints"
            seen = _wait_for_checkpoint(proc, ckpt_dir, 5, tmp_path / f"{name}.err")
            proc.send_signal(sig)
            assert proc.wait(timeout=60) == 130
            err, out = ((tmp_path / f"{name}.{kind}").read_text() for kind in ("err", "out"))
            saved = re.search(rf"{name} received: checkpoint saved at step (\d+); "
                              rf"resume with --resume", out + err)
            assert saved, (out + err)[-3000:]
            step = int(saved.group(1))
            assert step >= seen
            assert ckpt_step(tf1.train.latest_checkpoint(str(ckpt_dir))) == step
            assert f"interrupted: {name}: {step} steps" in out
            assert "Traceback" not in err
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize("when", ["last step", "validation"])
def test_a_signal_at_an_epochs_end_saves_says_and_resumes_exactly(tiny, vgg_dir, tmp_path, monkeypatch,
                                                                  when):
    """SIGTERM during the last step of epoch 2 (one step an epoch) or during its validation:
    the epoch is complete and recorded, the checkpoint of step 2 is there and said, and
    ``--resume`` to 4 epochs records epochs 1..4 exactly once each."""
    from roadseg import checkpoints, trainer
    owner, name = (checkpoints.Progress, "add_step") if when == "last step" else (trainer, "validate")
    real, calls = getattr(owner, name), []

    def signalling(*args, **kwargs):   # one call an epoch: add_step (1 step), validate (every epoch)
        result = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)   # the handler only sets a flag
        return result
    said = []
    options = dict(image_shape=[64, 128], batch_size=N_TRAIN, epochs=4, val_split="every-10th",
                   max_eval_images=1, log=said.append)
    with monkeypatch.context() as m:
        m.setattr(owner, name, signalling)
        first = trainer.train(tiny, vgg_dir, runs_dir=str(tmp_path), run="r", **options)
    assert first["status"] == "interrupted: SIGTERM" and first["steps"] == 2, first
    assert "SIGTERM received: checkpoint saved at step 2; resume with --resume" in said, said[-5:]
    assert ckpt_step(tf1.train.latest_checkpoint(str(tmp_path / "r" / "checkpoints"))) == 2
    assert [h["epoch"] for h in first["history"]] == [1, 2]
    again = trainer.train(tiny, vgg_dir, runs_dir=str(tmp_path), run="r", resume=True, **options)
    assert again["status"] == "finished" and again["steps"] == 4
    history = json.loads((tmp_path / "r" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and all("miou" in h for h in history)


def test_crash_while_saving_keeps_the_previous_checkpoint(tiny, vgg_dir, tmp_path, monkeypatch,
                                                          capsys):
    """The save of step 4 writes its data files, then the disk is full before the
    ``checkpoint`` index is updated (TF's Saver writes the index last)."""
    real_save = tf1.train.Saver.save

    def dying_save(self, sess, prefix, global_step=None, **kwargs):
        if "checkpoints" in str(prefix) and global_step == 4:
            real_save(self, sess, prefix, global_step=global_step, write_state=False)
            raise OSError(28, "No space left on device")
        return real_save(self, sess, prefix, global_step=global_step, **kwargs)
    monkeypatch.setattr(tf1.train.Saver, "save", dying_save)
    runs = tmp_path / "runs"
    ckpt_dir = runs / "full" / "checkpoints"
    expect_error(capsys, *train_args(tiny, vgg_dir, runs, "full", "--checkpoint-every", 2,
                                     "--val-split", "none", batch=1),
                 contains=["could not write checkpoint", "No space left on device",
                           "last good checkpoint kept:", "model.ckpt-2)", "--resume"])
    assert (ckpt_dir / "model.ckpt-4.index").exists()   # the half-finished save is there ...
    latest = tf1.train.latest_checkpoint(str(ckpt_dir))
    assert latest.endswith("model.ckpt-2") and ckpt_step(latest) == 2   # ... but not used

    monkeypatch.undo()
    code, out, err = cli(capsys, "train", "--data", tiny, "--vgg", vgg_dir, *SHAPE,
                         "--runs", runs, "--run", "full", "--resume")
    assert code == 0, err[-2000:]
    assert f"resumed from {latest}" in out
    assert f"finished: {N_TRAIN} steps" in out


def test_resume_skips_an_unreadable_newest_checkpoint(trained_run, tiny, vgg_dir, tmp_path,
                                                      capsys):
    runs = tmp_path / "runs"
    run = Path(shutil.copytree(trained_run, runs / "copy"))
    assert ckpt_steps(run / "checkpoints") == [2, 4, 5]
    data_file = run / "checkpoints" / "model.ckpt-5.data-00000-of-00001"
    data_file.write_bytes(data_file.read_bytes()[:1000])   # damaged on disk
    code, out, err = cli(capsys, "train", "--data", tiny, "--vgg", vgg_dir, *SHAPE,
                         "--runs", runs, "--run", "copy", "--resume")
    assert code == 0, err[-2000:]
    assert "model.ckpt-5 is unreadable" in out + err
    assert f"resumed from {run / 'checkpoints' / 'model.ckpt-4'}" in out
    assert "finished: 5 steps" in out               # step 5 trained again from step 4
    # the epoch redone after the fallback is recorded once, not appended a second time
    assert [h["epoch"] for h in json.loads((run / "history.json").read_text())] == [1]


# ============================================================================= 3. numerics
def test_huge_learning_rate_stops_with_the_step_and_a_hint(tiny, vgg_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    line = expect_error(capsys, *train_args(tiny, vgg_dir, runs, "nan", "--lr", "1e6"),
                        contains=["loss became nan at step", "lower --lr", "1000000.0",
                                  "no checkpoint was written yet, so the new run folder is removed"])
    assert re.search(r"at step \d+ \(epoch 1\)", line)
    assert not (runs / "nan").exists()             # no checkpoint yet: nothing left behind


def _poison_weights_at(monkeypatch, at_step):
    """Make training write NaN into a decoder bias during step ``at_step``."""
    from roadseg import model
    real = model.training_step

    def training_step(*args, **kwargs):
        step = real(*args, **kwargs)
        global_step, target = args[5], tf1.trainable_variables()[-1]
        with tf.control_dependencies([step.train_op]):
            value = target.read_value()
            poisoned = target.assign(tf.where(tf.equal(global_step.read_value(), at_step),
                                              value * np.nan, value))
        return step._replace(train_op=tf.group(step.train_op, poisoned))
    monkeypatch.setattr(model, "training_step", training_step)


@pytest.mark.parametrize("poison, message, kept", [
    (4, "weights became NaN or Inf at step 4", 2),  # right before a checkpoint: not saved
    (5, "loss became nan at step 6", 4),            # between checkpoints: the loss shows it
])
def test_nan_keeps_only_finite_checkpoints(tiny, vgg_dir, tmp_path, monkeypatch, capsys,
                                           poison, message, kept):
    _poison_weights_at(monkeypatch, poison)
    runs = tmp_path / "runs"
    ckpt_dir = runs / "nan" / "checkpoints"
    expect_error(capsys, *train_args(tiny, vgg_dir, runs, "nan", "--checkpoint-every", 2,
                                     "--val-split", "none", batch=1),
                 contains=[message, f"last good checkpoint kept: {ckpt_dir / f'model.ckpt-{kept}'}",
                           "lower --lr"])
    assert ckpt_steps(ckpt_dir)[-1] == kept
    reader = tf.train.load_checkpoint(str(ckpt_dir / f"model.ckpt-{kept}"))
    for name, dtype in reader.get_variable_to_dtype_map().items():
        if dtype.is_floating:
            assert np.isfinite(reader.get_tensor(name)).all(), name


# ============================================================================= 4. downloads
def test_download_safeguards_are_tested_in_test_vgg():
    """Downloads are covered by tests/test_vgg.py (local HTTP server, offline); make sure
    the tests docs/failures.md points at exist there."""
    source = (ROOT / "tests" / "test_vgg.py").read_text()
    for name in ("test_download_writes_complete_verified_file",
                 "test_download_wrong_sha256_keeps_nothing",
                 "test_download_retries_dropped_connection_then_fails_cleanly",
                 "test_download_times_out_and_404_is_not_retried",
                 "test_download_refuses_insecure_urls",
                 "test_truncated_zip_is_reported_and_nothing_extracted",
                 "test_zip_with_parent_entry_writes_nothing",
                 "test_safe_extract_refuses_unsafe_entries",
                 "test_keras_weights_with_wrong_md5_are_refused"):
        assert f"def {name}(" in source, name


def test_failures_table_points_at_existing_tests():
    """Every test docs/failures.md names exists (so every row is a test that runs)."""
    table = (ROOT / "docs" / "failures.md").read_text()
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", table)
    assert len(named) >= 30
    for path, name in named:
        assert f"def {name}(" in (ROOT / path).read_text(), f"{path}::{name}"


# ============================================================================= 5. no unpickling
UNSAFE = re.compile(r"\bpickle\b|\bcPickle\b|\bdill\b|\bjoblib\b|\bmarshal\b|\bshelve\b"
                    r"|allow_pickle\s*=\s*True|(?<![\w.])eval\(|(?<![\w.])exec\("
                    r"|\byaml\.load\(|\btorch\.load\(")


def _project_sources():
    skip = {".git", "runs", "data", "__pycache__"}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if not skip & set(parts) and not any(p.startswith(".") for p in parts):
            yield path


def test_nothing_executes_what_it_loads():
    me = Path(__file__).resolve()
    sources = [p for p in _project_sources() if p.resolve() != me]
    assert len(sources) > 10
    problems = []
    for path in sources:
        text = path.read_text()
        for found in UNSAFE.finditer(text):
            problems.append(f"{path.name}: {found.group(0)}")
        for found in re.finditer(r"\bnp\.load\(", text):
            call = text[found.end():text.find(")", found.end()) + 1]
            if "allow_pickle=False" not in call:
                problems.append(f"{path.name}: np.load without allow_pickle=False")
    assert not problems, problems


def test_the_unsafe_pattern_finds_what_it_should():
    for bad in ("import pickle", "np.load(f, allow_pickle=True)", "eval(text)", "x = exec(code)"):
        assert UNSAFE.search(bad), bad
    for fine in ("evaluate.evaluate(fn)", "tensor.eval()", "model.exec_time", "np.load(f)"):
        assert not UNSAFE.search(fine), fine
