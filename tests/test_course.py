"""Course code against the project, with only the TensorFlow import changed.

The student-style code below is what a course solution does: the course ``main.py``'s
``run()`` (KITTI road, 2 classes) and the seed notebook's ``run()`` (the seed layout,
5 one-hot classes in an int32 placeholder, ``gen_video_output``), both calling
``load_vgg``, ``layers``, ``optimize``, ``train_nn``, ``sess.run(tf.global_variables_initializer())``
and the helpers of ``helper.py``.  The two runs execute in a fresh Python as a student's
does -- ``import tensorflow.compat.v1 as tf; tf.disable_v2_behavior()`` (this file run as a
script) -- in a folder holding ``./data`` (small KITTI- or seed-shaped trees built here, the
width-1/16 random VGG16 of conftest.py as ``data/vgg``) and ``./runs``.  The other tests
check single helpers in this process, inside graphs of their own.
"""
import gc
import io
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow.compat.v1 as tf  # a course solution's one changed line (see __main__)
from PIL import Image

import helper
import project_tests as tests
from roadseg import datasets, demo_scenes, export, inference, metrics, model, run_folders, trainer, video
from roadseg.fcn import layers, load_vgg, optimize, train_nn
from roadseg.schemes import IGNORE, get_scheme

ROOT = Path(__file__).resolve().parent.parent
MAGENTA, RED, BLACK = (255, 0, 255), (255, 0, 0), (0, 0, 0)


# ============================================================ student-style code (course solutions)
def course_run():
    """The course main.py's run() as a student completes it; small sizes for a CPU.
    (The course's run() begins with tests.test_for_kitti_dataset(data_dir), which wants all
    289 KITTI images; the tree here has a few.)"""
    num_classes = 2
    image_shape = (64, 192)
    data_dir = './data'
    runs_dir = './runs'
    epochs = 2
    batch_size = 2

    helper.maybe_download_pretrained_vgg(data_dir)

    with tf.Session() as sess:
        vgg_path = os.path.join(data_dir, 'vgg')
        get_batches_fn = helper.gen_batch_function(os.path.join(data_dir, 'data_road/training'),
                                                   image_shape)

        input_image, keep_prob, layer3_out, layer4_out, layer7_out = load_vgg(sess, vgg_path)
        nn_last_layer = layers(layer3_out, layer4_out, layer7_out, num_classes)
        correct_label = tf.placeholder(tf.float32, [None, None, None, num_classes])
        learning_rate = tf.placeholder(tf.float32)
        logits, train_op, cross_entropy_loss = optimize(nn_last_layer, correct_label,
                                                        learning_rate, num_classes)

        sess.run(tf.global_variables_initializer())
        train_nn(sess, epochs, batch_size, get_batches_fn, train_op, cross_entropy_loss,
                 input_image, correct_label, keep_prob, learning_rate)

        helper.save_inference_samples(runs_dir, data_dir, sess, image_shape, logits, keep_prob,
                                      input_image)


def seed_run():
    """The seed notebook's run(): Cityscapes colour labels in data/training, 5 classes,
    one-hot labels through an int32 placeholder, a video at the end."""
    num_classes = 5
    image_shape = (64, 128)
    data_dir = './data'

    helper.maybe_download_pretrained_vgg(data_dir)

    with tf.Session() as sess:
        vgg_path = os.path.join(data_dir, 'vgg')
        get_batches_fn = helper.gen_batch_function(os.path.join(data_dir, 'training'), image_shape)

        epochs = 1
        batch_size = 2
        image_input, keep_prob, layer3, layer4, layer7 = load_vgg(sess, vgg_path)
        output = layers(layer3, layer4, layer7, num_classes)
        correct_label = tf.placeholder(dtype=tf.int32, shape=[None, None, None, num_classes])
        learning_rate = tf.placeholder(dtype=tf.float32)
        logits, train_op, cross_entropy_loss = optimize(output, correct_label, learning_rate,
                                                        num_classes)

        sess.run(tf.global_variables_initializer())
        train_nn(sess, epochs, batch_size, get_batches_fn, train_op, cross_entropy_loss, image_input,
                 correct_label, keep_prob, learning_rate)

        video_file = 'project_video.mp4'
        helper.gen_video_output(sess, logits, keep_prob, image_input, video_file, image_shape)
        print("Finished..")


def student_load_vgg(sess, vgg_path):
    """load_vgg as course solutions wrote it: the loader, then the tensors by name."""
    tf.saved_model.loader.load(sess, ['vgg16'], vgg_path)
    graph = tf.get_default_graph()
    names = ('image_input:0', 'keep_prob:0', 'layer3_out:0', 'layer4_out:0', 'layer7_out:0')
    return tuple(graph.get_tensor_by_name(name) for name in names)


def initializer_keeps_weights(vgg_path):
    """load the VGG16, run global_variables_initializer(): True when no weight changed."""
    with tf.Graph().as_default(), tf.Session() as sess:
        student_load_vgg(sess, vgg_path)
        encoder = tf.global_variables()
        before = sess.run(encoder)
        sess.run(tf.global_variables_initializer())
        return bool(encoder) and all(np.array_equal(a, b) for a, b in zip(before, sess.run(encoder)))


# ============================================================ data trees
def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


def kitti_scene(rng, h=80, w=240):
    """(image, colour label) like KITTI road's: road (magenta) in the lower part, red not-road
    above, a black (void) strip at the top; the road is dark and smooth, the rest bright noise."""
    image = rng.integers(120, 256, (h, w, 3)).astype(np.uint8)
    label = np.empty((h, w, 3), np.uint8)
    label[:] = RED
    horizon = int(rng.integers(h // 3, h // 2))
    label[horizon:] = MAGENTA
    image[horizon:] = rng.integers(40, 60, (h - horizon, w, 1))
    label[:4] = BLACK
    return image, label


def make_kitti_tree(data, n_train=4, n_test=2, seed=0):
    """data/data_road/{training,testing} as KITTI road ships it (few, small images)."""
    rng = np.random.default_rng(seed)
    base = data / "data_road"
    for i in range(n_train):
        image, label = kitti_scene(rng)
        _png(base / "training" / "image_2" / f"um_{i:06d}.png", image)
        _png(base / "training" / "gt_image_2" / f"um_road_{i:06d}.png", label)
        _png(base / "training" / "gt_image_2" / f"um_lane_{i:06d}.png", label)  # not used
    for i in range(n_test):
        _png(base / "testing" / "image_2" / f"uu_{i:06d}.png", kitti_scene(rng)[0])
    return data


def make_seed_tree(data, tmp, n=4):
    """data/training/{image,gt_image} and data/testing/image as the seed had them: Cityscapes
    frames with their colour labels (the demo scenes)."""
    demo = Path(demo_scenes.make_demo_data(str(tmp / "demo"), n=n + 1, seed=1, size=(96, 192),
                                           val_fraction=0.2))
    for split, folder in (("train", "training"), ("val", "testing")):
        for image in sorted((demo / "leftImg8bit" / split).rglob("*_leftImg8bit.png")):
            (data / folder / "image").mkdir(parents=True, exist_ok=True)
            shutil.copy(image, data / folder / "image" / image.name)
            if folder == "training":
                color = demo / "gtFine" / split / image.parent.name / image.name.replace(
                    "_leftImg8bit.png", "_gtFine_color.png")
                (data / folder / "gt_image").mkdir(exist_ok=True)
                shutil.copy(color, data / folder / "gt_image" / color.name)
    return data


def _run_as_student(mode, cwd):
    """Run this file as a course solution runs: a fresh Python, TF 1 behaviour, cwd = cwd."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), mode], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


# ============================================================ the two runs
def test_course_main_runs_as_students_wrote_it(vgg_dir, tmp_path):
    data = make_kitti_tree(tmp_path / "data")
    shutil.copytree(vgg_dir, data / "vgg")
    out = _run_as_student("course", tmp_path)
    assert out.count("Tests Passed") == 4            # the course's four function tests
    assert "initializer keeps the VGG16 weights" in out
    (run,) = (tmp_path / "runs").iterdir()
    for i in range(2):
        overlay = np.asarray(Image.open(run / f"uu_{i:06d}.png"))
        classes = np.asarray(Image.open(run / f"uu_{i:06d}_classes.png"))
        assert overlay.shape == (80, 240, 3) and classes.shape == (80, 240)
        assert set(np.unique(classes)) <= {0, 1}


def test_seed_notebook_runs_as_students_wrote_it(vgg_dir, tmp_path):
    data = make_seed_tree(tmp_path / "data", tmp_path)
    shutil.copytree(vgg_dir, data / "vgg")
    video.make_test_video(str(tmp_path / "project_video.mp4"), 5, size=(160, 96))
    out = _run_as_student("seed", tmp_path)
    assert "Finished.." in out
    (run,) = (tmp_path / "runs").iterdir()   # a new runs/<timestamp>/, not beside the input
    frames = video.read_frames(str(run / "project_video_overlay.mp4"), range(10))
    assert len(frames) == 5 and frames[0].shape == (96, 160, 3)


# ============================================================ single helpers
def test_course_way_yields_the_course_labels(tmp_path):
    """data/data_road/training -> boolean one-hot, channel 0 not road (red), 1 road (magenta);
    KITTI's black (void) pixels are all-False rows, which the loss ignores."""
    data = make_kitti_tree(tmp_path / "data", n_train=3)
    batches = list(helper.gen_batch_function(str(data / "data_road" / "training"), (64, 192))(2))
    assert [len(images) for images, _ in batches] == [2, 1]
    images, labels = batches[0]
    assert images.shape == (2, 64, 192, 3) and images.dtype == np.float32
    assert labels.shape == (2, 64, 192, 2) and labels.dtype == bool
    assert labels[:, -1, :, 1].all() and not labels[:, -1, :, 0].any()     # bottom: road
    assert labels[:, 10, :, 0].all() and not labels[:, 10, :, 1].any()     # above: not road
    assert not labels[:, 0].any()                                          # top: void
    # the modern call on the same data: class ids of kitti2, 255 = void
    ids = next(helper.gen_batch_function(str(data), (64, 192), scheme="kitti2", seed=0)(3))[1]
    assert ids.dtype == np.int32 and set(np.unique(ids)) == {0, 1, IGNORE}


def test_seed_way_yields_the_seeds_five_channels(tmp_path):
    data = make_seed_tree(tmp_path / "data", tmp_path)
    get_batches = helper.gen_batch_function(str(data / "training"), (96, 192))
    images, labels = next(get_batches(4))
    assert labels.shape == (4, 96, 192, 5) and labels.dtype == bool
    assert (labels.sum(-1) == 1).all()                 # the seed has no void: one class each
    # the seed's order: road, car, person, traffic light, background (the rest)
    seed4 = np.stack([datasets.load_label(s, get_scheme("seed4"))
                      for s in datasets.find_dataset(str(data)).splits["train"]])
    counts = labels.reshape(-1, 5).sum(0)
    want = np.bincount(seed4.ravel(), minlength=5)     # seed4: background, road, car, person, light
    np.testing.assert_array_equal(counts, want[[1, 2, 3, 4, 0]])


def test_batches_leave_the_callers_graph_and_session_alone(tmp_path):
    """A course training loop: the caller's graph and session stay the defaults while it
    iterates, and its own exception reaches it (not 'Nesting violated')."""
    data = make_kitti_tree(tmp_path / "data", n_train=4)
    get_batches = helper.gen_batch_function(str(data / "data_road" / "training"), (64, 192))
    threads = threading.active_count()
    graph = tf.Graph()
    with pytest.raises(ValueError, match="the caller's own error"):
        with graph.as_default(), tf.Session(graph=graph) as sess:
            for images, labels in get_batches(2):
                assert tf.get_default_graph() is graph and tf.get_default_session() is sess
                raise ValueError("the caller's own error")
    gc.collect()
    assert threading.active_count() == threads          # the producer thread has ended
    with graph.as_default(), tf.Session(graph=graph) as sess:   # and everything still works
        assert sum(len(images) for images, _ in get_batches(3)) == 4


def test_batch_errors_reach_the_caller(tmp_path):
    data = make_kitti_tree(tmp_path / "data", n_train=2)
    (data / "data_road" / "training" / "image_2" / "um_000001.png").write_bytes(b"broken")
    with pytest.raises(Exception, match="cannot decode image .*um_000001.png"):
        list(helper.gen_batch_function(str(data / "data_road" / "training"), (64, 192))(2))


def _course_graph(sess, vgg_path, num_classes):
    """load_vgg -> layers -> optimize, initialised as course solutions do."""
    image, keep, l3, l4, l7 = load_vgg(sess, vgg_path)
    label = tf.placeholder(tf.float32, [None, None, None, num_classes])
    logits, _, _ = optimize(layers(l3, l4, l7, num_classes), label, 1e-3, num_classes)
    sess.run(tf.global_variables_initializer())
    return image, keep, logits


def test_test_output_and_samples_take_the_class_count_from_the_logits(vgg_dir, tmp_path):
    data = make_kitti_tree(tmp_path / "data")
    with tf.Graph().as_default(), tf.Session() as sess:
        image, keep, logits = _course_graph(sess, vgg_dir, 2)
        outputs = list(helper.gen_test_output(sess, logits, keep, image,
                                              str(data / "data_road" / "testing"), (64, 192)))
        run_dir = helper.save_inference_samples(str(tmp_path / "runs"), str(data), sess, (64, 192),
                                                logits, keep, image)
        with pytest.raises(Exception, match="logits have 2 classes but scheme 'road4' has 5"):
            helper.save_inference_samples(str(tmp_path / "runs"), str(data), sess, (64, 192),
                                          logits, keep, image, scheme="road4")
    assert [name for name, _ in outputs] == ["uu_000000.png", "uu_000001.png"]
    assert all(overlay.shape == (80, 240, 3) for _, overlay in outputs)
    np.testing.assert_array_equal(outputs[0][1], np.asarray(Image.open(Path(run_dir) / "uu_000000.png")))


def test_dl_progress_is_a_urlretrieve_hook():
    with helper.DLProgress(unit="B", file=io.StringIO()) as bar:
        for block in range(4):
            bar.hook(block, 100, 350)
    assert bar.total == 350 and bar.n == 300
    assert {"DLProgress", "gen_test_output", "gen_video_output"} <= set(helper.__all__)


def course_like_vgg(path):
    """A SavedModel like the course's vgg.zip: TF 1 ref variables with ordinary random
    initializers (as a model converted by hand would have) and the course's tensor names."""
    with tf.Graph().as_default(), tf.Session() as sess:
        image = tf.placeholder(tf.float32, [None, None, None, 3], name="image_input")
        keep = tf.placeholder(tf.float32, name="keep_prob")
        x = image
        for i, name in enumerate(("layer3_out", "layer4_out", "layer7_out")):
            w = tf.get_variable(f"conv{i}/filter", [3, 3, 3 if i == 0 else 4, 4], use_resource=False,
                                initializer=tf.truncated_normal_initializer(stddev=0.1))
            x = tf.nn.max_pool2d(tf.nn.relu(tf.nn.conv2d(x, w, 1, "SAME")), 2, 2, "SAME")
            x = tf.identity(tf.nn.dropout(x, rate=1 - keep) if i == 2 else x, name=name)
        sess.run(tf.global_variables_initializer())
        builder = tf.saved_model.Builder(str(path))
        builder.add_meta_graph_and_variables(sess, ["vgg16"])
        builder.save()
    return path


def test_the_course_zip_keeps_its_weights_through_the_initializer(tmp_path):
    """maybe_download_pretrained_vgg patches the extracted model (and a complete one found
    in place): the students' initializer call keeps the (pretrained) weights."""
    model = course_like_vgg(tmp_path / "built" / "vgg")
    assert not initializer_keeps_weights(str(model))  # unpatched: the initializer re-draws them
    data = tmp_path / "data"
    data.mkdir()
    with zipfile.ZipFile(data / "vgg.zip", "w") as zf:
        for file in model.rglob("*"):
            zf.write(file, "vgg/" + file.relative_to(model).as_posix())
    assert helper.maybe_download_pretrained_vgg(str(data)) == str(data / "vgg")
    assert initializer_keeps_weights(str(data / "vgg"))
    assert (data / "vgg.zip").exists()                # a zip the user brought is kept
    shutil.copytree(model, tmp_path / "by_hand" / "vgg")  # extracted by hand, earlier
    helper.maybe_download_pretrained_vgg(str(tmp_path / "by_hand"))
    assert initializer_keeps_weights(str(tmp_path / "by_hand" / "vgg"))


# ============================================================ one inference path
def test_every_inference_path_gives_the_same_class_maps(vgg_dir, tmp_path):
    """The notebook's session_predict_fn, load_predictor on a run in TensorFlow (segment.py
    predict --backend tensorflow), an export and training's validation: the same class maps
    for the same weights and images (the OpenVINO backend: test_openvino.py)."""
    data = demo_scenes.make_demo_data(str(tmp_path / "demo"), n=10, seed=0, size=(128, 256))
    result = trainer.train(data, vgg_dir, runs_dir=str(tmp_path / "runs"), run="r",
                           image_shape=[64, 128], epochs=1, batch_size=2, log=lambda *a: None)
    run_dir = result["run_dir"]
    val = datasets.find_dataset(data).splits["val"]
    images = np.stack([datasets.load_image(s.image) for s in val])
    spec = model.ModelSpec.from_run(run_dir)
    with tf.Graph().as_default(), tf.Session() as sess:
        image, keep, l3, l4, l7 = load_vgg(sess, vgg_dir)
        out = layers(l3, l4, l7, 5, skip_scales=spec.skip_scales, l2_scale=spec.l2_scale)
        logits = tf.reshape(out, (-1, 5))
        tf.train.Saver(inference.model_variables()).restore(sess, run_folders.run_checkpoint(run_dir))
        notebook = helper.session_predict_fn(sess, [64, 128], logits, keep, image, 5)(images)
    exported = export.export(run_dir, str(tmp_path / "export"))
    with inference.load_predictor(run_dir, backend="tensorflow") as live, \
            inference.load_predictor(exported) as served:
        np.testing.assert_array_equal(live.predict(images), notebook)
        np.testing.assert_array_equal(served.predict(images), notebook)
        scores = metrics.evaluate(live.predict, val, live.scheme, progress=False)
    assert result["history"][-1]["miou"] == scores["mean_iou"]


if __name__ == "__main__":  # a course solution's process: TF 1 behaviour throughout
    tf.disable_v2_behavior()
    if sys.argv[1] == "course":
        tests.test_load_vgg(load_vgg, tf)
        tests.test_layers(layers)
        tests.test_optimize(optimize)
        tests.test_train_nn(train_nn)
        assert initializer_keeps_weights("./data/vgg")
        print("global_variables_initializer: the initializer keeps the VGG16 weights")
        course_run()
    else:
        seed_run()


def test_gen_video_output_run_again_writes_a_new_run_folder(vgg_dir, tmp_path, monkeypatch):
    """Re-running the seed notebook: the second gen_video_output works (the seed overwrote its
    output; refusing the first one's file made the rerun fail) and overwrites nothing."""
    monkeypatch.chdir(tmp_path)
    video.make_test_video("project_video.mp4", 3, size=(96, 64))
    with tf.Graph().as_default(), tf.Session() as sess:
        image, keep, logits = _course_graph(sess, vgg_dir, 5)
        first = helper.gen_video_output(sess, logits, keep, image, "project_video.mp4", (64, 96))
        before = Path(first).read_bytes()
        second = helper.gen_video_output(sess, logits, keep, image, "project_video.mp4", (64, 96))
        with pytest.raises(Exception, match="no_such.mp4 does not exist"):
            helper.gen_video_output(sess, logits, keep, image, "no_such.mp4", (64, 96))
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 2   # the failed third call leaves no empty folder
    assert sorted(Path(p).parent.name for p in (first, second)) == runs
    assert all(Path(p).name == "project_video_overlay.mp4" for p in (first, second))
    assert Path(first).read_bytes() == before and not (tmp_path / "project_video_overlay.mp4").exists()
    frames = [video.read_frames(p, range(5)) for p in (first, second)]
    assert len(frames[0]) == 3 and frames[0][0].shape == (64, 96, 3)
    np.testing.assert_array_equal(np.stack(frames[0]), np.stack(frames[1]))
