"""``segment.py batch-predict``: Apache Beam RunInference (in-process FnApiRunner, offline)
writes what ``segment.py predict`` writes, byte for byte; videos give what ``segment.py video``
writes plus per-frame class shares, chunked or not, with a manifest, --skip-bad and --resume.
Faults (issue 31): a job killed at three moments, a full disk, a second job, another model
on --resume, a truncated video -- each ends in one line and resumes to a clean run's files."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fakes import read_video

from roadseg import demo_scenes, export, inference, trainer, video
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
    return dict(root=root, run=result["run_dir"], images=images, vgg=vgg_dir,
                export=export.export(result["run_dir"], str(root / "export")))


JOB_FILES = ["manifest.jsonl", "job.json", ".lock"]   # the job's own, beside the outputs


def _files(folder):
    """Name -> bytes of the outputs in ``folder`` (not the manifest, job.json and the lock)."""
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.name not in JOB_FILES}


def _manifest(folder):
    return [json.loads(line) for line in (Path(folder) / "manifest.jsonl").read_text().splitlines()]


def test_batch_predict_writes_what_predict_writes(setup, tmp_path, capsys):
    images = setup["images"]
    folder = images[0].parent
    assert cli_main(["predict", "--model", setup["run"], *map(str, images), "--out",
                     str(tmp_path / "predict"), "--backend", "tensorflow"]) == 0   # as the export
    expected = _files(tmp_path / "predict")
    assert len(expected) == 2 * len(images)
    # an export, a folder + a glob; then the run folder itself (exported on the fly)
    others = [str(p) for p in images if p.parent != folder]
    glob = str(others[0].rsplit(os.sep, 1)[0]) + "/*.png" if others else None
    for model, inputs, out in [(setup["export"], [str(folder)] + ([glob] if glob else []), "beam_export"),
                               (setup["run"], list(map(str, images)), "beam_run")]:
        assert cli_main(["batch-predict", "--model", model, *inputs, "--out", str(tmp_path / out),
                         "--backend", "tensorflow"]) == 0, capsys.readouterr().err
        assert _files(tmp_path / out) == expected
        lines = _manifest(tmp_path / out)
        assert sorted(line["input"] for line in lines) == sorted(map(str, images))
        assert {(line["status"], line["frames"]) for line in lines} == {("ok", 1)}
        assert sorted(p.name for p in (tmp_path / out).iterdir()) == sorted([*expected, *JOB_FILES])


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


# ============================================================================ video archives
CLIPS = {"c1": (24, (160, 96), 12), "c2": (24, (96, 64), 10), "c3": (36, (160, 96), 12)}


@pytest.fixture(scope="module")
def archive(setup):
    """3 clips, a truncated mp4 (its first half) and a text file named .mp4."""
    folder = setup["root"] / "archive"
    folder.mkdir()
    for name, (n, size, fps) in CLIPS.items():
        video.make_test_video(folder / f"{name}.mp4", n, size=size, fps=fps)
    data = (folder / "c1.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(data[:len(data) // 2])
    (folder / "text.mp4").write_text("not a video, only named like one")
    return folder


def _shares(predictor, clip, n_classes):
    """Per-frame class shares computed here: every frame through the predictor."""
    _, frames = read_video(clip)
    maps = predictor.predict(frames)
    return np.stack([np.bincount(m.ravel(), minlength=n_classes) / m.size for m in maps])


def _table(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], np.array(rows[1:], float)


def test_archive_skip_bad_gives_overlays_tables_and_manifest(setup, archive, tmp_path, capsys):
    from roadseg import batch_predict
    image = str(setup["images"][0])
    bad_image = tmp_path / "bad.png"
    bad_image.write_bytes(b"not a png")
    out = tmp_path / "out"
    result = batch_predict.batch_predict(setup["export"], [str(archive), image, str(bad_image)],
                                         str(out), skip_bad=True, log=lambda *a: None)
    assert (result["ok"], result["failed"], result["inputs"]) == (4, 3, 7)
    assert result["counters"] == {"videos_ok": 3, "videos_failed": 2, "images_ok": 1,
                                  "images_failed": 1, "frames": 24 + 24 + 36 + 1}
    bars = capsys.readouterr().err   # the local runner's bars over inputs and frames
    assert "inputs: 100%" in bars and "7/7" in bars and "frames: 85frame" in bars, bars[-500:]
    stem = Path(image).stem
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{c}_{kind}" for c in CLIPS for kind in ("overlay.mp4", "classes.csv")]
        + [f"{stem}.png", f"{stem}_classes.png", *JOB_FILES])     # nothing hidden left
    lines = {Path(line["input"]).name: line for line in _manifest(out)}
    assert {name: line["status"] for name, line in lines.items()} == {
        "c1.mp4": "ok", "c2.mp4": "ok", "c3.mp4": "ok", "truncated.mp4": "failed",
        "text.mp4": "failed", Path(image).name: "ok", "bad.png": "failed"}
    for bad in ("truncated.mp4", "text.mp4"):
        assert "cannot read video" in lines[bad]["reason"] and bad in lines[bad]["reason"]
    assert "cannot decode image" in lines["bad.png"]["reason"]
    with inference.load_predictor(setup["export"]) as predictor:
        names = list(predictor.scheme.class_names)
        for name, (n, size, fps) in CLIPS.items():
            assert lines[f"{name}.mp4"]["frames"] == n and lines[f"{name}.mp4"]["seconds"] > 0
            # the overlay: byte for byte what 'segment.py video' writes with the same model
            reference = tmp_path / f"video_{name}.mp4"
            assert cli_main(["video", "--model", setup["export"], str(archive / f"{name}.mp4"),
                             str(reference)]) == 0
            assert (out / f"{name}_overlay.mp4").read_bytes() == reference.read_bytes()
            meta, frames = read_video(out / f"{name}_overlay.mp4")
            assert frames.shape == (n, size[1], size[0], 3) and meta["fps"] == fps
            # the table: index, time, each class's share of the frame
            header, table = _table(out / f"{name}_classes.csv")
            assert header == ["index", "time", *names]
            np.testing.assert_array_equal(table[:, 0], np.arange(n))
            np.testing.assert_allclose(table[:, 1], np.arange(n) / fps, atol=1e-6)
            np.testing.assert_allclose(table[:, 2:], _shares(predictor, archive / f"{name}.mp4",
                                                             len(names)), atol=1e-6)
            np.testing.assert_allclose(table[:, 2:].sum(1), 1, atol=1e-5)
    assert "Traceback" not in capsys.readouterr().err


def test_a_bad_input_without_skip_bad_ends_the_job_in_one_line(setup, archive, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(["batch-predict", "--model", setup["export"], str(archive / "c1.mp4"),
                     str(archive / "text.mp4"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: cannot read video") and "text.mp4" in err and "--skip-bad" in err
    assert "while running" not in err and "Traceback" not in err
    if out.exists():   # c1 finished first: complete files only, and the manifest says so
        lines = {Path(line["input"]).name: line["status"] for line in _manifest(out)}
        assert lines["text.mp4"] == "failed" and lines["c1.mp4"] in ("ok", "skipped")
        assert not [p.name for p in out.rglob(".partial-*")]
        if lines["c1.mp4"] == "ok":
            assert read_video(out / "c1_overlay.mp4")[1].shape[0] == 24


KILLER = """
import os, signal, sys
from roadseg import batch_predict
from roadseg.cli import main
tables, add = [], batch_predict.ClassTable.add
def add_then_die(self, maps):   # SIGKILL in the middle of the third video
    if self not in tables:
        tables.append(self)
    if len(tables) == 3 and self.n > 0:
        os.kill(os.getpid(), signal.SIGKILL)
    add(self, maps)
batch_predict.ClassTable.add = add_then_die
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("chunks", [[], ["--chunk-seconds", "1"]], ids=["whole", "chunked"])
def test_killed_job_resumed_redoes_only_the_missing(setup, archive, tmp_path, capsys, chunks):
    from roadseg import batch_predict
    out = tmp_path / "out"
    args = ["batch-predict", "--model", setup["export"], str(archive), "--out", str(out),
            "--skip-bad", "--batch-size", "2", *chunks]
    killed = subprocess.run([sys.executable, "-c", KILLER, *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert killed.returncode == -9, killed.stderr[-2000:]
    finals = {p.name: p for p in out.iterdir() if p.name not in JOB_FILES and not p.name.startswith(".")}
    assert len([n for n in finals if n.endswith("_overlay.mp4")]) == 2 and len(finals) == 4
    assert [p.name for p in out.glob(".partial-*")]        # it died while writing the third
    assert not (out / "manifest.jsonl").exists()             # ... before the merge at the end
    missing = next(c for c in CLIPS if f"{c}_overlay.mp4" not in finals)
    assert bool(list(out.glob(f".chunk-{missing}-*"))) == bool(chunks)   # its finished chunks
    before = {n: (p.read_bytes(), p.stat().st_mtime_ns) for n, p in finals.items()}
    for n in finals:     # complete, not cut short
        if n.endswith(".mp4"):
            assert read_video(out / n)[1].shape[0] == CLIPS[n.split("_")[0]][0]

    result = batch_predict.batch_predict(setup["export"], [str(archive)], str(out), batch_size=2,
                                         chunk_seconds=1.0 if chunks else None, skip_bad=True,
                                         resume=True, log=lambda *a: None)
    assert (result["done_before"], result["ok"], result["failed"]) == (2, 3, 2)
    assert result["counters"]["videos_ok"] == 1                # only the missing video ...
    # ... segmented again, or (chunked) rendered from the chunks the killed job had finished
    assert result["counters"].get("frames", 0) == (0 if chunks else CLIPS[missing][0])
    for n, (data, mtime) in before.items():   # kept: same bytes, never rewritten
        assert (out / n).read_bytes() == data and (out / n).stat().st_mtime_ns == mtime
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{c}_{kind}" for c in CLIPS for kind in ("overlay.mp4", "classes.csv")] + JOB_FILES)
    lines = {Path(line["input"]).name: line for line in _manifest(out)}
    assert [lines[f"{c}.mp4"]["frames"] for c in CLIPS] == [24, 24, 36]
    assert lines["text.mp4"]["status"] == lines["truncated.mp4"]["status"] == "failed"
    assert cli_main(args + ["--resume"]) == 0                # nothing left to do
    assert "3 of 5 inputs done (3 before this run), 2 failed" in capsys.readouterr().out


def test_chunk_seconds_gives_the_frames_of_one_pass(setup, archive, tmp_path):
    clip = str(archive / "c3.mp4")    # 36 frames at 12 fps: 1 s chunks -> 3 of 12 frames
    for out, extra in (("one", []), ("chunked", ["--chunk-seconds", "1"])):
        assert cli_main(["batch-predict", "--model", setup["export"], clip, "--out",
                         str(tmp_path / out), *extra]) == 0
    one, chunked = tmp_path / "one", tmp_path / "chunked"
    assert _manifest(chunked)[0]["chunks"] == 3 and "chunks" not in _manifest(one)[0]
    assert _manifest(chunked)[0]["frames"] == 36
    assert sorted(p.name for p in chunked.iterdir()) == sorted(["c3_classes.csv", "c3_overlay.mp4",
                                                               *JOB_FILES])   # parts removed
    _, chunk_frames = read_video(chunked / "c3_overlay.mp4")
    _, one_frames = read_video(one / "c3_overlay.mp4")
    assert chunk_frames.shape[0] == 36
    np.testing.assert_array_equal(chunk_frames, one_frames)   # same frames, same order
    assert _files(chunked) == _files(one)                       # even the same bytes


# ============================================================================ faults (issue 31)
# Four clips for a --chunk-seconds 1 job: three shorter than a chunk (rendered whole) and one of
# four chunks; 12 fps, --batch-size 2: a chunk is 12 frames.
FAULT_CLIPS = {"a1": 8, "a2": 10, "a3": 11, "long": 40}
FAULT_ARGS = ["--chunk-seconds", "1", "--batch-size", "2"]
BAR = re.compile(r"^(\x1b\[A)*(inputs|frames): ")   # tqdm's redraws of the two bars


@pytest.fixture(scope="module")
def clips(setup):
    folder = setup["root"] / "faults"
    folder.mkdir()
    for name, n in FAULT_CLIPS.items():
        video.make_test_video(folder / f"{name}.mp4", n, size=(96, 64), fps=12)
    return folder


@pytest.fixture(scope="module")
def clean(setup, clips):
    """The clean run's output folder, to compare every fault's result with."""
    out = setup["root"] / "clean"
    assert cli_main(["batch-predict", "--model", setup["export"], str(clips), "--out", str(out),
                     *FAULT_ARGS]) == 0
    return out


@pytest.fixture(scope="module")
def other_export(setup):
    """Another model of the same shape: the same data, another seed."""
    root = setup["root"]
    result = trainer.train(str(root / "cityscapes"), setup["vgg"], runs_dir=str(root / "runs"),
                           run="other", epochs=1, seed=7, image_shape=[64, 128], batch_size=2,
                           lr=1e-3, keep_prob=1.0, skip_scales=[], log=lambda *a: None)
    return export.export(result["run_dir"], str(root / "other_export"))


def _tree(folder):
    """Relative path -> bytes of every file under ``folder`` but the manifest (whose seconds
    differ) and the lock file."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("manifest.jsonl", ".lock")}


def _stamps(folder):
    folder = Path(folder)
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _same_manifest(out, clean):
    def lines(folder):
        return {Path(line["input"]).name: {k: v for k, v in line.items() if k != "seconds"}
                for line in _manifest(folder)}
    assert lines(out) == lines(clean)


def _finals_are_complete(out, clean):
    """Every file under a final name is the clean run's file, byte for byte: nothing partial."""
    finals = {n: b for n, b in _tree(out).items() if not n.startswith(".") and "/" not in n}
    reference = _tree(clean)
    for name, data in finals.items():
        if name != "job.json":
            assert data == reference[name], name


def _stderr_lines(text):
    """stderr without the progress bars' redraws: what a user reads besides the bars."""
    segments = (s for line in text.split("\n") for s in line.split("\r"))
    return [s for s in segments if s.strip() and not BAR.match(s)]


def _cli(*args):
    return subprocess.run([sys.executable, "segment.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


STOP_AT = """
import os, signal, sys, time
from roadseg import batch_predict
from roadseg.cli import main
STATE, ACTION = sys.argv[1], sys.argv[2]   # at STATE: SIGKILL, or wait for the file ACTION
record, seen = batch_predict._record, []
def stop():
    if ACTION == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    open(ACTION + ".ready", "w").close()
    while not os.path.exists(ACTION):
        time.sleep(0.05)
def record_then_stop(job, path, *args, **kwargs):
    if STATE == "before-long" and path.endswith("long.mp4"):
        stop()                              # its outputs are complete; it is not listed yet
    record(job, path, *args, **kwargs)
    seen.append(path)
    if STATE.startswith("after-") and len(seen) == int(STATE[6:]):
        stop()                              # its line is written; the next input's is not
batch_predict._record = record_then_stop
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("state", ["after-3", "before-long", "after-4"])
def test_killed_job_resumes_to_the_clean_runs_result(setup, clips, clean, tmp_path, state):
    """SIGKILL after the third line (the long clip's chunks part done), when the long clip's
    outputs are complete but not listed, and after every line but before the merge: the
    resumed job's files are the clean run's, byte for byte (the encoder is deterministic:
    the same frames give the same mp4), and nothing else is left."""
    from roadseg import batch_predict
    out = tmp_path / "out"
    args = ["batch-predict", "--model", setup["export"], str(clips), "--out", str(out), *FAULT_ARGS]
    killed = subprocess.run([sys.executable, "-c", STOP_AT, state, "kill", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert killed.returncode == -9, killed.stderr[-2000:]
    _finals_are_complete(out, clean)
    parts = sorted(out.glob(".chunk-*"))
    if parts:   # and a power cut's torn chunk file: checked before it is reused, done again
        parts[0].write_bytes(parts[0].read_bytes()[:parts[0].stat().st_size // 2])
    result = batch_predict.batch_predict(setup["export"], [str(clips)], str(out), batch_size=2,
                                         chunk_seconds=1.0, resume=True, log=lambda *a: None)
    assert (result["ok"], result["failed"]) == (4, 0)
    assert _tree(out) == _tree(clean)        # the same files, bytes, and nothing else left
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir())
    _same_manifest(out, clean)


def test_resume_with_another_model_is_refused(setup, clips, other_export, tmp_path, capsys):
    out = tmp_path / "out"
    first = [str(clips / "a1.mp4"), str(setup["images"][0])]
    assert cli_main(["batch-predict", "--model", setup["export"], *first, "--out", str(out)]) == 0
    before = _stamps(out)
    more = first + [str(clips / "a2.mp4")]
    capsys.readouterr()
    assert cli_main(["batch-predict", "--model", other_export, *more, "--out", str(out),
                     "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot resume {out}: "), err
    assert setup["export"] in err[0] and other_export in err[0] and "--model" in err[0], err
    assert _stamps(out) == before              # nothing changed in the output folder
    # the same model elsewhere resumes (the identity is the content, not the path); so does
    # the run it was exported from in TensorFlow (batch-predict exports it again: the same
    # model; --backend auto would run the run's OpenVINO conversion, another model)
    moved = shutil.copytree(setup["export"], tmp_path / "moved")
    assert cli_main(["batch-predict", "--model", str(moved), *more, "--out", str(out),
                     "--resume"]) == 0
    assert cli_main(["batch-predict", "--model", setup["run"], *more, str(clips / "a3.mp4"),
                     "--out", str(out), "--resume", "--backend", "tensorflow"]) == 0
    assert {Path(line["input"]).name: line["status"] for line in _manifest(out)} == {
        "a1.mp4": "ok", "a2.mp4": "ok", "a3.mp4": "ok", setup["images"][0].name: "ok"}
    for name, stamp in before.items():
        if name not in ("manifest.jsonl", ".lock"):
            assert _stamps(out)[name] == stamp, name


def test_a_failing_input_is_one_line_alone_on_stderr(setup, archive, tmp_path, capsys):
    """A truncated mp4: the command (in a process of its own, as Beam logs to the process's
    stderr) writes one line and nothing else; with -v, Beam's record of the error and the
    tracebacks come first, as debug lines."""
    args = ["batch-predict", "--model", setup["export"], str(archive / "c2.mp4"),
            str(archive / "truncated.mp4")]
    run = _cli(*args, "--out", tmp_path / "out")
    assert run.returncode == 2, run.stderr[-3000:]
    lines = _stderr_lines(run.stderr)
    assert len(lines) == 1, run.stderr[-3000:]
    assert lines[0].startswith(f"error: cannot read video {archive / 'truncated.mp4'}") and \
        "--skip-bad" in lines[0], lines[0]
    capsys.readouterr()
    assert cli_main([*args, "--out", str(tmp_path / "verbose"), "-v"]) == 2
    err = capsys.readouterr().err
    assert "Beam: cannot read video" in err and "Traceback (most recent call last)" in err
    assert _stderr_lines(err)[-1] == lines[0].replace(str(tmp_path / "out"), str(tmp_path / "verbose"))


def _mount_tmpfs(path, kilobytes):
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kilobytes}k", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs to fill ({done.stderr.strip() or 'not root'})")


def test_full_disk_then_resume_after_space_is_freed(setup, clips, clean, tmp_path):
    """A real full disk: a tmpfs of half the space the job needs."""
    disk = tmp_path / "disk"
    need = sum(-(-p.stat().st_size // 4096) * 4 for p in clean.rglob("*") if p.is_file())
    _mount_tmpfs(disk, need // 2)
    try:
        out = disk / "out"
        run = _cli("batch-predict", "--model", setup["export"], clips, "--out", out, *FAULT_ARGS,
                   "--skip-bad")                        # a full disk is not a bad input
        assert run.returncode == 2, run.stderr[-3000:]
        lines = _stderr_lines(run.stderr)
        assert len(lines) == 1, run.stderr[-3000:]
        assert lines[0].startswith(f"error: could not write {out}") and \
            "No space left on device" in lines[0] and "--resume" in lines[0], lines[0]
        assert out.is_dir()
        _finals_are_complete(out, clean)
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        assert cli_main(["batch-predict", "--model", setup["export"], str(clips), "--out",
                         str(out), *FAULT_ARGS, "--resume"]) == 0
        assert _tree(out) == _tree(clean)
        _same_manifest(out, clean)
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_second_job_on_one_out_is_refused(setup, clips, clean, tmp_path, capsys):
    out, go = tmp_path / "out", tmp_path / "go"
    args = ["batch-predict", "--model", setup["export"], str(clips), "--out", str(out), *FAULT_ARGS]
    first = subprocess.Popen([sys.executable, "-c", STOP_AT, "after-1", str(go), *args], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    try:
        while not Path(f"{go}.ready").exists():    # the first job has written its first line
            assert first.poll() is None, first.stderr.read()[-2000:]
            time.sleep(0.05)
        capsys.readouterr()
        assert cli_main(args) == 2
        assert "already exists" in capsys.readouterr().err
        assert cli_main(args + ["--resume"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {out} is being written by process "
                                                   f"{first.pid} right now"), err
    finally:
        go.touch()
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    assert _tree(out) == _tree(clean)


def test_resume_with_more_inputs_leaves_finished_outputs_untouched(setup, clips, archive, tmp_path,
                                                                     capsys):
    out = tmp_path / "out"
    assert cli_main(["batch-predict", "--model", setup["export"], str(clips / "a1.mp4"), "--out",
                     str(out)]) == 0
    before = {n: s for n, s in _stamps(out).items() if n.startswith("a1_")}
    assert cli_main(["batch-predict", "--model", setup["export"], str(clips / "a1.mp4"),
                     str(clips / "a2.mp4"), "--out", str(out), "--resume"]) == 0
    assert {n: s for n, s in _stamps(out).items() if n.startswith("a1_")} == before
    assert [line["status"] for line in _manifest(out)] == ["ok", "ok"]
    # an input named like one done earlier would overwrite its outputs: refused
    twin = tmp_path / "twin" / "a1.mp4"
    twin.parent.mkdir()
    shutil.copy(archive / "c1.mp4", twin)
    capsys.readouterr()
    assert cli_main(["batch-predict", "--model", setup["export"], str(twin), "--out", str(out),
                     "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "would both be saved as a1_overlay.mp4" in err[0], err
    assert {n: s for n, s in _stamps(out).items() if n.startswith("a1_")} == before


def test_a_truncated_video_whose_header_reads_is_done_with_a_warning(setup, tmp_path, capsys):
    """An mp4 with its index first (faststart), cut at 70%: the header promises 100 frames, 41
    decode.  Both ways (whole and chunked) give those frames, the manifest says how many of how
    many, and a warning line; the job does not fail."""
    import imageio_ffmpeg
    whole = video.make_test_video(tmp_path / "whole.mp4", 100, size=(96, 64), fps=12)
    fast = tmp_path / "fast.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(whole), "-c", "copy",
                    "-movflags", "+faststart", str(fast)], check=True)
    cut = tmp_path / "in" / "cut.mp4"
    cut.parent.mkdir()
    cut.write_bytes(fast.read_bytes()[:int(fast.stat().st_size * 0.7)])
    decoded = sum(len(b) for b in video.read_frame_batches(str(cut), 4))
    assert 0 < decoded < 100
    for name, extra in (("one", []), ("chunked", FAULT_ARGS)):
        capsys.readouterr()
        assert cli_main(["batch-predict", "--model", setup["export"], str(cut), "--out",
                         str(tmp_path / name), *extra]) == 0
        captured = capsys.readouterr()
        (line,) = _manifest(tmp_path / name)
        assert (line["status"], line["frames"], line["frames_expected"]) == ("ok", decoded, 100)
        warnings = [w for w in captured.err.splitlines() if w.startswith("warning: ")]
        assert warnings == [f"warning: {cut}: {decoded} of the 100 frames its header promises "
                            f"could be read (a truncated file?); its outputs hold those {decoded}"]
        assert read_video(tmp_path / name / "cut_overlay.mp4")[1].shape[0] == decoded
        assert "1 of 1 inputs done" in captured.out
    assert _files(tmp_path / "chunked") == _files(tmp_path / "one")
