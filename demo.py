"""The embedded default, end to end: ``python segment.py demo``.

No dataset and no network needed.  Steps: demo scenes in ``data/demo`` (unless a dataset
is given), a VGG16 (``data/vgg`` if present, else the course download, else the Keras
ImageNet conversion, else random weights with a loud banner), a short training, evaluation
on the validation split, overlays and a short video, all in one new ``runs/<name>/``.
"""
import os
import time

import numpy as np

DEMO_DATA = os.path.join("data", "demo")

# Settings that finish in minutes on a 2-core laptop CPU and visibly learn the demo scenes.
SETTINGS = {
    "default": dict(n=60, epochs=12, image_shape=[128, 256], width=0.25, video_frames=48),
    "quick": dict(n=16, epochs=2, image_shape=[64, 128], width=0.0625, video_frames=12),
}


def banner(text):
    line = "=" * max(len(s) for s in text.splitlines())
    print(f"\n{line}\n{text}\n{line}\n", flush=True)


def demo_video_frames(image_paths, n_frames, size):
    """A slow pan across demo scenes: ``n_frames`` RGB frames of ``size`` (H, W)."""
    import datasets
    from PIL import Image
    h, w = size
    frames = []
    per_scene = max(1, n_frames // max(1, len(image_paths)))
    for path in image_paths:
        image = datasets.load_image(path)
        big = np.asarray(Image.fromarray(image).resize((w + w // 8, h), Image.BILINEAR))
        for k in range(per_scene):
            x = int(round(k * (w // 8) / max(1, per_scene - 1)))
            frames.append(big[:, x:x + w])
            if len(frames) == n_frames:
                return frames
    return frames


def write_video(path, frames, fps=12):
    import imageio_ffmpeg
    h, w = frames[0].shape[:2]
    writer = imageio_ffmpeg.write_frames(path, (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                         macro_block_size=1, ffmpeg_log_level="error")
    writer.send(None)
    for f in frames:
        writer.send(np.ascontiguousarray(f))
    writer.close()


def run_demo(quick=False, runs_dir="runs", data_dir=None, log=print):
    """Run the whole job; returns a dict of what was produced (paths and figures)."""
    import datasets
    import demo_data
    import evaluate
    import model
    import outputs
    import train
    import vgg

    s = SETTINGS["quick" if quick else "default"]
    if data_dir is None:
        data_dir = DEMO_DATA
        banner(f"No dataset given: using {s['n']} procedurally drawn demo street scenes in {data_dir}.\n"
               f"Put Cityscapes (or CamVid / KITTI road) in data/ and pass --data to use real images.")
        demo_data.make_demo_data(data_dir, n=s["n"], seed=0, size=(256, 512))
    vgg_path, pretrained = vgg.obtain_vgg("data", source="auto", width=1.0 if pretrained_available()
                                          else s["width"])
    lr = 1e-4 if pretrained else 1e-3
    run = "demo-" + time.strftime("%Y%m%d-%H%M%S")
    result = train.train(data_dir, vgg_path, runs_dir=runs_dir, run=run, log=log,
                         epochs=s["epochs"], batch_size=4, lr=lr, image_shape=s["image_shape"],
                         keep_prob=0.5 if pretrained else 1.0, augment=True,
                         skip_scales=[0.01, 0.0001] if pretrained else None, l2_scale=1e-4)
    run_dir = result["run_dir"]
    found = datasets.find_dataset(data_dir)
    val = [x for x in found.splits.get("val", []) if x.label]
    with model.load_predictor(run_dir) as predictor:
        scores = evaluate.evaluate(predictor.predict, val, predictor.scheme)
        log(evaluate.format_table(scores, predictor.scheme.class_names))
        evaluate.save_json(scores, predictor.scheme.class_names, os.path.join(run_dir, "evaluation-val.json"))
        sample_dir = os.path.join(run_dir, "samples")
        os.mkdir(sample_dir)
        paths = [x.image for x in val]
        outputs.save_inference_samples_core(sample_dir, paths, predictor.predict, predictor.scheme.colors)
        clip = os.path.join(run_dir, "demo_input.mp4")
        write_video(clip, demo_video_frames(paths[:8], s["video_frames"], (256, 512)))
        video = os.path.join(run_dir, "demo_overlay.mp4")
        outputs.process_video(clip, video, predictor.predict, predictor.scheme.colors)
    log(f"\nDone. Run folder: {run_dir}\n  overlays: {sample_dir}\n  video:    {video}\n"
        f"  val mIoU: {scores['mean_iou']:.3f}" + ("" if pretrained else "  (VGG NOT pretrained)"))
    return dict(run_dir=run_dir, samples=sample_dir, video=video, mean_iou=scores["mean_iou"],
                pretrained=pretrained)


def pretrained_available():
    """True when a complete pretrained VGG16 is already in data/vgg (then it is used full width)."""
    import vgg
    try:
        vgg.check_vgg_dir(os.path.join("data", "vgg"))
        return True
    except Exception:
        return False
