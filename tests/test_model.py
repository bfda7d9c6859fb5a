"""roadseg.model: every path builds the network through ``model.network``; one training step
for 1 or N replicas (fp16's loss scaling in both); a run written in today's config.json
format reads back as a ``ModelSpec`` and predicts as before; export_info.json's one reader.

Width-1/16 random VGG16 (``vgg_dir``), demo scenes, ``small_run`` (conftest.py).
"""
import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from roadseg import cli, datasets, distribute, export, fcn, inference, litert, model, trainer
from roadseg.config import TrainConfig
from roadseg.errors import UserError
from roadseg.run_folders import run_checkpoint
from roadseg.schemes import get_scheme

tf1 = tf.compat.v1
ROOT = Path(__file__).resolve().parent.parent
OPTIONS = dict(image_shape=[64, 128], batch_size=4, keep_prob=1.0, augment=False, skip_scales=[])


@pytest.fixture(scope="module")
def train_samples(demo_root):
    return datasets.find_dataset(demo_root).splits["train"]


def _training_graph(cfg, samples, vgg_dir, devices):
    """(graph, TrainingGraph) of ``cfg`` on ``devices`` (logical CPU devices when > 1)."""
    graph = tf.Graph()
    with graph.as_default():
        dist = distribute.Distribution(cfg.replace(devices=devices)).start()
        with dist.session(graph) as sess:   # an fp32 session: the graph is what is compared
            return graph, trainer.build_training_graph(sess, cfg, samples, vgg_dir, dist)


def _loss_scaling(graph):
    """The loss-scale variables (local, by name) and whether the step checks for Inf/NaN."""
    with graph.as_default():
        scales = sorted(v.op.name for v in tf1.local_variables()
                        if v.op.name.split("/")[-1] in ("current_loss_scale", "good_steps"))
    finite_checks = sum(op.type == "IsFinite" for op in graph.get_operations())
    return scales, finite_checks


def test_fp16_loss_scaling_is_in_the_replicated_step_as_on_one_device(train_samples, vgg_dir):
    fp16 = TrainConfig.from_dict(dict(OPTIONS, precision="fp16"))   # built, not run: no GPU here
    one, _ = _training_graph(fp16, train_samples, vgg_dir, 1)
    two, g = _training_graph(fp16, train_samples, vgg_dir, 2)
    plain, _ = _training_graph(fp16.replace(precision="fp32"), train_samples, vgg_dir, 2)
    scales_one, checks_one = _loss_scaling(one)
    scales_two, checks_two = _loss_scaling(two)
    assert scales_one == scales_two == ["current_loss_scale", "good_steps"]
    # every gradient is checked for Inf/NaN on each replica, as on the one device
    assert checks_one > 20 and checks_two == 2 * checks_one
    assert _loss_scaling(plain) == ([], 0)
    with two.as_default():   # one scale, mirrored on both replicas
        scale = next(v for v in tf1.local_variables() if v.op.name == "current_loss_scale")
        assert len(scale.values) == 2 and len(g.progress[0]["step"].values) == 2


def test_every_path_builds_the_network_through_model_network(monkeypatch, small_run, vgg_dir,
                                                             train_samples, tmp_path):
    calls = []
    real = model.network

    def counted(spec, *args, **kwargs):
        calls.append(spec)
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(model, "network", counted)

    def count(action):
        calls.clear()
        action()
        return len(calls)

    cfg = TrainConfig.from_dict(OPTIONS)
    assert count(lambda: _training_graph(cfg, train_samples, vgg_dir, 1)) == 1
    assert count(lambda: _training_graph(cfg, train_samples, vgg_dir, 2)) == 3   # 2 replicas + eval
    assert count(lambda: inference.load_predictor(small_run, backend="tensorflow").close()) == 1
    assert count(lambda: export.export(small_run, str(tmp_path / "saved"))) == 1
    assert count(lambda: litert.export_tflite(small_run, str(tmp_path / "lite"), log=print)) == 1
    if importlib.util.find_spec("openvino"):
        from roadseg import openvino_model
        assert count(lambda: openvino_model.frozen_graph(small_run)) == 1
    assert all(spec == model.ModelSpec.from_run(small_run) for spec in calls)
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import ours
        with tf.Graph().as_default(), tf1.Session() as sess:
            assert count(lambda: ours.inference(sess, vgg_dir)) == 1
        assert count(lambda: ours.litert_model(vgg_dir, "none", None, str(tmp_path / "b"))) == 1
        assert count(lambda: ours.forward_flops(vgg_dir)) == 1
    finally:
        sys.path.remove(str(ROOT / "bench"))


def _reference_maps(run_dir, config, images):
    """Class maps as today's code builds them from a raw config.json: the course API
    (``fcn.load_vgg`` + ``fcn.layers`` with the config's own decoder options)."""
    scales = config.get("skip_scales", [0.01, 0.0001])
    with tf.Graph().as_default(), tf1.Session() as sess:
        raw = tf1.placeholder(tf.uint8, [None, None, None, 3])
        x = inference.resize_to_network(raw, config["image_shape"])
        _, _, l3, l4, l7 = fcn.load_vgg(sess, config["vgg"], input_map={
            "image_input:0": x, "keep_prob:0": tf.constant(1.0)})
        logits = fcn.layers(l3, l4, l7, get_scheme(config["scheme"]).num_classes,
                            skip_scales=tuple(scales) if scales else None,
                            l2_scale=config.get("l2_scale", 1e-3))
        classes, _ = inference.segmentation_head(logits, tf.shape(raw)[1:3])
        tf1.train.Saver(inference.model_variables()).restore(sess, run_checkpoint(run_dir))
        return sess.run(classes, {raw: images})


def test_a_run_in_todays_config_format_reads_back_and_predicts_identically(small_run, demo_root,
                                                                           tmp_path):
    run = tmp_path / "today"
    shutil.copytree(small_run, run)
    saved = json.loads((run / "config.json").read_text())
    # config.json exactly as the trainer wrote it before ModelSpec: TrainConfig.to_dict() + vgg_info
    today = {**TrainConfig.from_dict({k: v for k, v in saved.items()
                                      if k not in trainer.RUN_FACTS}).to_dict(),
             "vgg_info": saved["vgg_info"]}
    (run / "config.json").write_text(json.dumps(today, indent=2))
    spec = model.ModelSpec.from_run(str(run))
    assert (spec.scheme, spec.image_shape, spec.skip_scales, spec.l2_scale, spec.num_classes) == \
        ("road4", (128, 256), None, 1e-5, 5)
    assert spec.vgg_info == today["vgg_info"] and spec.vgg_info["width"] == 1 / 16
    images = np.stack([datasets.load_image(s.image) for s in datasets.find_dataset(demo_root)
                       .splits["val"]])
    before = _reference_maps(str(run), today, images)
    assert len(np.unique(before)) >= 3
    with inference.load_predictor(str(run), backend="tensorflow") as predictor:   # the same graph
        np.testing.assert_array_equal(predictor.predict(images), before)
    # written back unchanged by the trainer's writer: the same flat object
    assert spec.run_config(TrainConfig.from_dict(
        {k: v for k, v in today.items() if k != "vgg_info"}).to_dict()) == today


def test_a_run_of_an_earlier_version_without_decoder_keys_takes_the_old_defaults(small_run,
                                                                                tmp_path):
    run = tmp_path / "early"
    shutil.copytree(small_run, run)
    config = json.loads((run / "config.json").read_text())
    for key in ("skip_scales", "l2_scale", "vgg_info"):
        config.pop(key)
    (run / "config.json").write_text(json.dumps(config))
    spec = model.ModelSpec.from_run(str(run))
    assert spec.skip_scales == (0.01, 0.0001) and spec.l2_scale == 1e-3 and spec.vgg_info == {}
    config["image_shape"] = [100, 200]
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"config.json is damaged: image shape 100x200 is not "
                                        r"divisible by 32"):
        model.ModelSpec.from_run(str(run))


def test_predict_on_a_tflite_folder_with_a_damaged_export_info_is_one_line(small_run, demo_root,
                                                                          tmp_path, capsys):
    folder = Path(litert.export_tflite(small_run, str(tmp_path / "lite"), log=lambda *a: None))
    info = json.loads((folder / model.EXPORT_INFO).read_text())
    assert info["format"] == "tflite" and info["skip_scales"] == [] and "vgg" not in info
    image = datasets.find_dataset(demo_root).splits["val"][0].image
    for damage, message in (("{not json", "is damaged: not valid JSON"),
                            (json.dumps({"scheme": "road4"}), "is damaged: it has no image_shape"),
                            (json.dumps(dict(info, scheme="nope")), "unknown class scheme 'nope'"),
                            (None, f"has no {model.EXPORT_INFO}")):
        if damage is None:
            os.unlink(folder / model.EXPORT_INFO)
        else:
            (folder / model.EXPORT_INFO).write_text(damage)
        code = cli.main(["predict", "--model", str(folder), image, "--out", str(tmp_path / "p")])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert message in lines[0] and "segment.py export --format tflite" in lines[0], lines[0]
    assert not (tmp_path / "p").exists()


def test_loss_scaled_replicated_step_runs_on_two_logical_devices(train_samples, vgg_dir):
    """The loss-scaled step of --devices 2 --precision fp16, run in an fp32 session (the
    scaling does not need fp16 arithmetic): it trains, and the scale and step advance on
    both replicas as one."""
    cfg = TrainConfig.from_dict(dict(OPTIONS, precision="fp16", keep_prob=0.5))
    graph = tf.Graph()
    with graph.as_default():
        dist = distribute.Distribution(cfg.replace(devices=2)).start()
        with dist.session(graph) as sess:
            g = trainer.build_training_graph(sess, cfg, train_samples, vgg_dir, dist)
            sess.run(tf1.local_variables_initializer())
            sess.run(g.data_init)
            weights = [v for v in tf1.trainable_variables() if "score_fc7" in v.op.name][0]
            before = sess.run(weights)
            losses = [sess.run([g.train_op, g.loss], {g.lr: 1e-3, g.keep_prob: 0.5})[1]
                      for _ in range(3)]
            good = next(v for v in tf1.local_variables() if v.op.name == "good_steps")
            steps, good_steps = sess.run([g.progress[0]["step"], good])
            assert np.all(np.isfinite(losses)) and steps == 3 and good_steps == 3
            assert not np.allclose(sess.run(weights), before)


# ============================================================================ the encoder's learning
def _vgg_values(vgg_dir):
    """{variable name: value} saved in a VGG16 folder."""
    reader = tf.train.load_checkpoint(os.path.join(vgg_dir, "variables", "variables"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def _steps(cfg, samples, vgg_dir, n, lr=1e-3):
    """(graph, {trainable variable: value} before, and after ``n`` steps at ``lr``); with
    several replicas, the values of replica 0, and each other replica's are checked equal."""
    graph = tf.Graph()
    with graph.as_default():
        dist = distribute.Distribution(cfg).start()
        with dist.session(graph) as sess:
            g = trainer.build_training_graph(sess, cfg, samples, vgg_dir, dist)
            variables = {v.op.name: getattr(v, "values", [v]) for v in tf1.trainable_variables()}
            before = sess.run(variables)
            sess.run(g.data_init)
            for _ in range(n):
                sess.run(g.train_op, {g.lr: lr, g.keep_prob: 1.0})
            after = sess.run(variables)
    for values in (*before.values(), *after.values()):
        for copy in values[1:]:
            np.testing.assert_array_equal(copy, values[0])
    return graph, {k: v[0] for k, v in before.items()}, {k: v[0] for k, v in after.items()}


def _nodes(graph):
    """The graph's nodes as text, tf.data's functions without their process-wide counters."""
    return [re.sub(r'"(__inference_\w*?)_\d+"', r'"\1"', str(node)) for node in graph.as_graph_def().node]


def _ops(graph, kind):
    return sum(op.type == kind for op in graph.get_operations())


def test_encoder_lr_scale_1_without_reinit_is_todays_step(train_samples, vgg_dir, monkeypatch):
    """The default options build, node for node, the graph of the step before the options:
    one plain Adam over every trainable variable."""
    cfg = TrainConfig.from_dict(OPTIONS)
    assert (cfg.encoder_lr_scale, cfg.reinit) == (1.0, [])
    today, _ = _training_graph(cfg, train_samples, vgg_dir, 1)
    monkeypatch.setattr(model, "optimizer", lambda lr, options: (tf1.train.AdamOptimizer(lr), None))
    before, _ = _training_graph(cfg, train_samples, vgg_dir, 1)
    assert len(_nodes(today)) > 1000 and _nodes(today) == _nodes(before)
    with today.as_default():
        slots = [v.op.name for v in tf1.global_variables() if v.op.name.endswith(("/Adam", "/Adam_1"))]
        assert len(slots) == 2 * len(tf1.trainable_variables()) > 2 * 30   # VGG16: 30


def test_encoder_lr_scale_0_freezes_the_conv_layers(train_samples, vgg_dir):
    cfg = TrainConfig.from_dict(dict(OPTIONS, encoder_lr_scale=0.0))
    graph, before, after = _steps(cfg, train_samples, vgg_dir, 3)
    saved = _vgg_values(vgg_dir)
    convs = [n for n in after if n.startswith("conv")]
    assert len(convs) == 26
    for name in convs:   # bit for bit the VGG16 folder's, after 3 steps
        np.testing.assert_array_equal(after[name], saved[name])
    moved = [n for n in after if not np.array_equal(after[n], before[n])]
    assert sorted(moved) == sorted(n for n in after if not n.startswith("conv"))
    assert any(n.startswith("fcn8/") for n in moved) and "fc6/weights" in moved
    with graph.as_default():   # no Adam slots and no gradients for the conv layers
        assert not [v for v in tf1.global_variables() if v.op.name.startswith("conv")
                    and "Adam" in v.op.name]
    default, _ = _training_graph(TrainConfig.from_dict(OPTIONS), train_samples, vgg_dir, 1)
    assert _ops(default, "MaxPoolGrad") == 5 and _ops(graph, "MaxPoolGrad") == 0
    assert _ops(default, "Conv2DBackpropFilter") - _ops(graph, "Conv2DBackpropFilter") == 13


@pytest.mark.parametrize("devices", [1, 2])
def test_encoder_lr_scale_scales_the_conv_layers_steps(train_samples, vgg_dir, devices):
    """Adam's first step moves each weight by about lr (lr x sign of its gradient): the conv
    layers by lr x 0.25, fc6/fc7 and the decoder by lr; on every replica."""
    cfg = TrainConfig.from_dict(dict(OPTIONS, encoder_lr_scale=0.25, devices=devices))
    _, before, after = _steps(cfg, train_samples, vgg_dir, 1, lr=1e-3)
    step = {n: np.abs(after[n] - before[n]).max() for n in after}
    for name, size in step.items():
        want = 2.5e-4 if name.startswith("conv") else 1e-3
        assert want * 0.95 < size < want * 1.001, (name, size)


@pytest.mark.parametrize("devices", [1, 2])
def test_reinit_gives_those_layers_new_weights_that_learn_at_lr(train_samples, vgg_dir, devices):
    cfg = TrainConfig.from_dict(dict(OPTIONS, encoder_lr_scale=0.0, reinit=["conv5", "fc7"],
                                     devices=devices))
    _, before, after = _steps(cfg, train_samples, vgg_dir, 1)
    saved = _vgg_values(vgg_dir)
    for name in (n for n in saved if n.endswith("/weights")):   # (the random VGG's biases are 0)
        same = np.array_equal(before[name], saved[name])
        assert same == (not name.startswith(("conv5", "fc7/"))), name
    kernel = before["conv5_1/weights"]
    assert kernel.shape == (3, 3, 32, 32) and abs(kernel.std() / np.sqrt(2 / (9 * 32)) - 1) < 0.1
    assert not before["conv5_1/biases"].any() and not before["fc7/biases"].any()
    # frozen conv1..conv4; the re-initialised conv5 learns (at lr)
    assert np.array_equal(after["conv4_3/weights"], saved["conv4_3/weights"])
    assert 0.95e-3 < np.abs(after["conv5_1/weights"] - kernel).max() < 1.001e-3
    if devices == 1:   # the same seed, the same new weights
        _, again, _ = _steps(cfg, train_samples, vgg_dir, 0)
        np.testing.assert_array_equal(again["conv5_3/weights"], before["conv5_3/weights"])
