"""What people look at: class maps as colours, blended over the image, written as PNGs.

* ``colorize`` / ``overlay``  -> a class map as colours / blended over the image
* ``write_overlays``          -> ``<stem>.png`` overlay + ``<stem>_classes.png`` per image

``write_overlays`` takes a ``predict_fn(images) -> class_maps``: ``images`` a uint8
``(N, H, W, 3)`` RGB batch, the result ``(N, H, W)`` class ids at the *same* size (see
``roadseg.inference``), so it works with any model, or a fake one in the tests.  Colours
come from the class scheme (``schemes.get_scheme("road4")``).
"""
import functools
import os

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from roadseg.datasets import load_image
from roadseg.errors import UserError
from roadseg.inference import predict_batch, same_size_batches
from roadseg.run_folders import refuse_existing, staged_file
from roadseg.schemes import IGNORE


def _palette(colors):
    """A 256-entry colour table: class ``i`` -> ``colors[i]``, every other id -> black."""
    colors = np.asarray(colors, np.uint8).reshape(-1, 3)
    if len(colors) > IGNORE:
        raise ValueError(f"at most {IGNORE} classes can have colours, got {len(colors)}")
    table = np.zeros((256, 3), np.uint8)
    table[:len(colors)] = colors
    return table


def colorize(class_map, colors):
    """Class map ``(..., H, W)`` -> colour image ``(..., H, W, 3)`` uint8.

    Class ``i`` gets ``colors[i]``; IGNORE (255) and any id without a colour are black.
    """
    return np.take(_palette(colors), np.asarray(class_map, np.uint8), axis=0)


def overlay(image, class_map, colors, alpha=0.5, skip_classes=None):
    """Blend each pixel's class colour over ``image``: ``(1 - alpha) * image + alpha * colour``.

    ``image`` is uint8 ``(..., H, W, 3)`` RGB and ``class_map`` ``(..., H, W)`` (batches work
    too).  ``colors`` is a ``schemes.Scheme`` or an (N, 3) colour table.  Pixels of
    ``skip_classes`` (default: the scheme's ``unpainted`` classes, class 0 for a bare
    colour table), IGNORE and ids without a colour keep the image unchanged.  Rounded to
    the nearest integer, uint8.
    """
    if skip_classes is None:
        skip_classes = getattr(colors, "unpainted", (0,))
    colors = getattr(colors, "colors", colors)
    image = np.asarray(image, np.uint8)
    class_map = np.asarray(class_map, np.uint8)
    if image.shape[:-1] != class_map.shape or image.shape[-1] != 3:
        raise ValueError(f"image {image.shape} and class map {class_map.shape} differ in size")
    table = _blend_table(_palette(colors).tobytes(), len(np.reshape(colors, (-1, 3))), alpha,
                         tuple(sorted(set(skip_classes))))
    # Every output byte is table[channel][class << 8 | input byte]: three uint16 lookups a
    # pixel instead of float arithmetic on it (3x faster on video frames, same bytes).
    shifted = np.left_shift(class_map, 8, dtype=np.uint16)
    index, out = np.empty_like(shifted), np.empty_like(image)
    for channel in range(3):
        np.bitwise_or(shifted, image[..., channel], out=index)
        np.take(table[channel], index, out=out[..., channel], mode="wrap")
    return out


@functools.lru_cache(maxsize=32)
def _blend_table(palette, n_colors, alpha, skip_classes):
    """``table[channel, class << 8 | value]``: the overlay of ``value`` in ``channel`` for a
    pixel of ``class``, uint8 (3, 65536), computed as ``overlay`` defines it in float32 and
    rounded to nearest; classes that are not painted map every value to itself."""
    painted = np.zeros(256, bool)  # which class ids get a colour
    painted[:n_colors] = True
    painted[list(skip_classes)] = False
    colors = np.frombuffer(palette, np.uint8).reshape(256, 3)
    blend = np.broadcast_to(np.arange(256, dtype=np.float32), (3, 256, 256)).copy()  # [ch, class, value]
    blend *= 1.0 - alpha
    blend += colors.T.astype(np.float32)[:, :, None] * alpha
    np.rint(blend, out=blend)
    same = np.broadcast_to(np.arange(256, dtype=np.uint8), blend.shape)
    table = np.where(painted[None, :, None], blend.astype(np.uint8), same).reshape(3, 65536)
    table.flags.writeable = False
    return table


def _write_png(path, array):
    """Write a PNG under a temporary name that gets ``path`` only when complete; an existing
    file is never replaced, and a full disk is one UserError line with nothing under ``path``."""
    refuse_existing(path, "write into a new run folder")
    with staged_file(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def write_overlays(run_dir, image_paths, predict_fn, colors, batch_size=4):
    """Segment each image and write ``<stem>.png`` (overlay) and ``<stem>_classes.png``.

    Both are at the image's original size; the class map holds the raw uint8 class ids.
    ``run_dir`` must exist (see ``new_run_dir``); files are never overwritten, and each is
    written under a temporary name and renamed when complete (never a truncated PNG).  Consecutive
    images of the same size go to ``predict_fn`` together, up to ``batch_size`` at a time.
    Returns the written paths, overlay then class map for each image, in input order.
    """
    image_paths = [os.fspath(p) for p in image_paths]
    stems = {}
    for path in image_paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in stems:
            raise UserError(f"{path} and {stems[stem]} would both be saved as {stem}.png; "
                            f"rename one of them")
        stems[stem] = path
    written = []
    with tqdm(total=len(image_paths), desc="samples", unit="img") as bar:
        pairs = ((path, load_image(path)) for path in image_paths)
        for paths, images in same_size_batches(pairs, batch_size):
            maps = predict_batch(predict_fn, images)
            for path, image, class_map in zip(paths, images, maps):
                stem = os.path.join(run_dir, os.path.splitext(os.path.basename(path))[0])
                _write_png(stem + ".png", overlay(image, class_map, colors))
                _write_png(stem + "_classes.png", class_map)
                written += [stem + ".png", stem + "_classes.png"]
            bar.update(len(paths))
    return written
