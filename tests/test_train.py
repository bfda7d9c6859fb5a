"""The training driver, export and the course helpers, end to end on demo scenes.

A narrow random VGG (width 1/16) learns the procedurally drawn scenes within seconds;
the trained run is then exported, resumed and used through the seed's helper API.
"""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from roadseg import course, datasets, demo_scenes, export, fcn, inference, metrics, trainer, vgg

tf1 = tf.compat.v1
SHAPE = [128, 256]
FROM_SCRATCH = dict(lr=2e-3, keep_prob=1.0, skip_scales=None, l2_scale=1e-5, augment=False,
                    image_shape=SHAPE, batch_size=4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained for 15 epochs on 40 demo scenes (32 train / 8 val)."""
    root = tmp_path_factory.mktemp("train")
    data = demo_scenes.make_demo_data(str(root / "demo"), n=40, seed=0, size=(128, 256))
    vgg_path = vgg.build_vgg_savedmodel(str(root / "vgg"), source="random", width=1 / 16, seed=0)
    result = trainer.train(data, vgg_path, runs_dir=str(root / "runs"), run="r", epochs=15,
                         seed=0, **FROM_SCRATCH)
    return dict(root=root, data=data, vgg=vgg_path, **result)


def test_training_learns_demo_scenes(trained):
    history = trained["history"]
    assert trained["status"] == "finished" and trained["steps"] == 15 * 8
    assert [h["epoch"] for h in history] == list(range(1, 16))
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    best = max(history, key=lambda h: h["miou"])
    # chance (everything background) is an mIoU of about 0.12 on these scenes
    assert trained["best_miou"] == pytest.approx(best["miou"]) and best["miou"] > 0.3
    assert best["iou"]["road"] > 0.4 and best["iou"]["vehicle"] > 0.3
    run = trained["run_dir"]
    assert json.load(open(os.path.join(run, "history.json"))) == history
    assert json.load(open(os.path.join(run, "config.json")))["scheme"] == "road4"
    assert os.listdir(os.path.join(run, "tb"))  # TensorBoard events


def test_export_matches_live_session_and_training_metric(trained, tmp_path):
    val = [s for s in datasets.find_dataset(trained["data"]).splits["val"]]
    out = export.export(trained["run_dir"], str(tmp_path / "export"))
    with pytest.raises(Exception, match="already exists"):
        export.export(trained["run_dir"], out)
    images = np.stack([datasets.load_image(s.image) for s in val])
    with inference.load_predictor(trained["run_dir"], backend="tensorflow") as live, \
            inference.load_predictor(out) as exported:
        np.testing.assert_array_equal(live.predict(images), exported.predict(images))
        odd = images[:2, :100, :150]  # any input size: resized inside, class maps at input size
        assert exported.predict(np.ascontiguousarray(odd)).shape == (2, 100, 150)
        scores = metrics.evaluate(exported.predict, val, exported.scheme, progress=False)
    # the exported best checkpoint scores what training measured for it
    assert scores["mean_iou"] == pytest.approx(trained["best_miou"], abs=1e-6)


def test_resume_continues_epoch_step_and_optimizer_state(trained, tmp_path):
    kw = dict(runs_dir=str(tmp_path), run="resumed", seed=0, **FROM_SCRATCH)
    first = trainer.train(trained["data"], trained["vgg"], epochs=2, **kw)
    assert first["steps"] == 16
    again = trainer.train(trained["data"], trained["vgg"], epochs=3, resume=True, **kw)
    assert again["steps"] == 24
    assert [h["epoch"] for h in again["history"]] == [1, 2, 3]
    ckpt = tf1.train.load_checkpoint(tf1.train.latest_checkpoint(os.path.join(again["run_dir"],
                                                                              "checkpoints")))
    assert ckpt.get_tensor("train_state/step") == 24
    # Adam's beta1 power (beta1 at the start, times beta1 each step) counts every step
    # since the start: it was restored on resume, not reset (that would give 0.9 ** 9)
    assert ckpt.get_tensor("beta1_power") == pytest.approx(0.9 ** (24 + 1), rel=1e-5)
    with pytest.raises(Exception, match="cannot resume"):
        trainer.train(trained["data"], trained["vgg"], epochs=3, resume=True,
                    **dict(kw, scheme="cityscapes19"))


def test_gen_batch_function_inside_a_graph(trained):
    get_batches = course.gen_batch_function(trained["data"], (64, 128), seed=0)
    with tf.Graph().as_default():  # as in the course: called inside the training graph
        batches = list(get_batches(8))
    assert [len(b[0]) for b in batches] == [8, 8, 8, 8]
    images, labels = batches[0]
    assert images.shape == (8, 64, 128, 3) and images.dtype == np.float32
    assert labels.shape == (8, 64, 128) and set(np.unique(labels)) <= {0, 1, 2, 3, 4, 255}
    augmented = next(course.gen_batch_function(trained["data"], (64, 128), seed=0, augment=True)(2))
    assert augmented[0].shape == (2, 64, 128, 3) and not np.array_equal(augmented[0], images[:2])
    onehot = next(course.gen_batch_function(trained["data"], (64, 128), seed=0, one_hot=True)(2))[1]
    assert onehot.shape == (2, 64, 128, 5)
    assert set(np.unique(onehot.sum(-1))) <= {0.0, 1.0}


def test_save_inference_samples_from_a_course_session(trained, tmp_path):
    with tf.Graph().as_default(), tf1.Session() as sess:
        image, keep, l3, l4, l7 = fcn.load_vgg(sess, trained["vgg"])
        out = fcn.layers(l3, l4, l7, 5, skip_scales=None)
        logits = tf.reshape(out, (-1, 5))
        tf1.train.Saver(inference.model_variables()).restore(
            sess, inference.run_checkpoint(trained["run_dir"]))
        run_dir = course.save_inference_samples(str(tmp_path), trained["data"], sess, SHAPE, logits,
                                                keep, image, split="val")
    files = sorted(os.listdir(run_dir))
    val = datasets.find_dataset(trained["data"]).splits["val"]
    assert len(files) == 2 * len(val)
    first = datasets.load_image(val[0].image)
    overlay = datasets.load_image(os.path.join(run_dir, files[0]))
    assert overlay.shape == first.shape


def test_resumed_run_equals_uninterrupted_run(trained, tmp_path):
    """Same data order, augmentation and optimizer state after a resume: the weights match
    a run that was never stopped (the epoch is part of the data seed)."""
    kw = dict(runs_dir=str(tmp_path), seed=3, **dict(FROM_SCRATCH, augment=True))
    straight = trainer.train(trained["data"], trained["vgg"], run="straight", epochs=2, **kw)
    trainer.train(trained["data"], trained["vgg"], run="stopped", epochs=1, **kw)
    resumed = trainer.train(trained["data"], trained["vgg"], run="stopped", epochs=2, resume=True, **kw)

    def weights(run):
        ckpt = tf1.train.load_checkpoint(tf1.train.latest_checkpoint(os.path.join(run, "checkpoints")))
        return ckpt.get_tensor("fcn8/score_fc7/weights"), ckpt.get_tensor("conv1_1/weights")

    for a, b in zip(weights(straight["run_dir"]), weights(resumed["run_dir"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert straight["history"][1]["loss"] == pytest.approx(resumed["history"][1]["loss"], rel=1e-4)
