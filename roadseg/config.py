"""One configuration object for training: ``TrainConfig``.

Every training option is declared once, here, with its default, its check and its
command-line flag(s).  The same object is

* filled from a recipe file (``configs/*.json``: ``segment.py train --config FILE``),
  then from the command-line flags, which override the file;
* checked as a whole before anything runs (``validate``: one line per mistake);
* saved as the run's ``config.json`` and read back by ``--resume``, ``predict``,
  ``evaluate`` and ``export``.

    >>> cfg = TrainConfig.from_dict({"epochs": 3})
    >>> cfg.epochs, cfg.batch_size
    (3, 4)
"""
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Optional

from roadseg import precision as _precision
from roadseg.errors import UserError
from roadseg.schemes import SCHEMES

AUGMENT_LEVELS = ("flip", "mild", "full")
LR_SCHEDULES = ("constant", "poly", "cosine")
LOSSES = ("ce", "focal", "ohem")
VGG_SOURCES = ("auto", "course", "keras-imagenet", "hed-bsds500", "random")
VGG_GROUPS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7")   # --reinit: VGG16's layer groups
CACHE_MODES = ("auto", "memory", "file")   # input_pipeline.choose_cache (true: auto, false: off)
VAL_SPLIT_HELP = ("validation: unset = the 'val' split, else a whole training sequence held out, "
                  "else every 10th training image; 'sequence:NAME', 'every-10th', 'none' or a "
                  "split name")


def option(default, help, flags=None, check=None, **argparse_kw):
    """A dataclass field that is also a command-line option.

    ``flags``: ``[(flag, extra argparse keywords)]``; by default one ``--field-name`` flag
    with ``argparse_kw``.  ``check(value)`` returns an error text or None.
    """
    factory = (lambda: list(default)) if isinstance(default, list) else None
    meta = dict(help=help, flags=flags, check=check, argparse=argparse_kw)
    if factory:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- checks
def _positive_int(v):
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else "a whole number >= 1"


def _count(v):
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else "a whole number >= 0"


def _positive(v):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    return None if ok else "a finite number > 0"


def _non_negative(v):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
    return None if ok else "a finite number >= 0"


def _probability(v):
    return _positive(v) or (None if v <= 1 else "a number in (0, 1]")


def _one_of(*choices):
    return lambda v: None if v in choices else f"one of {', '.join(map(str, choices))}"


def _augment(v):
    return None if v in (False, True, *AUGMENT_LEVELS) else f"one of {', '.join(AUGMENT_LEVELS)}, or off"


def _cache(v):
    return None if v in (False, True, *CACHE_MODES) else f"one of {', '.join(CACHE_MODES)}, or off"


def _image_shape(v):
    from roadseg.fcn import check_image_shape  # fcn imports TensorFlow; this module does not
    try:
        check_image_shape(v)
    except UserError as err:
        return str(err)
    return None


def _skip_scales(v):
    ok = v is None or (isinstance(v, list) and (v == [] or (len(v) == 2 and all(
        _positive(x) is None for x in v))))
    return None if ok else "two numbers > 0 (pool4, pool3), or [] / null for no scaling"


def _class_weights(v):
    ok = v in (False, True) or (isinstance(v, list) and all(_non_negative(x) is None for x in v))
    return None if ok else "true (median frequency), false, or a list of weights >= 0"


def _precision_here(v):
    """One of PRECISIONS that this machine can run (fp16 needs a GPU)."""
    if v not in _precision.PRECISIONS:
        return f"one of {', '.join(_precision.PRECISIONS)}"
    found = _precision.problem(v)
    return f"auto, fp32 or bf16 here ({found})" if found else None


def _width(v):
    return None if v is None else _positive(v)


def _fc_width(v):
    return None if v is None else _positive_int(v)


def _groups(v):
    ok = isinstance(v, list) and all(g in VGG_GROUPS for g in v) and len(set(v)) == len(v)
    return None if ok else f"a list of distinct VGG16 layer groups out of {', '.join(VGG_GROUPS)}"


@dataclass
class TrainConfig:
    """Everything a training run is made of.  ``data``/``vgg``: what it trains on; the rest:
    how.  Defaults suit a pretrained VGG16 on Cityscapes-like data at 256x512."""

    # --- what: data and encoder
    data: Optional[str] = option(None, "dataset root (any supported layout)")
    vgg: Optional[str] = option(None, "VGG16 SavedModel folder (default: obtained into data/, "
                                "see --vgg-source)")
    vgg_source: str = option("auto", "where to get VGG16 when --vgg is not given",
                             check=_one_of(*VGG_SOURCES), choices=VGG_SOURCES)
    width: Optional[float] = option(None, "channel width of a random VGG16 built here (below 1 "
                                    "means random weights; default: 1, or 0.25 for auto's "
                                    "offline fallback)", check=_width, type=float)
    fc_width: Optional[int] = option(None, "channels of fc6/fc7 of a VGG16 built here (random or "
                                     "hed-bsds500; default 4096 x width; the course and Keras "
                                     "ImageNet models have 4096 only)", check=_fc_width, type=int)
    encoder_lr_scale: float = option(1.0, "learning rate of VGG16's conv layers = lr x this (fine-"
                                     "tuning); 0 freezes them: no gradients, no Adam slots. fc6/fc7 "
                                     "and re-initialised layers train at lr", check=_non_negative,
                                     type=float)
    reinit: list = option([], "re-initialise these VGG16 layer groups randomly (He-normal, zero "
                          "biases, from --seed) before training", check=_groups, nargs="+",
                          choices=VGG_GROUPS, metavar="GROUP")
    # --- the model
    scheme: str = option("road4", "class scheme", check=_one_of(*SCHEMES), choices=SCHEMES)
    image_shape: list = option([256, 512], "network input H W, divisible by 32",
                               check=_image_shape, type=int, nargs=2, metavar=("H", "W"))
    skip_scales: Optional[list] = option(
        [0.01, 0.0001], "pool4 / pool3 scaling before their score layers (right for a "
        "pretrained VGG16)", check=_skip_scales,
        flags=[("--no-skip-scaling", dict(action="store_const", const=[],
                                          help="do not scale pool4/pool3 by 0.01/0.0001 "
                                          "before their score layers (right for random init)"))])
    keep_prob: float = option(0.5, "dropout keep probability of fc6/fc7", check=_probability,
                              type=float)
    l2_scale: float = option(1e-3, "L2 weight of the decoder kernels", check=_non_negative,
                             flags=[("--l2", dict(type=float))])
    # --- the loss
    loss: str = option("ce", "per-pixel loss: cross-entropy, focal, or the hardest pixels only "
                       "(OHEM)", check=_one_of(*LOSSES), choices=LOSSES)
    focal_gamma: float = option(2.0, "focusing power of --loss focal", check=_non_negative,
                                type=float)
    ohem_fraction: float = option(0.25, "share of labelled pixels kept by --loss ohem",
                                  check=_probability, type=float)
    dice_weight: float = option(0.0, "add this weight x the soft Dice loss (per-class overlap, "
                                "every class counts the same) to the pixel loss; 0 = off",
                                check=_non_negative, type=float)
    class_weights: object = option(False, "median-frequency class weights",
                                   check=_class_weights, action="store_const", const=True)
    # --- optimisation
    epochs: int = option(10, "epochs", check=_positive_int, type=int)
    batch_size: int = option(4, "images per step", check=_positive_int, type=int)
    lr: float = option(1e-4, "learning rate (Adam)", check=_positive, type=float)
    lr_schedule: str = option("constant", "learning-rate schedule", check=_one_of(*LR_SCHEDULES),
                              choices=LR_SCHEDULES)
    warmup_epochs: float = option(0.0, "linear learning-rate warm-up", check=_non_negative,
                                  type=float)
    augment: object = option(
        True, "training augmentation: flip, mild (flip + scale 0.8-1.25x), full (flip + scale "
        "0.5-2x + colour jitter)", check=_augment,
        flags=[("--augment", dict(choices=AUGMENT_LEVELS)),
               ("--no-augment", dict(action="store_const", const=False,
                                     help="no augmentation at all"))])
    seed: int = option(0, "seed of the decoder's initial weights, shuffling and augmentation",
                       check=_count, type=int)
    # --- where: devices and hosts (roadseg.distribute)
    devices: int = option(1, "train on N GPUs, or N logical CPU devices without a GPU "
                          "(MirroredStrategy; the batch is split over them)", check=_positive_int,
                          type=int)
    workers: int = option(1, "train on W hosts together, each named in TF_CONFIG "
                          "(MultiWorkerMirroredStrategy; see docs/scaling.md)", check=_positive_int,
                          type=int)
    precision: str = option("fp32", "arithmetic of the training step: auto (bf16 where the CPU "
                            "computes bfloat16 natively -- AVX512_BF16 or AMX -- else fp32; the "
                            "recipes' choice), bf16 (oneDNN bfloat16; emulated and slower on "
                            "AVX-512 CPUs without it, plain fp32 on CPUs without AVX-512) or fp16 "
                            "(GPU, with loss scaling) mixed precision; variables and checkpoints "
                            "stay fp32, so a run may be resumed at another precision; config.json "
                            "records what ran (precision_used)", check=_precision_here,
                            choices=_precision.PRECISIONS)
    # --- bookkeeping
    val_split: Optional[str] = option(None, VAL_SPLIT_HELP)
    eval_every: int = option(1, "validate every N epochs (the last epoch always)",
                             check=_positive_int, type=int)
    max_eval_images: Optional[int] = option(None, "validate on at most N images",
                                            check=lambda v: None if v is None else _positive_int(v),
                                            type=int)
    checkpoint_every: int = option(0, "also checkpoint every N steps; 0 = each epoch",
                                   check=_count, type=int)
    keep_checkpoints: int = option(3, "how many of the latest checkpoints to keep",
                                   check=_positive_int, type=int)
    cache: object = option(
        "auto", "keep decoded, resized training images after the first epoch: auto (in memory "
        "when they take at most 1/64 of the available memory, else in a file cache under the run "
        "folder, removed when training finishes; a log line says which), memory, or file",
        check=_cache, flags=[("--cache", dict(choices=CACHE_MODES)),
                             ("--no-cache", dict(action="store_const", const=False,
                                                 help="decode the images again every epoch"))])
    skip_bad: bool = option(False, "leave out samples that cannot be read or whose image and "
                            "label differ in size (each is listed, the count reported)",
                            action="store_const", const=True)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, values, where="the configuration"):
        """A config from ``values`` (unknown keys are a UserError naming ``where``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserError(f"{where}: unknown option(s) {', '.join(unknown)}; known: "
                            f"{', '.join(sorted(names))}")
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        return cls(**values)

    @classmethod
    def read_recipe(cls, path):
        """The options a recipe file sets (a JSON object; see ``configs/``); keys starting
        with ``_`` are comments.  Unknown options and bad JSON are a UserError."""
        try:
            with open(path) as f:
                values = json.load(f)
        except FileNotFoundError:
            raise UserError(f"config file {path} does not exist; see configs/ for recipes") from None
        except (OSError, ValueError) as err:
            raise UserError(f"config file {path} is not valid JSON ({err}); fix or replace it") from None
        if not isinstance(values, dict):
            raise UserError(f"config file {path} must hold a JSON object of options")
        values = {k: v for k, v in values.items() if not k.startswith("_")}
        cls.from_dict(values, path)   # unknown keys: an error naming the file
        return values

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self):
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ checking
    def validate(self):
        """Raise a UserError for the first option that is not usable; returns self."""
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            problem = check(getattr(self, f.name)) if check else None
            if problem:
                if f.name == "image_shape":
                    raise UserError(problem)
                value = getattr(self, f.name)
                raise UserError(f"option {f.name} ({_flags(f)[0][0]}) = {json.dumps(value)} is not "
                                f"valid: it must be {problem}")
        replicas = self.devices * self.workers
        if self.batch_size % replicas:
            raise UserError(f"--batch-size {self.batch_size} does not split over {replicas} replicas "
                            f"(--devices {self.devices} x --workers {self.workers}); use a multiple "
                            f"of {replicas}")
        return self


# ----------------------------------------------------------------------------- the CLI
def _flags(f):
    if f.metadata.get("flags"):
        return f.metadata["flags"]
    return [("--" + f.name.replace("_", "-"), f.metadata.get("argparse", {}))]


def add_arguments(parser, skip=()):
    """Add one flag (or a few) per option to ``parser``; every default is None ("not given"),
    so that a recipe file and a resumed run's own settings are not overridden by defaults."""
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        for flag, kw in _flags(f):
            kw = dict(kw)
            help_text = kw.pop("help", f.metadata["help"])
            if ("const" not in kw or flag == _flags(f)[0][0]) and _shown(f) is not None:
                help_text += f" (default {_shown(f)})"
            parser.add_argument(flag, dest=f.name, default=None, help=help_text, **kw)


def _shown(f):
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return (" ".join(map(str, default)) or "none") if isinstance(default, list) else default


def given_options(args):
    """The options a parsed command line sets (flags left out are not in the dict)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def options_help():
    """A one-line-per-option summary (for docs)."""
    return "\n".join(f"{_flags(f)[0][0]:<22} {f.metadata['help']}"
                     for f in dataclasses.fields(TrainConfig))


