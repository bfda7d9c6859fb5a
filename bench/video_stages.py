"""Where a frame's CPU time goes in ``segment.py video`` (issue 34): each stage of the
pipeline run alone, one after the other, on the same frames, timed by CPU time.

    python bench/video_stages.py MODEL CLIP [--frames N] [--batch B] [--preset P ...] [--backend B]

MODEL is anything ``segment.py video --model`` takes (a run folder, a SavedModel, an
OpenVINO or LiteRT folder; ``--backend`` as ``segment.py video``'s for a run folder).
Stages, each as ``segment.py video`` runs it:

* ``decode``       ffmpeg decoding to RGB (its process, by ``RUSAGE_CHILDREN``) + reading
                   the frames into batches in Python (``video.read_frame_batches``)
* ``resize in``    uint8 frames -> the network's float input (``inference.resize_to_network``)
* ``network``      VGG16 + FCN-8s on that input, to the logits
* ``resize out``   logits -> frame size (bilinear) -> argmax -> class maps
                   (these three: TensorFlow models only, by feeding the predictor's own graph
                   at its intermediate tensors; other backends get one ``model`` row, and a
                   ``model at network size`` row: the frames pre-resized to the network's
                   input, so the difference is what the resizes cost there)
* ``model``        ``predictor.predict`` on the batch, everything in it; OpenVINO: also the
                   same model with its ``classes`` output alone (``predict`` computes the
                   full-size ``probabilities`` too)
* ``overlay``      ``overlays.overlay`` blending the class colours over the frames (its
                   lookup table, and the float32 arithmetic it replaced: the same bytes)
* ``encode``       libx264 at each ``--preset`` (its process) + sending the frames to it;
                   the file's size and its PSNR against the overlays that went in

CPU time is the process's (every thread) plus its finished children's, so other people's
jobs on the machine change it little (they would halve a wall-clock rate); the load
average is printed with the table.  Prints a Markdown table of CPU ms per frame.
"""
import argparse
import os
import resource
import sys
import tempfile
import time

import common  # bench/ is on sys.path as the script's folder; puts this checkout first

common.quiet_tensorflow()


def cpu_now():
    """(this process's CPU seconds, its finished children's CPU seconds, wall seconds)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time(), children.ru_utime + children.ru_stime, time.perf_counter()


def timed(fn):
    """``(result, (process CPU s, children CPU s, wall s))`` of ``fn()``."""
    before = cpu_now()
    out = fn()
    return out, tuple(b - a for a, b in zip(before, cpu_now()))


def decode(clip, frames, batch):
    from roadseg import video
    return timed(lambda: list(video.read_frame_batches(clip, batch, 0, frames)))


def tf_stages(predictor, batches):
    """The three parts of a TensorFlow predictor's graph, each fed its own input."""
    import numpy as np
    resized = predictor.graph.get_tensor_by_name("clip_by_value:0")   # resize_to_network's end
    argmax = predictor._classes.op.inputs[0].op                       # classes = cast(argmax(up))
    logits = argmax.inputs[0].op.inputs[0]                            # up = resize(logits)
    run, images = predictor.sess.run, predictor._images
    run(predictor._classes, {images: batches[0]})   # warm-up
    xs, t_in = timed(lambda: [run(resized, {images: b}) for b in batches])
    ls, t_net = timed(lambda: [run(logits, {resized: x}) for x in xs])
    maps, t_out = timed(lambda: [run(predictor._classes, {logits: lg, images: b})
                                 for lg, b in zip(ls, batches)])
    whole, t_all = timed(lambda: [predictor.predict(b) for b in batches])
    assert all(np.array_equal(a, b) for a, b in zip(maps, whole)), "stages differ from predict"
    return whole, [("resize in", t_in), ("network", t_net), ("resize out + argmax", t_out),
                   ("model (predict, all of it)", t_all)]


def other_stages(predictor, batches):
    """Any other predictor: the whole of ``predict``, and ``predict`` on frames already at the
    network's input size; OpenVINO: also the model with its classes output alone."""
    import numpy as np
    import tensorflow as tf

    from roadseg.inference import resize_to_network
    shape = tuple(predictor.image_shape)
    small = [np.asarray(resize_to_network(tf.constant(b), shape)).astype(np.uint8) for b in batches]
    predictor.predict(batches[0])   # warm-up at both sizes
    predictor.predict(small[0])
    whole, t_all = timed(lambda: [predictor.predict(b) for b in batches])
    _, t_small = timed(lambda: [predictor.predict(b) for b in small])
    rows = [(f"model at network size {shape[0]}x{shape[1]} (no resize)", t_small),
            ("model (predict, all of it)", t_all)]
    if hasattr(predictor, "compiled"):   # OpenVINO: predict computes both outputs
        request = classes_only(predictor.source).create_infer_request()
        request.infer({0: batches[0]})
        maps, t_classes = timed(lambda: [request.infer({0: b})[0].copy() for b in batches])
        assert all(np.array_equal(a, b) for a, b in zip(maps, whole)), "classes-only differs"
        rows.append(("model, the classes output only (no probabilities)", t_classes))
    return whole, rows


def classes_only(folder):
    """The OpenVINO model in ``folder`` compiled (fp32 hint, as the predictor) with its
    ``classes`` output only."""
    import openvino as ov

    from roadseg import openvino_model
    core = ov.Core()
    model = core.read_model(os.path.join(openvino_model.model_path(folder) or folder,
                                         openvino_model.MODEL_FILE))
    classes = next(out for out in model.outputs if "classes" in out.get_names())
    only = ov.Model([ov.opset13.result(classes.node.input_value(0))], model.get_parameters(), "classes")
    return core.compile_model(only, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def float_overlay(images, maps, scheme, alpha=0.5):
    """``overlays.overlay`` as it was before issue 34: the blend in float32 on every pixel."""
    import numpy as np

    from roadseg.overlays import _palette
    painted = np.zeros(256, bool)
    painted[:len(scheme.colors)] = True
    painted[list(scheme.unpainted)] = False
    blend = images.astype(np.float32)
    blend *= 1.0 - alpha
    blend += np.take(_palette(scheme.colors).astype(np.float32) * alpha, maps, axis=0)
    np.rint(blend, out=blend)
    return np.where(np.take(painted, maps)[..., None], blend.astype(np.uint8), images)


def encode(batches, size, fps, preset):
    """CPU time of encoding ``batches``, the file's MiB, and the PSNR (dB, RGB, all frames)
    of the decoded file against the frames that went in."""
    import numpy as np

    from roadseg import video
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.mp4")
        _, t = timed(lambda: video._write_batches(batches, path, size, fps, preset=preset))
        mb = os.path.getsize(path) / 2 ** 20
        decoded = np.concatenate(list(video.read_frame_batches(path, 8)))
    error = np.mean((decoded.astype(np.float32) - np.concatenate([np.stack(b) for b in batches])) ** 2)
    return t, mb, 10 * np.log10(255 ** 2 / error)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("clip")
    p.add_argument("--frames", type=int, default=221, help="the first N frames (default 221)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--preset", nargs="+", default=["medium", "veryfast"])
    p.add_argument("--backend", default="auto", help="what runs a run folder: auto, tensorflow, openvino")
    a = p.parse_args(argv)

    import numpy as np

    from roadseg import inference, overlays, video
    size, fps, _ = video.probe_video(a.clip)
    load = os.getloadavg()
    batches, t_dec = decode(a.clip, a.frames, a.batch)
    n = sum(len(b) for b in batches)
    rows = [("decode (ffmpeg + reading)", t_dec)]
    with inference.load_predictor(a.model, backend=a.backend) as predictor:
        stages = tf_stages if predictor.graph is not None else other_stages
        maps, model_rows = stages(predictor, batches)
        kind = type(predictor).__name__
    rows += model_rows
    pairs = list(zip(batches, maps))   # before: a batch at a time; now: a frame at a time
    blended, t_ov = timed(lambda: [[overlays.overlay(f, m, predictor.scheme) for f, m in zip(*p)]
                                   for p in pairs])
    before, t_float = timed(lambda: [float_overlay(b, m, predictor.scheme) for b, m in pairs])
    assert all(np.array_equal(np.stack(a), b) for a, b in zip(blended, before)), "overlays differ"
    rows += [("overlay, float32 blend of a batch (before)", t_float),
             ("overlay, lookup table a frame at a time (now)", t_ov)]
    for preset in a.preset:
        t_enc, mb, psnr = encode(blended, size, fps, preset)
        rows.append((f"encode libx264 -crf {video.CRF} -preset {preset} ({mb:.2f} MiB, "
                     f"PSNR {psnr:.2f} dB)", t_enc))
    print(f"\n{a.model} ({kind}), {a.clip} {size[0]}x{size[1]}, {n} frames, batch {a.batch}; "
          f"load average {load[0]:.1f} before, {os.getloadavg()[0]:.1f} after, {os.cpu_count()} cores\n")
    print("| stage | CPU ms/frame (process + ffmpeg) | ffmpeg's share | wall ms/frame |")
    print("| --- | --- | --- | --- |")
    for name, (proc, child, wall) in rows:
        print(f"| {name} | {1000 * (proc + child) / n:.1f} | {1000 * child / n:.1f} | "
              f"{1000 * wall / n:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
