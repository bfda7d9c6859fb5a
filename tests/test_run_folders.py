"""run_folders.py: new run folders never reuse one; published files never replace one."""
import re

import pytest

from roadseg import run_folders
from roadseg.errors import UserError


def test_new_run_dir_never_reuses_a_folder(tmp_path):
    runs = tmp_path / "runs"
    first = run_folders.new_run_dir(runs, "exp")
    (runs / "exp-1").write_text("a file, not a folder")    # any existing name is skipped
    second = run_folders.new_run_dir(runs, "exp")
    third = run_folders.new_run_dir(runs, "exp")
    assert [p.split("/")[-1] for p in (first, second, third)] == ["exp", "exp-2", "exp-3"]
    stamped = run_folders.new_run_dir(runs)
    again = run_folders.new_run_dir(runs)
    assert re.fullmatch(r"\d{8}-\d{6}", stamped.split("/")[-1])
    assert again != stamped and (runs / again.split("/")[-1]).is_dir()
    with pytest.raises(UserError, match="plain folder name"):
        run_folders.new_run_dir(runs, "../elsewhere")


def test_publish_never_replaces_a_file(tmp_path):
    (tmp_path / ".out.mp4.part").write_bytes(b"new video")
    (tmp_path / "out.mp4").write_bytes(b"someone's file")
    with pytest.raises(UserError, match="out.mp4 appeared"):
        run_folders.publish(str(tmp_path / ".out.mp4.part"), str(tmp_path / "out.mp4"))
    assert (tmp_path / "out.mp4").read_bytes() == b"someone's file"
    run_folders.publish(str(tmp_path / ".out.mp4.part"), str(tmp_path / "new.mp4"))
    assert (tmp_path / "new.mp4").read_bytes() == b"new video"


def test_refuse_existing_is_one_line_and_leaves_the_file(tmp_path):
    taken = tmp_path / "out.json"
    taken.write_text("mine")
    with pytest.raises(UserError) as err:
        run_folders.refuse_existing(str(taken), "choose another file name")
    assert str(err.value) == f"{taken} already exists; choose another file name (nothing is overwritten)"
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")    # a dangling link is taken too
    with pytest.raises(UserError, match="run folder .*link already exists; pass --resume"):
        run_folders.refuse_existing(str(tmp_path / "link"), "pass --resume", kind="run folder")
    run_folders.refuse_existing(str(tmp_path / "free"), "unused")           # free: no error
    with pytest.raises(UserError, match="gs://b/out already exists"):       # another filesystem
        run_folders.refuse_existing("gs://b/out", "choose a new --out folder", exists=lambda p: True)
    assert taken.read_text() == "mine"
