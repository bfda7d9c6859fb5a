"""Benchmark suite: how close FCN-8s training and inference come to this machine's limit.

    python bench/run.py            # full run, about 10 minutes on 2 cores
    python bench/run.py --quick    # fewer iterations and cases, under 3 minutes
    python bench/run.py --levers   # the tuning experiments (variants of the main cases)

Prints one table measured in one run and writes it, with every step time, the
machine and the load average, to ``bench/results/<timestamp>.json`` (git-ignored;
the cases' own output goes to ``<timestamp>.log`` beside it).  Each case runs in its
own process (``cases.py``), so its peak resident memory is its own and environment
switches take effect.  Benchmarks are not tests: nothing here runs in CI.

Rows (see README.md): the fp32 GEMM peak as the reference; full-width VGG16-FCN8
at 256x512 for inference and training, with achieved GFLOP/s from the graph's
counted FLOPs and the ratio to the GEMM peak; the input pipeline against what
training consumes; video end to end against the model alone; and a plain Keras 3
version of the same network as the peer.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata

import common  # bench/ is on sys.path as the script's folder; roadseg is installed (pip -e .)

HERE = os.path.dirname(os.path.abspath(__file__))

RESULTS = os.path.join(HERE, "results")
TARGETS = dict(infer=0.85, train=0.80, pipeline=5.0, video=0.90, peer=1.0, bf16=1.6, int8=2.0)


# --------------------------------------------------------------------------- plans
def main_plan(quick):
    """``[(key, spec, extra env)]`` of the main table."""
    def q(full, short):
        return short if quick else full

    plan = [
        ("gemm", dict(case="gemm", n=4096, reps=q(4, 2), warmup=1, iters=q(5, 2))),
        ("flops", dict(case="flops", train_batches=q([4, 8], [4]))),
        ("infer_b1", dict(case="infer", batch=1, warmup=q(2, 1), iters=q(8, 3))),
        ("infer_b8", dict(case="infer", batch=8, warmup=1, iters=q(4, 2))),
        ("train_b4", dict(case="train", batch=4, warmup=q(2, 1), iters=q(4, 2))),
    ]
    if not quick:
        plan.append(("train_b8", dict(case="train", batch=8, warmup=2, iters=3)))
    plan += [
        ("peer_infer_b8", dict(case="peer_infer", batch=8, warmup=1, iters=q(4, 2))),
        ("peer_train_b4", dict(case="peer_train", batch=4, warmup=q(2, 1), iters=q(4, 2))),
    ]
    if not quick:
        plan += [("peer_infer_b1", dict(case="peer_infer", batch=1, warmup=2, iters=8)),
                 ("peer_train_b8", dict(case="peer_train", batch=8, warmup=2, iters=3))]
    plan += [   # the overhead of replicating over 2 logical devices on the same 2 cores
        ("devices2_b4", dict(case="train", devices=2, batch=4, warmup=q(2, 1), iters=q(4, 2))),
    ]
    plan += [
        ("pipeline_png", dict(case="pipeline", images=q(16, 8), batch=8, cache=False, warmup=1,
                              iters=q(6, 2))),
        ("pipeline_cache", dict(case="pipeline", images=q(16, 8), batch=8, cache=True,
                                iters=q(40, 10))),
        ("video", dict(case="video", frames=q(32, 12), batch=4, warmup=1)),
    ]
    plan += [   # issue 31: a run folder as segment.py predict / evaluate / video open it
        ("run_folder_b8", dict(case="run_folder", batch=8, warmup=1, iters=q(4, 2))),
    ]
    return [(key, spec, {}) for key, spec in
            plan + precision_plan(quick) + openvino_plan(quick) + realtime_plan(quick)]


REALTIME_CLIPS = dict(lanes="highway_lanes.mp4", cars="highway_cars.mp4")   # 960x540, 1280x720
REALTIME_MODELS = dict(  # key: (label, VGG width, backend, --max-frames)
    w025_tf=("width 1/4 TF fp32", 0.25, "tf", None),
    w025_ov_int8=("width 1/4 OpenVINO int8", 0.25, "openvino_int8", None),
    w1_ov_int8=("full width OpenVINO int8", 1.0, "openvino_int8", 48),
    w1_tf=("full width TF fp32", 1.0, "tf", 48),
)


def realtime_plan(quick):
    """Issue 34: ``segment.py video`` end to end on the real clips (every frame, then
    ``--realtime``), road4 at 256x512; full-width models on the first 48 frames only."""
    clips = ["lanes"] if quick else list(REALTIME_CLIPS)
    models = ["w025_tf", "w025_ov_int8"] if quick else list(REALTIME_MODELS)
    return [(f"realtime_{clip}_{m}", dict(case="realtime", clip=REALTIME_CLIPS[clip],
                                          model_width=REALTIME_MODELS[m][1],
                                          backend=REALTIME_MODELS[m][2],
                                          max_frames=REALTIME_MODELS[m][3]))
            for clip in clips for m in models]


def precision_plan(quick, quality=None):
    """The precision rows: bf16 GEMM, bf16 inference / training (oneDNN auto mixed precision)
    against the fp32 rows of the same run, LiteRT fp32 and int8; ``quality`` = (run, data)
    adds the mIoU of each on that run's test split."""
    train_batch = 4 if quick else 8
    plan = [
        ("gemm_bf16", dict(case="gemm", n=4096, reps=4 if quick else 8, dtype="bfloat16", warmup=1,
                           iters=2 if quick else 5)),
        ("bf16_infer_b8", dict(case="infer", batch=8, precision="bf16", warmup=2,
                               iters=2 if quick else 4)),
        (f"bf16_train_b{train_batch}", dict(case="train", batch=train_batch, precision="bf16",
                                            warmup=2, iters=2 if quick else 3)),
        ("litert_fp32", dict(case="litert", quantize="none", batch=8, warmup=1, iters=2 if quick else 3)),
        ("litert_int8", dict(case="litert", quantize="int8", batch=8, warmup=1, iters=2 if quick else 3,
                             calibration=8)),
    ]
    if quality:
        plan.append(("quality", dict(case="quality", run=os.path.abspath(quality[0]),
                                     data=os.path.abspath(quality[1]), split="test")))
    return plan


def openvino_plan(quick):
    """Issue 23: OpenVINO's own GEMM limits (fp32, bf16, int8) and the product's OpenVINO model
    (``segment.py export --format openvino`` of one bench run) at fp32, bf16 and int8, batch 8."""
    iters = 2 if quick else 3
    plan = [(f"gemm_ov_{p}", dict(case="gemm_openvino", precision=p, n=4096, reps=4, warmup=1,
                                  iters=iters)) for p in ("fp32", "bf16", "int8")]
    plan += [("ov_fp32", dict(case="openvino", batch=8, warmup=1, iters=iters)),
             ("ov_bf16", dict(case="openvino", batch=8, precision="bf16", warmup=1, iters=iters)),
             ("ov_int8", dict(case="openvino", batch=8, quantize="int8", warmup=1, iters=iters))]
    return plan


def lever_plan(quick):
    """Variants of inference (batch 8) and training (batch 4) with one lever changed each."""
    def q(full, short):
        return short if quick else full

    infer = dict(case="infer", batch=8, warmup=1, iters=q(3, 2))
    train = dict(case="train", batch=4, warmup=q(2, 1), iters=q(3, 2))
    xla_env = {"TF_XLA_FLAGS": "--tf_xla_auto_jit=2 --tf_xla_cpu_global_jit"}
    plan = [("gemm", dict(case="gemm", n=4096, reps=q(4, 2), warmup=1, iters=q(4, 2)), {}),
            ("flops", dict(case="flops", train_batches=[4]), {})]
    for name, change, env in [
            ("baseline", {}, {}),
            ("intra2_inter1", dict(intra=2, inter=1), {}),
            ("intra1_inter2", dict(intra=1, inter=2), {}),
            ("onednn_off", {}, {"TF_ENABLE_ONEDNN_OPTS": "0"}),
            ("xla_on_1", dict(xla=True), {}),
            ("xla_env_autojit", {}, xla_env)]:
        plan.append((f"infer_{name}", dict(infer, **change), env))
        plan.append((f"train_{name}", dict(train, **change), env))
    plan += [
        ("infer_frozen", dict(infer, variant="frozen"), {}),
        ("infer_folded", dict(infer, variant="folded"), {}),
        ("infer_b1", dict(infer, batch=1, iters=q(6, 3)), {}),
        ("infer_b4", dict(infer, batch=4), {}),
        ("infer_b16", dict(infer, batch=16, iters=2), {}),
        ("train_feed_dict", dict(train, feed="feed_dict"), {}),
        # OpenVINO (issue 23): batch size, the THROUGHPUT hint (a stream per core, the batch
        # split over them); static shapes and a classes-only output measured no different
        ("ov_fp32_b1", dict(case="openvino", batch=1, warmup=1, iters=q(6, 3)), {}),
        ("ov_fp32_b8", dict(case="openvino", batch=8, warmup=1, iters=q(3, 2)), {}),
        ("ov_fp32_b16", dict(case="openvino", batch=16, warmup=1, iters=2), {}),
        ("ov_fp32_throughput", dict(case="openvino", batch=8, hint="THROUGHPUT", warmup=1,
                                    iters=q(3, 2)), {}),
        ("ov_int8_b8", dict(case="openvino", batch=8, quantize="int8", warmup=1, iters=q(3, 2)), {}),
        ("ov_int8_throughput", dict(case="openvino", batch=8, quantize="int8", hint="THROUGHPUT",
                                    warmup=1, iters=q(3, 2)), {}),
        ("peer_infer_b8", dict(case="peer_infer", batch=8, warmup=1, iters=q(3, 2)), {}),
        ("peer_infer_b8_nojit", dict(case="peer_infer", batch=8, warmup=1, iters=q(3, 2),
                                     jit_compile=False), {}),
        ("peer_train_b4", dict(case="peer_train", batch=4, warmup=q(2, 1), iters=q(3, 2)), {}),
        ("peer_train_b4_nojit", dict(case="peer_train", batch=4, warmup=q(2, 1), iters=q(3, 2),
                                     jit_compile=False), {}),
    ]
    if not quick:
        plan.append(("check_variants", dict(case="check_variants"), {}))
    return plan


# --------------------------------------------------------------------------- running
def run_case(key, spec, env, log):
    """Run one case in a fresh process; return its result dict (``error`` on failure)."""
    cmd = [sys.executable, os.path.join(HERE, "cases.py"), json.dumps(spec)]
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **env)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    wall = time.perf_counter() - start
    log.write(f"==== {key} {json.dumps(spec)} env={env} ({wall:.1f}s, exit {proc.returncode})\n")
    log.write(proc.stdout + "\n")
    log.flush()
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = proc.stdout.strip().splitlines()[-1:] or ["no output"]
        return dict(error=f"exit {proc.returncode}: {tail[0][:200]}", wall_s=wall, env=env)
    result = json.loads(lines[-1][len("RESULT "):])
    result.update(wall_s=round(wall, 1), env=env)
    return result


def machine():
    """What the figures were measured on."""
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor())
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    from roadseg import precision
    return dict(cpu=model, cores=os.cpu_count(), avx512="avx512f" in flags,
                cpu_features=precision.cpu_features(),
                memory_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1),
                python=platform.python_version(), tensorflow=metadata.version("tensorflow"),
                keras=metadata.version("keras"), numpy=metadata.version("numpy"),
                kernel=platform.release())


# --------------------------------------------------------------------------- table
HEADER = ["case", "rate", "GFLOP/s", "% peak", "% peak (CPU)", "peak MiB", "comparison", "target"]


def _ok(results, key):
    return key in results and "error" not in results[key]


def _peaks(results):
    gemm = results.get("gemm", {})
    return gemm.get("rate"), gemm.get("cpu_rate")


def _model_row(results, key, label, per_image, compare="", target=""):
    """A row for a model case; stores gflops / fractions of peak in its result."""
    r = results[key]
    if "error" in r:
        return [label, "FAILED", "", "", "", "", r["error"], target]
    peak, peak_cpu = _peaks(results)
    gflops = r["rate"] * per_image / 1e9 if per_image else None
    cpu_gflops = r["cpu_rate"] * per_image / 1e9 if per_image and "cpu_rate" in r else None
    r.update(gflops=gflops, fraction_of_peak=gflops / peak if gflops and peak else None,
             cpu_fraction_of_peak=cpu_gflops / peak_cpu if cpu_gflops and peak_cpu else None)
    return [label, f"{r['rate']:.3g} {r['unit']}", _f(gflops, "{:.0f}"),
            _f(r["fraction_of_peak"], "{:.0%}"), _f(r["cpu_fraction_of_peak"], "{:.0%}"),
            f"{r['peak_rss_mb']:.0f}", compare, target]


def _verdict(value, goal, fmt, shown=None):
    """'>= goal: MET' or 'missed', with the value in ``shown`` format when given."""
    text = f">= {fmt.format(goal)}: {'MET' if value is not None and value >= goal else 'missed'}"
    return text + (f" ({shown.format(value)})" if shown and value is not None else "")


def build_rows(results):
    """The main table's rows (``HEADER`` columns)."""
    rows = []
    peak, peak_cpu = _peaks(results)
    flops = results["flops"] if _ok(results, "flops") else {}
    if peak:
        rows.append(["fp32 GEMM 4096^3 (TF, reference)", f"{peak:.0f} GFLOP/s", f"{peak:.0f}", "100%",
                     f"100% = {peak_cpu:.0f}", f"{results['gemm']['peak_rss_mb']:.0f}", "", ""])
    if flops:
        fwd = flops["forward"]
        train = ", ".join(f"training b{k[7:]} {v / 1e9:.1f}" for k, v in flops.items()
                          if k.startswith("train_b"))
        rows.append(["FLOPs counted per 256x512 image", f"{fwd / 1e9:.1f} GFLOP", "", "", "", "",
                     f"forward = {fwd / 2e9:.1f} GMAC (expected ~{common.EXPECTED_GMAC}); "
                     f"{train} GFLOP", ""])
    ours = sorted((k for k in results if k.startswith(("infer_b", "train_b"))),
                  key=lambda k: (k[0] == "t", int(k.split("_b")[1])))
    largest = {k.split("_b")[0]: k for k in ours}  # targets apply to the largest batch
    for key in ours:
        kind, batch = key.split("_b")
        per_image = flops.get("forward") if kind == "infer" else flops.get(f"train_b{batch}")
        peer_key = f"peer_{key}"
        compare = ""
        if _ok(results, key) and _ok(results, peer_key):
            ratio = results[key]["rate"] / results[peer_key]["rate"]
            results[key]["ours_over_peer"] = ratio
            compare = f"{ratio:.2f}x the Keras peer ({_verdict(ratio, TARGETS['peer'], '{:.1f}x')})"
        row = _model_row(results, key, f"ours {'inference' if kind == 'infer' else 'training'} "
                                       f"batch {batch}", per_image, compare)
        if largest[kind] == key:
            row[-1] = _verdict(results[key].get("fraction_of_peak"), TARGETS[kind], "{:.0%} of peak",
                               "{:.1%}")
        rows.append(row)
        if peer_key in results:
            rows.append(_model_row(results, peer_key, f"  Keras 3 peer "
                                   f"{'predict' if kind == 'infer' else 'fit'} batch {batch}", per_image))
    rows += device_rows(results, flops.get("train_b4"))
    return (rows + pipeline_and_video_rows(results) + precision_rows(results) + openvino_rows(results)
            + run_folder_rows(results) + realtime_rows(results))


def realtime_rows(results):
    """Issue 34: ``segment.py video`` on the real clips -- frames/s (wall clock) and latency
    of every frame, what ``--realtime`` keeps, and CPU ms a frame against what the machine's
    cores have at the clip's rate (2 cores at 25 fps: 80 ms), the load-robust verdict."""
    rows = []
    for key in (k for k in results if k.startswith("realtime_")):
        r = results[key]
        _, clip, model = key.split("_", 2)
        size = {"lanes": "960x540", "cars": "1280x720"}[clip]
        label = f"video {size} {REALTIME_MODELS[model][0]}"
        if "error" in r:
            rows.append([label, "FAILED", "", "", "", "", r["error"], ""])
            continue
        budget = os.cpu_count() * 1000 / r["all_fps"]
        kept = r["realtime_frames"] - r.get("realtime_dropped", 0)
        compare = (f"{r['all_frames']:.0f} frames: latency p50 {r['all_latency_p50_ms']:.0f} ms, p95 "
                   f"{r['all_latency_p95_ms']:.0f} ms, CPU {r['all_cpu_ms_per_frame']:.0f} ms a frame; "
                   f"--realtime: {kept:.0f} of {r['realtime_frames']:.0f} kept at "
                   f"{r['realtime_frames_per_second']:.3g}/s, p50 {r['realtime_latency_p50_ms']:.0f} "
                   f"ms, p95 {r['realtime_latency_p95_ms']:.0f} ms")
        verdict = (f"CPU <= {budget:.0f} ms a frame: "
                   f"{'MET' if r['all_cpu_ms_per_frame'] <= budget else 'missed'}")
        rows.append([label, f"{r['rate']:.3g} frames/s", "", "", "", f"{r['video_peak_rss_mb']:.0f}",
                     compare, verdict])
    return rows


def pipeline_and_video_rows(results):
    """The input pipeline against what training consumes; video end to end against the model."""
    rows = []
    consumer = next((k for k in ("train_b8", "train_b4") if _ok(results, k)), None)
    for key, label in (("pipeline_png", "input pipeline from 2048x1024 PNGs"),
                       ("pipeline_cache", "input pipeline from its cache")):
        r = results.get(key)
        if r is None or "error" in r:
            rows += [[label, "FAILED", "", "", "", "", r["error"], ""]] if r else []
            continue
        compare = target = ""
        if consumer:
            r["times_training"] = ratio = r["rate"] / results[consumer]["rate"]
            compare = f"{ratio:.3g}x what training batch {consumer[-1]} consumes"
            if key == "pipeline_cache":
                target = _verdict(ratio, TARGETS["pipeline"], "{:.0f}x training")
        rows.append([label, f"{r['rate']:.3g} images/s", "", "", "", f"{r['peak_rss_mb']:.0f}",
                     compare, target])
    r = results.get("video")
    if r is not None and "error" in r:
        rows.append(["video 1280x720 end to end", "FAILED", "", "", "", "", r["error"], ""])
    elif r is not None:
        r["end_to_end_over_model"] = ratio = r["rate"] / r["model_only"]
        rows.append(["video 1280x720 end to end", f"{r['rate']:.3g} frames/s", "", "", "",
                     f"{r['peak_rss_mb']:.0f}",
                     f"{ratio:.0%} of model-only {r['model_only']:.3g} frames/s",
                     _verdict(ratio, TARGETS["video"], "{:.0%}")])
    return rows


PRECISION_ROWS = (  # key, label, reference key, quality name, target
    ("bf16_infer_b8", "bf16 inference batch 8 (oneDNN AMP)", "infer_b8", "bf16", "bf16"),
    ("bf16_train_b8", "bf16 training batch 8 (oneDNN AMP)", "train_b8", None, "bf16"),
    ("bf16_train_b4", "bf16 training batch 4 (oneDNN AMP)", "train_b4", None, "bf16"),
    ("litert_fp32", "LiteRT fp32 (XNNPACK)", "infer_b8", "litert_fp32", None),
    ("litert_int8", "LiteRT int8 (XNNPACK)", "litert_fp32", "litert_int8", "int8"),
)


def precision_rows(results):
    """The precision rows; each result gets ``speedup_vs_fp32`` (and by CPU time), against
    the fp32 row of the same run it replaces, and ``miou_delta`` when ``quality`` ran."""
    rows = []
    peak, peak_cpu = _peaks(results)
    g = results.get("gemm_bf16")
    if g and "error" not in g and peak:
        g["speedup_vs_fp32"] = g["rate"] / peak
        g["cpu_speedup_vs_fp32"] = cpu = g["cpu_rate"] / peak_cpu if peak_cpu else None
        rows.append(["bf16 GEMM 4096^3 (TF)", f"{g['rate']:.0f} GFLOP/s", f"{g['rate']:.0f}",
                     f"{g['rate'] / peak:.0%}", _f(cpu, "{:.0%}"), f"{g['peak_rss_mb']:.0f}",
                     f"{g['rate'] / peak:.2f}x the fp32 GEMM ({_f(cpu, '{:.2f}x')} by CPU time)", ""])
    flops = results["flops"] if _ok(results, "flops") else {}
    quality = results["quality"] if _ok(results, "quality") else {}
    bf16_cpu = bool(set(results.get("_machine", {}).get("cpu_features", ())) & {"avx512_bf16", "amx_bf16"})
    for key, label, ref, qname, target in PRECISION_ROWS:
        if key not in results:
            continue
        per_image = flops.get(f"train_b{key[-1]}") if "train" in key else flops.get("forward")
        compare, verdict = "", ""
        if _ok(results, key) and _ok(results, ref):
            r, base = results[key], results[ref]
            r["speedup_vs_fp32"] = speedup = r["rate"] / base["rate"]
            r["cpu_speedup_vs_fp32"] = cpu = r.get("cpu_rate", 0) / base["cpu_rate"] if \
                base.get("cpu_rate") else None
            r["fp32_reference"] = ref
            compare = f"{speedup:.2f}x {ref} ({_f(cpu, '{:.2f}x')} by CPU time)"
            if key == "litert_int8" and _ok(results, "infer_b8"):
                tf32 = results["infer_b8"]
                r["speedup_vs_tf_fp32"] = r["rate"] / tf32["rate"]
                r["cpu_speedup_vs_tf_fp32"] = tf_cpu = (r.get("cpu_rate", 0) / tf32["cpu_rate"]
                                                        if tf32.get("cpu_rate") else None)
                compare += f", {r['speedup_vs_tf_fp32']:.2f}x infer_b8 ({_f(tf_cpu, '{:.2f}x')})"
            if qname and qname in quality:
                fp32 = quality["litert_fp32" if key == "litert_int8" else "fp32"]
                r["miou_delta"] = quality[qname]["mean_iou"] - fp32["mean_iou"]
                r["pixels_agree"] = quality[qname]["agreement_with_fp32"]
                compare += (f"; mIoU {quality[qname]['mean_iou']:.4f} ({r['miou_delta']:+.4f}), "
                            f"{r['pixels_agree']:.2%} pixels as fp32")
            if target == "bf16":   # judged by CPU time: wall-clock swings with others' load
                verdict = (_verdict(cpu or speedup, TARGETS["bf16"], "{:.1f}x", "{:.2f}x by CPU")
                           if bf16_cpu else "n/a: no AVX512_BF16/AMX")
            elif target == "int8":
                verdict = _verdict(cpu or speedup, TARGETS["int8"], "{:.1f}x", "{:.2f}x by CPU")
        if results[key].get("threads"):
            label += f", {results[key]['threads']} thread{'s' if results[key]['threads'] > 1 else ''}"
        rows.append(_model_row(results, key, label, per_image, compare, verdict))
    return rows


OPENVINO_ROWS = (  # key, label, precision (its limit), TF reference of the same precision
    ("ov_fp32", "OpenVINO fp32 batch 8", "fp32", "infer_b8"),
    ("ov_bf16", "OpenVINO bf16 batch 8", "bf16", "bf16_infer_b8"),
    ("ov_int8", "OpenVINO int8 (NNCF) batch 8", "int8", "litert_int8"),
)
GOALS = dict(int8_vs_litert=1.25, int8_vs_tf_fp32=7.0, int8_miou_points=1.0, bf16_limit=0.75,
             fp32_limit=0.85)


def limits(results):
    """Each precision's limit by CPU time (GFLOP/s): the best GEMM measured for it, through
    TensorFlow or OpenVINO; ``(limits, {precision: case key})``."""
    candidates = dict(fp32=("gemm", "gemm_ov_fp32"), bf16=("gemm_bf16", "gemm_ov_bf16"),
                      int8=("gemm_ov_int8",))
    out, keys = {}, {}
    for precision, cases in candidates.items():
        found = [(results[k]["cpu_rate"], k) for k in cases if _ok(results, k) and "cpu_rate" in results[k]]
        if found:
            out[precision], keys[precision] = max(found)
    return out, keys


def own_limit(results, key, precision, per_image):
    """``key``'s GFLOP/s by CPU time as a fraction of ``precision``'s limit (stored)."""
    lim, _ = limits(results)
    r = results.get(key, {})
    if not (_ok(results, key) and per_image and lim.get(precision) and "cpu_rate" in r):
        return None
    r["cpu_fraction_of_own_limit"] = value = r["cpu_rate"] * per_image / 1e9 / lim[precision]
    return value


def openvino_rows(results):
    """Issue 23's rows: OpenVINO's GEMM limits, then OpenVINO fp32 / bf16 / int8 with each
    row's % of its own precision's limit (by CPU time) and the issue's goals."""
    rows = []
    lim, lim_keys = limits(results)
    peak, peak_cpu = _peaks(results)
    for p in ("fp32", "bf16", "int8"):
        g = results.get(f"gemm_ov_{p}")
        if g is None:
            continue
        if "error" in g:
            rows.append([f"{p} GEMM 4096^3 (OpenVINO)", "FAILED", "", "", "", "", g["error"], ""])
            continue
        rows.append([f"{p} GEMM 4096^3 (OpenVINO)", f"{g['rate']:.0f} GFLOP/s", f"{g['rate']:.0f}",
                     _f(g["rate"] / peak if peak else None, "{:.0%}"),
                     _f(g["cpu_rate"] / peak_cpu if peak_cpu else None, "{:.0%}"), f"{g['peak_rss_mb']:.0f}",
                     f"{p} limit by CPU time: {lim.get(p, 0):.0f} GFLOP/s ({lim_keys.get(p)})", ""])
    flops = results["flops"] if _ok(results, "flops") else {}
    per_image = flops.get("forward")
    quality = results["quality"] if _ok(results, "quality") else {}
    notes = []
    for key, p in (("infer_b8", "fp32"), ("bf16_infer_b8", "bf16"), ("litert_int8", "int8")):
        if own_limit(results, key, p, per_image) is not None:
            notes.append(f"{key} {results[key]['cpu_fraction_of_own_limit']:.0%} of the {p} limit")
    for key, label, p, ref in OPENVINO_ROWS:
        if key not in results:
            continue
        compare, verdict = [], ""
        frac = own_limit(results, key, p, per_image)
        if frac is not None:
            compare.append(f"{frac:.0%} of the {p} limit (CPU)")
        r = results[key]
        for other in (ref, "infer_b8") if ref != "infer_b8" else (ref,):
            if _ok(results, key) and _ok(results, other):
                r[f"cpu_speedup_vs_{other}"] = results[key]["cpu_rate"] / results[other]["cpu_rate"]
                compare.append(f"{r[f'cpu_speedup_vs_{other}']:.2f}x {other} by CPU "
                               f"({r['rate'] / results[other]['rate']:.2f}x wall)")
        qname = f"openvino_{p}"
        if qname in quality and "fp32" in quality:
            r["miou_delta"] = quality[qname]["mean_iou"] - quality["fp32"]["mean_iou"]
            r["pixels_agree"] = quality[qname]["agreement_with_fp32"]
            compare.append(f"mIoU {quality[qname]['mean_iou']:.4f} ({r['miou_delta']:+.4f}), "
                           f"{r['pixels_agree']:.2%} pixels as TF fp32")
        if p == "int8" and _ok(results, key):
            verdict = "; ".join([
                _verdict(r.get("cpu_speedup_vs_litert_int8"), GOALS["int8_vs_litert"], "{:.2f}x LiteRT int8",
                         "{:.2f}x"),
                _verdict(r.get("cpu_speedup_vs_infer_b8"), GOALS["int8_vs_tf_fp32"], "{:.0f}x TF fp32",
                         "{:.2f}x")]
                + ([f"mIoU within 1 point: {'MET' if abs(r['miou_delta']) <= 0.01 else 'missed'}"]
                   if "miou_delta" in r else []))
        elif p in ("fp32", "bf16") and frac is not None:
            tf_frac = results.get(ref, {}).get("cpu_fraction_of_own_limit")
            best = max(frac, tf_frac or 0)
            verdict = _verdict(best, GOALS[f"{p}_limit"], "{:.0%} of the limit",
                               "best " + ("OpenVINO" if frac >= (tf_frac or 0) else "TF") + " {:.0%}")
        rows.append(_model_row(results, key, label, per_image, "; ".join(compare), verdict))
    if notes and rows:
        rows.append(["  TF / LiteRT rows against their own limit", "", "", "", "", "", "; ".join(notes), ""])
    return rows


def run_folder_rows(results):
    """Issue 31: inference on a run folder (``load_predictor``'s default backend, what
    ``segment.py predict / evaluate / video`` run) against the best fp32 GEMM measured (TF's or
    OpenVINO's) and the Keras peer, by CPU time and by wall clock."""
    key, r = "run_folder_b8", results.get("run_folder_b8")
    if r is None:
        return []
    flops = results["flops"] if _ok(results, "flops") else {}
    per_image = flops.get("forward")
    label = "run folder inference batch 8 (segment.py predict)"
    if "error" in r or not per_image:
        return [_model_row(results, key, label, per_image)]
    label += f": {r['predictor'].replace('Predictor', '') or 'TensorFlow'}"
    lim, lim_keys = limits(results)
    fp32_keys = [k for k in ("gemm", "gemm_ov_fp32") if _ok(results, k)]
    best_wall = max((results[k]["rate"] for k in fp32_keys), default=None)
    frac_cpu = own_limit(results, key, "fp32", per_image)
    r["fraction_of_best_fp32_gemm"] = frac_wall = (r["rate"] * per_image / 1e9 / best_wall
                                                   if best_wall else None)
    compare = [f"{_f(frac_cpu, '{:.0%}')} of the fp32 limit by CPU ({lim_keys.get('fp32')}), "
               f"{_f(frac_wall, '{:.0%}')} wall; load {r['first_load_s']} s converting, "
               f"{r['load_s']} s cached"]
    verdicts = [_verdict(frac_cpu, TARGETS["infer"], "{:.0%} of the fp32 limit", "{:.0%} by CPU")]
    peer = results.get("peer_infer_b8")
    if _ok(results, "peer_infer_b8"):
        r["cpu_over_peer"] = cpu = r["cpu_rate"] / peer["cpu_rate"] if "cpu_rate" in peer else None
        r["over_peer"] = wall = r["rate"] / peer["rate"]
        compare.append(f"{_f(cpu, '{:.2f}x')} the Keras peer by CPU ({wall:.2f}x wall)")
        verdicts.append(_verdict(cpu, TARGETS["peer"], "{:.1f}x the peer", "{:.2f}x by CPU"))
    if _ok(results, "infer_b8"):
        r["cpu_over_infer_b8"] = results[key]["cpu_rate"] / results["infer_b8"]["cpu_rate"]
        compare.append(f"{r['cpu_over_infer_b8']:.2f}x TF infer_b8 by CPU")
    row = _model_row(results, key, label, per_image, "; ".join(compare), "; ".join(verdicts))
    return [row]


def device_rows(results, per_image):
    """``trainer.build_training_graph`` on 1 and on 2 logical CPU devices (MirroredStrategy)
    at batch 4: on the same 2 cores the second device adds no compute, so the ratio is the
    cost of replication (two half-batch towers, the gradient sum, the second copy of the
    weights), not a speed-up."""
    rows = []
    for key, label in (("devices2_b4", "training 2 logical devices b4"),):
        if key not in results:
            continue
        compare = ""
        if _ok(results, key) and _ok(results, "train_b4"):
            one, two = results["train_b4"], results[key]
            two["over_one_device"] = ratio = two["rate"] / one["rate"]
            compare = f"{ratio:.2f}x the 1-device graph"
            if "cpu_rate" in one and "cpu_rate" in two:
                two["cpu_over_one_device"] = cpu = two["cpu_rate"] / one["cpu_rate"]
                compare += f" ({cpu:.2f}x by CPU time)"
            compare += f"; gradients {two['grad_bytes'] / 2 ** 20:.0f} MiB per step all-reduced"
        rows.append(_model_row(results, key, label, per_image, compare))
    return rows


def lever_rows(results):
    """Rows for ``--levers``: every variant, and its speed relative to its baseline."""
    peak, peak_cpu = _peaks(results)
    flops = results["flops"] if _ok(results, "flops") else {}
    rows = [["fp32 GEMM 4096^3 (TF, reference)", _f(peak, "{:.0f} GFLOP/s"), _f(peak, "{:.0f}"),
             "100%", _f(peak_cpu, "100% = {:.0f}"), "", "", ""]]
    for key, r in results.items():
        if key in ("gemm", "flops"):
            continue
        if key == "check_variants" and "error" not in r:
            rows.append([key, "", "", "", "", "", "; ".join(
                f"{k}: logits {v['logit_diff']:.1e} of their std, {v['pixels_differ']:.2%} pixels"
                for k, v in r.items() if "_vs_" in k), ""])
            continue
        train = key.startswith(("train", "peer_train"))
        per_image = flops.get("train_b4") if train else flops.get("forward")
        base_key = "train_baseline" if train else "infer_baseline"
        compare = ""
        if _ok(results, key) and _ok(results, base_key) and key != base_key:
            base = results[base_key]
            compare = f"{r['rate'] / base['rate']:.2f}x baseline"
            if "cpu_rate" in r and "cpu_rate" in base:
                compare += f" ({r['cpu_rate'] / base['cpu_rate']:.2f}x by CPU time)"
        rows.append(_model_row(results, key, key, per_image, compare))
    return rows


def _f(value, fmt):
    return "" if value is None else fmt.format(value)


def format_table(rows):
    header = HEADER
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    def line(r):
        return "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


# --------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations and cases (< 3 min)")
    parser.add_argument("--levers", action="store_true",
                        help="run the tuning variants instead of the main table")
    parser.add_argument("--only", help="comma-separated case keys to run (e.g. gemm,flops,infer_b8)")
    parser.add_argument("--quality", nargs=2, metavar=("RUN", "DATA"),
                        help="also measure the mIoU of RUN (a trained run folder) on DATA's test "
                        "split at fp32, bf16, LiteRT fp32 and int8, OpenVINO fp32 / bf16 / int8 (the "
                        "precision rows' deltas)")
    parser.add_argument("--vgg-width", type=float, default=1.0,
                        help="VGG channel width; anything but 1 is for trying the suite out only")
    args = parser.parse_args(argv)

    os.makedirs(RESULTS, exist_ok=True)
    work = os.path.join(RESULTS, "work")
    vgg = os.path.join(work, f"vgg_random_w{args.vgg_width:g}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    plan = lever_plan(args.quick) if args.levers else main_plan(args.quick)
    if args.quality and not args.levers:
        plan += [(k, spec, {}) for k, spec in precision_plan(args.quick, args.quality) if k == "quality"]
    if args.only:
        keep = set(args.only.split(","))
        plan = [p for p in plan if p[0] in keep or p[0] in ("gemm", "flops", "quality")]
    load_before = os.getloadavg()
    started = time.perf_counter()
    results = {}
    with open(os.path.join(RESULTS, f"{stamp}.log"), "w") as log:
        prep = run_case("prepare", dict(case="prepare", vgg=vgg, width=args.vgg_width), {}, log)
        if "error" in prep:
            sys.exit(f"could not build the VGG16 SavedModel: {prep['error']}")
        for key, spec, env in plan:
            spec = dict(spec, vgg=vgg, work=work, width=args.vgg_width)
            print(f"[{time.perf_counter() - started:5.0f}s] {key} ...", flush=True)
            results[key] = dict(run_case(key, spec, env, log), spec=spec)
    load_after = os.getloadavg()
    info = machine()
    results["_machine"] = info
    rows = lever_rows(results) if args.levers else build_rows(results)
    results.pop("_machine")
    table = format_table(rows)
    width_note = "" if args.vgg_width == 1 else f", VGG WIDTH {args.vgg_width:g} (NOT comparable)"
    print(f"\n{info['cpu']}, {info['cores']} cores, CPU features "
          f"{' '.join(info['cpu_features']) or 'none of note'}, TF {info['tensorflow']}, "
          f"Keras {info['keras']}"
          f"{width_note}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
          f"{time.perf_counter() - started:.0f}s\n")
    print(table)
    out = os.path.join(RESULTS, f"{stamp}.json")
    with open(out, "w") as f:
        json.dump(dict(timestamp=stamp, mode="levers" if args.levers else "main", quick=args.quick,
                       vgg_width=args.vgg_width, machine=info, load_before=load_before,
                       load_after=load_after, seconds=time.perf_counter() - started,
                       targets=TARGETS, table=rows, cases=results), f, indent=1)
    print(f"\nwritten to {os.path.relpath(out)}")


if __name__ == "__main__":
    main()
