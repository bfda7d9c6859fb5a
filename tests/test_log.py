"""log.py: one channel (the package logger), written through tqdm; --quiet and --verbose."""
import re
import sys

import pytest
from tqdm import tqdm

from roadseg import cli, log
from roadseg.log import logger


@pytest.fixture(autouse=True)
def normal_level():
    yield
    log.configure("normal")


def pieces(text):
    """A terminal's lines: what lies between carriage returns and newlines."""
    return [p for p in re.split(r"[\r\n]", text) if p.strip()]


def test_info_goes_to_stdout_warnings_and_errors_to_stderr(capsys):
    log.configure("verbose")
    logger.info("an info line")
    logger.warning("a warning line")
    logger.error("error: an error line")
    logger.debug("a debug line")
    out, err = capsys.readouterr()
    assert out == "an info line\n"
    assert err == "a warning line\nerror: an error line\na debug line\n"


def test_a_line_written_during_a_progress_bar_gets_a_line_of_its_own(capsys):
    with tqdm(total=3, file=sys.stderr, ascii=True, mininterval=0) as bar:
        bar.update(1)
        logger.warning("the disk is almost full")
        bar.update(1)
        print("a plain print", file=sys.stderr)    # what the logger replaces: lands on the bar
        bar.update(1)
    err = capsys.readouterr().err
    assert "the disk is almost full" in pieces(err)
    assert "a plain print" not in pieces(err) and "a plain print" in err
    assert re.search(r"\n *2/3 \[|\r *67%\|", err)   # the bar is drawn again after the line


def test_levels_quiet_normal_verbose(capsys):
    for verbosity, shown in (("quiet", ["w"]), ("normal", ["i", "w"]), ("verbose", ["d", "i", "w"])):
        log.configure(verbosity)
        logger.debug("d")
        logger.info("i")
        logger.warning("w")
        out, err = capsys.readouterr()
        assert sorted(out.split() + err.split()) == shown, verbosity
    assert len([h for h in logger.handlers if isinstance(h, log.TqdmHandler)]) == 1


def test_quiet_silences_progress_bars_of_every_kind(capsys):
    from tqdm.auto import tqdm as auto_tqdm
    for verbosity, drawn in (("quiet", False), ("normal", True)):
        log.configure(verbosity)
        for kind in (tqdm, auto_tqdm):
            for _ in kind(range(3), desc="bar", file=sys.stderr, mininterval=0):
                pass
        err = capsys.readouterr().err
        assert (err.count("bar: 100%") >= 2) if drawn else err == "", err
    with tqdm(range(2), disable=False, file=sys.stderr) as explicit:   # its own choice stands
        assert explicit.disable is False


def test_cli_quiet_draws_no_bar(tmp_path, capsys):
    assert cli.main(["make-demo-data", str(tmp_path / "a"), "--n", "2", "--size", "64", "128", "-q"]) == 0
    assert capsys.readouterr().err == ""
    assert cli.main(["make-demo-data", str(tmp_path / "b"), "--n", "2", "--size", "64", "128"]) == 0
    assert "drawing demo scenes:   0%" in capsys.readouterr().err   # (leave=False: cleared at the end)


def test_channel_is_the_given_callback_or_the_logger(capsys):
    said = []
    log.channel(said.append)("to the caller")
    log.channel(None)("to the logger")
    assert said == ["to the caller"] and capsys.readouterr().out == "to the logger\n"


def test_cli_quiet_and_verbose(tmp_path, capsys):
    assert cli.main(["make-demo-data", str(tmp_path / "a"), "--n", "2", "--size", "64", "128"]) == 0
    assert f"demo scenes written to {tmp_path / 'a'}" in capsys.readouterr().out
    assert cli.main(["make-demo-data", str(tmp_path / "b"), "--n", "2", "--size", "64", "128",
                     "--quiet"]) == 0
    assert capsys.readouterr().out == "" and (tmp_path / "b").is_dir()
    # an error: one line, also with --quiet; --verbose adds where it was raised, above it
    assert cli.main(["check-data", str(tmp_path / "none"), "-q"]) == 2
    assert capsys.readouterr().err == (f"error: dataset folder '{tmp_path / 'none'}' does not exist; "
                                       f"pass the folder that holds the dataset (or make demo scenes "
                                       f"with `segment.py make-demo-data DIR`)\n")
    assert cli.main(["check-data", str(tmp_path / "none"), "--verbose"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "Traceback (most recent call last):" in err and err[-1].startswith("error: dataset folder")
