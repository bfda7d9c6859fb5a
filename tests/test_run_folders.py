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
