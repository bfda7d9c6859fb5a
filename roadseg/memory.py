"""How much memory a training step needs, and whether this machine has it.

``check_training_memory`` refuses, before anything is allocated, a run whose estimated
peak memory exceeds what is available (a swap storm or the OOM killer otherwise), and
warns above half of it.
"""
import os

from roadseg.errors import UserError
from roadseg.log import logger
from roadseg.vgg import POOL_AFTER, VGG16_LAYERS

# Peak memory of TensorFlow itself with this graph (measured: about 0.7 GB resident).
FRAMEWORK_BYTES = 0.7e9


def estimate_training_memory(image_shape, batch_size, width=1.0):
    """Rough peak bytes of one training step on VGG16 of channel ``width``.

    Activations: every VGG16 layer output (and pool output) per input pixel, kept for the
    backward pass and matched by a gradient (x2, float32); weights: values, gradients and
    two Adam moments (x4, float32); plus ``FRAMEWORK_BYTES``.  Measured peak resident
    memory at 256x512, batch 4: 1.13 GB at width 1/4 and 4.01 GB at width 1; this gives
    1.2 GB and 4.1 GB.
    """
    per_pixel, scale, params, c_in = 0.0, 1, 0, 3
    for name, _, channels, k in VGG16_LAYERS:
        c = max(1, round(channels * width))
        per_pixel += c / scale ** 2
        if name in POOL_AFTER:
            scale *= 2
            per_pixel += c / scale ** 2
        params += k * k * c_in * c + c
        c_in = c
    pixels = int(image_shape[0]) * int(image_shape[1]) * int(batch_size)
    return int(2 * 4 * per_pixel * pixels + 4 * 4 * params + FRAMEWORK_BYTES)


def available_memory():
    """Bytes of memory available to a new allocation (Linux MemAvailable, else free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_training_memory(image_shape, batch_size, width, log=None):
    """Refuse a run whose estimated memory exceeds what is available; warn above half."""
    h, w = image_shape
    need = estimate_training_memory((h, w), batch_size, width)
    have = available_memory()
    what = f"training at {h}x{w} with batch {batch_size} needs about {need / 1e9:.1f} GB"
    if need > have:
        raise UserError(f"{what} of memory (estimate) but only {have / 1e9:.1f} GB is available; "
                        f"use a smaller --image-shape or --batch-size (or a narrower VGG)")
    if need > have / 2:
        (log or logger.warning)(f"warning: {what} of the {have / 1e9:.1f} GB available; other "
                                f"programs may run short")
