"""input_pipeline.py: shapes and dtypes, label-safe resizing, aligned augmentation,
determinism, caching, bad files."""
import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from roadseg import datasets, input_pipeline
from roadseg.datasets import Sample
from roadseg.errors import UserError
from roadseg.schemes import IGNORE, get_scheme

ROAD4 = get_scheme("road4")
SHAPE = (64, 128)
# Cityscapes ids -> road4 class and an image colour that encodes it (one channel each)
ENCODE = {7: (1, (230, 20, 20)), 26: (2, (20, 230, 20)), 24: (3, (20, 20, 230))}


def png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array)).save(path)
    return str(path)


def block_samples(tmp_path, n, shape=SHAPE, block=16, seed=0):
    """Samples whose image colour encodes the label: 16x16 blocks of road/car/person."""
    rng = np.random.default_rng(seed)
    ids = np.array(list(ENCODE), np.uint8)
    palette = np.zeros((256, 3), np.uint8)
    for i, (_, colour) in ENCODE.items():
        palette[i] = colour
    samples = []
    for k in range(n):
        grid = rng.choice(ids, (shape[0] // block, shape[1] // block))
        label = np.kron(grid, np.ones((block, block), np.uint8))
        samples.append(Sample(png(tmp_path / f"img{k}.png", palette[label]),
                              png(tmp_path / f"lab{k}.png", label), "ids", "cityscapes"))
    return samples


def batches(*args, **kw):
    return list(input_pipeline.numpy_batches(input_pipeline.make_dataset(*args, **kw)))


def test_shapes_dtypes_and_values(demo_root):
    train = datasets.find_dataset(demo_root).splits["train"]     # 10 scenes of 128x256
    out = batches(train, ROAD4, SHAPE, 4, shuffle=False)
    assert [len(x) for x, _ in out] == [4, 4, 2]
    images, labels = out[0]
    assert images.shape == (4, 64, 128, 3) and images.dtype == np.float32
    assert labels.shape == (4, 64, 128) and labels.dtype == np.int32
    assert 0 <= images.min() and images.max() <= 255 and images.max() > 100
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3, 4, IGNORE}
    # no shuffle: file order; the image is the file resized bilinearly
    first = tf.image.resize(datasets.load_image(train[0].image), SHAPE).numpy()
    np.testing.assert_allclose(images[0], np.round(first), atol=0.51)
    assert [len(x) for x, _ in batches(train, ROAD4, SHAPE, 4, drop_remainder=True)] == [4, 4]


def test_bad_arguments(tmp_path):
    samples = block_samples(tmp_path, 1)
    with pytest.raises(UserError, match="divisible by 32"):
        input_pipeline.make_dataset(samples, ROAD4, (60, 128), 2)
    with pytest.raises(UserError, match="no label"):
        input_pipeline.make_dataset([Sample(samples[0].image, None)], ROAD4, SHAPE, 2)
    with pytest.raises(UserError, match="no samples"):
        input_pipeline.make_dataset([], ROAD4, SHAPE, 2)


@pytest.mark.parametrize("augment", [False, True])
def test_label_resizing_never_invents_classes(tmp_path, augment):
    # 1-pixel stripes of road / car / person / void at an awkward size, colour-coded
    stripes = np.array([(128, 64, 128), (0, 0, 142), (220, 20, 60), (0, 0, 0)], np.uint8)
    label = stripes[(np.arange(50)[:, None] + np.arange(70)[None]) % 4]
    s = Sample(png(tmp_path / "i.png", np.zeros((50, 70, 3), np.uint8)),
               png(tmp_path / "c.png", label), "color", "cityscapes")
    for shape in [(32, 32), (96, 128)]:
        (_, labels), = batches([s] * 3, ROAD4, shape, 3, augment=augment, seed=1)
        assert set(np.unique(labels).tolist()) <= {1, 2, 3, IGNORE}
        assert len(set(np.unique(labels).tolist()) - {IGNORE}) == 3


def decode_image(images):
    """Class encoded by the image colour: the dominant channel, or IGNORE for grey padding."""
    cls = np.argmax(images, axis=-1) + 1
    return np.where(images.max(-1) - images.min(-1) > 60, cls, IGNORE)


def test_augmentation_keeps_image_and_label_aligned(tmp_path):
    samples = block_samples(tmp_path, 8)
    (images, labels), = batches(samples, ROAD4, SHAPE, 8, augment=True, seed=3, shuffle=False)
    # compare away from block borders, where bilinear resizing mixes colours
    padded = np.pad(labels, [(0, 0), (1, 1), (1, 1)], mode="edge")
    interior = np.ones(labels.shape, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            interior &= padded[:, 1 + dy:1 + dy + SHAPE[0], 1 + dx:1 + dx + SHAPE[1]] == labels
    agree = decode_image(images)[interior] == labels[interior]
    assert agree.mean() > 0.995
    # ...and augmentation really did something: flips/crops moved pixels, padding appeared
    (plain, plain_labels), = batches(samples, ROAD4, SHAPE, 8, shuffle=False)
    moved = [(labels[i] != plain_labels[i]).mean() > 0.2 for i in range(8)]
    assert sum(moved) >= 5
    assert (labels == IGNORE).any() and not (plain_labels == IGNORE).any()
    assert not np.allclose(images, plain)


def test_flip_alone_is_exact(tmp_path):
    """augment="flip": the only change is a joint horizontal flip, images untouched otherwise."""
    samples = block_samples(tmp_path, 6, seed=1)
    (images, labels), = batches(samples, ROAD4, SHAPE, 6, augment="flip", seed=0, shuffle=False)
    (plain_images, _), = batches(samples, ROAD4, SHAPE, 6, shuffle=False)
    (_, plain), = batches(samples, ROAD4, SHAPE, 6, shuffle=False)
    flipped = [np.array_equal(a, b[:, ::-1]) for a, b in zip(labels, plain)]
    same = [np.array_equal(a, b) for a, b in zip(labels, plain)]
    assert all(f or s for f, s in zip(flipped, same)) and any(flipped) and any(same)
    for image, plain_image, f in zip(images, plain_images, flipped):  # no colour jitter
        np.testing.assert_array_equal(image, plain_image[:, ::-1] if f else plain_image)


def test_mild_augmentation_scales_within_its_range(tmp_path):
    samples = block_samples(tmp_path, 6, seed=1)
    (_, labels), = batches(samples, ROAD4, SHAPE, 6, augment="mild", seed=0, shuffle=False)
    (_, plain), = batches(samples, ROAD4, SHAPE, 6, shuffle=False)
    # scaled at most 0.8x: padding (IGNORE) covers under (1 - 0.8^2) of the pixels
    assert np.mean(labels == 255) < 0.36
    assert not all(np.array_equal(a, b) or np.array_equal(a, b[:, ::-1]) for a, b in zip(labels, plain))
    with pytest.raises(UserError, match="unknown augmentation"):
        input_pipeline.make_dataset(samples, ROAD4, SHAPE, 2, augment="wild")


def test_same_seed_same_batches_and_new_order_each_epoch(tmp_path):
    samples = block_samples(tmp_path, 10)

    def run(seed):
        ds = input_pipeline.make_dataset(samples, ROAD4, SHAPE, 5, augment=True, seed=seed)
        return [list(input_pipeline.numpy_batches(ds)) for _ in range(2)]   # two epochs
    a, b, c = run(7), run(7), run(8)
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        np.testing.assert_array_equal(x[0], y[0])
        np.testing.assert_array_equal(x[1], y[1])
    assert not np.array_equal(a[0][0][1], c[0][0][1])
    assert not np.array_equal(a[0][0][1], a[1][0][1])   # epochs differ


def test_repeat_and_shuffle_cover_every_sample(tmp_path):
    samples = block_samples(tmp_path, 6)
    (_, plain), = batches(samples, ROAD4, SHAPE, 6, shuffle=False)
    ds = input_pipeline.make_dataset(samples, ROAD4, SHAPE, 4, repeat=True, seed=2)
    it = input_pipeline.numpy_batches(ds)
    seen = np.concatenate([next(it)[1] for _ in range(3)])       # 12 = two epochs
    index = [next(i for i in range(6) if np.array_equal(x, plain[i])) for x in seen]
    assert sorted(index[:6]) == sorted(index[6:]) == list(range(6))
    assert index[:6] != index[6:]                                 # reshuffled each epoch


def test_cache_in_memory_and_on_disk(tmp_path):
    samples = block_samples(tmp_path / "data", 4)
    (ref_images, ref_labels), = batches(samples, ROAD4, SHAPE, 4, shuffle=False)
    (images, labels), = batches(samples, ROAD4, SHAPE, 4, shuffle=False, cache=True)
    np.testing.assert_array_equal(images, ref_images)
    np.testing.assert_array_equal(labels, ref_labels)

    prefix = tmp_path / "cache" / "train"
    prefix.parent.mkdir()
    batches(samples, ROAD4, SHAPE, 4, shuffle=False, cache=str(prefix))
    written = sorted(p.name for p in prefix.parent.iterdir())
    assert written and all(name.startswith("train_") for name in written)
    for s in samples:                          # the second run must read only the cache
        Path(s.image).unlink()
    (images, labels), = batches(samples, ROAD4, SHAPE, 4, shuffle=False, cache=str(prefix))
    np.testing.assert_array_equal(images, ref_images)
    np.testing.assert_array_equal(labels, ref_labels)
    with pytest.raises(UserError, match="cannot decode"):  # other shape: other cache
        batches(samples, ROAD4, (32, 64), 4, shuffle=False, cache=str(prefix))



def test_bad_files_fail_or_are_skipped(tmp_path, capsys):
    samples = block_samples(tmp_path, 4)
    (tmp_path / "img2.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="img2.png"):
        batches(samples, ROAD4, SHAPE, 4)
    capsys.readouterr()
    (images, labels), = batches(samples, ROAD4, SHAPE, 4, skip_bad=True, shuffle=False)
    warned = capsys.readouterr().err.splitlines()   # the package logger: warnings on stderr
    assert len(warned) == 1 and re.match(r"skipping bad sample: .*img2\.png", warned[0]), warned
    assert len(images) == 3
    mismatch = Sample(samples[0].image, png(tmp_path / "small.png", np.full((8, 8), 7, np.uint8)))
    with pytest.raises(UserError, match="small.png' is 8x8"):
        batches([mismatch], ROAD4, SHAPE, 1)


def test_graph_mode(tmp_path):
    samples = block_samples(tmp_path, 3)
    with tf.Graph().as_default():
        out = batches(samples, ROAD4, SHAPE, 2, augment=True, seed=0)
        assert [x.shape for x, _ in out] == [(2, 64, 128, 3), (1, 64, 128, 3)]
        (tmp_path / "img0.png").write_bytes(b"broken")
        with pytest.raises(UserError, match="img0.png"):
            batches(samples, ROAD4, SHAPE, 3)


def test_throughput(tmp_path):
    rate = input_pipeline.throughput(block_samples(tmp_path, 4), ROAD4, SHAPE, 2, 3, True, None)
    assert rate > 1
