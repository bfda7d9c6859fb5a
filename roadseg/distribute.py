"""Training on several devices and several hosts with ``tf.distribute``, in graph mode.

``segment.py train --devices N`` runs ``MirroredStrategy`` over N GPUs, or over N logical
CPU devices when there is no GPU; ``--workers W`` with ``TF_CONFIG`` on every host runs
``MultiWorkerMirroredStrategy`` (one process per host, gRPC between them; see
docs/scaling.md).  The trainer stays the same (``trainer.build_training_graph`` builds
both the one-device and the replicated graph, each replica's step being
``model.training_step``'s -- one device is its single replica); this module holds what
differs:

    Distribution       the strategy, the session config and target, who is the chief
    MirroredVGG        VGG16's variables made once as mirrored variables, its SavedModel
                       graph imported per replica reading them (``input_map``): the
                       encoder ``model.network`` builds each replica's FCN-8s on
    check_agreement    every worker starts from the same step, weights, data and options
    one_line_errors    a worker that died, as one line for the others

Why VGG16 is not loaded with its SavedModel loader per replica: ``loader.load`` inside a
replica fails (its variables would not be the strategy's), so the variables are made
in ``strategy.scope()`` under the SavedModel's own names -- checkpoints keep the
project's variable names, and ``predict``/``evaluate``/``export`` read them unchanged --
and its weights are restored by a ``Saver`` built from a *list* of the mirrored
variables (a ``{name: variable}`` dict would restore only the first copy).

Every replica gets ``batch_size / replicas`` images of the one global batch that the
input pipeline makes on each host (the same seed gives every host the same batch), so
the data order -- and ``--resume`` -- do not depend on the number of replicas.  Each
replica's loss (``model.replica_objective``) is its pixel loss weighted by its share of the
batch, plus 1/replicas of *its own* decoder's L2 terms: summed over replicas that is the
one-device loss of the global batch when the replicas' images hold as many labelled pixels
(OHEM and the Dice term are computed per replica).
"""
import contextlib
import json
import os
import socket
import time

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from roadseg import fcn, model, vgg
from roadseg import precision as precision_module
from roadseg.errors import UserError, reason

tf1 = tf.compat.v1
SUM = tf.distribute.ReduceOp.SUM
# What a lost peer looks like to the survivors' collective ops (the gRPC channel closes).
LOST_PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
                    tf.errors.DeadlineExceededError)
DOCS = "docs/scaling.md"
WAIT_FOR_WORKERS_S = 600    # how long a worker waits for the others to start


# ============================================================================ set-up
class Distribution:
    """How this training process runs: on one device (``strategy`` None), on several, or as
    one worker of several.  Made from the config (``TF_CONFIG`` is checked at once);
    ``start()`` makes the strategy -- in the training graph, where its ops must live."""

    def __init__(self, cfg):
        self.devices, self.workers = cfg.devices, cfg.workers
        self.gpus = len(tf.config.list_physical_devices("GPU"))
        if self.gpus and cfg.devices > self.gpus:
            raise UserError(f"--devices {cfg.devices}: this host has {self.gpus} GPU(s); pass at "
                            f"most {self.gpus}")
        if cfg.workers > 1 and cfg.devices > 1 and not self.gpus:
            raise UserError(f"--devices {cfg.devices} with --workers: logical CPU devices are for "
                            f"one host; on CPU-only hosts use --devices 1 (one replica per worker)")
        self.cluster, self.worker = read_tf_config(cfg.workers) if cfg.workers > 1 else (None, 0)
        self.strategy = self.server = self.session_config = None
        self.target = ""

    @property
    def is_chief(self):
        return self.worker == 0

    @property
    def replicas(self):
        return self.strategy.num_replicas_in_sync if self.strategy else 1

    def start(self):
        """Make the strategy (and a multi-worker run's gRPC server) in the default graph."""
        if self.workers > 1:
            self._start_multi_worker()
        elif self.devices > 1:
            self.session_config = tf1.ConfigProto(allow_soft_placement=True)
            if self.gpus:
                devices = [f"/gpu:{i}" for i in range(self.devices)]
            else:   # N logical CPU devices of this session (how the tests run without a GPU)
                self.session_config.device_count["CPU"] = self.devices
                devices = [f"/cpu:{i}" for i in range(self.devices)]
            self.strategy = tf.distribute.MirroredStrategy(devices)
        return self

    def _start_multi_worker(self):
        spec = tf.train.ClusterSpec(self.cluster)
        gpus = self.devices if self.gpus else 0
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            spec, task_type="worker", task_id=self.worker, rpc_layer="grpc",
            num_accelerators={"GPU": gpus} if gpus else None)
        self.strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
        self.session_config = self.strategy.update_config_proto(
            tf1.ConfigProto(allow_soft_placement=True))
        if self.server is None:
            try:
                self.server = tf.distribute.Server(spec, job_name="worker", task_index=self.worker,
                                                   protocol="grpc", config=self.session_config)
            except (tf.errors.OpError, RuntimeError) as err:
                raise UserError(f"worker {self.worker} cannot listen on "
                                f"{self.cluster['worker'][self.worker]} ({reason(err)}); free "
                                f"the port or change TF_CONFIG") from None
        self.target = self.server.target
        wait_for_workers(self.cluster["worker"], self.worker)


    def session(self, graph, precision="fp32", log=None):
        """The session: this strategy's target and config, with ``precision``'s graph rewrite
        (``roadseg.precision``; a precision this machine cannot run raises here)."""
        config = precision_module.session_config(precision, self.session_config)
        if log and precision != "fp32":
            log(f"precision: {precision_module.describe(precision)}")
            for line in precision_module.notes(precision):
                log(line)
        return tf1.Session(self.target, graph=graph, config=config)

    def describe(self):
        if self.strategy is None:
            return "one device"
        if self.workers > 1:
            return (f"MultiWorkerMirroredStrategy, worker {self.worker} of {self.workers}"
                    f"{' (chief)' if self.is_chief else ''}, {self.replicas} replicas in sync")
        return f"MirroredStrategy, {self.replicas} replicas in sync"


def wait_for_workers(hosts, me, timeout=WAIT_FOR_WORKERS_S):
    """Wait until every other worker's server accepts connections: TensorFlow's collective
    ops would wait for a worker that never starts forever, in C++, deaf to Ctrl-C."""
    deadline = time.monotonic() + timeout
    waiting = [h for i, h in enumerate(hosts) if i != me]
    with tqdm(total=len(hosts), initial=len(hosts) - len(waiting), desc="workers up",
              unit="worker", leave=False) as bar:
        while waiting:
            host, port = waiting[0].rsplit(":", 1)
            try:
                socket.create_connection((host.strip("[]"), int(port)), timeout=1).close()
                waiting.pop(0)
                bar.update(1)
                continue
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise UserError(f"worker {hosts.index(waiting[0])} ({waiting[0]}) did not start "
                                f"within {timeout:.0f}s; start 'segment.py train --workers "
                                f"{len(hosts)}' there with its TF_CONFIG, or fix the address")
            time.sleep(0.2)


def read_tf_config(workers):
    """``(cluster spec dict, task index)`` from ``TF_CONFIG``, checked against ``workers``."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise UserError(f"--workers {workers} needs TF_CONFIG on every host (the cluster's worker "
                        f"addresses and this host's index); see {DOCS}")
    try:
        tf_config = json.loads(raw)
        hosts = list(tf_config["cluster"]["worker"])
        task = tf_config["task"]
        index = int(task["index"])
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"TF_CONFIG is not valid ({type(err).__name__}: {err}); it must look like "
                        f"{{\"cluster\": {{\"worker\": [\"host1:port\", ...]}}, \"task\": "
                        f"{{\"type\": \"worker\", \"index\": 0}}}}; see {DOCS}") from None
    other_jobs = sorted(set(tf_config["cluster"]) - {"worker"})
    if other_jobs or task.get("type", "worker") != "worker":
        raise UserError(f"TF_CONFIG: only 'worker' tasks take part (worker 0 is the chief); "
                        f"remove {', '.join(other_jobs) or task.get('type')}; see {DOCS}")
    if len(hosts) != workers:
        raise UserError(f"--workers {workers} but TF_CONFIG lists {len(hosts)} worker(s); make "
                        f"them agree on every host")
    if not 0 <= index < workers:
        raise UserError(f"TF_CONFIG task index {index} is not one of the {workers} workers (0.."
                        f"{workers - 1})")
    return {"worker": hosts}, index


# ============================================================================ VGG16
class MirroredVGG:
    """VGG16 from its SavedModel as mirrored variables, applied per replica.

    Made in ``strategy.scope()`` (cross-replica context); ``apply`` imports the
    SavedModel's graph -- pruned to the three layers FCN-8s uses -- with ``input_map``
    feeding it the replica's images and ``keep_prob`` and pointing each variable of the
    graph at the replica's copy of the mirrored variable (the copy on its device).
    ``restore`` loads the SavedModel's weights into every copy.
    """

    OUTPUTS = ("layer3_out", "layer4_out", "layer7_out")

    def __init__(self, strategy, vgg_path):
        self.strategy, self.path = strategy, vgg_path
        meta = _vgg_meta_graph(vgg_path)
        self.graph_def = tf1.graph_util.extract_sub_graph(meta.graph_def, list(self.OUTPUTS))
        nodes = {n.name: n for n in meta.graph_def.node}
        trainable = {d.variable_name for d in _variable_defs(meta, "trainable_variables")}
        self.mapped = []    # (the graph's tensor to replace, the variable, is_resource)
        self.variables = []
        for d in _variable_defs(meta, "variables"):
            node = nodes[d.variable_name.split(":")[0]]
            var = tf1.get_variable(node.name, shape=tf.TensorShape(node.attr["shape"].shape),
                                   dtype=tf.as_dtype(node.attr["dtype"].type),
                                   initializer=tf1.zeros_initializer(),
                                   trainable=d.variable_name in trainable)
            # A resource variable's handle is replaced (every read then reads the copy);
            # a ref variable (TF 1.0, the course model) is read through its snapshot.
            self.mapped.append((d.variable_name if d.is_resource else d.snapshot_name, var,
                                d.is_resource))
            self.variables.append(var)

    def apply(self, images, keep_prob):
        """``(layer3_out, layer4_out, layer7_out)`` of ``images`` on this context's copy."""
        in_replica = tf.distribute.in_cross_replica_context() is False
        input_map = {"image_input:0": images, "keep_prob:0": keep_prob}
        for name, var, is_resource in self.mapped:
            copy = var if in_replica else self.strategy.experimental_local_results(var)[0]
            input_map[name] = copy.handle if is_resource else tf.identity(copy)
        outputs = tf1.import_graph_def(self.graph_def, input_map=input_map, name="vgg16",
                                       return_elements=[f"{n}:0" for n in self.OUTPUTS])
        return tuple(outputs)

    def restore(self, sess):
        """Load the SavedModel's weights into every copy of every variable."""
        saver = tf1.train.Saver(self.variables)     # a list: every copy is restored
        saver.restore(sess, os.path.join(self.path, "variables", "variables"))


def _vgg_meta_graph(vgg_path):
    from tensorflow.core.protobuf import saved_model_pb2
    vgg.check_vgg_dir(vgg_path)
    with open(os.path.join(vgg_path, "saved_model.pb"), "rb") as f:
        model = saved_model_pb2.SavedModel.FromString(f.read())
    for meta in model.meta_graphs:
        if fcn.VGG_TAG in meta.meta_info_def.tags:
            return meta
    raise UserError(f"cannot load VGG16 from {vgg_path} (no MetaGraph tagged '{fcn.VGG_TAG}'); "
                    f"move it away and {vgg.GET_VGG_HINT}")


def _variable_defs(meta, collection):
    from tensorflow.core.framework import variable_pb2
    if collection not in meta.collection_def:
        return []
    return [variable_pb2.VariableDef.FromString(raw)
            for raw in meta.collection_def[collection].bytes_list.value]


# ============================================================================ validation
def eval_device(strategy):
    """The device of the first local replica, where validation runs."""
    return strategy.extended.worker_devices[0]


# ============================================================================ agreement
def check_agreement(sess, dist, g, train_samples, run_dir, options=()):
    """Every worker must start from the same step and weights, with as many samples and the
    same ``options`` (``[(name, value)]``: what shapes the graph or the steps,
    ``trainer.agreed_options``): a worker that restored another checkpoint (a run folder
    that is not shared), reads another dataset or was started with other options stops
    here with one line, before any step -- every worker, naming the first option that
    differs.  One all-reduce of ``[step, samples, weight checksum, digest of each option]``:
    an entry's sum over replicas equals replicas x this worker's own on every worker only
    when all are equal."""
    strategy = dist.strategy
    digests = [float(model.option_digest(value)) for _, value in options]
    with strategy.scope():
        checksum = tf.add_n([tf.reduce_sum(tf.cast(v, tf.float64)) for v in tf1.trainable_variables()])
        own = tf.concat([tf.stack([tf.cast(g.progress[0]["step"], tf.float64),
                                   tf.constant(float(train_samples), tf.float64), checksum]),
                         tf.constant(digests, tf.float64, [len(digests)])], 0)

        def fn():
            return tf.distribute.get_replica_context().all_reduce(SUM, own)

        total = strategy.experimental_local_results(strategy.extended.call_for_each_replica(fn))[0]
    total, own = sess.run([total, own])
    differ = ~np.isclose(total, own * dist.replicas, rtol=1e-9, atol=0)
    for (name, value), bad in zip(options, differ[3:]):
        if bad:
            raise UserError(f"worker {dist.worker}: the workers were started with different options: "
                            f"{name} differs ({name}={json.dumps(value)} here); start every worker "
                            f"with the same options; see {DOCS}")
    if differ[:3].any():
        raise UserError(f"worker {dist.worker} does not start where the others do (step "
                        f"{own[0]:.0f}, {own[1]:.0f} training samples, weight checksum "
                        f"{own[2]:.9g}): every worker must read the same run folder ({run_dir}) "
                        f"and the same dataset; see {DOCS}")


# ============================================================================ failures
@contextlib.contextmanager
def one_line_errors(dist, ckpt):
    """Turn another worker's death (the collective ops' gRPC channel closing) into one
    line naming the last checkpoint; every other error passes unchanged."""
    try:
        yield
    except LOST_PEER_ERRORS as err:
        if dist.workers == 1:
            raise
        latest = ckpt.latest()
        kept = f"last checkpoint {latest}" if latest else "no checkpoint was written yet"
        raise UserError(f"worker {dist.worker}: another worker stopped or cannot be reached "
                        f"({type(err).__name__}: {reason(err)}); training stopped; restart "
                        f"every worker with --resume ({kept})") from None

