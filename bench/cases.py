"""One benchmark case per process: ``python bench/cases.py '<json spec>'``.

``run.py`` starts every case in a fresh process so that environment switches
(``TF_ENABLE_ONEDNN_OPTS``, ``TF_XLA_FLAGS``) take effect before TensorFlow loads and
so that each case's peak resident memory (``ru_maxrss``) is its own.  The spec is a
JSON object with ``case`` (a name in ``CASES``) and that case's parameters; the last
line printed is ``RESULT <json>`` with the measured figures.

Every case returns at least ``rate`` (images, frames or GFLOP per second, see
``unit``) and ``times`` (the timed step times, seconds).
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import common  # bench/ is on sys.path as the script's folder

common.quiet_tensorflow()


def _config(spec):
    return common.session_config(spec.get("intra"), spec.get("inter"), spec.get("xla", False),
                                 spec.get("precision", "fp32"))


def _scheme():
    from roadseg.schemes import get_scheme
    return get_scheme(common.SCHEME)


def _demo_samples(root, n, size):
    """Labelled samples of a demo set of ``n`` scenes of ``size`` (made once, reused)."""
    from roadseg import datasets, demo_scenes
    demo_scenes.make_demo_data(root, n=n, seed=0, size=size, val_fraction=0.0)
    return datasets.find_dataset(root).splits["train"]


# --------------------------------------------------------------------------- cases
def prepare(spec):
    """Build the random-weight VGG16 SavedModel at ``spec["vgg"]`` (the benchmarks' own
    work folder) unless it exists and is newer than vgg.py."""
    import shutil

    from roadseg import vgg
    model_file = os.path.join(spec["vgg"], "saved_model.pb")
    if os.path.exists(model_file) and os.path.getmtime(model_file) < os.path.getmtime(vgg.__file__):
        shutil.rmtree(spec["vgg"])
    if not os.path.exists(spec["vgg"]):
        vgg.build_vgg_savedmodel(spec["vgg"], source="random", width=spec.get("width", 1.0), seed=0)
    vgg.check_vgg_dir(spec["vgg"])
    return {}


def gemm(spec):
    """GEMM: a chain of ``reps`` n x n matmuls in one session.run (sequential); fp32, or
    ``dtype="bfloat16"`` (bf16 operands and products, as oneDNN runs them on AVX512_BF16/AMX)."""
    import numpy as np
    import tensorflow as tf
    tf1 = tf.compat.v1
    n, reps = spec.get("n", 4096), spec.get("reps", 4)
    dtype = tf.as_dtype(spec.get("dtype", "float32"))
    with tf.Graph().as_default(), tf1.Session(config=_config(spec)) as sess:
        rng = np.random.default_rng(0)
        a = tf1.Variable(rng.standard_normal((n, n), np.float32))  # variables: not folded away
        b = tf1.Variable(rng.standard_normal((n, n), np.float32) / np.float32(np.sqrt(n)))
        sess.run(tf1.global_variables_initializer())
        a, b = tf.cast(a, dtype), tf.cast(b, dtype)
        x = a
        for _ in range(reps):  # each product needs the previous one: no overlap
            x = tf.matmul(x, b)
        out = tf.reduce_sum(tf.cast(x[:1, :1], tf.float32))
        timing = common.time_steps(lambda: sess.run(out), spec["warmup"], spec["iters"])
    return dict(common.rates(timing, 2 * n ** 3 * reps / 1e9), unit="GFLOP/s")


def flops(spec):
    """FLOPs per image: forward (batch 1) and one training step at each batch size."""
    import ours
    out = dict(forward=ours.forward_flops(spec["vgg"]))
    for batch in spec.get("train_batches", []):
        out[f"train_b{batch}"] = ours.training_flops(spec["vgg"], batch)
    return out


def infer(spec):
    """Our inference graph on random uint8 256x512 batches, through ``feed_dict`` as the
    Predictor does; ``variant`` product / frozen / folded (see ours.inference)."""
    import numpy as np
    import ours
    import tensorflow as tf
    batch = spec["batch"]
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph, config=_config(spec)) as sess:
        images, classes, _ = ours.inference(sess, spec["vgg"], spec.get("variant", "product"))
        data = np.random.default_rng(0).integers(0, 256, (batch, *common.IMAGE_SHAPE, 3), np.uint8)
        timing = common.time_steps(lambda: sess.run(classes, {images: data}),
                                   spec["warmup"], spec["iters"])
    return dict(common.rates(timing, batch), unit="images/s")


def check_variants(spec):
    """How far the frozen and folded variants are from the product graph (sanity check):
    the largest logit difference relative to the logits' spread, and the share of
    pixels whose class differs (near-ties of random weights may flip)."""
    import numpy as np
    import ours
    import tensorflow as tf
    data = np.random.default_rng(1).integers(0, 256, (2, *common.IMAGE_SHAPE, 3), np.uint8)
    out = {}
    for variant in ours.INFERENCE_VARIANTS:
        graph = tf.Graph()
        with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
            images, classes, logits = ours.inference(sess, spec["vgg"], variant)
            out[variant] = sess.run([classes, logits], {images: data})
    maps, scores = out["product"]
    return {f"{v}_vs_product": dict(pixels_differ=float(np.mean(m != maps)),
                                    logit_diff=float(np.abs(s - scores).max() / scores.std()))
            for v, (m, s) in out.items() if v != "product"}


def train(spec):
    """One Adam step per call of ``trainer.build_training_graph`` -- the product's training
    graph, as ``segment.py train`` runs it -- at global batch ``batch`` on ``devices``
    logical CPU devices (MirroredStrategy; 1 = the one-device graph), in a session with the
    spec's threads / XLA / precision.  ``feed`` "pipeline": its tf.data input (demo scenes,
    augmentation, cache), as training runs; "feed_dict": one fixed batch fed from numpy
    every step, to compare.  Also the gradient bytes per step (the all-reduce volume)."""
    import numpy as np
    import tensorflow as tf

    from roadseg import distribute, trainer
    from roadseg.config import TrainConfig
    tf1 = tf.compat.v1
    batch, feed = spec["batch"], spec.get("feed", "pipeline")
    samples = _demo_samples(os.path.join(spec["work"], "demo_256x512"), 16, common.IMAGE_SHAPE)
    cfg = TrainConfig.from_dict(dict(scheme=common.SCHEME, image_shape=list(common.IMAGE_SHAPE),
                                     batch_size=batch, devices=spec.get("devices", 1))).validate()
    graph = tf.Graph()
    with graph.as_default():
        dist = distribute.Distribution(cfg).start()
        config = _config(spec)
        if dist.session_config is not None:
            config.MergeFrom(dist.session_config)
        with tf1.Session(dist.target, graph=graph, config=config) as sess:
            g = trainer.build_training_graph(sess, cfg, samples, spec["vgg"], dist)
            grad_bytes = sum(v.shape.num_elements() * v.dtype.size for v in tf1.trainable_variables())
            sess.run(g.data_init)
            feeds = {g.keep_prob: cfg.keep_prob, g.lr: cfg.lr}
            if feed == "feed_dict":
                rng = np.random.default_rng(0)
                feeds[g.images] = rng.integers(0, 256, (batch, *common.IMAGE_SHAPE, 3)).astype(np.float32)
                feeds[g.labels] = rng.integers(0, _scheme().num_classes, (batch, *common.IMAGE_SHAPE))

            def step():
                try:
                    sess.run(g.train_op, feeds)
                except tf.errors.OutOfRangeError:   # the epoch of 16 scenes ended: start the next
                    sess.run(g.data_init)
                    sess.run(g.train_op, feeds)

            timing = common.time_steps(step, spec["warmup"], spec["iters"])
    return dict(common.rates(timing, batch), unit="images/s", grad_bytes=grad_bytes,
                replicas=dist.replicas)


def input_pipeline(spec):
    """``input_pipeline.make_dataset`` images/s at 256x512 with augmentation, from full-size
    2048x1024 PNGs (decode + resize + augment) or from its in-memory cache after epoch 1."""
    from roadseg import input_pipeline
    n, batch, cached = spec["images"], spec["batch"], spec["cache"]
    samples = _demo_samples(os.path.join(spec["work"], f"demo_1024x2048_n{n}"), n, (1024, 2048))
    ds = input_pipeline.make_dataset(samples, _scheme(), common.IMAGE_SHAPE, batch, shuffle=True,
                               augment=True, seed=0, cache=True if cached else None, repeat=True)
    batches = iter(ds)
    warmup = -(-n // batch) if cached else spec["warmup"]  # a whole first epoch fills the cache
    timing = common.time_steps(lambda: next(batches), warmup, spec["iters"])
    timing.pop("cpu_times")  # the pipeline's threads work ahead: per-batch CPU time means nothing
    return dict(common.rates(timing, batch), unit="images/s")


def video(spec):
    """``video.process_video`` end to end on a generated 1280x720 clip, and the same
    predictor on the same (already decoded) frames just before and just after it:
    model-only frames/s from the median batch."""
    import imageio_ffmpeg
    import numpy as np
    import ours

    from roadseg import video as video_module
    scheme, batch, n = _scheme(), spec["batch"], spec["frames"]
    predictor = ours.new_predictor(spec["vgg"], _config(spec), spec.get("variant", "product"))
    with tempfile.TemporaryDirectory() as tmp:
        clip = video_module.make_test_video(os.path.join(tmp, "clip.mp4"), n, size=(1280, 720), fps=25)
        reader = imageio_ffmpeg.read_frames(clip)
        meta = next(reader)
        frames = np.stack([np.frombuffer(f, np.uint8).reshape(720, 1280, 3) for f in reader])
        chunks = [frames[i:i + batch] for i in range(0, len(frames), batch)]
        for _ in range(spec["warmup"]):
            predictor.predict(chunks[0])

        def model_pass():  # seconds per frame, batch by batch
            out = []
            for chunk in chunks:
                start = time.perf_counter()
                predictor.predict(chunk)
                out.append((time.perf_counter() - start) / len(chunk))
            return out

        per_frame = model_pass()  # the model alone just before and just after the video
        stats = video_module.process_video(clip, os.path.join(tmp, "out.mp4"), predictor.predict,
                                           scheme, batch_size=batch)
        per_frame += model_pass()
    predictor.close()
    return dict(rate=stats["frames_per_second"], unit="frames/s",
                model_only=1 / statistics.median(per_frame), model_seconds_per_frame=per_frame,
                frames=stats["frames"], size=list(meta["size"]), times=[stats["seconds"]])


def peer_infer(spec):
    """The Keras 3 peer's ``predict`` on a ``tf.data`` stream of random 256x512 images."""
    import numpy as np
    import peer
    import tensorflow as tf
    batch, warmup, iters = spec["batch"], spec["warmup"], spec["iters"]
    net = peer.compiled(_scheme().num_classes, spec.get("jit_compile", "auto"),
                         spec.get("width", 1.0))
    data = np.random.default_rng(0).integers(0, 256, (batch, *common.IMAGE_SHAPE, 3)).astype(np.float32)
    timer = peer.StepTimer()
    net.predict(tf.data.Dataset.from_tensors(data).repeat(), steps=warmup + iters, verbose=0,
                callbacks=[timer])
    return dict(common.rates(timer.timing(warmup), batch), unit="images/s")


def peer_train(spec):
    """The Keras 3 peer's ``fit`` on the same ``make_dataset`` input as ``train``."""
    import peer
    import tensorflow as tf

    from roadseg import input_pipeline
    batch, warmup, iters = spec["batch"], spec["warmup"], spec["iters"]
    samples = _demo_samples(os.path.join(spec["work"], "demo_256x512"), 16, common.IMAGE_SHAPE)
    ds = input_pipeline.make_dataset(samples, _scheme(), common.IMAGE_SHAPE, batch, shuffle=True,
                               augment=True, seed=0, cache=True, repeat=True)
    tf.random.set_seed(0)
    net = peer.compiled(_scheme().num_classes, spec.get("jit_compile", "auto"),
                         spec.get("width", 1.0))
    timer = peer.StepTimer()
    net.fit(ds, steps_per_epoch=warmup + iters, epochs=1, verbose=0, callbacks=[timer])
    return dict(common.rates(timer.timing(warmup), batch), unit="images/s")


def litert(spec):
    """``litert.LiteRTPredictor`` end to end (resize, LiteRT network, head) on random uint8
    256x512 images, one per interpreter call; ``quantize`` none / float16 / int8 (int8
    calibrated on ``calibration`` demo scenes at 256x512)."""
    import numpy as np
    import ours

    from roadseg import litert as litert_module
    batch, quantize = spec["batch"], spec.get("quantize", "none")
    paths = None
    if quantize == "int8":
        samples = _demo_samples(os.path.join(spec["work"], "demo_256x512"), 16, common.IMAGE_SHAPE)
        paths = [s.image for s in samples[:spec.get("calibration", 8)]]
    with tempfile.TemporaryDirectory(dir=spec["work"]) as tmp:
        start = time.perf_counter()
        folder = ours.litert_model(spec["vgg"], quantize, paths, os.path.join(tmp, "m"))
        convert_s = time.perf_counter() - start
        size_mb = os.path.getsize(os.path.join(folder, litert_module.MODEL_FILE)) / 2 ** 20
        with litert_module.LiteRTPredictor(folder, threads=spec.get("threads")) as predictor:
            data = np.random.default_rng(0).integers(0, 256, (batch, *common.IMAGE_SHAPE, 3), np.uint8)
            timing = common.time_steps(lambda: predictor.predict(data), spec["warmup"], spec["iters"])
    return dict(common.rates(timing, batch), unit="images/s", convert_seconds=round(convert_s, 1),
                model_mb=round(size_mb, 1), threads=spec.get("threads") or litert_module.cores())


def openvino(spec):
    """``openvino_model.OpenVINOPredictor`` end to end (the whole path in OpenVINO: resize,
    network, upsampling, argmax) on random uint8 256x512 batches, on the bench run's
    ``segment.py export --format openvino`` folder (``ov.exported``, made once): ``quantize``
    none (``precision`` fp32 or bf16: OpenVINO's inference precision hint) or int8 (NNCF,
    calibrated on ``calibration`` demo scenes).  ``hint``: OpenVINO's PERFORMANCE_HINT
    (LATENCY: one stream; THROUGHPUT: a stream per core, the batch split over them)."""
    import numpy as np
    import ov

    from roadseg import openvino_model
    batch, quantize = spec["batch"], spec.get("quantize", "none")
    start = time.perf_counter()
    folder = ov.exported(spec["vgg"], spec["work"], quantize, spec.get("calibration", 8))
    export_s = time.perf_counter() - start
    hint = spec.get("hint", "LATENCY")
    data = np.random.default_rng(0).integers(0, 256, (batch, *common.IMAGE_SHAPE, 3), np.uint8)
    with openvino_model.OpenVINOPredictor(folder, precision=spec.get("precision"),
                                          config={"PERFORMANCE_HINT": hint}) as predictor:
        if hint == "THROUGHPUT":
            step = ov.split_over_streams(predictor.compiled, data)
        else:
            def step():
                return predictor.predict(data)
        timing = common.time_steps(step, spec["warmup"], spec["iters"])
        streams = int(predictor.compiled.get_property("NUM_STREAMS"))
    size_mb = os.path.getsize(os.path.join(folder, openvino_model.WEIGHTS_FILE)) / 2 ** 20
    return dict(common.rates(timing, batch), unit="images/s", model_mb=round(size_mb, 1),
                export_seconds=round(export_s, 1), streams=streams)


def run_folder(spec):
    """``inference.load_predictor`` on a run folder -- what ``segment.py predict / evaluate /
    video`` open -- at ``backend`` (default auto: OpenVINO fp32 when installed), on random
    uint8 256x512 batches, class maps out.  The run is ``ov.bench_run`` (the full-width random
    model saved as a run); its OpenVINO cache is removed first, so the first load converts
    (``first_load_s``) and the second reuses the conversion (``load_s``)."""
    import shutil

    import numpy as np
    import ov

    from roadseg import inference, openvino_model
    run = ov.bench_run(spec["vgg"], spec["work"])
    shutil.rmtree(os.path.join(run, openvino_model.CACHE_DIR), ignore_errors=True)
    backend, batch, lines, loads = spec.get("backend", "auto"), spec["batch"], [], []
    for _ in range(2):
        start = time.perf_counter()
        predictor = inference.load_predictor(run, backend=backend, log=lines.append)
        loads.append(round(time.perf_counter() - start, 1))
        if len(loads) == 1:
            predictor.close()
    data = np.random.default_rng(0).integers(0, 256, (batch, *common.IMAGE_SHAPE, 3), np.uint8)
    with predictor:
        timing = common.time_steps(lambda: predictor.predict(data), spec["warmup"], spec["iters"])
    return dict(common.rates(timing, batch), unit="images/s", predictor=type(predictor).__name__,
                first_load_s=loads[0], load_s=loads[1], log=lines)


def gemm_openvino(spec):
    """OpenVINO's own GEMM: a chain of ``reps`` n x n MatMuls (``ov.gemm_model``) compiled for
    the CPU at ``precision`` (f32 / bf16 inference precision hint) or as int8 (FakeQuantize
    on both operands: OpenVINO's int8 GEMM); 2n^3 FLOPs (int8: OPs) each."""
    import numpy as np
    import openvino
    import ov
    n, reps, precision = spec.get("n", 4096), spec.get("reps", 4), spec.get("precision", "fp32")
    hint = "bf16" if precision == "bf16" else "f32"
    compiled = openvino.Core().compile_model(ov.gemm_model(n, reps, precision == "int8"), "CPU",
                                             {"INFERENCE_PRECISION_HINT": hint})
    request = compiled.create_infer_request()
    a = np.random.default_rng(1).standard_normal((n, n), np.float32)
    timing = common.time_steps(lambda: request.infer({0: a}), spec["warmup"], spec["iters"])
    return dict(common.rates(timing, 2 * n ** 3 * reps / 1e9), unit="GFLOP/s")


def quality(spec):
    """mIoU of a trained run on a labelled split at every precision the product offers: the
    TensorFlow predictor at fp32 and bf16, its LiteRT exports (none, int8 calibrated on
    the run's training images) and its OpenVINO exports (fp32, bf16 where the CPU has it,
    int8 calibrated as LiteRT's); plus the share of pixels whose class equals fp32's (on every
    image of the split, or the first ``agreement_images``)."""
    import numpy as np

    from roadseg import datasets, inference, metrics, openvino_model
    from roadseg import litert as litert_module
    from roadseg import precision as precision_module
    splits = datasets.find_dataset(spec["data"]).splits
    split = spec.get("split", "test") if spec.get("split", "test") in splits else "val"
    samples = [s for s in splits[split] if s.label]
    images = [datasets.load_image(s.image) for s in samples[:spec.get("agreement_images")]]
    out, reference = {}, None
    with tempfile.TemporaryDirectory(dir=spec["work"]) as tmp:
        models = [("fp32", spec["run"], None), ("bf16", spec["run"], "bf16")]
        for quantize in ("none", "int8"):
            folder = litert_module.export_tflite(spec["run"], os.path.join(tmp, quantize), quantize)
            models.append((f"litert_{'fp32' if quantize == 'none' else quantize}", folder, None))
        for quantize in ("none", "int8"):   # issue 23: OpenVINO, from the same run
            folder = openvino_model.export_openvino(spec["run"], os.path.join(tmp, f"ov_{quantize}"),
                                                    quantize)
            if quantize == "int8":
                models.append(("openvino_int8", folder, None))
                continue
            models.append(("openvino_fp32", folder, None))
            if precision_module.native_bf16():
                models.append(("openvino_bf16", folder, "bf16"))
        for name, model, precision in models:
            with inference.load_predictor(model, precision=precision) as predictor:
                scores = metrics.evaluate(predictor.predict, samples, predictor.scheme, progress=False)
                maps = np.concatenate([predictor.predict(im) for im in images], axis=None)
            reference = maps if reference is None else reference
            out[name] = dict(mean_iou=float(scores["mean_iou"]),
                             agreement_with_fp32=float(np.mean(maps == reference)))
    return dict(out, images=len(samples), split=split, run=spec["run"], data=spec["data"])


def realtime(spec):
    """Issue 34: ``segment.py video`` as a user runs it (a subprocess) on ``clip``, every frame
    and then ``--realtime``, with the road4 model of VGG width ``model_width`` at 256x512
    (random weights, ``ov.bench_run``): ``backend`` "tf" (its SavedModel export, TensorFlow
    fp32) or "openvino_int8" (``segment.py export --format openvino --quantize int8``).
    Figures are the command's own closing line: frames/s (wall clock), latency p50 / p95,
    CPU ms a frame (its process and ffmpeg), frames dropped."""
    import ov
    vgg = os.path.join(spec["work"], f"vgg_random_w{spec['model_width']:g}")
    prepare(dict(vgg=vgg, width=spec["model_width"]))
    if spec["backend"] == "tf":
        model = ov.savedmodel(vgg, spec["work"], "road4")
    else:
        model = ov.exported(vgg, spec["work"], "int8", scheme="road4")
    clip = os.path.join(os.path.dirname(common.ROOT), "shared", "data", "videos", spec["clip"])
    if not os.path.isfile(clip):
        raise SystemExit(f"{clip} is absent (../shared/data is not part of a clone)")
    out = {}
    with tempfile.TemporaryDirectory(dir=spec["work"]) as tmp:
        for mode, flags in (("all", []), ("realtime", ["--realtime"])):
            if spec.get("max_frames"):
                flags += ["--max-frames", str(spec["max_frames"])]
            cmd = [sys.executable, os.path.join(common.ROOT, "segment.py"), "video", "--model", model,
                   clip, os.path.join(tmp, f"{mode}.mp4"), *flags]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            print(proc.stdout[-2000:])
            if proc.returncode:
                raise SystemExit(f"segment.py video failed: {proc.stdout.strip().splitlines()[-1:]}")
            out[mode] = video_line(proc.stdout.strip().splitlines()[-1])
    a, r = out["all"], out["realtime"]
    import resource  # the largest segment.py process, not this one
    video_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return dict(rate=a["frames_per_second"], unit="frames/s", times=[], model=model, clip=spec["clip"],
                video_peak_rss_mb=round(video_mb, 1),
                **{f"all_{k}": v for k, v in a.items()}, **{f"realtime_{k}": v for k, v in r.items()})


def video_line(line):
    """The figures of ``segment.py video``'s closing line (``cli.video_summary``)."""
    import re
    fields = dict(frames=r"(\d+) frames at", fps=r"at ([\d.]+) fps", frames_per_second=r"([\d.]+) frames/s",
                  latency_p50_ms=r"p50 (\d+) ms", latency_p95_ms=r"p95 (\d+) ms",
                  cpu_ms_per_frame=r"CPU (\d+) ms a frame", dropped=r"(\d+) of \d+ frames dropped")
    found = {k: re.search(pattern, line) for k, pattern in fields.items()}
    return {k: float(m.group(1)) for k, m in found.items() if m}


CASES = dict(prepare=prepare, gemm=gemm, flops=flops, infer=infer, check_variants=check_variants, train=train,
             pipeline=input_pipeline, video=video, peer_infer=peer_infer,
             peer_train=peer_train, litert=litert, quality=quality, openvino=openvino,
             gemm_openvino=gemm_openvino, run_folder=run_folder, realtime=realtime)


def main(argv):
    spec = json.loads(argv[1])
    result = CASES[spec["case"]](spec)
    result["peak_rss_mb"] = round(common.peak_rss_mb(), 1)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv)
