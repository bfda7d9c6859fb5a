"""Resuming training: nothing lost, nothing trained twice, every epoch recorded (issue 17).

Training is killed, interrupted or broken at chosen and at random moments; after each
``--resume`` the step, the optimizer state, the list of epochs in history.json and the
best checkpoint are checked.  64x128 demo scenes (10 train, 2 val), width-1/16 random VGG.
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from roadseg import demo_scenes, trainer
from roadseg.checkpoints import Progress
from roadseg.cli import main as cli_main
from roadseg.errors import UserError

tf1 = tf.compat.v1
ROOT = Path(__file__).resolve().parent.parent
SHAPE = ["--image-shape", "64", "128"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny") / "cityscapes"
    demo_scenes.make_demo_data(str(root), n=12, seed=0, size=(64, 128))
    return root


def quiet(*args):
    pass


def train(tiny, vgg_dir, runs, run="r", resume=False, **options):
    options = dict(dict(image_shape=[64, 128], epochs=2, batch_size=2, lr=1e-3, keep_prob=1.0,
                        skip_scales=[]), **options)
    return trainer.train(str(tiny), vgg_dir, runs_dir=str(runs), run=run, resume=resume,
                         log=quiet, **options)


def steps(folder):
    return sorted(int(p.name.split("-")[1].split(".")[0]) for p in Path(folder).glob("*.index"))


def epochs_of(run_dir):
    return [h["epoch"] for h in json.loads((Path(run_dir) / "history.json").read_text())]


def check_best_considered_every_epoch(run_dir):
    """best/ holds the weights of the epoch with the highest validation mIoU."""
    history = json.loads((Path(run_dir) / "history.json").read_text())
    top = max(history, key=lambda h: h["miou"])
    reader = tf.train.load_checkpoint(tf1.train.latest_checkpoint(str(Path(run_dir) / "best")))
    assert reader.get_tensor("train_state/best_miou") == pytest.approx(top["miou"], abs=1e-6)
    assert steps(Path(run_dir) / "best") == [top["step"]]


# ----------------------------------------------------------------------------- the index
@pytest.mark.parametrize("damage", ["missing", "empty", "garbage"])
def test_resume_without_a_usable_checkpoint_index_finds_the_files(tiny, vgg_dir, tmp_path, damage):
    runs, lines = tmp_path / "runs", []
    first = train(tiny, vgg_dir, runs, epochs=1, checkpoint_every=2)
    ckpt = Path(first["run_dir"]) / "checkpoints"
    assert steps(ckpt) == [2, 4, 5]
    index = ckpt / "checkpoint"
    if damage == "missing":
        index.unlink()
    else:
        index.write_text("" if damage == "empty" else "model_checkpoint_path: \x00\x01{{{")
    result = trainer.train(str(tiny), vgg_dir, runs_dir=str(runs), run="r", resume=True,
                           log=lines.append, epochs=2)
    text = "\n".join(lines)
    assert "found 3 checkpoint(s) from their files" in text
    assert f"resumed from {ckpt / 'model.ckpt-5'}" in text
    assert result["steps"] == 10 and epochs_of(first["run_dir"]) == [1, 2]
    # continued from step 5 (a restart from 0 would have written steps 2, 4, ... over them);
    # the usual rotation (keep 3) removed only older checkpoints
    assert steps(ckpt) == [6, 8, 10]


# ----------------------------------------------------------------------------- epoch bookkeeping
def test_an_epoch_stopped_at_its_last_step_is_recorded_on_resume(tiny, vgg_dir, tmp_path,
                                                                monkeypatch):
    """SIGTERM during the last step of epoch 1: the epoch is complete, so it is validated and
    recorded (with the mean loss of all its steps) before the run stops; --resume trains
    epoch 2 only."""
    runs = tmp_path / "runs"
    real = Progress.add_step
    losses = []

    def add_step(self, loss, data_loss):
        real(self, loss, data_loss)
        losses.append(loss)
        if self.step == 5:
            os.kill(os.getpid(), signal.SIGTERM)   # the stop flag's handler catches it
    monkeypatch.setattr(Progress, "add_step", add_step)
    first = train(tiny, vgg_dir, runs)
    assert first["status"] == "interrupted: SIGTERM" and first["steps"] == 5
    assert [h["epoch"] for h in first["history"]] == [1]
    monkeypatch.setattr(Progress, "add_step", real)
    second = train(tiny, vgg_dir, runs, resume=True)
    assert second["status"] == "finished" and second["steps"] == 10
    history = second["history"]
    assert [h["epoch"] for h in history] == [1, 2] and all("miou" in h for h in history)
    assert history[0]["loss"] == pytest.approx(np.mean(losses[:5]), rel=1e-5)
    check_best_considered_every_epoch(first["run_dir"])


def test_a_crash_during_validation_is_finished_on_resume(tiny, vgg_dir, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    real = trainer.validate
    calls = []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("power cut during validation of epoch 2")
        return real(*args, **kwargs)
    monkeypatch.setattr(trainer, "validate", crashing)
    with pytest.raises(RuntimeError, match="power cut"):
        train(tiny, vgg_dir, runs, epochs=3)
    assert epochs_of(runs / "r") == [1]
    monkeypatch.setattr(trainer, "validate", real)
    result = train(tiny, vgg_dir, runs, epochs=3, resume=True)
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]
    assert result["steps"] == 15                   # epoch 2 was not trained again
    check_best_considered_every_epoch(runs / "r")


# ----------------------------------------------------------------------------- refused resumes
def test_resume_with_another_batch_size_is_refused(tiny, vgg_dir, tmp_path):
    runs = tmp_path / "runs"
    train(tiny, vgg_dir, runs, epochs=1)
    with pytest.raises(UserError, match=r"trained with batch_size=2, now batch_size=4; use the same"):
        train(tiny, vgg_dir, runs, epochs=2, batch_size=4, resume=True)
    assert epochs_of(runs / "r") == [1]


def test_a_frozen_encoder_stays_frozen_on_resume(tiny, vgg_dir, tmp_path):
    """encoder_lr_scale 0 is kept in config.json: the resumed run's conv layers are still the
    VGG16 folder's, bit for bit; another scale (other Adam slots) is refused in one line."""
    runs = tmp_path / "runs"
    train(tiny, vgg_dir, runs, epochs=1, encoder_lr_scale=0.0, reinit=["fc7"])
    assert json.loads((runs / "r" / "config.json").read_text())["encoder_lr_scale"] == 0.0
    first = tf.train.load_checkpoint(str(runs / "r" / "checkpoints" / "model.ckpt-5"))
    result = train(tiny, vgg_dir, runs, epochs=2, resume=True)
    assert result["steps"] == 10 and epochs_of(runs / "r") == [1, 2]
    saved = tf.train.load_checkpoint(os.path.join(vgg_dir, "variables", "variables"))
    latest = tf.train.load_checkpoint(str(runs / "r" / "checkpoints" / "model.ckpt-10"))
    names = sorted(latest.get_variable_to_shape_map())
    assert not [n for n in names if n.startswith("conv") and "Adam" in n]
    for name in [n for n in names if re.fullmatch(r"conv\d_\d/(weights|biases)", n)]:
        np.testing.assert_array_equal(latest.get_tensor(name), saved.get_tensor(name))
    # fc7 (re-initialised at the start, not frozen) learnt in both epochs
    assert not np.array_equal(first.get_tensor("fc7/weights"), saved.get_tensor("fc7/weights"))
    assert not np.array_equal(latest.get_tensor("fc7/weights"), first.get_tensor("fc7/weights"))
    with pytest.raises(UserError, match=r"trained with encoder_lr_scale=0.0, now encoder_lr_scale=0.1"):
        train(tiny, vgg_dir, runs, epochs=3, resume=True, encoder_lr_scale=0.1)
    assert epochs_of(runs / "r") == [1, 2]


def test_resume_of_a_run_with_all_its_epochs_says_so(tiny, vgg_dir, tmp_path):
    runs, lines = tmp_path / "runs", []
    train(tiny, vgg_dir, runs, epochs=1)
    result = trainer.train(str(tiny), vgg_dir, runs_dir=str(runs), run="r", resume=True,
                           log=lines.append)
    assert result["steps"] == 5 and "has 1 epochs already; pass a larger --epochs" in "\n".join(lines)


def _train_process(tiny, vgg_dir, runs, log, *extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    with open(log, "a") as out:
        return subprocess.Popen(
            [sys.executable, "segment.py", "train", "--data", str(tiny), "--vgg", vgg_dir, *SHAPE,
             "--batch-size", "2", "--lr", "1e-3", "--no-skip-scaling", "--keep-prob", "1",
             "--runs", str(runs), "--run", "r", "--checkpoint-every", "1", *extra],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)


def test_two_trainings_of_one_run_at_once_the_second_is_refused(tiny, vgg_dir, tmp_path, capsys):
    runs, log = tmp_path / "runs", tmp_path / "log"
    first = _train_process(tiny, vgg_dir, runs, log, "--epochs", "50")
    try:
        deadline = time.time() + 120
        while not list((runs / "r" / "checkpoints").glob("*.index")) and time.time() < deadline:
            assert first.poll() is None, log.read_text()[-2000:]
            time.sleep(0.05)
        code = cli_main(["train", "--data", str(tiny), "--vgg", vgg_dir, *SHAPE, "--runs",
                         str(runs), "--run", "r", "--resume", "--batch-size", "2"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1
        assert f"is being trained by process {first.pid} right now" in err[0]
    finally:
        first.kill()
        first.wait()
    # the lock died with its process: a resume now just works
    code = cli_main(["train", "--data", str(tiny), "--vgg", vgg_dir, *SHAPE, "--runs", str(runs),
                     "--run", "r", "--resume", "--epochs", "1"])
    assert code == 0


# ----------------------------------------------------------------------------- random kills
def test_killed_at_random_moments_resume_loses_nothing(tiny, vgg_dir, tmp_path):
    """SIGKILL at random moments, several times; after every --resume: the step and the
    Adam state continue from the last checkpoint; at the end every epoch is in
    history.json and best/ holds the best of them."""
    runs, log, epochs = tmp_path / "runs", tmp_path / "log", 3
    ckpt = runs / "r" / "checkpoints"
    rng = random.Random(7)
    extra = ["--epochs", str(epochs)]
    for attempt in range(4):
        proc = _train_process(tiny, vgg_dir, runs, log, *extra)
        time.sleep(rng.uniform(4.0, 9.0))        # start-up takes ~3-4 s, then ~5 steps/s
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        extra = ["--epochs", str(epochs), "--resume"]
        if not (runs / "r" / "config.json").exists():
            extra = extra[:2]                     # killed before its first checkpoint
            continue
        latest = tf1.train.latest_checkpoint(str(ckpt))
        if latest:
            reader = tf.train.load_checkpoint(latest)
            step = int(reader.get_tensor("train_state/step"))
            beta1 = reader.get_tensor("beta1_power")
            assert beta1 == pytest.approx(0.9 ** (step + 1), rel=1e-4)   # Adam saw every step
            assert step == int(re.search(r"-(\d+)$", latest).group(1))
    proc = _train_process(tiny, vgg_dir, runs, log, *extra)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert epochs_of(runs / "r") == [1, 2, 3]
    reader = tf.train.load_checkpoint(tf1.train.latest_checkpoint(str(ckpt)))
    assert int(reader.get_tensor("train_state/step")) == 15
    assert int(reader.get_tensor("train_state/epochs_done")) == 3
    check_best_considered_every_epoch(runs / "r")
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize("content, says", [("[{", "is damaged: not valid JSON"), ("", "not valid JSON"),
                                           ('{"epoch": 1}', "holds a JSON dict, not list"),
                                           ('[{"loss": 1}]', "every entry must be an object")])
def test_a_damaged_history_on_resume_is_one_line(tiny, vgg_dir, tmp_path, content, says):
    runs = tmp_path / "runs"
    train(tiny, vgg_dir, runs, epochs=1)
    (runs / "r" / "history.json").write_text(content)
    with pytest.raises(UserError, match=says) as err:
        train(tiny, vgg_dir, runs, epochs=2, resume=True)
    assert "history.json" in str(err.value) and "move it away" in str(err.value)
