#!/usr/bin/env python
"""Command line: ``python segment.py <command> --help``.

A thin layer over the modules: it parses arguments, calls one function, prints the
result.  Mistakes a user can fix end in one line on stderr and exit code 2.
"""
import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from errors import UserError  # noqa: E402

DEFAULT_DATA = "data"
DEFAULT_RUNS = "runs"


# ----------------------------------------------------------------------------- commands
def cmd_make_demo_data(a):
    import demo_data
    demo_data.make_demo_data(a.dir, n=a.n, seed=a.seed, size=tuple(a.size))
    print(f"demo scenes written to {a.dir}")


def cmd_check_data(a):
    import datasets
    report = datasets.check_dataset(a.dir, a.scheme, skip_bad=a.skip_bad)
    print(datasets.format_report(report))
    return 1 if report["problems"] else 0


def cmd_get_vgg(a):
    import vgg
    if a.out:
        if a.source not in ("random", "keras-imagenet"):
            raise UserError("--out works with --source random or keras-imagenet; the course model "
                            "always goes to <data>/vgg")
        vgg.build_vgg_savedmodel(a.out, source=a.source, width=a.width, seed=a.seed)
        path, pretrained = a.out, bool(vgg.read_vgg_info(a.out).get("pretrained"))
    else:
        path, pretrained = vgg.obtain_vgg(a.data, source=a.source, width=a.width)
    print(f"VGG16 ready at {path} ({'pretrained' if pretrained else 'NOT pretrained: random weights'})")


def resolve_vgg(a):
    """--vgg DIR if given, else obtain one (``vgg.obtain_vgg``) under the data folder."""
    import vgg
    if a.vgg:
        return vgg.check_vgg_dir(a.vgg)
    path, _ = vgg.obtain_vgg(DEFAULT_DATA, source=a.vgg_source, width=a.width)
    return path


def cmd_train(a):
    import train
    options = dict(scheme=a.scheme, image_shape=a.image_shape, epochs=a.epochs,
                   batch_size=a.batch_size, lr=a.lr, keep_prob=a.keep_prob,
                   lr_schedule=a.lr_schedule, warmup_epochs=a.warmup_epochs,
                   class_weights=a.class_weights, augment=not a.no_augment, seed=a.seed,
                   checkpoint_every=a.checkpoint_every, eval_every=a.eval_every, val_split=a.val_split,
                   skip_scales=None if a.no_skip_scaling else [0.01, 0.0001], l2_scale=a.l2,
                   loss=a.loss, focal_gamma=a.focal_gamma, ohem_fraction=a.ohem_fraction)
    result = train.train(a.data, resolve_vgg(a), runs_dir=a.runs, run=a.run, resume=a.resume,
                         **options)
    print(f"{result['status']}: {result['steps']} steps, best val mIoU "
          f"{result['best_miou']:.4f} -- run folder {result['run_dir']}")
    return 0 if result["status"] == "finished" else 130


def cmd_evaluate(a):
    import datasets
    import evaluate
    import model
    with model.load_predictor(a.model) as predictor:
        found = datasets.find_dataset(a.data)
        if a.split not in found.splits:
            raise UserError(f"{a.data} has no '{a.split}' split (it has {', '.join(found.splits)}); "
                            f"pass --split")
        samples = [s for s in found.splits[a.split] if s.label]
        if not samples:
            raise UserError(f"split '{a.split}' of {a.data} has no labels to evaluate against")
        result = evaluate.evaluate(predictor.predict, samples, predictor.scheme,
                                   batch_size=a.batch_size)
        names = predictor.scheme.class_names
        print(evaluate.format_table(result, names))
        out = a.out or os.path.join(a.model, f"evaluation-{a.split}-{time.strftime('%Y%m%d-%H%M%S')}.json")
        evaluate.save_json(result, names, out)
        print(f"saved {out}")
        if a.cityscapes_out:
            evaluate.write_cityscapes_predictions(predictor.predict, samples, predictor.scheme,
                                                  a.cityscapes_out)
            print(f"Cityscapes labelIds predictions in {a.cityscapes_out}")


def _image_paths(inputs):
    exts = (".png", ".jpg", ".jpeg", ".bmp")
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(exts))
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise UserError(f"input {item} does not exist; pass image files or folders of images")
    if not paths:
        raise UserError(f"no images (png/jpg) found in {', '.join(inputs)}")
    return paths


def cmd_predict(a):
    import model
    import outputs
    paths = _image_paths(a.inputs)
    with model.load_predictor(a.model) as predictor:
        if a.out and os.path.exists(a.out):
            raise UserError(f"{a.out} already exists; choose a new --out folder (nothing is overwritten)")
        out = a.out or outputs.new_run_dir(a.runs, "predict-" + time.strftime("%Y%m%d-%H%M%S"))
        os.makedirs(out, exist_ok=True)
        outputs.save_inference_samples_core(out, paths, predictor.predict, predictor.scheme.colors,
                                            batch_size=a.batch_size)
    print(f"{len(paths)} overlays and class maps in {out}")


def cmd_video(a):
    import model
    import outputs
    with model.load_predictor(a.model) as predictor:
        stats = outputs.process_video(a.input, a.output, predictor.predict, predictor.scheme.colors,
                                      batch_size=a.batch_size, max_frames=a.max_frames)
    print(f"{a.output}: {stats['frames']} frames at {stats['fps']:.2f} fps, "
          f"{stats['frames_per_second']:.2f} frames/s end to end")


def cmd_export(a):
    import model
    model.export(a.model, a.out)
    print(f"exported inference SavedModel (tag serve, signature predict) to {a.out}")


def cmd_demo(a):
    import demo
    demo.run_demo(quick=a.quick, runs_dir=a.runs)


# ----------------------------------------------------------------------------- parser
def build_parser():
    p = argparse.ArgumentParser(prog="segment.py", description="FCN-8 road-scene segmentation "
                                "(road, vehicles, pedestrians, traffic lights) on VGG16.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help):
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        return sp

    from schemes import SCHEMES
    sp = add("make-demo-data", cmd_make_demo_data, "write procedurally drawn street scenes "
             "(Cityscapes layout) to DIR")
    sp.add_argument("dir")
    sp.add_argument("--n", type=int, default=60, help="number of scenes (default 60)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--size", type=int, nargs=2, default=[256, 512], metavar=("H", "W"))

    sp = add("check-data", cmd_check_data, "validate a dataset: counts per split, pixel share "
             "per class; exit 1 on problems")
    sp.add_argument("dir")
    sp.add_argument("--scheme", default="road4", choices=SCHEMES)
    sp.add_argument("--skip-bad", action="store_true", help="list undecodable files instead of stopping")

    sp = add("get-vgg", cmd_get_vgg, "obtain VGG16 as a SavedModel (course download, Keras "
             "ImageNet conversion, or random weights)")
    sp.add_argument("--source", default="auto", choices=["auto", "course", "keras-imagenet", "random"])
    sp.add_argument("--width", type=float, default=1.0, help="channel-width multiplier (e.g. 0.25)")
    sp.add_argument("--data", default=DEFAULT_DATA, help="data folder (default: data)")
    sp.add_argument("--out", help="build into this new folder instead")
    sp.add_argument("--seed", type=int, default=0)

    sp = add("train", cmd_train, "train FCN-8s; a run folder runs/<name> holds checkpoints, "
             "history and TensorBoard logs")
    sp.add_argument("--data", required=True, help="dataset root (any supported layout)")
    sp.add_argument("--vgg", help="VGG16 SavedModel folder (default: obtained into data/)")
    sp.add_argument("--vgg-source", default="auto", choices=["auto", "course", "keras-imagenet", "random"])
    sp.add_argument("--width", type=float, default=1.0, help="VGG width when it is built here")
    sp.add_argument("--scheme", default="road4", choices=SCHEMES)
    sp.add_argument("--image-shape", type=int, nargs=2, default=[256, 512], metavar=("H", "W"))
    sp.add_argument("--epochs", type=int, default=10)
    sp.add_argument("--batch-size", type=int, default=4)
    sp.add_argument("--lr", type=float, default=1e-4)
    sp.add_argument("--lr-schedule", default="constant", choices=["constant", "poly", "cosine"])
    sp.add_argument("--warmup-epochs", type=float, default=0.0)
    sp.add_argument("--keep-prob", type=float, default=0.5)
    sp.add_argument("--l2", type=float, default=1e-3, help="L2 weight of the decoder kernels")
    sp.add_argument("--class-weights", action="store_true", help="median-frequency class weights")
    sp.add_argument("--loss", default="ce", choices=["ce", "focal", "ohem"],
                    help="per-pixel loss: cross-entropy, focal, or cross-entropy of the hardest "
                    "pixels only (OHEM)")
    sp.add_argument("--focal-gamma", type=float, default=2.0, help="focusing power of --loss focal")
    sp.add_argument("--ohem-fraction", type=float, default=0.25,
                    help="share of labelled pixels kept by --loss ohem")
    sp.add_argument("--no-augment", action="store_true", help="no flips/scale-crop/colour jitter")
    sp.add_argument("--no-skip-scaling", action="store_true",
                    help="do not scale pool4/pool3 by 0.01/0.0001 before their score layers")
    sp.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                    help="also checkpoint every STEPS steps (default: each epoch)")
    sp.add_argument("--eval-every", type=int, default=1, metavar="EPOCHS")
    sp.add_argument("--val-split", help="validation split (default: 'val', else every 10th train "
                    "image held out; 'none' for no validation)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--run", help="run name (default: a timestamp)")
    sp.add_argument("--resume", action="store_true", help="continue --run (or the latest run)")
    sp.add_argument("--runs", default=DEFAULT_RUNS, help=argparse.SUPPRESS)

    sp = add("evaluate", cmd_evaluate, "per-class IoU, mIoU, pixel accuracy on a split (table + JSON)")
    sp.add_argument("--model", required=True, help="runs/<name> folder or exported model")
    sp.add_argument("--data", required=True)
    sp.add_argument("--split", default="val")
    sp.add_argument("--batch-size", type=int, default=4)
    sp.add_argument("--out", help="JSON path (default: in the model folder)")
    sp.add_argument("--cityscapes-out", help="also write Cityscapes labelIds PNGs here for "
                    "csEvalPixelLevelSemanticLabeling")

    sp = add("predict", cmd_predict, "overlays and class maps for images or folders")
    sp.add_argument("--model", required=True)
    sp.add_argument("inputs", nargs="+")
    sp.add_argument("--out", help="new output folder (default: runs/predict-<timestamp>)")
    sp.add_argument("--batch-size", type=int, default=4)
    sp.add_argument("--runs", default=DEFAULT_RUNS, help=argparse.SUPPRESS)

    sp = add("video", cmd_video, "overlay every frame of a video, write an H.264 mp4")
    sp.add_argument("--model", required=True)
    sp.add_argument("input")
    sp.add_argument("output")
    sp.add_argument("--batch-size", type=int, default=4)
    sp.add_argument("--max-frames", type=int)

    sp = add("export", cmd_export, "write a self-contained inference SavedModel of a run")
    sp.add_argument("--model", required=True, help="runs/<name> folder")
    sp.add_argument("--out", required=True)

    sp = add("demo", cmd_demo, "the embedded default end to end: demo data, VGG, short training, "
             "evaluation, overlays and a video in runs/")
    sp.add_argument("--quick", action="store_true", help="smallest settings (about a minute)")
    sp.add_argument("--runs", default=DEFAULT_RUNS, help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
