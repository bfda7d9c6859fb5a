"""errors.reason: the one-line reason of an exception or a tool's log, one rule at a time."""
import errno
import io

import pytest
import tensorflow as tf

from roadseg.errors import REASON_CHARS, UserError, reason

# What TensorFlow 2.21 raises for a failed op (a session's run), copied from a real one.
TF_NOT_FOUND = ("Graph execution error:\n\nDetected at node 'ReadFile' defined at (most recent call "
                "last):\n    File \"<string>\", line 16, in <module>\nNode: 'ReadFile'\n/nonexist; No "
                "such file or directory\n\t [[{{node ReadFile}}]]")
TF_DISK_FULL = ("Graph execution error:\n\nDetected at node 'save/SaveV2':\n variables.data; No space "
                "left on device\n\t [[{{node save/SaveV2}}]]\n\nHint: If you want to see a list of "
                "allocated tensors when OOM happens, add report_tensor_allocations_upon_oom.")


def test_an_os_error_gives_its_strerror():
    assert reason(OSError(errno.ENOSPC, "No space left on device", "/x/y")) == "No space left on device"
    assert reason(PermissionError(errno.EACCES, "Permission denied")) == "Permission denied"


def test_tensorflow_preamble_node_lines_and_hints_are_skipped():
    assert reason(tf.errors.NotFoundError(None, None, TF_NOT_FOUND)) == \
        "/nonexist; No such file or directory"
    assert reason(tf.errors.DataLossError(None, None, "Graph execution error:\n\nDetected at node "
                                          "'save/RestoreV2' defined at (most recent call last):\n"
                                          "<stack traces unavailable>\nfile is too short to be an "
                                          "sstable\n\t [[{{node save/RestoreV2}}]]")) == \
        "file is too short to be an sstable"


def test_a_buried_write_reason_is_found():
    assert reason(tf.errors.ResourceExhaustedError(None, None, TF_DISK_FULL)) == "No space left on device"
    assert reason(RuntimeError("Failed to rename: a to: b : Read-only file system ; x")) == \
        "Read-only file system"


def test_a_collective_abort_gives_its_reason():
    aborted = tf.errors.UnavailableError(None, None, "Collective ops is aborted by: Socket closed\n"
                                         "The error could be from a previous operation.")
    assert reason(aborted) == "Socket closed"
    grpc = tf.errors.UnavailableError(None, None, 'failed to connect to all addresses {created_time:'
                                      '"2026", grpc_status:14, grpc_message:"Connection refused"}')
    assert reason(grpc) == "Connection refused"


def test_a_wrapped_user_error_keeps_its_whole_line():
    line = "cannot decode image 'in/b.png' (image file is truncated); replace the file " + "x" * 300
    wrapped = RuntimeError(f"Traceback (most recent call last):\n  File \"w.py\", line 3\n"
                           f"roadseg.errors.UserError: {line}\n [while running 'decode']")
    assert reason(wrapped) == line


def test_beams_step_is_dropped_from_a_user_error_and_a_wrapped_one():
    assert reason(UserError("cannot read video a.mp4 (moov atom not found) [while running 'split']")) \
        == "cannot read video a.mp4 (moov atom not found)"
    wrapped = RuntimeError("roadseg.errors.UserError: bad a.png [while running 'decode']")
    assert reason(wrapped) == "bad a.png"


def test_openvinos_where_and_which_check_lines_are_skipped():
    err = RuntimeError("Exception from src/inference/src/cpp/core.cpp:97:\nException from "
                       "src/inference/src/model_reader.cpp:159:\nCheck 'false' failed at "
                       "src/frontends/ir/src/ir_deserializer.cpp:416:\nIncorrect weights in bin file!\n")
    assert reason(err) == "Incorrect weights in bin file!"


def test_an_exception_gives_its_first_line_a_log_its_last():
    assert reason(RuntimeError("Could not load meta information\n=== stderr ===\nmoov atom")) == \
        "Could not load meta information"
    log = b"[mp4 @ 0x55d0c0] first complaint\n[mp4 @ 0x55d0c0] Invalid data found\n\n"
    assert reason(log) == "Invalid data found"
    stdout = "Evaluating 3 pairs of images...\nFound no prediction for ground truth a.png\n"
    assert reason(stdout) == "Found no prediction for ground truth a.png"


def test_a_log_file_is_read_from_its_start():
    log = io.BytesIO()
    log.write(b"[libx264 @ 0x1] Error writing trailer: Disk quota exceeded\n")
    assert reason(log) == "Disk quota exceeded"
    empty = io.BytesIO()
    assert reason(empty, "ffmpeg wrote an incomplete file") == "ffmpeg wrote an incomplete file"
    assert reason("") == "unknown error"


def test_nothing_to_say_gives_the_type_and_long_lines_are_cut():
    assert reason(ValueError()) == "ValueError"
    assert reason(StopIteration()) == "StopIteration"
    assert reason(ValueError("y" * 500)) == "y" * REASON_CHARS


def test_user_error_lines_stay_one_line():
    assert str(UserError(f"a\n  {reason(RuntimeError('b'))}")) == "a b"


@pytest.mark.parametrize("text", ["Graph execution error:", "  File \"x\", line 1", "\t [[{{node a}}]]"])
def test_only_noise_is_no_reason(text):
    assert reason(RuntimeError(text)) == "RuntimeError"
