#!/usr/bin/env python
"""How memory, start-up, throughput and disk grow with the work (issue 25).

    python bench/scale.py data                      # generate the inputs under --root
    python bench/scale.py run [--only train512,...] [--sizes 1,10,100]
    python bench/scale.py plot                      # table + bench/figures/scale-<case>.png

Every case runs one ``segment.py`` command (``roadseg.cli.main``) in a child process of its
own, at 1x, 10x and 100x its work, and records:

* **peak RSS** of the process *and its children* (ffmpeg, Beam workers): the sum over the
  process tree sampled every 0.1 s with psutil (``peak_tree_mb``), and the kernel's own
  high-water mark of the largest process (``maxrss_mb``, ``getrusage(RUSAGE_CHILDREN)``);
* **start-up**: seconds from launching the process to the end of the first training step /
  the first predicted batch or frame (a hook in the child notes it);
* **throughput**: items (training pairs, images, frames) per second after start-up, in wall
  clock and per CPU second (user + system of the process and its children: load-robust);
* **disk**: the largest size the run / output folder reached while the command ran (sampled
  every 2 s; a training cache removed at the end is counted) and its size at the end;
* the load average before and after.

Inputs are generated under ``--root`` (default bench/results/scale-data, git-ignored):
demo scenes (``roadseg.demo_scenes``) drawn once and hard-linked under new names to make
larger sets in the Cityscapes layout (decoding costs the same; the disk does not fill), a
1080p clip looped to the length wanted (``ffmpeg -stream_loop``, stream copy), a random
VGG16 of width 1/16 and a small run trained on it for the inference commands.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[:1] != [ROOT]:
    sys.path.insert(0, ROOT)

RESULTS = os.path.join(ROOT, "bench", "results")      # JSON and logs (git-ignored)
FIGURES = os.path.join(ROOT, "bench", "figures")      # the plots bench/README.md shows (committed)
WIDTH = 1 / 16
BIG = (1024, 2048)            # Cityscapes' own size: the training sources
SMALL = (128, 256)            # the small images of predict / evaluate / batch-predict
UNIQUE_BIG, UNIQUE_SMALL = 40, 100
VIDEO_FPS, VIDEO_CLIP_FRAMES = 25, 100

# (case, 1x work) -- 10x and 100x multiply it
# (train1024mem: the cache held in memory, as every training run did before the policy)
BASE = {"train512": 30, "train1024": 30, "train1024mem": 30, "video": 250, "predict": 1000,
        "evaluate": 1000, "batch": 1000}
UNIT = {"train512": "pairs", "train1024": "pairs", "train1024mem": "pairs", "video": "frames",
        "predict": "images", "evaluate": "images", "batch": "images"}


# ============================================================================ data
def make_data(root):
    """Everything the cases read, made once (each step is skipped when its output exists)."""
    from roadseg import demo_scenes, vgg
    os.makedirs(root, exist_ok=True)
    vgg_dir = os.path.join(root, "vgg-w16")
    if not os.path.isdir(vgg_dir):
        vgg.build_vgg_savedmodel(vgg_dir, source="random", width=WIDTH, seed=0)
    big = demo_scenes.make_demo_data(os.path.join(root, "src-big"), n=UNIQUE_BIG, seed=1, size=BIG,
                                     val_fraction=0.1)
    small = demo_scenes.make_demo_data(os.path.join(root, "src-small"), n=UNIQUE_SMALL, seed=2,
                                       size=SMALL, val_fraction=0.1)
    model = os.path.join(root, "runs", "model")
    if not os.path.isdir(model):
        from roadseg import trainer
        trainer.train(small, vgg_dir, runs_dir=os.path.join(root, "runs"), run="model", epochs=1,
                      image_shape=[256, 512], batch_size=4, max_eval_images=4)
    clip = os.path.join(root, "clip-1080p.mp4")
    if not os.path.exists(clip):
        from roadseg import datasets, video
        images = [datasets.load_image(p) for p in sorted(_files(big, "_leftImg8bit.png"))[:4]]
        video.write_video(clip, video.pan_clip_frames(images, VIDEO_CLIP_FRAMES, (1080, 1920)),
                          fps=VIDEO_FPS)


def _files(root, ending):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(ending)]


def linked_cityscapes(src, dest, n_train, n_val):
    """A Cityscapes-layout set of ``n_train`` / ``n_val`` pairs hard-linked from ``src``'s
    scenes in turn (``dest`` is reused when complete)."""
    marker = os.path.join(dest, "complete")
    if os.path.exists(marker):
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    pairs = sorted(zip(sorted(_files(src, "_leftImg8bit.png")), sorted(_files(src, "_gtFine_labelIds.png"))))
    for split, n in (("train", n_train), ("val", n_val)):
        if not n:
            continue
        os.makedirs(os.path.join(dest, "leftImg8bit", split, "city"))
        os.makedirs(os.path.join(dest, "gtFine", split, "city"))
        for i in range(n):
            image, label = pairs[i % len(pairs)]
            frame = f"city_{i:06d}_000019"
            os.link(image, os.path.join(dest, "leftImg8bit", split, "city", f"{frame}_leftImg8bit.png"))
            os.link(label, os.path.join(dest, "gtFine", split, "city", f"{frame}_gtFine_labelIds.png"))
    open(marker, "w").close()
    return dest


def looped_video(clip, dest, frames):
    """``clip`` looped (stream copy, no re-encoding) to at least ``frames`` frames."""
    if os.path.exists(dest):
        return dest
    import imageio_ffmpeg

    from roadseg.run_folders import staged_file
    loops = -(-frames // VIDEO_CLIP_FRAMES) - 1
    with staged_file(dest) as tmp:
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-stream_loop", str(loops),
                        "-i", clip, "-c", "copy", "-f", "mp4", tmp], check=True)
    return dest


# ============================================================================ cases
def case_argv(case, n, root, work):
    """``(segment.py argv, folder whose disk use is measured)`` of ``case`` at ``n`` items."""
    vgg_dir, model = os.path.join(root, "vgg-w16"), os.path.join(root, "runs", "model")
    out = os.path.join(work, "out")
    if case.startswith("train"):
        shape = ["512", "1024"] if case == "train512" else ["1024", "2048"]
        data = linked_cityscapes(os.path.join(root, "src-big"), os.path.join(root, f"big-{n}"), n, 4)
        return (["train", "--data", data, "--vgg", vgg_dir, "--epochs", "1", "--batch-size", "4",
                 "--image-shape", *shape, "--max-eval-images", "2", "--run", "r", "--runs", work]
                + (["--cache", "memory"] if case.endswith("mem") else []), os.path.join(work, "r"))
    if case == "video":
        clip = looped_video(os.path.join(root, "clip-1080p.mp4"),
                            os.path.join(root, f"video-{n}.mp4"), n)
        return ["video", "--model", model, clip, out + ".mp4", "--max-frames", str(n)], work
    data = linked_cityscapes(os.path.join(root, "src-small"), os.path.join(root, f"small-{n}"),
                             0, n)
    images = os.path.join(data, "leftImg8bit", "val", "city")
    if case == "predict":
        return ["predict", "--model", model, images, "--out", out, "--batch-size", "8"], out
    if case == "batch":
        return ["batch-predict", "--model", model, images, "--out", out, "--batch-size", "8"], out
    if case == "evaluate":
        return ["evaluate", "--model", model, "--data", data, "--split", "val", "--batch-size", "8",
                "--out", out + ".json"], work
    raise ValueError(case)


def child(spec):
    """In the child process: note when the first step / batch / frame is done, then run the
    command.  Writes ``{"first": unix time, "items": n}`` to ``spec['note']``."""
    from roadseg import checkpoints, cli, inference, metrics, overlays, video
    note = {"first": None, "items": 0}

    def noted(func, count):
        def wrapper(*args, **kwargs):
            result = func(*args, **kwargs)
            note["items"] += count(args, result)
            if note["first"] is None:
                note["first"] = time.time()
            return result
        return wrapper

    add_step = checkpoints.Progress.add_step
    checkpoints.Progress.add_step = noted(add_step, lambda a, r: 1)
    predict = noted(inference.predict_batch, lambda a, r: len(r))
    for module in (inference, metrics, overlays, video):
        module.predict_batch = predict
    if spec["argv"][0] == "batch-predict":
        from roadseg import batch_predict
        handler = batch_predict.SegmentationModelHandler
        handler.run_inference = noted(handler.run_inference, lambda a, r: len(r))
    try:
        code = cli.main(spec["argv"])
    finally:
        with open(spec["note"], "w") as f:
            json.dump(note, f)
    sys.exit(code)


def measure(argv, disk_dir, work):
    """Run ``argv`` in a child process; its peak RSS (tree and largest process), start-up,
    wall and CPU seconds, peak and final disk use of ``disk_dir``."""
    import psutil

    from roadseg.input_pipeline import folder_bytes
    note = os.path.join(work, "note.json")
    log = open(os.path.join(work, "log.txt"), "w")
    load = os.getloadavg()
    start = time.time()
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "child",
                             json.dumps({"argv": argv, "note": note})], stdout=log, stderr=log,
                            cwd=ROOT, env={**os.environ, "TQDM_MININTERVAL": "5"})
    parent, peak, disk_peak, last_disk = psutil.Process(proc.pid), 0, 0, 0.0
    while True:
        # wait4: this child's own rusage (RUSAGE_CHILDREN would keep earlier cases' maximum)
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            tree = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(_rss(p) for p in tree))
        except psutil.NoSuchProcess:
            pass
        if time.time() - last_disk > 2:
            disk_peak, last_disk = max(disk_peak, folder_bytes(disk_dir)), time.time()
        time.sleep(0.1)
    wall = time.time() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    with open(note) as f:
        noted = json.load(f)
    disk_end = folder_bytes(disk_dir)
    return dict(code=proc.returncode, peak_tree_mb=peak / 2**20, maxrss_mb=usage.ru_maxrss / 1024,
                wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime,
                startup_s=(noted["first"] - start) if noted["first"] else None,
                counted=noted["items"], disk_peak_mb=max(disk_peak, disk_end) / 2**20,
                disk_end_mb=disk_end / 2**20, load_before=load, load_after=os.getloadavg())


def _rss(p):
    try:
        return p.memory_info().rss
    except Exception:   # the process ended between listing and reading
        return 0


def run_case(case, factor, root, scratch):
    n = BASE[case] * factor
    work = os.path.join(scratch, f"{case}-{factor}x")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    argv, disk_dir = case_argv(case, n, root, work)
    result = measure(argv, disk_dir, work)
    steady = result["wall_s"] - (result["startup_s"] or 0)
    result.update(case=case, factor=factor, n=n, unit=UNIT[case], argv=argv,
                  rate=n / steady if steady > 0 else None, cpu_rate=n / result["cpu_s"])
    if result["code"] == 0:
        shutil.rmtree(work, ignore_errors=True)   # outputs measured; the disk is freed
    else:
        result["log"] = os.path.join(work, "log.txt")
    return result


def machine():
    import platform

    import tensorflow as tf
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return dict(cpu=cpu, cores=os.cpu_count(), memory_gb=round(mem / 2**30, 1),
                tensorflow=tf.__version__, python=platform.python_version())


# ============================================================================ report
def table(results):
    head = ("| case | n | peak RSS tree (MiB) | x 1x | max RSS one process (MiB) | start-up (s) | "
            "rate (/s wall) | rate (/s CPU) | disk peak / end (MiB) | load | exit |")
    lines = [head, "|" + " --- |" * 11]
    base = {}
    for r in results:
        ref = base.setdefault(r["case"], r["peak_tree_mb"])
        start = f"{r['startup_s']:.1f}" if r["startup_s"] is not None else "-"
        r = dict(r, **_partial(r))
        rate = f"{r['rate']:.2f}" if r["rate"] else "-"
        n = f"{r['n']} {r['unit']}" + (f" (stopped after {r['done']})" if "done" in r else "")
        lines.append(f"| {r['case']} | {n} | {r['peak_tree_mb']:.0f} | "
                     f"{r['peak_tree_mb'] / ref:.2f} | {r['maxrss_mb']:.0f} | {start} | {rate} | "
                     f"{r['cpu_rate']:.2f} | {r['disk_peak_mb']:.0f} / {r['disk_end_mb']:.0f} | "
                     f"{r['load_before'][0]:.1f} | {r['code']} |")
    return "\n".join(lines)


def _partial(r):
    """A run stopped early (exit 130: SIGTERM, checkpoint saved): its rates from the work it
    did (training steps x the batch of 4; the hook counted them)."""
    if r["code"] == 0 or not r["case"].startswith("train") or not r["counted"]:
        return {}
    done = r["counted"] * 4
    steady = r["wall_s"] - (r["startup_s"] or 0)
    return dict(done=done, rate=done / steady, cpu_rate=done / r["cpu_s"])


def plot(results, out_dir):
    """One PNG per case: peak RSS and throughput against the work."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    for case in dict.fromkeys(r["case"] for r in results):
        rows = sorted((r for r in results if r["case"] == case), key=lambda r: r["n"])
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        ns = [r["n"] for r in rows]
        ax.plot(ns, [r["peak_tree_mb"] for r in rows], "o-", label="peak RSS, process tree (MiB)")
        ax.plot(ns, [r["disk_peak_mb"] for r in rows], "s--", label="disk peak (MiB)")
        if case.startswith("train"):
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
            ax.axhline(total, color="grey", lw=0.8, ls=":", label="the machine's memory")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel(rows[0]["unit"])
        ax.set_ylabel("MiB")
        ax2 = ax.twinx()
        ax2.plot(ns, [r["cpu_rate"] for r in rows], "^:", color="C2", label=f"{rows[0]['unit']}/CPU s")
        ax2.set_ylabel(f"{rows[0]['unit']} per CPU second")
        ax2.set_ylim(bottom=0)
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="lower right", framealpha=0.85)
        ax.set_title(f"{case} (segment.py {rows[0]['argv'][0]}): memory, disk, throughput", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"scale-{case}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def latest_results():
    """Every case's newest result at each factor, over all scale-*.json files."""
    files = sorted(f for f in os.listdir(RESULTS) if f.startswith("scale-") and f.endswith(".json"))
    rows = {}
    for name in files:
        with open(os.path.join(RESULTS, name)) as f:
            for r in json.load(f)["results"]:
                rows[(r["case"], r["factor"])] = r
    return [rows[k] for k in sorted(rows, key=lambda k: (list(BASE).index(k[0]), k[1]))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("data", "run", "plot", "child"))
    p.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--root", default=os.environ.get("SCALE_DATA", os.path.join(RESULTS, "scale-data")),
                   help="where the generated inputs go (default bench/results/scale-data, git-ignored; "
                   "up to ~30 GB at 100x)")
    p.add_argument("--only", default=",".join(BASE), help="cases, comma-separated: " + ",".join(BASE))
    p.add_argument("--sizes", default="1,10,100", help="factors of the 1x work (default 1,10,100)")
    a = p.parse_args(argv)
    if a.what == "child":
        return child(json.loads(a.spec))
    os.makedirs(RESULTS, exist_ok=True)
    if a.what == "data":
        return make_data(a.root)
    if a.what == "plot":
        results = latest_results()
        print(table(results))
        os.makedirs(FIGURES, exist_ok=True)
        print("\n".join(plot(results, FIGURES)))
        return 0
    from roadseg.run_folders import write_json
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out, results, info = os.path.join(RESULTS, f"scale-{stamp}.json"), [], machine()
    for case in a.only.split(","):
        for factor in map(int, a.sizes.split(",")):
            r = run_case(case, factor, a.root, os.path.join(a.root, "work"))
            results.append(r)
            print(json.dumps({k: r[k] for k in ("case", "n", "code", "peak_tree_mb", "maxrss_mb",
                                                "startup_s", "rate", "cpu_rate", "disk_peak_mb")}),
                  flush=True)
            write_json(out, dict(machine=info, results=results))   # replaced after each case
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
