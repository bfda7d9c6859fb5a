"""Scale-out: training on 2 logical CPU devices (MirroredStrategy) and on 2 worker processes
on 127.0.0.1 (MultiWorkerMirroredStrategy), as ``segment.py train --devices/--workers``.

64x128 demo scenes, width-1/16 random VGG16.  Every process a test starts is ended by its
pid; the workers talk over loopback ports picked free just before.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from roadseg import datasets, demo_scenes, distribute, export, inference, trainer
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
    with inference.load_predictor(run) as live, inference.load_predictor(out) as exported:
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
