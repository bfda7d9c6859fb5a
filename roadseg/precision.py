"""Numeric precision of a TensorFlow session: ``--precision fp32 | bf16 | fp16``.

The one place that turns a precision into a session (used by the trainer, the predictors,
the demo and the benchmarks).  Precision is a *graph rewrite* made by Grappler when the
session runs a graph; nothing in the graph, the variables or the checkpoints changes:

``fp32``  no rewrite.
``bf16``  ``auto_mixed_precision_onednn_bfloat16``: convolutions, matrix products and their
          gradients run in bfloat16 on oneDNN (AVX512_BF16 / AMX on the CPU), with casts
          inserted around them; variables, the loss and the softmax stay float32.  On a CPU
          without native bfloat16 (neither ``avx512_bf16`` nor ``amx_bf16``) oneDNN emulates
          it -- slower than fp32 -- and ``notes`` says so in one line.
``fp16``  ``auto_mixed_precision`` on a GPU (float16 compute, float32 variables); training
          adds dynamic loss scaling (``minimize``) so small gradients do not flush to zero.
          Without a GPU it is refused in one line (``problem``): TensorFlow has no float16
          rewrite that speeds up a CPU (its ``auto_mixed_precision_cpu`` emulation converts
          none of this model's nodes and crashed in training, TF 2.21); use bf16 there.

bf16 has float32's exponent range, so it needs no loss scaling.  Checkpoints are the same
for every precision, so a run can be resumed, evaluated or exported at any of them.
"""
import functools

PRECISIONS = ("fp32", "bf16", "fp16")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")   # /proc/cpuinfo flags of native bfloat16 arithmetic


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


def native_bf16():
    """True when the CPU computes bfloat16 natively (AVX512_BF16 or AMX_BF16)."""
    return any(flag in cpu_info()[1] for flag in BF16_FLAGS)


@functools.lru_cache(maxsize=None)
def has_gpu():
    import tensorflow as tf
    return bool(tf.config.list_physical_devices("GPU"))


def check(precision):
    """Raise ValueError unless ``precision`` is one of ``PRECISIONS`` (None means fp32)."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision or "fp32"


def notes(precision):
    """The one-line notes for running ``precision`` on this machine ([] when none)."""
    precision = check(precision)
    if precision == "bf16" and not has_gpu() and not native_bf16():
        model = cpu_info()[0]
        return [f"note: this CPU ({model}) has no native bfloat16 (no avx512_bf16 or amx_bf16 "
                f"in /proc/cpuinfo): --precision bf16 runs emulated and slower than fp32"]
    return []


def problem(precision):
    """Why ``precision`` cannot run on this machine, or None."""
    if check(precision) == "fp16" and not has_gpu():
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
    out = tf.compat.v1.ConfigProto()
    if config is not None:
        out.CopyFrom(config)
    rewrite = out.graph_options.rewrite_options
    on = rewriter_config_pb2.RewriterConfig.ON
    if precision == "bf16":
        rewrite.auto_mixed_precision_onednn_bfloat16 = on
    elif precision == "fp16":
        rewrite.auto_mixed_precision = on
    for line in notes(precision) if log else ():
        log(line)
    return out


def session(precision="fp32", graph=None, log=None):
    """A ``tf.compat.v1.Session`` on ``graph`` computing at ``precision``; ``log`` gets the
    precision (unless fp32) and its notes."""
    import tensorflow as tf
    config = session_config(precision)   # a precision this machine cannot run raises here
    if log and check(precision) != "fp32":
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
    """``"bf16 (oneDNN auto mixed precision; CPU has avx512_bf16, amx_bf16)"`` and the like."""
    precision = check(precision)
    if precision == "fp32":
        return "fp32"
    what = {"bf16": "oneDNN bfloat16 auto mixed precision", "fp16": "float16 auto mixed precision"}
    native = [f for f in BF16_FLAGS if f in cpu_info()[1]]
    return f"{precision} ({what[precision]}; CPU bf16: {', '.join(native) or 'none'})"

