"""The model: what shapes the network (``ModelSpec``), the one function that builds it
(``network``) and the one training step built on it (``training_step``).

Every path builds VGG16 + FCN-8s through ``network(spec, images, keep_prob, encoder)``:
training on one device or per replica (and its validation tower), ``inference``'s head
behind ``load_predictor`` and the SavedModel export, the LiteRT export and the benchmarks.
They differ only in the ``encoder(images, keep_prob) -> (pool3, pool4, fc7)`` they pass:

    SavedModelEncoder        VGG16's SavedModel loaded into the session (``fcn.load_vgg``)
    distribute.MirroredVGG   its variables mirrored over replicas (``.apply``)
    litert.Encoder           rebuilt from built-in ops for LiteRT

``ModelSpec`` is written once into a run's ``config.json`` (by the trainer, beside the other
options: the file stays one flat object, so runs of every earlier version read the same) and
read back typed by every consumer (``ModelSpec.from_run``); ``--resume`` needs the same
spec.  ``write_export_info`` / ``read_export_info`` are the one writer and reader of an
export's ``export_info.json``.

Training: ``training_step`` runs one replica's objective (``replica_objective``: its share of
the pixel loss (+ Dice), its own decoder's L2 terms) and one optimizer path (Adam through
``precision.minimize``, with dynamic loss scaling for fp16) in every replica of a
``tf.distribute`` strategy -- one device is a single replica of the default strategy, as in
torchvision's segmentation reference, where one train step serves 1 or N devices.
``fcn.optimize``, the course's facade, builds on the same pieces (``fcn.data_loss``,
``precision.minimize``).
"""
import dataclasses
import hashlib
import json
import os
from typing import NamedTuple, Optional

import tensorflow as tf

from roadseg import fcn, precision, vgg
from roadseg.config import TrainConfig
from roadseg.errors import UserError
from roadseg.run_folders import RUN_CONFIG, join_path, read_json, read_run_config, staged_file
from roadseg.schemes import get_scheme

tf1 = tf.compat.v1
SUM = tf.distribute.ReduceOp.SUM
EXPORT_INFO = "export_info.json"
EXPORT_FIX = "export the run again ('segment.py export')"
_DEFAULTS = TrainConfig()   # the option defaults, declared once in roadseg.config


# ============================================================================ the spec
@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The fields that shape the network (and its weights).  Two specs are equal when the
    same weights fit both; ``vgg`` (where the VGG16 folder is now) takes no part in that:
    ``vgg_info`` says which VGG16 it is (source, width, seed; {} for the course's)."""
    scheme: str
    image_shape: tuple
    vgg: Optional[str] = dataclasses.field(default=None, compare=False)
    vgg_info: dict = dataclasses.field(default_factory=dict)
    skip_scales: Optional[tuple] = tuple(_DEFAULTS.skip_scales)
    l2_scale: float = _DEFAULTS.l2_scale

    def __post_init__(self):
        get_scheme(self.scheme)   # an unknown scheme is a UserError here
        scales = tuple(float(s) for s in self.skip_scales) if self.skip_scales else None
        for name, value in (("image_shape", fcn.check_image_shape(self.image_shape)),
                           ("skip_scales", scales), ("l2_scale", float(self.l2_scale)),
                           ("vgg_info", dict(self.vgg_info or {}))):
            object.__setattr__(self, name, value)

    @property
    def num_classes(self):
        return get_scheme(self.scheme).num_classes

    @classmethod
    def from_config(cls, cfg, vgg_info=None):
        """The spec of a ``TrainConfig`` (and the ``vgg_info`` of its VGG16 folder)."""
        return cls(cfg.scheme, cfg.image_shape, cfg.vgg, vgg_info or {}, cfg.skip_scales,
                   cfg.l2_scale)

    @classmethod
    def from_dict(cls, values, where="the configuration"):
        """The spec in a flat dict (a run's config.json); fields it lacks take today's
        defaults, as earlier versions did; a bad value is a UserError naming ``where``."""
        fields = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in values.items() if k in fields})
        except (UserError, TypeError, ValueError) as err:
            raise UserError(f"{where} is damaged: {err}; restore it from a backup, or train a "
                            f"new run ('segment.py train')") from None

    @classmethod
    def from_run(cls, run_dir):
        """The spec of a training run, read from its config.json."""
        return cls.from_dict(read_run_config(run_dir, required=REQUIRED),
                             os.path.join(run_dir, RUN_CONFIG))

    def to_dict(self):
        """The spec as config.json / export_info.json hold it (JSON types)."""
        return dict(scheme=self.scheme, image_shape=list(self.image_shape), vgg=self.vgg,
                    vgg_info=dict(self.vgg_info), skip_scales=list(self.skip_scales or []),
                    l2_scale=self.l2_scale)

    def run_config(self, options):
        """The run's config.json: every training option (``TrainConfig.to_dict()``) and the
        spec, one flat object (the format every version has read)."""
        return {**options, **self.to_dict()}

    def differences(self, other):
        """``[(field, mine, other's)]`` of the fields that shape the weights and differ."""
        theirs = dict(other.identity())
        return [(name, mine, theirs[name]) for name, mine in self.identity() if mine != theirs[name]]

    def identity(self):
        """``[(field, value)]`` of the fields that shape the weights (JSON types)."""
        values = self.to_dict()
        return [(f.name, values[f.name]) for f in dataclasses.fields(self) if f.compare]


REQUIRED = tuple(f.name for f in dataclasses.fields(ModelSpec)
                 if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING) + ("vgg",)


def option_digest(value):
    """A 48-bit number standing for an option's value (exact in a float64, so that workers
    can compare options through one all-reduce)."""
    text = json.dumps(value, sort_keys=True, default=list)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:6], "big")


# ============================================================================ the network
class SavedModelEncoder:
    """VGG16's SavedModel loaded into ``sess`` (``fcn.load_vgg`` with ``input_map``): the
    loader restores its weights; ``variables`` are the ones it made."""

    def __init__(self, sess, vgg_path):
        self.sess, self.path, self.variables = sess, vgg_path, []

    def __call__(self, images, keep_prob):
        before = set(tf1.global_variables())
        layers = fcn.load_vgg(self.sess, self.path, input_map={"image_input:0": images,
                                                               "keep_prob:0": keep_prob})[2:]
        self.variables += [v for v in tf1.global_variables() if v not in before]
        return layers


def network(spec, images, keep_prob, encoder):
    """VGG16 + FCN-8s: float32 images ``[N, H, W, 3]`` (0..255, at ``spec.image_shape``) ->
    logits ``[N, H, W, C]``.  ``encoder(images, keep_prob)`` gives VGG16's pool3, pool4 and
    fc7; the FCN-8s decoder (``fcn.layers``) goes on top with the spec's options."""
    l3, l4, l7 = encoder(images, keep_prob)
    return fcn.layers(l3, l4, l7, spec.num_classes, skip_scales=spec.skip_scales,
                      l2_scale=spec.l2_scale)


# ============================================================================ training
class LossOptions(NamedTuple):
    """What the data loss is made of (``fcn.data_loss``)."""
    class_weights: Optional[list] = None
    loss: str = "ce"
    focal_gamma: float = 2.0
    ohem_fraction: float = 0.25
    dice_weight: float = 0.0

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.class_weights or None, cfg.loss, cfg.focal_gamma, cfg.ohem_fraction,
                   cfg.dice_weight)


def replica_objective(spec, logits, labels, own_l2, options=LossOptions(), share=1.0, replicas=1):
    """One replica's objective: ``(its share of the data loss + its own L2 / replicas, the
    data part)``.  Summed over replicas this is the whole batch's loss with every L2 term
    once: the one-device loss (``fcn.optimize``'s) when ``replicas`` is 1."""
    data = fcn.data_loss(logits, labels, spec.num_classes, options.class_weights,
                         options.dice_weight, loss=options.loss, focal_gamma=options.focal_gamma,
                         ohem_fraction=options.ohem_fraction)
    if replicas > 1:
        data, own_l2 = data * share, own_l2 / replicas
    return data + own_l2, data


def tower(spec, images, labels, keep_prob, encoder, options=LossOptions(), share=1.0, replicas=1):
    """One replica: ``(logits, objective, data part)``; the L2 terms are the ones *this*
    network adds (``fcn.layers`` records every replica's in one graph collection)."""
    terms = tf1.get_collection_ref(tf1.GraphKeys.REGULARIZATION_LOSSES)
    before = len(terms)
    logits = network(spec, images, keep_prob, encoder)
    own = terms[before:]
    l2 = tf.add_n(own) if own else tf.constant(0.0)
    return (logits, *replica_objective(spec, logits, labels, l2, options, share, replicas))


class EncoderOptions(NamedTuple):
    """How VGG16's layers learn: the conv layers at ``lr x lr_scale`` (0: frozen) and the
    layer groups in ``reinit`` (re-initialised randomly, ``vgg.reinitialize``) at ``lr``."""
    lr_scale: float = 1.0
    reinit: tuple = ()

    @classmethod
    def from_config(cls, cfg):
        return cls(float(cfg.encoder_lr_scale), tuple(cfg.reinit))

    def scaled(self, name):
        """Does the variable ``name`` learn at ``lr x lr_scale`` (a pretrained conv layer)?"""
        group = vgg.layer_group(name)
        return bool(group) and group.startswith("conv") and group not in self.reinit


class _EncoderScaledAdam(tf1.train.AdamOptimizer):
    """Adam with the learning rate times ``options.lr_scale`` on the variables
    ``options.scaled`` picks (one optimizer, one backward pass, one set of slot names)."""

    def __init__(self, lr, options):
        super().__init__(lr)
        self._options = options

    def _with_lr(self, apply, grad, var):
        if not self._options.scaled(var.op.name):
            return apply(grad, var)
        lr = self._lr_t   # set by _prepare for this apply_gradients
        self._lr_t = lr * self._options.lr_scale
        try:
            return apply(grad, var)
        finally:
            self._lr_t = lr

    def _apply_dense(self, grad, var):
        return self._with_lr(super()._apply_dense, grad, var)

    def _resource_apply_dense(self, grad, var):
        return self._with_lr(super()._resource_apply_dense, grad, var)


def optimizer(lr, options=EncoderOptions()):
    """``(optimizer, var_list)`` of the training step: Adam over every trainable variable
    (``var_list`` None) when the conv layers learn at lr; with ``lr_scale`` 0 they are left
    out of ``var_list`` (no gradients, no Adam slots), else they get ``lr x lr_scale``."""
    if options.lr_scale == 1:
        return tf1.train.AdamOptimizer(lr), None
    if options.lr_scale == 0:
        return tf1.train.AdamOptimizer(lr), [v for v in tf1.trainable_variables()
                                             if not options.scaled(v.op.name)]
    return _EncoderScaledAdam(lr, options), None


class TrainingStep(NamedTuple):
    logits: object          # the replica's logits (one device: [N, H, W, C] of ``images``)
    loss: tf.Tensor         # the global batch's loss (summed over replicas, with the L2 terms)
    data_loss: tf.Tensor    # without the L2 terms
    train_op: tf.Operation  # one Adam step on every replica, then global_step + 1


def training_step(spec, images, labels, keep_prob, lr, global_step, encoder,
                  options=LossOptions(), loss_scaling=False, strategy=None,
                  encoder_options=EncoderOptions()):
    """One Adam step over every replica of ``strategy`` (None: one device, the default
    strategy's single replica).  Replica ``i`` of ``R`` takes rows ``[n*i//R, n*(i+1)//R)``
    of the global batch of ``n``; its gradients come from ``precision.minimize`` (loss
    scaling for fp16) and are summed over replicas.  The global step counts every step.
    ``encoder_options``: VGG16's conv layers at another learning rate, or frozen
    (``optimizer``)."""
    strategy = strategy or tf.distribute.get_strategy()

    @tf.autograph.experimental.do_not_convert
    def step(images, labels):
        ctx = tf.distribute.get_replica_context()
        count, share = ctx.num_replicas_in_sync, 1.0
        if count > 1:
            i = tf.cast(ctx.replica_id_in_sync_group, tf.int64)
            n = tf.shape(images, out_type=tf.int64)[0]
            lo, hi = n * i // count, n * (i + 1) // count
            share = tf.cast(hi - lo, tf.float32) / tf.cast(tf.maximum(n, 1), tf.float32)
            images, labels = images[lo:hi], labels[lo:hi]
        logits, objective, data = tower(spec, images, labels, keep_prob, encoder, options, share,
                                        count)
        adam, var_list = optimizer(lr, encoder_options)
        train_op = precision.minimize(adam, objective, None, loss_scaling, var_list)
        return logits, objective, data, train_op

    logits, objective, data, train_ops = strategy.extended.call_for_each_replica(
        step, args=(images, labels))
    with tf.control_dependencies([strategy.group(train_ops)]):
        counted = strategy.extended.update(global_step, lambda v: v.assign_add(1).op, group=True)
    return TrainingStep(logits, strategy.reduce(SUM, objective, axis=None),
                        strategy.reduce(SUM, data, axis=None), counted)


# ============================================================================ export_info.json
def write_export_info(folder, spec, **facts):
    """``folder/export_info.json``: the spec (scheme, class names, image shape, ...) and
    ``facts`` about the export (format, checkpoint, source run, ...)."""
    info = dict(spec.to_dict(), class_names=list(get_scheme(spec.scheme).class_names), **facts)
    info.pop("vgg")   # a path on the exporting machine: the export does not need VGG16
    with staged_file(os.path.join(folder, EXPORT_INFO)) as tmp, open(tmp, "w") as f:
        json.dump(info, f, indent=2)


def read_export_info(folder, fix=EXPORT_FIX, read_text=None):
    """The dict in ``folder/export_info.json`` with a checked ``scheme`` and ``image_shape``.
    Missing, damaged or without a key: one UserError line ending in ``fix``.  ``read_text``
    (path -> text, FileNotFoundError when absent) reads other file systems (Beam's)."""
    path = join_path(folder, EXPORT_INFO)
    try:
        text = None if read_text is None else read_text(path)
    except FileNotFoundError:
        raise _missing(folder, fix) from None
    if text is None and not os.path.isfile(path):
        raise _missing(folder, fix)
    info = read_json(path, fix, required=("scheme", "image_shape"),
                     read_text=None if text is None else (lambda _: text))
    try:
        get_scheme(info["scheme"])
        fcn.check_image_shape(info["image_shape"])
    except UserError as err:
        raise UserError(f"{path} is damaged: {err}; {fix}") from None
    return info


def _missing(folder, fix):
    return UserError(f"{folder} has no {EXPORT_INFO} (scheme and image shape): it is not a model "
                     f"exported by this project, or an incomplete one; {fix}")

