"""--precision: the session rewrite, the CPU check, fp16's loss scaling, and what bf16 does to
a trained model's class maps (``small_run``: the width-1/16 VGG trained on demo scenes)."""
import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from roadseg import cli, datasets, fcn, inference, precision, trainer
from roadseg.config import TrainConfig
from roadseg.errors import UserError
from roadseg.model import ModelSpec

tf1 = tf.compat.v1
GPU = precision.has_gpu()


def test_session_config_turns_on_one_rewrite():
    rewrite = lambda p: precision.session_config(p).graph_options.rewrite_options  # noqa: E731
    on = rewrite("bf16").auto_mixed_precision_onednn_bfloat16
    assert on == 1 and rewrite("bf16").auto_mixed_precision == 0
    assert rewrite("fp32").auto_mixed_precision_onednn_bfloat16 == 0
    base = tf1.ConfigProto(intra_op_parallelism_threads=1)
    merged = precision.session_config("bf16", base)
    assert merged.intra_op_parallelism_threads == 1 and base.graph_options.rewrite_options \
        .auto_mixed_precision_onednn_bfloat16 == 0   # the caller's config is not changed
    with pytest.raises(ValueError, match="auto, fp32, bf16, fp16"):
        precision.session_config("fp8")


@pytest.mark.skipif(GPU, reason="fp16 runs on this machine's GPU")
def test_fp16_without_a_gpu_is_refused_in_one_line():
    with pytest.raises(UserError, match="fp16 needs a GPU.*use bf16") as err:
        precision.session_config("fp16")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"precision \(--precision\) = \"fp16\".*auto, fp32 or bf16 here"):
        TrainConfig(precision="fp16").validate()


# /proc/cpuinfo flags of the three CPU kinds seen on the development machines, and one more
CPU_KINDS = {
    "Intel Xeon (AMX)": ({"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8"}, "amx"),
    "AMD EPYC (AVX-512, AVX512_BF16)": ({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}, "native"),
    "Intel Xeon (AVX-512, no bf16)": ({"avx2", "avx512f", "avx512_vnni"}, "emulated"),
    "AMD EPYC (AVX2 only)": ({"avx2", "fma"}, "none"),
}


@pytest.mark.parametrize("model", CPU_KINDS)
def test_each_cpu_kind_gets_true_notes_and_autos_choice(monkeypatch, model):
    flags, kind = CPU_KINDS[model]
    monkeypatch.setattr(precision, "has_gpu", lambda: False)
    monkeypatch.setattr(precision, "cpu_info", lambda: (model, frozenset(flags)))
    assert precision.bf16_support() == kind
    native = kind in ("amx", "native")
    assert precision.resolve("auto") == ("bf16" if native else "fp32")
    assert precision.computed("bf16") == ("fp32" if kind == "none" else "bf16")
    assert precision.computed("auto") == precision.resolve("auto")
    assert precision.notes("fp32") == []
    bf16 = precision.notes("bf16")
    if native:
        assert bf16 == []
    else:
        assert len(bf16) == 1 and model in bf16[0]
        said = {"emulated": "runs emulated and slower than fp32",
                "none": "computes exactly as fp32 (same numbers, same speed)"}[kind]
        assert said in bf16[0], bf16
    auto = precision.notes("auto")
    assert len(auto) == 1 and f"--precision auto runs {precision.resolve('auto')}:" in auto[0]
    rewrite = precision.session_config("auto").graph_options.rewrite_options
    assert rewrite.auto_mixed_precision_onednn_bfloat16 == (1 if native else 0)
    lines = []
    precision.session("auto", tf.Graph(), log=lines.append).close()
    assert lines[0].startswith("precision: " + precision.resolve("auto")) and lines[1:] == auto


def test_auto_on_a_gpu_machine_is_fp32(monkeypatch):
    monkeypatch.setattr(precision, "has_gpu", lambda: True)
    monkeypatch.setattr(precision, "cpu_info", lambda: ("Xeon", frozenset({"amx_bf16"})))
    assert precision.resolve("auto") == "fp32" and "a GPU is used" in precision.notes("auto")[0]


def test_precision_is_a_checked_train_option():
    assert TrainConfig().precision == "fp32"
    assert TrainConfig(precision="bf16").validate().precision == "bf16"
    assert TrainConfig(precision="auto").validate().precision == "auto"
    with pytest.raises(UserError, match="one of auto, fp32, bf16, fp16"):
        TrainConfig(precision="int8").validate()
    # same weights, same checkpoints: not part of the model
    assert "precision" not in {f.name for f in dataclasses.fields(ModelSpec)}


def _adam_run(loss_scaling, steps=3, poison=None):
    """Variables after ``steps`` Adam steps on a small quadratic (fp32 session), the global
    step, and the loss-scale variables; ``poison`` = the step whose gradient is Inf."""
    with tf.Graph().as_default(), tf1.Session() as sess:
        w = tf1.get_variable("w", initializer=np.array([0.5, -1.0, 2.0], np.float32))
        step = tf1.train.get_or_create_global_step()
        bad = tf1.placeholder_with_default(1.0, [])
        loss = tf.reduce_sum(tf.square(w - 1.0)) * bad
        op = precision.minimize(tf1.train.AdamOptimizer(0.1), loss, step, loss_scaling)
        fcn.initialize_new_variables(sess, [])
        for i in range(steps):
            sess.run(op, {bad: np.inf} if i == poison else {})
        scale = [v for v in tf1.local_variables() if "current_loss_scale" in v.op.name]
        saved = {v.op.name for v in tf1.global_variables()}
        return sess.run(w), sess.run(step), sess.run(scale), saved


def test_fp16_loss_scaling_leaves_adam_and_checkpoints_unchanged():
    plain_w, plain_step, _, plain_vars = _adam_run(False)
    w, step, scale, saved = _adam_run(True)
    np.testing.assert_allclose(w, plain_w, rtol=1e-6)   # the scale divides out again
    assert step == plain_step == 3 and scale == [2.0 ** 15]
    assert saved == plain_vars                         # the scale is not in checkpoints
    w, step, scale, _ = _adam_run(True, steps=2, poison=1)   # Inf gradients: step skipped
    np.testing.assert_allclose(w, _adam_run(False, steps=1)[0], rtol=1e-6)
    assert step == 2 and scale == [2.0 ** 14]           # counted, and the scale halved


def test_bf16_class_maps_are_what_the_cpu_makes_of_them(small_run, demo_root):
    """AVX-512 CPUs (native or emulated): TensorFlow rewrites to bfloat16 -- the maps agree
    with fp32's on >= 99% of pixels (measured 0.9991 with AMX) and the probabilities differ.
    A CPU without AVX-512: no rewrite -- bf16's probabilities are fp32's, bit for bit (what
    ``precision.notes`` tells the user there)."""
    images = np.stack([datasets.load_image(s.image) for split in
                       datasets.find_dataset(demo_root).splits.values() for s in split])
    # TensorFlow's fp32 against TensorFlow's bf16 rewrite (auto would run fp32 in OpenVINO)
    with inference.load_predictor(small_run, backend="tensorflow") as fp32:
        ref = fp32.predict(images)
        ref_probs = fp32.predict_proba(images[:2])
    with inference.load_predictor(small_run, precision="bf16") as bf16:
        maps = bf16.predict(images)
        probs = bf16.predict_proba(images[:2])
    assert len(np.unique(ref)) >= 3            # a model that draws more than one class
    if precision.bf16_support() == "none" or GPU:
        assert precision.computed("bf16") == "fp32" or GPU
        np.testing.assert_array_equal(probs, ref_probs)
        np.testing.assert_array_equal(maps, ref)
        return
    agree = np.mean(maps == ref)
    assert agree >= 0.99, agree                # measured 0.9991
    assert agree < 1.0 or np.abs(probs - ref_probs).max() > 0   # bf16 really ran
    assert np.abs(probs - ref_probs).max() < 0.2


def test_a_run_resumes_at_another_precision(tmp_path, demo_root, vgg_dir):
    options = dict(epochs=1, batch_size=4, image_shape=[64, 128], lr=1e-3, keep_prob=1.0,
                   skip_scales=None, seed=0, augment=False, log=lambda *a: None)
    runs = str(tmp_path / "runs")
    first = trainer.train(demo_root, vgg_dir, runs_dir=runs, run="r", **options)
    again = trainer.train(demo_root, vgg_dir, runs_dir=runs, run="r", resume=True,
                          **dict(options, epochs=2, precision="bf16"))
    assert again["status"] == "finished" and again["steps"] == 2 * first["steps"]
    config = json.load(open(os.path.join(again["run_dir"], "config.json")))
    assert config["precision"] == "bf16"        # what was asked, and what ran on this CPU:
    assert config["precision_used"] == ("fp32" if precision.bf16_support() == "none" and not GPU
                                        else "bf16")
    with inference.load_predictor(again["run_dir"]) as predictor:   # fp32 reads it
        assert predictor.predict(np.zeros((1, 64, 128, 3), np.uint8)).shape == (1, 64, 128)


def test_cli_precision_flags(small_run, demo_root, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = cli.main(["evaluate", "--model", small_run, "--data", demo_root, "--split", "val",
                     "--precision", "bf16", "--out", str(out)])
    assert code == 0 and json.load(open(out))["mean_iou"] > 0.2
    assert "precision: bf16" in capsys.readouterr().out
    if not GPU:
        image = datasets.find_dataset(demo_root).splits["val"][0].image
        code = cli.main(["predict", "--model", small_run, image, "--precision", "fp16",
                         "--out", str(tmp_path / "p")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "fp16 needs a GPU" in err[0]
        assert not (tmp_path / "p").exists()
