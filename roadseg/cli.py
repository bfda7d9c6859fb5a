#!/usr/bin/env python
"""Command line: ``python segment.py <command> --help``.

A thin layer over the modules: it parses arguments, calls one function, prints the
result.  Mistakes a user can fix end in one line on stderr and exit code 2.
"""
import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")   # before TensorFlow is imported


def quiet_tensorflow_import():
    """Import TensorFlow with stderr muted: at import it prints C++ info lines (oneDNN, CUDA
    stubs) that TF_CPP_MIN_LOG_LEVEL does not silence, which would bury our one-line errors.
    An import failure still raises, with its traceback, after stderr is restored."""
    if "tensorflow" in sys.modules:
        return
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow
        # Python-side deprecation warnings (e.g. "load ... is deprecated") would precede an
        # error line too; the CLI shows its own messages only.
        tensorflow.get_logger().setLevel("ERROR")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


quiet_tensorflow_import()   # the modules below import TensorFlow: mute its start-up lines first
from roadseg import (  # noqa: E402
    cityscapes_eval,
    config,
    datasets,
    demo,
    demo_scenes,
    export,
    inference,
    litert,
    metrics,
    overlays,
    precision,
    run_folders,
    trainer,
    vgg,
    video,
)
from roadseg.errors import UserError  # noqa: E402
from roadseg.schemes import SCHEMES  # noqa: E402

DEFAULT_RUNS = "runs"


# ----------------------------------------------------------------------------- commands
def cmd_make_demo_data(a):
    demo_scenes.make_demo_data(a.dir, n=a.n, seed=a.seed, size=tuple(a.size))
    print(f"demo scenes written to {a.dir}")


def cmd_check_data(a):
    report = datasets.check_dataset(a.dir, a.scheme, skip_bad=a.skip_bad)
    print(datasets.format_report(report))
    return 1 if report["problems"] else 0


def cmd_get_vgg(a):
    if a.out:
        if a.source not in ("random", "keras-imagenet"):
            raise UserError("--out works with --source random or keras-imagenet; the course model "
                            "always goes to <data>/vgg")
        vgg.build_vgg_savedmodel(a.out, source=a.source, width=a.width or 1.0, seed=a.seed)
        path, pretrained = a.out, bool(vgg.read_vgg_info(a.out).get("pretrained"))
    else:
        path, pretrained = vgg.obtain_vgg(a.data, source=a.source, width=a.width)
    print(f"VGG16 ready at {path} ({'pretrained' if pretrained else 'NOT pretrained: random weights'})")


def cmd_train(a):
    """Exit 0 when finished; 130 when SIGINT (Ctrl-C) or SIGTERM stopped it after saving."""
    result = trainer.train(runs_dir=a.runs, run=a.run, resume=a.resume, recipe=a.config,
                           **config.given_options(a))
    print(f"{result['status']}: {result['steps']} steps, best val mIoU "
          f"{result['best_miou']:.4f} -- run folder {result['run_dir']}")
    return 0 if result["status"] == "finished" else 130


def cmd_evaluate(a):
    # Outputs that are taken are refused before anything is computed or written.
    if a.out and os.path.exists(a.out):
        raise UserError(f"{a.out} already exists; choose another file name (nothing is overwritten)")
    if a.cityscapes_out and os.path.isdir(a.cityscapes_out) and os.listdir(a.cityscapes_out):
        raise UserError(f"prediction folder {a.cityscapes_out} is not empty; choose a new folder")
    if a.official and not a.cityscapes_out:
        raise UserError("--official needs --cityscapes-out DIR (a new folder for the labelIds PNGs)")
    found = datasets.find_dataset(a.data)   # data problems too, before the model is loaded
    if a.split not in found.splits:
        raise UserError(f"{a.data} has no '{a.split}' split (it has {', '.join(found.splits)}); "
                        f"pass --split")
    samples = [s for s in found.splits[a.split] if s.label]
    if not samples:
        raise UserError(f"split '{a.split}' of {a.data} has no labels to evaluate against")
    with _predictor(a) as predictor:
        result = metrics.evaluate(predictor.predict, samples, predictor.scheme,
                                   batch_size=a.batch_size)
        names = predictor.scheme.class_names
        print(metrics.format_table(result, names))
        out = a.out or os.path.join(a.model, f"evaluation-{a.split}-{time.strftime('%Y%m%d-%H%M%S')}.json")
        metrics.save_json(result, names, out)
        print(f"saved {out}")
        if a.cityscapes_out:
            cityscapes_eval.write_cityscapes_predictions(predictor.predict, samples, predictor.scheme,
                                                  a.cityscapes_out)
            print(f"Cityscapes labelIds predictions in {a.cityscapes_out}")
        if a.official:
            gt = [s.label for s in samples]
            if not all(g.endswith("_gtFine_labelIds.png") for g in gt):
                raise UserError("--official needs Cityscapes gtFine *_gtFine_labelIds.png ground truth")
            official = cityscapes_eval.run_official_evaluator(gt, a.cityscapes_out)
            print("official cityscapesscripts evaluator (19 classes):")
            for name, iou in official["class_iou"].items():
                print(f"  {name:<15} {iou:.4f}")
            print(f"  {'mean IoU':<15} {official['mean_iou']:.4f}")


def _predictor(a):
    """The model of ``--model`` at ``--precision``."""
    return inference.load_predictor(a.model, precision=a.precision, log=print)


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
    paths = _image_paths(a.inputs)
    with _predictor(a) as predictor:
        if a.out and os.path.exists(a.out):
            raise UserError(f"{a.out} already exists; choose a new --out folder (nothing is overwritten)")
        out = a.out or run_folders.new_run_dir(a.runs, "predict-" + time.strftime("%Y%m%d-%H%M%S"))
        os.makedirs(out, exist_ok=True)
        overlays.write_overlays(out, paths, predictor.predict, predictor.scheme,
                                            batch_size=a.batch_size)
    print(f"{len(paths)} overlays and class maps in {out}")


def cmd_video(a):
    with _predictor(a) as predictor:
        stats = video.process_video(a.input, a.output, predictor.predict, predictor.scheme,
                                      batch_size=a.batch_size, max_frames=a.max_frames)
    print(f"{a.output}: {stats['frames']} frames at {stats['fps']:.2f} fps, "
          f"{stats['frames_per_second']:.2f} frames/s end to end")


def cmd_export(a):
    if a.format == "tflite":
        litert.export_tflite(a.model, a.out, a.quantize or "none", a.calibration)
        print(f"exported LiteRT model ({a.quantize or 'none'} quantisation) to "
              f"{os.path.join(a.out, litert.MODEL_FILE)}")
        return
    if a.quantize or a.calibration:
        raise UserError("--quantize and --calibration are for --format tflite; add it, or leave "
                        "them out for a SavedModel")
    export.export(a.model, a.out)
    print(f"exported inference SavedModel (tag serve, signature predict) to {a.out}")


def cmd_demo(a):
    """Exit 0 when finished; 130 when Ctrl-C stopped the training (after saving it)."""
    result = demo.run_demo(quick=a.quick, runs_dir=a.runs, precision=a.precision)
    return 0 if result["status"] == "finished" else 130


# ----------------------------------------------------------------------------- parser
def add_precision(sp, what="of the model's arithmetic"):
    sp.add_argument("--precision", choices=precision.PRECISIONS, help=f"precision {what}: "
                    "bf16 (oneDNN bfloat16, for AVX512_BF16/AMX CPUs) or fp16 (GPU) mixed "
                    "precision; not for .tflite models (default fp32)")


def build_parser():
    p = argparse.ArgumentParser(prog="segment.py", description="FCN-8 road-scene segmentation "
                                "(road, vehicles, pedestrians, traffic lights) on VGG16.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help):
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        return sp

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
    sp.add_argument("--width", type=float, help="channel-width multiplier of a random VGG16 (e.g. "
                    "0.25; pretrained ones are width 1; default: 1, or 0.25 for auto's fallback)")
    sp.add_argument("--data", default=vgg.DATA_ROOT, help="data folder (default: data)")
    sp.add_argument("--out", help="build into this new folder instead")
    sp.add_argument("--seed", type=int, default=0)

    sp = add("train", cmd_train, "train FCN-8s; a run folder runs/<name> holds checkpoints, "
             "history and TensorBoard logs. Ctrl-C or SIGTERM saves a checkpoint and exits "
             "with code 130 (continue with --resume)")
    sp.add_argument("--config", metavar="FILE", help="a recipe: a JSON file of these options "
                    "(configs/*.json); flags given here override it")
    config.add_arguments(sp)   # one flag (or a few) per TrainConfig option
    sp.add_argument("--run", help="run name (default: a timestamp)")
    sp.add_argument("--resume", action="store_true", help="continue --run (or the latest run)")
    sp.add_argument("--runs", default=DEFAULT_RUNS, help=argparse.SUPPRESS)

    sp = add("evaluate", cmd_evaluate, "per-class IoU, mIoU, pixel accuracy on a split (table + JSON)")
    sp.add_argument("--model", required=True, help="runs/<name> folder or exported model")
    sp.add_argument("--data", required=True)
    sp.add_argument("--split", default="val")
    sp.add_argument("--batch-size", type=int, default=4)
    sp.add_argument("--out", help="JSON path (default: in the model folder)")
    add_precision(sp)
    sp.add_argument("--cityscapes-out", help="also write Cityscapes labelIds PNGs here for "
                    "csEvalPixelLevelSemanticLabeling")
    sp.add_argument("--official", action="store_true", help="then score them with the official "
                    "cityscapesscripts evaluator (use --scheme cityscapes19 runs for exact classes)")

    sp = add("predict", cmd_predict, "overlays and class maps for images or folders")
    sp.add_argument("--model", required=True)
    sp.add_argument("inputs", nargs="+")
    sp.add_argument("--out", help="new output folder (default: runs/predict-<timestamp>)")
    add_precision(sp)
    sp.add_argument("--batch-size", type=int, default=4)
    sp.add_argument("--runs", default=DEFAULT_RUNS, help=argparse.SUPPRESS)

    sp = add("video", cmd_video, "overlay every frame of a video, write an H.264 mp4")
    sp.add_argument("--model", required=True)
    sp.add_argument("input")
    sp.add_argument("output")
    sp.add_argument("--batch-size", type=int, default=4)
    sp.add_argument("--max-frames", type=int)
    add_precision(sp)

    sp = add("export", cmd_export, "write a self-contained inference SavedModel of a run, or a "
             "LiteRT model (model.tflite) for in-car CPUs and int8 accelerators")
    sp.add_argument("--model", required=True, help="runs/<name> folder")
    sp.add_argument("--out", required=True, help="new folder")
    sp.add_argument("--format", choices=("savedmodel", "tflite"), default="savedmodel",
                    help="savedmodel (default) or tflite (LiteRT, fixed input size: the run's "
                    "image shape; predict/video/evaluate take DIR or DIR/model.tflite)")
    sp.add_argument("--quantize", choices=litert.QUANTIZE, help="tflite: none (default), "
                    "float16 weights, or int8 post-training quantisation")
    sp.add_argument("--calibration", metavar="DATA_DIR", help="int8: the representative "
                    f"images' dataset (up to {litert.CALIBRATION_IMAGES} of its training images; "
                    "default: the run's training data)")

    sp = add("demo", cmd_demo, "the embedded default end to end: demo data, VGG, short training, "
             "evaluation, overlays and a video in runs/")
    sp.add_argument("--quick", action="store_true", help="tiny settings: every step in well "
                    "under a minute, no download (a smoke test; learns little)")
    add_precision(sp, "of its training and inference")
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
