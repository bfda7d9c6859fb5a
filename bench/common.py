"""Shared pieces of the benchmarks: timing, FLOP counting, memory, session options.

Every benchmark case times a ``step()`` callable: ``warmup`` calls first (graph
optimisation, oneDNN primitive creation, XLA compilation happen there and are not
timed), then ``iters`` timed calls, each measured in wall-clock time and in CPU
time of the whole process (all its threads).

Figures come from the *fastest* step: on a machine shared with other work, load
only ever adds time, so the minimum is the best estimate of what the code does
on its own (as ``timeit`` does).  The CPU time gives a second, load-robust view:
``work / (cpu_seconds / cores)`` is the rate the process would reach if it had
every core to itself -- when others take half the machine the wall-clock rate
halves but the CPU time does not change.  Every step time is kept in the JSON.
"""
import os
import resource
import statistics
import sys
import time

# Measure the roadseg of this checkout (a clone or worktree), not whichever one ``pip -e``
# installed: the repository root goes first on sys.path of run.py and of every case.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[:1] != [ROOT]:
    sys.path.insert(0, ROOT)

IMAGE_SHAPE = (256, 512)
SCHEME = "cityscapes19"         # 19 classes, as the Cityscapes benchmark
EXPECTED_GMAC = 55.4            # VGG16-FCN8 forward at 256x512, per image


def time_steps(step, warmup, iters):
    """Call ``step()`` ``warmup`` times untimed, then ``iters`` times.

    Returns ``dict(times=[wall s], cpu_times=[process CPU s])`` of the timed calls.
    """
    for _ in range(warmup):
        step()
    times, cpu_times = [], []
    for _ in range(iters):
        start, cpu = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
    return dict(times=times, cpu_times=cpu_times)


def rates(timing, items_per_step):
    """``rate`` (items/s of the fastest step), ``median_rate`` and ``cpu_rate`` (items per
    second of CPU time spread over every core: the rate with the machine to oneself)."""
    out = dict(timing, rate=items_per_step / min(timing["times"]),
               median_rate=items_per_step / statistics.median(timing["times"]))
    if timing.get("cpu_times"):
        out["cpu_rate"] = items_per_step / (min(timing["cpu_times"]) / os.cpu_count())
    return out


def peak_rss_mb():
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def session_config(intra=None, inter=None, xla=False, precision="fp32"):
    """A ``ConfigProto``: thread pools (None = TensorFlow's default, one per core),
    XLA auto-clustering (``global_jit_level = ON_1``) and the product's ``--precision``
    rewrite (``roadseg.precision.session_config``)."""
    import tensorflow as tf

    from roadseg import precision as precision_module
    config = tf.compat.v1.ConfigProto()
    if intra is not None:
        config.intra_op_parallelism_threads = intra
    if inter is not None:
        config.inter_op_parallelism_threads = inter
    if xla:
        config.graph_options.optimizer_options.global_jit_level = tf.compat.v1.OptimizerOptions.ON_1
    return precision_module.session_config(precision, config)


def count_flops(graph):
    """Floating-point operations of one run of every op in ``graph`` (needs static shapes)."""
    import tensorflow as tf
    builder = tf.compat.v1.profiler.ProfileOptionBuilder
    options = builder(builder.float_operation()).with_empty_output().build()
    return tf.compat.v1.profiler.profile(graph, options=options).total_float_ops


def quiet_tensorflow():
    """Keep TensorFlow's C++ start-up chatter out of the benchmark output."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
