"""The OpenVINO benchmark pieces (issue 23): the product's OpenVINO models of a full-width run,
and OpenVINO's own GEMM limit.

* ``bench_run(vgg, work)`` -- a run folder (``config.json`` + a checkpoint) holding the
  full-width random VGG16 and a freshly initialised decoder (seed 0), so that the product's
  own export paths run on it unchanged: ``export.export`` (SavedModel),
  ``openvino_model.export_openvino`` (none / int8).  Made once per VGG16 build, kept in
  ``work``.
* ``exported(vgg, work, quantize)`` -- that run's OpenVINO model folder (made once);
  ``savedmodel(vgg, work)`` its SavedModel export.  Both, and ``bench_run``, take a
  ``scheme`` and ``image_shape`` too (default: 19 classes at 256x512).
* ``gemm_model(n, reps, int8)`` -- a chain of ``reps`` n x n MatMuls as an OpenVINO model
  (with FakeQuantize on both operands of every product for int8: OpenVINO then runs them
  as int8 GEMMs), the limit rows' workload.
"""
import os

import common  # bench/ is on sys.path as the script's folder
import numpy as np

DEMO = "demo_256x512"


def _stamp(vgg):
    return str(os.path.getmtime(os.path.join(vgg, "saved_model.pb")))


def bench_run(vgg, work, scheme=common.SCHEME, image_shape=common.IMAGE_SHAPE):
    """A run folder of the random-weight model of ``vgg`` at ``image_shape`` (default 256x512)
    with ``scheme``'s classes (default 19) (cached)."""
    import tensorflow as tf

    from roadseg import demo_scenes, inference, model
    from roadseg.run_folders import write_json
    tf1 = tf.compat.v1
    run = os.path.join(work, f"openvino_run_{os.path.basename(vgg)}{_variant(scheme, image_shape)}")
    stamp = os.path.join(run, "vgg_stamp")
    if os.path.isfile(stamp) and open(stamp).read() == _stamp(vgg):
        return run
    if os.path.isdir(run):
        import shutil
        shutil.rmtree(run)
    data = os.path.join(work, DEMO)
    demo_scenes.make_demo_data(data, n=16, seed=0, size=common.IMAGE_SHAPE, val_fraction=0.0)
    spec = model.ModelSpec(scheme, tuple(image_shape), os.path.abspath(vgg),
                           skip_scales=(0.01, 0.0001), l2_scale=1e-3)
    # written in place; the stamp, written last, marks it complete (a staged folder would not
    # do: the checkpoint index names the folder it was saved in)
    os.makedirs(os.path.join(run, "checkpoints"))
    with tf.Graph().as_default(), tf1.Session() as sess:
        tf1.set_random_seed(0)
        inference.build_inference(sess, spec)
        sess.run(tf1.variables_initializer([v for v in tf1.global_variables()
                                            if v.op.name.startswith("fcn8/")]))
        tf1.train.Saver(inference.model_variables()).save(
            sess, os.path.join(run, "checkpoints", "model.ckpt"), global_step=0)
    write_json(os.path.join(run, "config.json"), spec.run_config({"data": os.path.abspath(data)}))
    with open(stamp, "w") as f:
        f.write(_stamp(vgg))
    return run


def _variant(scheme, image_shape):
    """The folder-name suffix of a bench run that is not the default 19 classes at 256x512."""
    same = scheme == common.SCHEME and tuple(image_shape) == tuple(common.IMAGE_SHAPE)
    return "" if same else f"_{scheme}_{image_shape[0]}x{image_shape[1]}"


def exported(vgg, work, quantize="none", calibration=8, scheme=common.SCHEME,
             image_shape=common.IMAGE_SHAPE):
    """The bench run (``bench_run``) exported by ``openvino_model.export_openvino`` (cached);
    int8 is calibrated on ``calibration`` demo scenes of the run's data."""
    from roadseg import openvino_model
    run = bench_run(vgg, work, scheme, image_shape)
    out = os.path.join(work, f"openvino_{quantize}_{os.path.basename(vgg)}{_variant(scheme, image_shape)}")
    stamp = os.path.join(run, "vgg_stamp")
    info = os.path.join(out, "export_info.json")
    if os.path.isfile(info) and os.path.getmtime(info) > os.path.getmtime(stamp):
        return out
    if os.path.isdir(out):
        import shutil
        shutil.rmtree(out)
    cal = None
    if quantize == "int8":   # a folder of the first `calibration` training scenes
        from roadseg import litert
        cal = os.path.join(work, f"calibration_{calibration}")
        os.makedirs(cal, exist_ok=True)
        for path in litert.calibration_images(os.path.join(work, DEMO), 16)[:calibration]:
            link = os.path.join(cal, os.path.basename(path))
            if not os.path.lexists(link):
                os.symlink(os.path.abspath(path), link)
    openvino_model.export_openvino(run, out, quantize, cal)
    return out


def savedmodel(vgg, work, scheme=common.SCHEME, image_shape=common.IMAGE_SHAPE):
    """The bench run (``bench_run``) as ``segment.py export`` writes it (a SavedModel, run by
    TensorFlow whatever backend a run folder would get), made once."""
    from roadseg import export
    run = bench_run(vgg, work, scheme, image_shape)
    out = os.path.join(work, f"savedmodel_{os.path.basename(vgg)}{_variant(scheme, image_shape)}")
    stamp = os.path.join(run, "vgg_stamp")
    if os.path.isfile(os.path.join(out, "export_info.json")) and \
            os.path.getmtime(os.path.join(out, "export_info.json")) > os.path.getmtime(stamp):
        return out
    if os.path.isdir(out):
        import shutil
        shutil.rmtree(out)
    return export.export(run, out)


def gemm_model(n, reps, int8=False):
    """``reps`` chained n x n MatMuls (each needs the previous one) as an ``openvino.Model``
    with a parameter input [n, n]; ``int8``: both operands of every MatMul through a
    FakeQuantize with 256 levels (OpenVINO's int8 GEMM pattern)."""
    import openvino as ov
    from openvino import opset13 as ops
    rng = np.random.default_rng(0)
    x = ops.parameter([n, n], ov.Type.f32, name="a")
    b = ops.constant(rng.standard_normal((n, n), np.float32) / np.float32(np.sqrt(n)))

    def fq(t, limit, levels):   # as NNCF writes them: activations i8 [-128s, 127s], weights [-127s, 127s]
        low = -limit * (128 / 127 if levels == 256 else 1)
        lo, hi = ops.constant(np.float32(low)), ops.constant(np.float32(limit))
        return ops.fake_quantize(t, lo, hi, lo, hi, levels)

    y = x
    for _ in range(reps):
        y = ops.matmul(fq(y, 4.0, 256) if int8 else y, fq(b, 0.1, 255) if int8 else b, False, False)
    return ov.Model([ops.result(y)], [x], "gemm")


def split_over_streams(compiled, data):
    """A step that runs ``data`` split over the compiled model's optimal number of requests
    at once (OpenVINO's THROUGHPUT hint gives each its stream), waiting for all."""
    import openvino as ov
    queue = ov.AsyncInferQueue(compiled, compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    parts = np.array_split(data, len(queue))

    def step():
        for part in parts:
            queue.start_async({0: part})
        queue.wait_all()
    return step
