"""Numeric precision of a TensorFlow session: ``--precision auto | fp32 | bf16 | fp16``.

The one place that turns a precision into a session (used by the trainer, the predictors,
the demo and the benchmarks).  Precision is a *graph rewrite* made by Grappler when the
session runs a graph; nothing in the graph, the variables or the checkpoints changes:

``fp32``  no rewrite.
``bf16``  ``auto_mixed_precision_onednn_bfloat16``: convolutions, matrix products and their
          gradients run in bfloat16 on oneDNN, with casts inserted around them; variables,
          the loss and the softmax stay float32.  What that does depends on the CPU
          (``bf16_support``; the table per CPU kind is in docs/backends.md):

          ``amx``       AMX_BF16 (Intel Xeon 4th gen. and later): bfloat16 tiles, ~3x fp32.
          ``native``    AVX512_BF16 without AMX (AMD Zen 4/5, Intel Cooper Lake): bfloat16
                        dot products, ~1.7-2x fp32.
          ``emulated``  AVX-512 without AVX512_BF16 (Intel Skylake-SP .. Ice Lake): TensorFlow
                        rewrites, oneDNN emulates bfloat16 -- slower than fp32.
          ``none``      no AVX-512 (AVX2 only: most laptops, desktops, many cloud VMs):
                        TensorFlow makes no bfloat16 rewrite at all (its
                        ``IsBF16SupportedByOneDNNOnThisCPU`` asks for AVX512F or AVX_NE_CONVERT),
                        so bf16 computes exactly fp32.

          ``notes`` tells the user which of these happens, in one line.
``fp16``  ``auto_mixed_precision`` on a GPU (float16 compute, float32 variables); training
          adds dynamic loss scaling (``minimize``) so small gradients do not flush to zero.
          Without a GPU it is refused in one line (``problem``): TensorFlow has no float16
          rewrite that speeds up a CPU (its ``auto_mixed_precision_cpu`` emulation converts
          none of this model's nodes and crashed in training, TF 2.21); use bf16 there.
``auto``  bf16 where the CPU computes bfloat16 natively (``amx`` / ``native``) and no GPU is
          used, else fp32 (``resolve``); the recipes' default.  A run's config.json records
          what ran (``precision_used``).

bf16 has float32's exponent range, so it needs no loss scaling.  Checkpoints are the same
for every precision, so a run can be resumed, evaluated or exported at any of them.
"""
import functools

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")   # /proc/cpuinfo flags of native bfloat16 arithmetic
# TensorFlow rewrites to bfloat16 only on a CPU with one of these (IsBF16SupportedByOneDNNOnThisCPU)
REWRITE_FLAGS = ("avx512f", "avx_ne_convert")


@functools.lru_cache(maxsize=None)
def cpu_info():
    """``(model name, set of flags)`` of this machine's CPU from /proc/cpuinfo (empty when
    there is none, e.g. not Linux)."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, frozenset(flags)


def cpu_features(names=("avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni",
                        "avx512_fp16", "avx_vnni")):
    """The ones of ``names`` this CPU has, e.g. for a benchmark table's caption."""
    flags = cpu_info()[1]
    return [n for n in names if n in flags]


def bf16_support(flags=None):
    """What TensorFlow's bf16 rewrite does on a CPU with ``flags`` (default: this one's):
    ``"amx"``, ``"native"``, ``"emulated"`` or ``"none"`` (see the module's docstring)."""
    flags = cpu_info()[1] if flags is None else flags
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "native"
    if any(flag in flags for flag in REWRITE_FLAGS):
        return "emulated"
    return "none"


def native_bf16():
    """True when the CPU computes bfloat16 natively (AVX512_BF16 or AMX_BF16)."""
    return bf16_support() in ("amx", "native")


@functools.lru_cache(maxsize=None)
def has_gpu():
    import tensorflow as tf
    return bool(tf.config.list_physical_devices("GPU"))


def resolve(precision):
    """The precision that runs for ``precision`` (None: fp32; auto: bf16 on a CPU with native
    bfloat16 when no GPU is used, else fp32)."""
    if precision is None:
        return "fp32"
    if precision == "auto":
        return "bf16" if native_bf16() and not has_gpu() else "fp32"
    return precision


def check(precision):
    """The precision that runs for ``precision`` (``resolve``); ValueError unless it is one of
    ``PRECISIONS`` (None means fp32)."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return resolve(precision)


def computed(precision):
    """The arithmetic ``precision`` really gets here (a run's ``precision_used``): as ``check``,
    except that bf16 on a CPU without AVX-512 computes fp32 (TensorFlow makes no rewrite)."""
    ran = check(precision)
    return "fp32" if ran == "bf16" and bf16_support() == "none" and not has_gpu() else ran


def notes(precision):
    """The one-line notes for running ``precision`` on this machine ([] when none)."""
    ran, model = check(precision), cpu_info()[0]
    support = bf16_support()
    if precision == "auto":
        why = (f"this CPU ({model}) computes bfloat16 natively ({support_flags()})" if ran == "bf16"
               else "a GPU is used" if has_gpu()
               else f"this CPU ({model}) has no native bfloat16 (no avx512_bf16 or amx_bf16)")
        return [f"note: --precision auto runs {ran}: {why}"]
    if ran != "bf16" or has_gpu():
        return []
    if support == "none":
        return [f"note: this CPU ({model}) has no AVX-512, so TensorFlow makes no bfloat16 "
                f"rewrite: --precision bf16 computes exactly as fp32 (same numbers, same speed)"]
    if support == "emulated":
        return [f"note: this CPU ({model}) has no native bfloat16 (no avx512_bf16 or amx_bf16 "
                f"in /proc/cpuinfo): --precision bf16 runs emulated and slower than fp32"]
    return []


def support_flags():
    """The native bfloat16 flags this CPU has, e.g. ``"avx512_bf16, amx_bf16"`` (or "none")."""
    return ", ".join(f for f in BF16_FLAGS if f in cpu_info()[1]) or "none"


def problem(precision):
    """Why ``precision`` cannot run on this machine, or None."""
    if precision == "fp16" and not has_gpu():
        return "fp16 needs a GPU and TensorFlow finds none here; on a CPU use bf16"
    return None


def session_config(precision="fp32", config=None, log=None):
    """A ``ConfigProto`` (``config``, copied, or a new one) with ``precision``'s graph rewrite;
    ``log`` (e.g. ``print``) gets ``notes(precision)``."""
    import tensorflow as tf
    from tensorflow.core.protobuf import rewriter_config_pb2

    from roadseg.errors import UserError

    if problem(precision):
        raise UserError(f"--precision {precision}: {problem(precision)}")
    ran = check(precision)
    out = tf.compat.v1.ConfigProto()
    if config is not None:
        out.CopyFrom(config)
    rewrite = out.graph_options.rewrite_options
    on = rewriter_config_pb2.RewriterConfig.ON
    if ran == "bf16":
        rewrite.auto_mixed_precision_onednn_bfloat16 = on
    elif ran == "fp16":
        rewrite.auto_mixed_precision = on
    for line in notes(precision) if log else ():
        log(line)
    return out


def session(precision="fp32", graph=None, log=None):
    """A ``tf.compat.v1.Session`` on ``graph`` computing at ``precision``; ``log`` gets the
    precision (unless fp32) and its notes."""
    import tensorflow as tf
    config = session_config(precision)   # a precision this machine cannot run raises here
    if log and precision not in (None, "fp32"):
        log(f"precision: {describe(precision)}")
        for line in notes(precision):
            log(line)
    return tf.compat.v1.Session(graph=graph, config=config)


def needs_loss_scaling(precision):
    return check(precision) == "fp16"


def minimize(optimizer, loss, global_step=None, loss_scaling=False, var_list=None):
    """``optimizer.minimize(loss, global_step)`` over ``var_list`` (None: every trainable
    variable); with ``loss_scaling`` (fp16 training) the
    gradients come from the loss times a dynamic scale (x2 every 2000 finite steps, /2 and the
    step skipped on Inf/NaN gradients) and are divided by it before Adam sees them.

    The global step counts every step, skipped or not (the trainer's step counter and learning
    rate schedule follow it).  The scale's two variables are local variables, not in
    checkpoints: checkpoints stay the same for every precision; a resumed run starts the scale
    afresh and finds its level again within a few steps.
    """
    import tensorflow as tf
    tf1 = tf.compat.v1
    if not loss_scaling:
        return optimizer.minimize(loss, global_step=global_step, var_list=var_list)
    before = set(tf1.global_variables())
    scaled = tf1.mixed_precision.MixedPrecisionLossScaleOptimizer(optimizer, "dynamic")
    train_op = scaled.minimize(loss, var_list=var_list)
    globals_ = tf1.get_collection_ref(tf1.GraphKeys.GLOBAL_VARIABLES)
    for var in [v for v in globals_ if v not in before and _is_loss_scale(v)]:
        globals_.remove(var)
        tf1.add_to_collection(tf1.GraphKeys.LOCAL_VARIABLES, var)
    if global_step is None:
        return train_op
    with tf.control_dependencies([train_op]):
        return tf1.assign_add(global_step, 1).op


def _is_loss_scale(var):
    return var.op.name.split("/")[-1] in ("current_loss_scale", "good_steps")


def describe(precision):
    """``"bf16 (oneDNN bfloat16 auto mixed precision; CPU bf16: avx512_bf16, amx_bf16)"`` and the
    like; for auto, what it resolved to."""
    ran = check(precision)
    if ran == "fp32":
        return "fp32" + (" (auto)" if precision == "auto" else "")
    what = {"bf16": "oneDNN bfloat16 auto mixed precision", "fp16": "float16 auto mixed precision"}
    auto = "auto: " if precision == "auto" else ""
    return f"{ran} ({auto}{what[ran]}; CPU bf16: {support_flags()})"
