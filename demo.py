"""The embedded default, end to end: ``python segment.py demo`` (and the notebook's helpers).

No dataset and no network needed.  ``run_demo`` makes demo scenes in ``data/demo``, gets a
VGG16 (``obtain_demo_vgg``: ``data/vgg`` if present, else the course download, else the
Keras ImageNet conversion, else a narrow random-weight model with a loud banner), trains
briefly, evaluates on the validation split, and writes overlays and a short video, all in
one new ``runs/demo-<timestamp>/``.

The notebook uses the same pieces: ``obtain_demo_vgg``, ``hyperparameters(pretrained)``,
``make_demo_clip`` and ``read_video_frames``.
"""
import os
import time
import urllib.error
import urllib.request

import numpy as np

from errors import UserError

DATA_ROOT = "data"
DEMO_SCENE_SIZE = (256, 512)   # (H, W) the scenes are drawn at; training resizes them
# Settings that finish in minutes on a 2-core CPU and visibly learn the demo scenes
# (quick: a smoke test of every step in seconds).  Measured: more scenes beat more epochs,
# and without augmentation the scenes are learnt faster (they vary enough by themselves).
# A pretrained VGG16 is full width, 10-50x slower per step here, and needs far fewer epochs.
# Each setting has its own data folder, so running one after the other never clashes.
SETTINGS = {
    "default": dict(data="demo", n=200, epochs=12, epochs_pretrained=2, image_shape=[128, 256],
                    width=0.25, video_frames=48),
    "quick": dict(data="demo-quick", n=12, epochs=2, epochs_pretrained=1, image_shape=[64, 128],
                  width=0.0625, video_frames=8),
}
# Where the pretrained VGG16 comes from; probed before downloading so that a machine
# without network falls back to random weights in seconds.
VGG_HOSTS = ("https://s3-us-west-1.amazonaws.com/", "https://storage.googleapis.com/")
PROBE_TIMEOUT_S = 3


def banner(text):
    """Print ``text`` framed by lines of '=' so it stands out in a log."""
    line = "=" * max(len(s) for s in text.splitlines())
    print(f"\n{line}\n{text}\n{line}\n", flush=True)


def hyperparameters(pretrained):
    """Training settings that work for the encoder at hand.

    Pretrained VGG16 (the FCN paper's recipe): lr 1e-4, dropout keep 0.5, pool4/pool3
    scaled by 0.01/0.0001 before their score layers.  Random weights (trained from
    scratch): lr 1e-3, no dropout, no skip scaling -- the activations of a random
    encoder are already unit-scale, and scaling them down would mute the skips.
    """
    if pretrained:
        return dict(lr=1e-4, keep_prob=0.5, skip_scales=[0.01, 0.0001])
    return dict(lr=1e-3, keep_prob=1.0, skip_scales=None)


def default_epochs(pretrained, quick=False):
    """Epochs of the demo training: ``SETTINGS`` for a pretrained or a random-weight VGG16."""
    s = SETTINGS["quick" if quick else "default"]
    return s["epochs_pretrained" if pretrained else "epochs"]


def _reachable(url, timeout=PROBE_TIMEOUT_S):
    """True when an HTTP server answers at ``url`` within ``timeout`` seconds (proxies honoured)."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True   # the server answered, if only with an error status
    except (OSError, ValueError):
        return False
    return True


def obtain_demo_vgg(data_root=DATA_ROOT, source="auto", width=0.25, download=True):
    """A VGG16 SavedModel for training here: returns ``(vgg_path, pretrained)``.

    ``source="auto"``: ``<data_root>/vgg`` if complete; else (when ``download`` and the
    host answers) the course zip, else Keras' ImageNet weights; else a random-weight
    VGG16 of ``width`` with a loud banner -- a full-width random VGG16 would train far
    too slowly on a CPU to be worth it.  Offline this takes a few seconds at most.
    Other sources go straight to ``vgg.obtain_vgg`` (``width`` applies to 'random' only).
    """
    import vgg
    if source != "auto":
        return vgg.obtain_vgg(data_root, source=source, width=width if source == "random" else 1.0)
    if os.path.exists(os.path.join(data_root, "vgg")):   # incomplete -> UserError naming the file
        return vgg.obtain_vgg(data_root, source="auto", width=1.0)
    if download:
        for way, host in zip(("course", "keras-imagenet"), VGG_HOSTS):
            if not _reachable(host):
                print(f"{host} does not answer: skipping the {way} VGG16", flush=True)
                continue
            try:
                return vgg.obtain_vgg(data_root, source=way, width=1.0)
            except vgg.DownloadError as err:
                print(f"the {way} VGG16 could not be downloaded: {err}", flush=True)
    why = "and none could be downloaded" if download else "(downloading skipped)"
    banner(f"NO PRETRAINED VGG16: none in {data_root}/vgg {why}.\n"
           f"Training a RANDOM-WEIGHT VGG16 of width {width:g} from scratch: it learns the demo scenes,\n"
           f"but real photos need a pretrained encoder: `python segment.py get-vgg` (course or Keras).")
    return vgg.obtain_vgg(data_root, source="random", width=width)


def demo_video_frames(image_paths, n_frames, size=DEMO_SCENE_SIZE):
    """A slow pan across the images: ``n_frames`` RGB frames of ``size`` (H, W)."""
    import datasets
    from PIL import Image
    h, w = size
    frames = []
    per_scene = max(1, -(-n_frames // max(1, len(image_paths))))
    for path in image_paths:
        big = np.asarray(Image.fromarray(datasets.load_image(path)).resize((w + w // 8, h),
                                                                           Image.BILINEAR))
        for k in range(per_scene):
            x = int(round(k * (w // 8) / max(1, per_scene - 1)))
            frames.append(big[:, x:x + w])
            if len(frames) == n_frames:
                return frames
    return frames


def make_demo_clip(image_paths, path, n_frames=48, size=DEMO_SCENE_SIZE, fps=12):
    """Write an H.264 clip panning across ``image_paths`` to the new file ``path``."""
    import imageio_ffmpeg
    if os.path.exists(path):
        raise UserError(f"{path} already exists; choose another name (nothing is overwritten)")
    frames = demo_video_frames(image_paths, n_frames, size)
    h, w = size
    writer = imageio_ffmpeg.write_frames(path, (w, h), fps=fps, codec="libx264",
                                         pix_fmt_out="yuv420p", macro_block_size=1,
                                         ffmpeg_log_level="error")
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    return path


def read_video_frames(path, indices):
    """The frames of the video at ``path`` with the given indices, as RGB arrays."""
    import imageio_ffmpeg
    wanted, frames = set(indices), {}
    reader = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24")
    try:
        w, h = next(reader)["size"]
        for i, raw in enumerate(reader):
            if i in wanted:
                frames[i] = np.frombuffer(raw, np.uint8).reshape(h, w, 3)
            if len(frames) == len(wanted):
                break
    finally:
        reader.close()
    return [frames[i] for i in indices if i in frames]


def run_demo(quick=False, runs_dir="runs", data_root=DATA_ROOT, vgg_source="auto", log=print):
    """Run the whole job; returns a dict of what was produced (paths and figures)."""
    import datasets
    import demo_data
    import evaluate
    import model
    import outputs
    import train

    s = SETTINGS["quick" if quick else "default"]
    data_dir = os.path.join(data_root, s["data"])
    banner(f"No dataset needed: using {s['n']} procedurally drawn demo street scenes in {data_dir}.\n"
           f"For real images put Cityscapes (or CamVid / KITTI road) in data/ and use "
           f"'segment.py train --data' or the notebook.")
    demo_data.make_demo_data(data_dir, n=s["n"], seed=0, size=DEMO_SCENE_SIZE)
    vgg_path, pretrained = obtain_demo_vgg(data_root, vgg_source, s["width"], download=not quick)
    hp = hyperparameters(pretrained)
    run = ("demo-quick-" if quick else "demo-") + time.strftime("%Y%m%d-%H%M%S")
    t0 = time.time()
    result = train.train(data_dir, vgg_path, runs_dir=runs_dir, run=run, log=log,
                         epochs=default_epochs(pretrained, quick), batch_size=4,
                         image_shape=s["image_shape"], augment=False, l2_scale=1e-4, **hp)
    run_dir = result["run_dir"]
    if result["status"] != "finished":
        return dict(run_dir=run_dir, status=result["status"])
    val = [x for x in datasets.find_dataset(data_dir).splits["val"] if x.label]
    with model.load_predictor(run_dir) as predictor:
        names, colors = predictor.scheme.class_names, predictor.scheme.colors
        scores = evaluate.evaluate(predictor.predict, val, predictor.scheme)
        log(evaluate.format_table(scores, names))
        evaluate.save_json(scores, names, os.path.join(run_dir, "evaluation-val.json"))
        sample_dir = os.path.join(run_dir, "samples")
        os.mkdir(sample_dir)
        paths = [x.image for x in val]
        outputs.save_inference_samples_core(sample_dir, paths, predictor.predict, predictor.scheme)
        clip = make_demo_clip(paths, os.path.join(run_dir, "demo_input.mp4"), s["video_frames"])
        video = os.path.join(run_dir, "demo_overlay.mp4")
        outputs.process_video(clip, video, predictor.predict, predictor.scheme)
    seconds = time.time() - t0
    log(f"\nDone in {seconds:.0f} s. Run folder: {run_dir}\n  overlays: {sample_dir}\n"
        f"  video:    {video}\n  val mIoU: {scores['mean_iou']:.3f}"
        + ("" if pretrained else "  (VGG NOT pretrained: random weights)"))
    return dict(run_dir=run_dir, status="finished", samples=sample_dir, video=video,
                mean_iou=scores["mean_iou"], iou=dict(zip(names, scores["iou"])),
                pretrained=pretrained)
