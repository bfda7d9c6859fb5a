"""Procedurally drawn street scenes: the built-in demo dataset and test fixture.

``make_demo_data(root)`` paints simple street scenes -- sky, buildings with
windows, trees, a road in perspective with lane marks, sidewalks, cars, trucks and
buses, pedestrians and traffic lights on poles -- and writes them in the official
Cityscapes layout with real Cityscapes label ids and colours::

    root/leftImg8bit/{train,val}/demo/demo_000003_000019_leftImg8bit.png
    root/gtFine/{train,val}/demo/demo_000003_000019_gtFine_labelIds.png
    root/gtFine/{train,val}/demo/demo_000003_000019_gtFine_color.png
    root/demo_info.json      (the parameters; written last, marks a complete set)

so every class scheme and the whole pipeline work on it without downloading
anything.  Drawing is vectorised numpy (every shape is a mask computed inside its
bounding box), deterministic by seed, and takes well under a second per 10 scenes
at 256x512.  Nothing here is meant to look photographic: the point is a dataset
whose classes are learnable, so every scene has at least one pedestrian and one
traffic light.
"""
import json
from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS
from PIL import Image
from tqdm.auto import tqdm

from roadseg.errors import UserError
from roadseg.run_folders import staged_dir

FORMAT_VERSION = 1
INFO_FILE = "demo_info.json"

# Cityscapes label ids (cityscapesscripts.helpers.labels) used by the scenes.
EGO, ROAD, SIDEWALK, BUILDING, POLE, LIGHT = 1, 7, 8, 11, 17, 19
VEGETATION, SKY, PERSON, CAR, TRUCK, BUS = 21, 23, 24, 26, 27, 28


def make_demo_data(root, n=60, seed=0, size=(256, 512), val_fraction=0.2):
    """Write ``n`` demo scenes of ``size`` (H, W) under ``root``; return ``root``.

    The last ``round(n * val_fraction)`` scenes form the ``val`` split (at least one
    when n >= 2), the others ``train``.  A root that already holds a complete demo
    set made with the same parameters is reused as it is; any other non-empty root
    is refused with ``UserError`` (nothing the user made is overwritten).
    """
    root = Path(root)
    h, w = int(size[0]), int(size[1])
    params = {"version": FORMAT_VERSION, "n": int(n), "seed": int(seed), "size": [h, w],
              "val_fraction": float(val_fraction)}
    if n < 1 or h < 32 or w < 32 or not 0 <= val_fraction < 1:
        raise UserError(f"demo data needs n >= 1, size >= 32x32 and 0 <= val_fraction < 1 "
                        f"(got n={n}, size={size}, val_fraction={val_fraction})")
    names = _file_names(params)
    if root.exists() and not root.is_dir():
        raise UserError(f"'{root}' is a file, not a folder; choose a new folder for the demo data")
    if root.exists() and any(root.iterdir()):
        if _is_complete(root, params, names):
            return str(root)
        raise UserError(f"'{root}' is not empty and not a complete demo set with n={n}, "
                        f"seed={seed}, size={h}x{w}; choose a new folder or delete it")
    # drawn into a hidden folder next to root, renamed when complete: a full disk or Ctrl-C
    # leaves no half set behind
    with staged_dir(str(root), replace_empty=True) as tmp:
        for i, (image, label_ids, color) in enumerate(tqdm(names, desc="drawing demo scenes",
                                                           unit="scene", leave=False)):
            rgb, ids = draw_scene(np.random.default_rng([seed, i]), h, w)
            for path, array in ((image, rgb), (label_ids, ids), (color, _COLORS[ids])):
                path = Path(tmp) / path
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(path, compress_level=1)
        (Path(tmp) / INFO_FILE).write_text(json.dumps(params, indent=1))
    return str(root)


def _file_names(params):
    """``[(image, labelIds, color)]`` relative paths, in scene order."""
    n = params["n"]
    n_val = min(max(round(n * params["val_fraction"]), 1 if n >= 2 and params["val_fraction"] > 0
                    else 0), n - 1)
    names = []
    for i in range(n):
        split = "val" if i >= n - n_val else "train"
        frame = f"demo_{i:06d}_000019"
        names.append((f"leftImg8bit/{split}/demo/{frame}_leftImg8bit.png",
                      f"gtFine/{split}/demo/{frame}_gtFine_labelIds.png",
                      f"gtFine/{split}/demo/{frame}_gtFine_color.png"))
    return names


def _is_complete(root, params, names):
    try:
        info = json.loads((root / INFO_FILE).read_text())
    except (OSError, ValueError):
        return False
    return info == params and all((root / p).is_file() for triple in names for p in triple)


def _color_table():
    table = np.zeros((256, 3), np.uint8)
    for lab in CITYSCAPES_LABELS:
        if lab.id >= 0:
            table[lab.id] = lab.color
    return table


_COLORS = _color_table()   # Cityscapes label id -> official colour


# ---------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------
class Canvas:
    """An RGB float image and its label-id map, painted shape by shape."""

    def __init__(self, h, w):
        self.h, self.w = h, w
        self.rgb = np.zeros((h, w, 3), np.float32)
        self.ids = np.zeros((h, w), np.uint8)
        self.yy, self.xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5  # pixel centres

    def paint(self, box, inside, color, label_id):
        """Paint pixels of ``box`` (y0, y1, x0, x1) where ``inside(yy, xx)`` holds."""
        y0, y1 = max(int(box[0]), 0), min(int(np.ceil(box[1])), self.h)
        x0, x1 = max(int(box[2]), 0), min(int(np.ceil(box[3])), self.w)
        if y0 >= y1 or x0 >= x1:
            return
        yy, xx = self.yy[y0:y1, x0:x1], self.xx[y0:y1, x0:x1]
        mask = inside(yy, xx)
        self.rgb[y0:y1, x0:x1][mask] = color
        self.ids[y0:y1, x0:x1][mask] = label_id

    def rect(self, y0, y1, x0, x1, color, label_id):
        self.paint((y0, y1, x0, x1),
                   lambda yy, xx: (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1),
                   color, label_id)

    def ellipse(self, cy, cx, ry, rx, color, label_id):
        self.paint((cy - ry, cy + ry, cx - rx, cx + rx),
                   lambda yy, xx: ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1,
                   color, label_id)

    def trapezoid(self, y0, y1, top, bottom, color, label_id):
        """Rows y0..y1; x spans linearly from ``top`` (x0, x1) to ``bottom`` (x0, x1)."""
        def inside(yy, xx):
            t = (yy - y0) / max(y1 - y0, 1e-6)
            left = top[0] + t * (bottom[0] - top[0])
            right = top[1] + t * (bottom[1] - top[1])
            return (yy >= y0) & (yy < y1) & (xx >= left) & (xx < right)
        self.paint((y0, y1, min(top[0], bottom[0]), max(top[1], bottom[1])),
                   inside, color, label_id)


def draw_scene(rng, h, w):
    """One street scene: ``(rgb (h, w, 3) uint8, Cityscapes label ids (h, w) uint8)``."""
    c = Canvas(h, w)
    horizon = h * rng.uniform(0.38, 0.5)
    vx = w * rng.uniform(0.4, 0.6)                       # vanishing point x
    _sky(c, rng, horizon)
    _buildings(c, rng, horizon)
    left, right = w * rng.uniform(0.4, 0.75, size=2)     # road half-widths at the bottom
    walk = w * rng.uniform(0.15, 0.35)                   # sidewalk width at the bottom
    road = _Road(horizon, h, vx, left, right, walk)
    _ground(c, rng, road)
    objects = ([(t, _car) for t in rng.uniform(0.2, 1.0, rng.integers(1, 6))]
               + [(t, _pedestrian) for t in rng.uniform(0.3, 0.95, rng.integers(1, 4))]
               + [(t, _traffic_light) for t in rng.uniform(0.3, 0.85, rng.integers(1, 3))])
    for t, draw in sorted(objects, key=lambda o: o[0]):   # far to near
        draw(c, rng, road, t)
    if rng.random() < 0.3:
        _ego_hood(c, rng)
    return _lighting(c, rng), c.ids


class _Road:
    """Perspective geometry: depth t in (0, 1] maps to a row and road edges."""

    def __init__(self, horizon, h, vx, left, right, walk):
        self.horizon, self.h, self.vx = horizon, h, vx
        self.left, self.right, self.walk = left, right, walk

    def y(self, t):
        return self.horizon + t * (self.h - self.horizon)

    def x(self, t, u):
        """x at depth t; u in [-1, 1] spans the road, beyond it the sidewalks."""
        return self.vx + t * u * (self.right if u > 0 else self.left)


def _sky(c, rng, horizon):
    top = rng.choice([[70, 130, 200], [150, 160, 175], [90, 110, 160], [200, 150, 120]])
    low = np.clip(np.asarray(top) + rng.uniform(40, 90), 0, 255)
    t = np.clip(c.yy[:, :1] / max(horizon, 1), 0, 1)[..., None]
    c.rgb[:] = (1 - t) * top + t * low
    c.ids[:] = SKY


def _buildings(c, rng, horizon):
    x = -rng.uniform(0, 0.1) * c.w
    while x < c.w:
        bw = c.w * rng.uniform(0.08, 0.25)
        top = horizon - c.h * rng.uniform(0.08, 0.38)
        kind = rng.random()
        if kind < 0.15:                                   # a gap showing sky
            pass
        elif kind < 0.35:                                 # a tree
            green = rng.uniform([40, 80, 20], [90, 140, 60])
            trunk = (80, 60, 40)
            c.rect(horizon - 0.05 * c.h, c.h, x + 0.45 * bw, x + 0.55 * bw, trunk, VEGETATION)
            c.ellipse(top + 0.3 * bw, x + bw / 2, 0.35 * bw + 0.1 * (horizon - top),
                      0.6 * bw, green, VEGETATION)
        else:
            wall = rng.uniform(60, 200, 3) * rng.uniform(0.8, 1.0)
            c.rect(top, c.h, x, x + bw, wall, BUILDING)
            sx, sy = bw / rng.integers(2, 6), c.h * rng.uniform(0.04, 0.08)
            glass = wall * rng.uniform(0.3, 0.6)
            x0 = x
            c.paint((top, c.h, x, x + bw),
                    lambda yy, xx: (((xx - x0) % sx) > 0.3 * sx) & (((yy - top) % sy) > 0.4 * sy)
                    & (xx > x0 + 0.1 * sx) & (xx < x0 + bw - 0.1 * sx) & (yy > top + 0.3 * sy),
                    glass, BUILDING)
        x += bw


def _ground(c, rng, road):
    y0, y1 = road.horizon, c.h
    walk = rng.uniform(120, 200) + rng.uniform(-20, 20, 3)
    asphalt = rng.uniform(50, 110) + rng.uniform(-8, 8, 3)
    vx = road.vx
    c.trapezoid(y0, y1, (vx, vx), (vx - road.left - road.walk, vx + road.right + road.walk),
                walk, SIDEWALK)
    c.trapezoid(y0, y1, (vx, vx), (vx - road.left, vx + road.right), asphalt, ROAD)
    # Dashed lane marks: dash phase uniform in 1/t (screen distance to the horizon).
    offset = rng.uniform(-0.3, 0.3)
    half = c.w * 0.008
    phase = rng.uniform(0, 1)

    def mark(yy, xx):
        t = np.clip((yy - road.horizon) / (c.h - road.horizon), 1e-3, 1)
        centre = road.x(1, offset)
        x = vx + t * (centre - vx)
        return (np.abs(xx - x) < t * half + 0.3) & ((3.0 / t + phase) % 1 < 0.5) & (t > 0.05)
    c.paint((y0, y1, 0, c.w), mark, rng.uniform(200, 240, 3), ROAD)


def _car(c, rng, road, t):
    u = rng.uniform(-0.75, 0.75)
    cx, base = road.x(t, u), road.y(t)
    kind = rng.choice([CAR, CAR, CAR, CAR, TRUCK, BUS])
    width = t * (road.left + road.right) * rng.uniform(0.3, 0.4)
    height = width * (rng.uniform(0.55, 0.75) if kind == CAR else rng.uniform(0.9, 1.2))
    paint = rng.uniform(0, 255, 3)
    x0, x1, top = cx - width / 2, cx + width / 2, base - height
    wheel = 0.12 * height
    if kind == CAR:                                       # body, cabin, window
        c.rect(base - 0.6 * height, base - wheel, x0, x1, paint, kind)
        inset = 0.15 * width
        c.trapezoid(top, base - 0.6 * height + 1, (x0 + 2 * inset, x1 - 2 * inset),
                    (x0 + inset, x1 - inset), paint, kind)
        c.trapezoid(top + 0.08 * height, base - 0.62 * height, (x0 + 2.3 * inset, x1 - 2.3 * inset),
                    (x0 + 1.3 * inset, x1 - 1.3 * inset), (40, 50, 60), kind)
    else:                                                 # box with a row of windows
        c.rect(top, base - wheel, x0, x1, paint, kind)
        c.rect(top + 0.1 * height, top + 0.35 * height, x0 + 0.05 * width, x1 - 0.05 * width,
               (40, 50, 60), kind)
    for wx in (x0 + 0.18 * width, x1 - 0.18 * width):     # wheels
        c.ellipse(base - wheel, wx, wheel, 0.1 * width, (20, 20, 20), kind)
    for lx in (x0 + 0.03 * width, x1 - 0.13 * width):     # rear lights
        c.rect(base - 0.45 * height, base - 0.35 * height, lx, lx + 0.1 * width,
               (200, 20, 20), kind)


def _pedestrian(c, rng, road, t):
    side = rng.choice([-1, 1])
    u = side * rng.uniform(1.05, 1 + road.walk / (road.right if side > 0 else road.left))
    if rng.random() < 0.2:
        u = rng.uniform(-0.9, 0.9)                        # crossing the road
    ph = t * c.h * rng.uniform(0.35, 0.5)                 # figure height in pixels
    x = float(np.clip(road.x(t, u), 0.15 * ph, c.w - 0.15 * ph))
    base = road.y(t)
    top = base - ph
    clothes, legs = rng.uniform(0, 255, 3), rng.uniform(0, 120, 3)
    skin = rng.choice([[230, 190, 160], [180, 130, 100], [110, 80, 60]])
    c.rect(top + 0.55 * ph, base, x - 0.1 * ph, x - 0.01 * ph, legs, PERSON)
    c.rect(top + 0.55 * ph, base, x + 0.01 * ph, x + 0.1 * ph, legs, PERSON)
    c.rect(top + 0.16 * ph, top + 0.58 * ph, x - 0.12 * ph, x + 0.12 * ph, clothes, PERSON)
    c.rect(top + 0.18 * ph, top + 0.5 * ph, x - 0.17 * ph, x - 0.12 * ph, clothes, PERSON)
    c.rect(top + 0.18 * ph, top + 0.5 * ph, x + 0.12 * ph, x + 0.17 * ph, clothes, PERSON)
    c.ellipse(top + 0.08 * ph, x, 0.08 * ph, 0.065 * ph, skin, PERSON)


def _traffic_light(c, rng, road, t):
    side = rng.choice([-1, 1])
    u = side * rng.uniform(1.02, 1 + 0.5 * road.walk / (road.right if side > 0 else road.left))
    base = road.y(t)
    box_w = max(3.0, t * c.w * 0.045)
    x = float(np.clip(road.x(t, u), box_w, c.w - box_w))
    box_h = 2.7 * box_w
    pole_h = min(t * c.h * rng.uniform(0.6, 1.0), base - box_h - 0.02 * c.h)  # box in view
    pole_w = max(1.0, t * c.w * 0.008)
    c.rect(base - pole_h, base, x - pole_w / 2, x + pole_w / 2, (90, 90, 95), POLE)
    top = base - pole_h - box_h
    yellowish = rng.uniform([170, 140, 20], [230, 190, 60])
    c.rect(top, top + box_h, x - box_w / 2, x + box_w / 2, yellowish, LIGHT)
    lit = rng.integers(0, 3)
    for k, colour in enumerate([(255, 40, 30), (255, 190, 40), (60, 255, 120)]):
        shade = colour if k == lit else (60, 50, 30)
        c.ellipse(top + (k + 0.5) * box_h / 3, x, 0.3 * box_w, 0.3 * box_w, shade, LIGHT)


def _ego_hood(c, rng):
    depth = c.h * rng.uniform(0.05, 0.1)
    bulge = c.h * 0.04
    c.paint((c.h - depth - bulge, c.h, 0, c.w),
            lambda yy, xx: yy > c.h - depth - bulge * (1 - ((xx - c.w / 2) / (c.w / 2)) ** 2),
            rng.uniform(10, 60, 3), EGO)


def _lighting(c, rng):
    """Global gain, colour tint, a soft left-right shading and sensor noise."""
    gain = rng.uniform(0.7, 1.2) * rng.uniform(0.9, 1.1, 3)
    shade = 1 + rng.uniform(-0.15, 0.15) * (c.xx[..., None] / c.w - 0.5)
    noise = rng.normal(0, rng.uniform(2, 8), c.rgb.shape)
    return np.clip(c.rgb * gain * shade + noise, 0, 255).astype(np.uint8)
