"""Scale-out: training on 2 logical CPU devices (MirroredStrategy) and on 2 worker processes
on 127.0.0.1 (MultiWorkerMirroredStrategy), as ``segment.py train --devices/--workers``.

64x128 demo scenes, width-1/16 random VGG16.  Every process a test starts is ended by its
pid; the workers talk over loopback ports picked free just before.
"""
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from roadseg import datasets, demo_scenes, distribute, export, inference, trainer, vgg
from roadseg.config import TrainConfig
from roadseg.errors import UserError

tf1 = tf.compat.v1
ROOT = Path(__file__).resolve().parent.parent
OPTIONS = dict(image_shape=[64, 128], batch_size=4, lr=1e-3, keep_prob=1.0, augment=False,
               skip_scales=[], val_split="none")


def quiet(*args):
    pass


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes") / "cityscapes"
    demo_scenes.make_demo_data(str(root), n=10, seed=0, size=(64, 128))
    return root


def _graph_run(cfg, samples, vgg_dir, steps, init=None, devices=1):
    """Build the training graph on ``devices``, restore ``init`` (a checkpoint) or save the
    initial weights there, run ``steps`` steps; returns (losses, weights per replica, names)."""
    graph = tf.Graph()
    with graph.as_default():
        dist = distribute.Distribution(cfg.replace(devices=devices)).start()
        with dist.session(graph) as sess:
            g = trainer.build_training_graph(sess, cfg, samples, vgg_dir, dist)
            saver = tf1.train.Saver()
            if os.path.exists(init + ".index"):
                saver.restore(sess, init)
            else:
                saver.save(sess, init)
            sess.run(g.data_init)
            losses = [sess.run([g.train_op, g.loss, g.data_loss], {g.lr: cfg.lr})[1:]
                      for _ in range(steps)]
            copies = {}
            for v in tf1.trainable_variables():
                parts = dist.strategy.experimental_local_results(v) if dist.strategy else [v]
                copies[v.op.name] = sess.run(list(parts))
            names = sorted(v.op.name for v in tf1.global_variables())
    return np.array(losses), copies, names


def test_two_devices_start_as_one_device_and_replicas_stay_identical(scenes, vgg_dir, tmp_path):
    cfg = TrainConfig.from_dict(OPTIONS).validate()
    samples = datasets.find_dataset(str(scenes)).splits["train"]
    init = str(tmp_path / "init.ckpt")
    one, _, names_one = _graph_run(cfg, samples, vgg_dir, 1, init)
    two, copies, names_two = _graph_run(cfg, samples, vgg_dir, 2, init, devices=2)
    # the same variables (the project's names): checkpoints go both ways
    assert names_two == names_one
    # the global batch split in two gives the loss of the whole batch (the replicas' halves
    # hold slightly different numbers of labelled pixels: equal to ~1e-5, not exactly)
    np.testing.assert_allclose(two[0], one[0], atol=1e-3)
    assert two[1, 0] < two[0, 0]   # it learns
    for name, (first, second) in copies.items():
        np.testing.assert_array_equal(first, second, err_msg=name)


def test_two_devices_with_ref_variables_as_in_the_course_vgg(scenes, tmp_path, monkeypatch):
    """The course's vgg.zip (TF 1.0) holds ref variables (VariableV2), read through their
    snapshots: a replica's import maps those instead of the resource handles."""
    with monkeypatch.context() as m:
        m.setattr(tf1, "get_variable", functools.partial(tf1.get_variable, use_resource=False))
        ref_vgg = vgg.build_vgg_savedmodel(str(tmp_path / "vgg_ref"), source="random", width=1 / 16)
    graph_def = distribute._vgg_meta_graph(ref_vgg).graph_def
    assert {n.op for n in graph_def.node if n.op.startswith("Var")} == {"VariableV2"}
    cfg = TrainConfig.from_dict(OPTIONS).validate()
    samples = datasets.find_dataset(str(scenes)).splits["train"]
    init = str(tmp_path / "init.ckpt")
    one, _, _ = _graph_run(cfg, samples, ref_vgg, 1, init)
    two, copies, _ = _graph_run(cfg, samples, ref_vgg, 2, init, devices=2)
    np.testing.assert_allclose(two[0], one[0], atol=1e-3)
    for name, (first, second) in copies.items():
        np.testing.assert_array_equal(first, second, err_msg=name)


@pytest.fixture(scope="module")
def two_device_run(scenes, vgg_dir, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    result = trainer.train(str(scenes), vgg_dir, runs_dir=str(runs), run="two", epochs=2, devices=2,
                           log=quiet, **dict(OPTIONS, val_split=None))
    return result


def test_two_device_run_works_with_predict_export_and_resume(two_device_run, scenes, vgg_dir,
                                                             tmp_path):
    run = two_device_run["run_dir"]
    assert two_device_run["status"] == "finished" and two_device_run["steps"] == 2 * 2
    assert json.loads((Path(run) / "config.json").read_text())["devices"] == 2
    assert [h["epoch"] for h in two_device_run["history"]] == [1, 2]
    assert "miou" in two_device_run["history"][-1]   # validated on the eval tower
    val = datasets.find_dataset(str(scenes)).splits["val"]
    images = np.stack([datasets.load_image(s.image) for s in val])
    out = export.export(run, str(tmp_path / "export"))
    with inference.load_predictor(run, backend="tensorflow") as live, \
            inference.load_predictor(out) as exported:
        maps = live.predict(images)
        np.testing.assert_array_equal(maps, exported.predict(images))
    assert maps.shape == images.shape[:3]
    # resumed on one device: the same checkpoint, the step goes on
    again = trainer.train(str(scenes), vgg_dir, runs_dir=str(Path(run).parent), run="two",
                          resume=True, epochs=3, devices=1, log=quiet)
    assert again["steps"] == 6 and [h["epoch"] for h in again["history"]] == [1, 2, 3]


def test_devices_and_workers_are_checked_up_front():
    with pytest.raises(UserError, match="does not split over 3 replicas"):
        TrainConfig.from_dict(dict(batch_size=4, devices=3)).validate()
    with pytest.raises(UserError, match="devices"):
        TrainConfig.from_dict(dict(devices=0)).validate()
    cfg = TrainConfig.from_dict(dict(workers=2)).validate()
    for tf_config, match in [(None, "needs TF_CONFIG"), ("{", "not valid"),
                             ('{"cluster": {"worker": ["a:1"]}, "task": {"index": 0}}',
                              "lists 1 worker"),
                             ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"index": 2}}',
                              "task index 2"),
                             ('{"cluster": {"worker": ["a:1", "b:1"], "ps": ["c:1"]}, '
                              '"task": {"index": 0}}', "only 'worker' tasks")]:
        env = {} if tf_config is None else {"TF_CONFIG": tf_config}
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("TF_CONFIG", raising=False)
            for k, v in env.items():
                mp.setenv(k, v)
            with pytest.raises(UserError, match=match):
                distribute.Distribution(cfg)


# ============================================================================ several workers
WORKER_SCRIPT = r'''
import sys
import numpy as np, tensorflow as tf
from roadseg import datasets, distribute, trainer
from roadseg.config import TrainConfig
data, vgg_dir, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
cfg = TrainConfig.from_dict(dict(%s, workers=2, batch_size=2)).validate()
samples = datasets.find_dataset(data).splits["train"]
graph = tf.Graph()
with graph.as_default():
    dist = distribute.Distribution(cfg).start()
    with dist.session(graph) as sess:
        g = trainer.build_training_graph(sess, cfg, samples, vgg_dir, dist)
        distribute.check_agreement(sess, dist, g, len(samples), "-")
        sess.run(g.data_init)
        losses = [sess.run([g.train_op, g.loss], {g.lr: cfg.lr})[1] for _ in range(steps)]
        local = {v.op.name: dist.strategy.experimental_local_results(v)[0]
                 for v in tf.compat.v1.trainable_variables()}
        np.savez(out, losses=losses, **sess.run(local))
''' % repr(OPTIONS)


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _tf_config(ports, index):
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def _start_workers(command, ports, log_dir, name):
    """One process per worker (``command(i)``), TF_CONFIG naming loopback ports; output to
    files (a full pipe would block a worker)."""
    procs = []
    for i in range(len(ports)):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_CONFIG=_tf_config(ports, i),
                   PYTHONPATH=str(ROOT))
        with open(log_dir / f"{name}{i}.out", "w") as out, open(log_dir / f"{name}{i}.err", "w") as err:
            procs.append(subprocess.Popen(command(i), cwd=ROOT, env=env, stdout=out, stderr=err))
    return procs


def _end(procs):
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait(procs, timeout, log_dir, name):
    deadline = time.time() + timeout
    try:
        for proc in procs:
            proc.wait(max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
        logs = "\n".join((log_dir / f"{name}{i}.err").read_text()[-2000:] for i in range(len(procs)))
        pytest.fail(f"workers still running after {timeout}s:\n{logs}")
    finally:
        _end(procs)


def test_two_workers_on_loopback_keep_identical_weights(scenes, vgg_dir, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    outs = [tmp_path / f"w{i}.npz" for i in range(2)]
    procs = _start_workers(lambda i: [sys.executable, str(script), str(scenes), vgg_dir, "4",
                                      str(outs[i])], _free_ports(2), tmp_path, "w")
    _wait(procs, 240, tmp_path, "w")
    assert [p.returncode for p in procs] == [0, 0], (tmp_path / "w1.err").read_text()[-2000:]
    first, second = (dict(np.load(out, allow_pickle=False)) for out in outs)
    assert first["losses"][-1] < first["losses"][0]
    assert first.keys() == second.keys() and len(first) > 20
    for name in first:   # bit-identical: the all-reduce gives every worker the same sums
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def _wait_for_checkpoint(procs, ckpt_dir, min_step, timeout=180):
    index = ckpt_dir / "checkpoint"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            _end(procs)
            pytest.fail(f"a worker ended early: {[p.returncode for p in procs]}")
        if index.exists() and any(int(s) >= min_step for s in
                                  re.findall(r'^model_checkpoint_path: ".*-(\d+)"', index.read_text(), re.M)):
            return
        time.sleep(0.02)
    _end(procs)
    pytest.fail(f"no checkpoint >= {min_step} after {timeout}s")


def test_sigkilled_worker_ends_the_other_with_one_line_then_resume(scenes, vgg_dir, tmp_path):
    runs = tmp_path / "runs"

    def command(resume):
        return lambda i: [sys.executable, "segment.py", "train", "--data", str(scenes), "--vgg", vgg_dir,
                          "--image-shape", "64", "128", "--batch-size", "2", "--epochs", "3",
                          "--checkpoint-every", "1", "--no-augment", "--workers", "2", "--run", "k",
                          "--runs", str(runs)] + (["--resume"] if resume else [])

    procs = _start_workers(command(False), _free_ports(2), tmp_path, "k")
    _wait_for_checkpoint(procs, runs / "k" / "checkpoints", 2)
    os.kill(procs[1].pid, signal.SIGKILL)
    killed = time.time()
    _wait(procs, 60, tmp_path, "k")
    assert time.time() - killed < 20
    err = (tmp_path / "k0.err").read_text()
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert procs[0].returncode == 2 and "Traceback" not in err
    assert len(lines) == 1 and "another worker stopped" in lines[0] and "--resume" in lines[0]

    procs = _start_workers(command(True), _free_ports(2), tmp_path, "r")
    _wait(procs, 240, tmp_path, "r")
    chief, worker = ((tmp_path / f"r{i}.out").read_text() for i in range(2))
    assert [p.returncode for p in procs] == [0, 0], (tmp_path / "r0.err").read_text()[-2000:]
    assert "resumed from" in chief and "resumed from" in worker
    assert "finished: 12 steps" in chief and "finished: 12 steps" in worker
    history = json.loads((runs / "k" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3] and "miou" in history[-1]
    assert "epoch 3/3:" in chief and "epoch 3/3:" not in worker   # only the chief validates
    assert os.listdir(runs / "k" / "tb")


def test_workers_started_with_different_options_all_stop_naming_the_option(scenes, vgg_dir,
                                                                             tmp_path):
    """--batch-size 4 on the chief, 6 on worker 1: before, worker 1 trained to the end and
    the chief lost it; now every worker stops at the start-up check with one line."""
    runs = tmp_path / "runs"

    def command(i):
        return [sys.executable, "segment.py", "train", "--data", str(scenes), "--vgg", vgg_dir,
                "--image-shape", "64", "128", "--batch-size", ("4", "6")[i], "--epochs", "1",
                "--no-augment", "--workers", "2", "--run", "opts", "--runs", str(runs)]

    procs = _start_workers(command, _free_ports(2), tmp_path, "o")
    _wait(procs, 240, tmp_path, "o")
    for i, proc in enumerate(procs):
        err = (tmp_path / f"o{i}.err").read_text()
        lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and "Traceback" not in err, err[-2000:]
        assert len(lines) == 1 and f"worker {i}: the workers were started with different " \
            f"options: batch_size differs (batch_size={(4, 6)[i]} here)" in lines[0], lines
        assert "finished" not in (tmp_path / f"o{i}.out").read_text()
    assert not (runs / "opts").exists()   # no checkpoint was written: the chief removed it
