"""The peer: the same FCN-8s written as a plain Keras 3 functional model.

This is what a user would write instead of the TF1-style graph: ``Conv2D``,
``MaxPooling2D``, ``Conv2DTranspose`` and ``Add`` layers, compiled with Keras'
defaults (which for the TensorFlow backend means XLA, ``jit_compile="auto"``).
Same architecture, shapes and preprocessing as ours: VGG16 with fc6/fc7 as 7x7 and
1x1 convolutions and dropout, pool4 x 0.01 and pool3 x 0.0001 before their score
layers, bilinear-initialised transposed convolutions, Adam and pixel-wise
cross-entropy that ignores label 255.  Weights are random: the benchmark times
arithmetic, not accuracy.
"""
import time

import common  # bench/ is on sys.path as the script's folder
import keras
import numpy as np

from roadseg import fcn
from roadseg import vgg as vgg_module


def fcn8(num_classes, image_shape=common.IMAGE_SHAPE, width=1.0):
    """A Keras functional FCN-8s: float32 RGB 0..255 images -> logits ``[N, H, W, C]``.

    ``width`` scales VGG's channel counts as ``vgg.build_vgg_savedmodel`` does."""
    from keras import layers as L
    inputs = keras.Input((*image_shape, 3))
    mean = np.array(vgg_module.IMAGENET_MEAN_BGR, np.float32)
    x = L.Lambda(lambda t: keras.ops.flip(t, axis=-1) - mean, name="caffe_preprocess")(inputs)
    pools = []
    for name, _, channels, k in vgg_module.VGG16_LAYERS:
        channels = max(1, int(round(channels * width)))
        x = L.Conv2D(channels, k, padding="same", activation="relu", name=name)(x)
        if name in ("fc6", "fc7"):
            x = L.Dropout(0.5, name=f"drop_{name}")(x)
        if name in vgg_module.POOL_AFTER:
            x = L.MaxPooling2D(2, padding="same", name=f"pool{len(pools) + 1}")(x)
            pools.append(x)

    def score(t, name):
        return L.Conv2D(num_classes, 1, name=name,
                        kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.01))(t)

    def upsample(t, factor, name):
        kernel = fcn.bilinear_kernel(2 * factor, num_classes)
        return L.Conv2DTranspose(num_classes, 2 * factor, strides=factor, padding="same",
                                 use_bias=False, name=name,
                                 kernel_initializer=keras.initializers.Constant(kernel))(t)

    pool4 = L.Rescaling(0.01, name="scale_pool4")(pools[3])
    pool3 = L.Rescaling(0.0001, name="scale_pool3")(pools[2])
    fuse4 = L.Add(name="fuse_pool4")([upsample(score(x, "score_fc7"), 2, "upscore2"),
                                      score(pool4, "score_pool4")])
    fuse3 = L.Add(name="fuse_pool3")([upsample(fuse4, 2, "upscore_pool4"),
                                      score(pool3, "score_pool3")])
    logits = upsample(fuse3, 8, "upscore8")
    return keras.Model(inputs, logits, name="fcn8_keras")


def compiled(num_classes, jit_compile="auto", width=1.0):
    """``fcn8`` compiled for training as a user would: Adam, sparse cross-entropy."""
    net = fcn8(num_classes, width=width)
    net.compile(optimizer=keras.optimizers.Adam(1e-4),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=255),
                jit_compile=jit_compile)
    return net


class StepTimer(keras.callbacks.Callback):
    """Wall-clock and process CPU time of every ``fit`` / ``predict`` step (end of one
    batch to the end of the next, so fetching the batch counts too)."""

    def __init__(self):
        super().__init__()
        self.marks = []

    def _begin(self, batch, logs=None):
        if not self.marks:
            self.marks.append((time.perf_counter(), time.process_time()))

    def _end(self, batch, logs=None):
        self.marks.append((time.perf_counter(), time.process_time()))

    on_train_batch_begin = on_predict_batch_begin = _begin
    on_train_batch_end = on_predict_batch_end = _end

    def timing(self, skip):
        """``dict(times, cpu_times)`` of the steps after the first ``skip`` (warm-up)."""
        wall, cpu = np.diff(np.array(self.marks), axis=0).T
        return dict(times=list(wall[skip:]), cpu_times=list(cpu[skip:]))
