"""Tests for metrics.py and cityscapes_eval.py: metrics on hand-worked cases, the
streaming evaluation at native resolution, reports, labelIds export and parity
with the official Cityscapes evaluator."""
import json
import os
import sys
from collections import namedtuple

import numpy as np
import pytest
from PIL import Image

from roadseg import cityscapes_eval, datasets, metrics
from roadseg.errors import UserError
from roadseg.metrics import ConfusionMatrix
from roadseg.schemes import IGNORE, get_scheme

# The contract of datasets.Sample / datasets.load_pair, with a stand-in loader:
# `image` holds an (H, W) class map that the fake model reads back from channel 0.
Sample = namedtuple("Sample", "image label kind dataset")


@pytest.fixture
def fake_datasets(monkeypatch):
    """A stand-in ``datasets.load_pair`` for samples that carry their arrays."""
    def load_pair(sample, scheme):
        image = np.repeat(np.asarray(sample.kind["image"], np.uint8)[..., None], 3, axis=2)
        return image, np.asarray(sample.kind["label"], np.uint8)

    monkeypatch.setattr(datasets, "load_pair", load_pair)


def make_sample(image_map, label, name="x_000000_000000_leftImg8bit.png"):
    return Sample(name, None, {"image": image_map, "label": label}, "cityscapes")


def read_channel0(images):
    return images[..., 0].copy()


# ---------------------------------------------------------------------------------
# ConfusionMatrix on hand-made cases
# ---------------------------------------------------------------------------------
def test_perfect_prediction_scores_one():
    label = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    r = ConfusionMatrix(3)
    r.update(label, label)
    r = r.compute()
    np.testing.assert_array_equal(r["iou"], [1, 1, 1])
    assert r["mean_iou"] == 1 and r["pixel_accuracy"] == 1 and r["fw_iou"] == 1


def test_all_wrong_scores_zero():
    cm = ConfusionMatrix(2)
    cm.update(np.array([0, 0, 1, 1]), np.array([1, 1, 0, 0]))
    r = cm.compute()
    np.testing.assert_array_equal(r["iou"], [0, 0])
    assert r["mean_iou"] == 0 and r["pixel_accuracy"] == 0
    np.testing.assert_array_equal(r["confusion_matrix"], [[0, 2], [2, 0]])


def test_class_absent_from_label_and_prediction_is_nan_and_left_out_of_mean():
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]))
    r = cm.compute()
    assert np.isnan(r["iou"][2]) and np.isnan(r["accuracy"][2])
    assert r["iou"][0] == pytest.approx(1 / 2) and r["iou"][1] == pytest.approx(2 / 3)
    assert r["mean_iou"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_class_only_predicted_has_iou_zero_not_nan():
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1]))
    r = cm.compute()
    assert r["iou"][2] == 0 and np.isnan(r["accuracy"][2])
    assert r["mean_iou"] == pytest.approx((1 / 2 + 1 + 0) / 3)


def test_ignore_and_out_of_range_labels_are_not_counted():
    label = np.array([[0, IGNORE, 1], [1, 7, IGNORE]], np.uint8)
    pred_a = np.array([[0, 0, 1], [1, 0, 1]], np.uint8)
    pred_b = np.array([[0, 1, 1], [1, 1, 0]], np.uint8)  # differs only where not counted
    a, b = ConfusionMatrix(2), ConfusionMatrix(2)
    a.update(label, pred_a)
    b.update(label, pred_b)
    np.testing.assert_array_equal(a.matrix, b.matrix)
    np.testing.assert_array_equal(a.matrix, [[1, 0], [0, 2]])
    assert a.compute()["pixels"] == 3


def test_worked_example_exact_fractions():
    # M = [[2,1,0],[0,2,0],[0,1,0]]  (rows: label, cols: prediction)
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 0, 0, 1, 1, 2]), np.array([0, 0, 1, 1, 1, 1]))
    r = cm.compute()
    np.testing.assert_allclose(r["iou"], [2 / 3, 1 / 2, 0])
    np.testing.assert_allclose(r["accuracy"], [2 / 3, 1, 0])
    assert r["mean_iou"] == pytest.approx(7 / 18)
    assert r["mean_accuracy"] == pytest.approx(5 / 9)
    assert r["pixel_accuracy"] == pytest.approx(2 / 3)
    assert r["fw_iou"] == pytest.approx(3 / 6 * 2 / 3 + 2 / 6 * 1 / 2 + 1 / 6 * 0)  # 1/2
    assert r["pixels"] == 6


def test_uint8_inputs_with_many_classes_do_not_overflow():
    # 19 * 18 + 18 = 360 does not fit in uint8; the index must be computed wide.
    label = np.array([18, 18, 17], np.uint8)
    pred = np.array([18, 17, 17], np.uint8)
    cm = ConfusionMatrix(19)
    cm.update(label, pred)
    assert cm.matrix[18, 18] == 1 and cm.matrix[18, 17] == 1 and cm.matrix[17, 17] == 1
    assert cm.matrix.sum() == 3


def test_merge_equals_one_big_update():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (4, 16, 16)).astype(np.uint8)
    labels[labels == 4] = IGNORE
    preds = rng.integers(0, 4, (4, 16, 16)).astype(np.uint8)
    parts = []
    for label, pred in zip(labels, preds):
        cm = ConfusionMatrix(4)
        cm.update(label, pred)
        parts.append(cm)
    merged = ConfusionMatrix(4)
    for part in parts:
        merged.merge(part)
    whole = ConfusionMatrix(4)
    whole.update(labels, preds)
    np.testing.assert_array_equal(merged.matrix, whole.matrix)
    assert merged.matrix.sum() == np.count_nonzero(labels != IGNORE)


def test_bad_inputs_raise():
    cm = ConfusionMatrix(2)
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="class ids"):
        cm.update(np.zeros(3, np.uint8), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="merge"):
        cm.merge(ConfusionMatrix(3))


# ---------------------------------------------------------------------------------
# evaluate(): streaming, batching of same-size images, native resolution
# ---------------------------------------------------------------------------------
def stripes(h, w):
    """Left half class 0, right half class 1."""
    label = np.zeros((h, w), np.uint8)
    label[:, w // 2:] = 1
    return label


def test_evaluate_identity_prediction_gives_miou_one(fake_datasets):
    sizes = [(4, 6), (4, 6), (2, 10), (4, 6), (4, 6), (4, 6)]
    samples = [make_sample(stripes(h, w), stripes(h, w)) for h, w in sizes]
    batches = []

    def predict(images):
        batches.append(images.shape)
        return read_channel0(images)

    r = metrics.evaluate(predict, samples, get_scheme("road4"), batch_size=2, progress=False)
    assert r["mean_iou"] == 1 and r["pixels"] == 5 * 24 + 20
    np.testing.assert_array_equal(r["iou"][:2], [1, 1])
    assert np.isnan(r["iou"][2:]).all()
    # Consecutive same-size images share a batch of at most 2; a new size starts a new one.
    assert batches == [(2, 4, 6, 3), (1, 2, 10, 3), (2, 4, 6, 3), (1, 4, 6, 3)]


def test_evaluate_shifted_prediction_known_iou(fake_datasets):
    # A "model" that is off by one column: per row label 000111 -> prediction 100011,
    # so each class has TP 2, FP 1, FN 1 -> IoU 1/2, in images of two sizes.
    samples = [make_sample(stripes(4, 6), stripes(4, 6)),
               make_sample(stripes(2, 6), stripes(2, 6))]
    r = metrics.evaluate(lambda x: np.roll(read_channel0(x), 1, axis=2), samples,
                          get_scheme("road4"), progress=False)
    np.testing.assert_allclose(r["iou"][:2], [1 / 2, 1 / 2])
    assert r["pixel_accuracy"] == pytest.approx(4 / 6)
    np.testing.assert_array_equal(r["confusion_matrix"][:2, :2], [[12, 6], [6, 12]])


def test_evaluate_rejects_prediction_at_another_size(fake_datasets):
    samples = [make_sample(stripes(4, 6), stripes(4, 6))]
    with pytest.raises(ValueError, match="input size"):
        metrics.evaluate(lambda x: read_channel0(x)[:, ::2, ::2], samples,
                          get_scheme("road4"), progress=False)


# ---------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------
def worked_result():
    cm = ConfusionMatrix(4)
    cm.update(np.array([0, 0, 0, 1, 1, 2]), np.array([0, 0, 1, 1, 1, 1]))
    return cm.compute()


def test_format_table_lists_classes_and_summary():
    names = ["background", "road", "vehicle", "pedestrian"]
    lines = metrics.format_table(worked_result(), names).splitlines()
    assert lines[2].split() == ["background", "0.6667", "0.6667"]
    assert lines[3].split() == ["road", "0.5000", "1.0000"]
    assert lines[5].split() == ["pedestrian", "-", "-"]          # absent: NaN
    assert lines[-3].split() == ["mean", "IoU", "0.3889"]         # 7/18
    assert lines[-2].split() == ["pixel", "accuracy", "0.6667"]
    assert lines[-1].split() == ["frequency-weighted", "IoU", "0.5000"]


def test_save_json_writes_values_and_never_overwrites(tmp_path):
    names = ["background", "road", "vehicle", "pedestrian"]
    path = tmp_path / "out" / "metrics.json"
    metrics.save_json(worked_result(), names, str(path))
    data = json.loads(path.read_text())
    assert data["classes"]["background"]["iou"] == pytest.approx(2 / 3)
    assert data["classes"]["pedestrian"] == {"iou": None, "accuracy": None}
    assert data["mean_iou"] == pytest.approx(7 / 18) and data["fw_iou"] == pytest.approx(0.5)
    assert data["confusion_matrix"][0] == [2, 1, 0, 0]
    before = path.read_text()
    with pytest.raises(UserError, match="already exists"):
        metrics.save_json(worked_result(), names, str(path))
    assert path.read_text() == before


# ---------------------------------------------------------------------------------
# labelIds export
# ---------------------------------------------------------------------------------
def test_export_label_ids_road4():
    classes = np.array([[0, 1, 2], [3, 4, IGNORE]], np.uint8)
    out = cityscapes_eval.export_label_ids(classes, get_scheme("road4"))
    assert out.dtype == np.uint8
    # unlabeled, road, car, person, traffic light; IGNORE -> unlabeled
    np.testing.assert_array_equal(out, [[0, 7, 26], [24, 19, 0]])


def test_export_label_ids_cityscapes19_round_trips():
    scheme = get_scheme("cityscapes19")
    classes = np.arange(19, dtype=np.uint8).reshape(1, 19)
    out = cityscapes_eval.export_label_ids(classes, scheme)
    np.testing.assert_array_equal(
        out[0], [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33])
    np.testing.assert_array_equal(scheme.lut("cityscapes")[out], classes)
    with pytest.raises(ValueError, match="outside"):
        cityscapes_eval.export_label_ids(np.array([19]), scheme)


def test_prediction_name_matches_official_pattern():
    name = "/d/leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png"
    assert cityscapes_eval.prediction_name(name) == "aachen_000000_000019_pred_labelIds.png"
    assert cityscapes_eval.prediction_name("camvid/0001TP_006690.png") == "0001TP_006690_pred_labelIds.png"


# ---------------------------------------------------------------------------------
# cityscapes_eval: the numpy shim
# ---------------------------------------------------------------------------------
def test_in1d_shim_returns_flattened_membership():
    cityscapes_eval.install_numpy_shims()
    got = np.in1d(np.array([[1, 2], [3, 4]]), [2, 3])
    np.testing.assert_array_equal(got, [False, True, True, False])
    np.testing.assert_array_equal(np.in1d([1, 2, 3], [2], invert=True), [True, False, True])


def test_evaluator_imports_despite_a_stale_export_dir(monkeypatch, tmp_path):
    import cityscapesscripts.evaluation as package

    cityscapes_eval.import_cityscapes_evaluator()
    # Force a fresh import (monkeypatch puts the old module back afterwards).
    monkeypatch.delitem(sys.modules, package.__name__ + ".evalPixelLevelSemanticLabeling")
    monkeypatch.delattr(package, "evalPixelLevelSemanticLabeling")
    monkeypatch.setenv("CITYSCAPES_EXPORT_DIR", str(tmp_path / "missing"))
    ev = cityscapes_eval.import_cityscapes_evaluator()
    assert callable(ev.evaluateImgLists)
    assert os.environ["CITYSCAPES_EXPORT_DIR"] == str(tmp_path / "missing")


# ---------------------------------------------------------------------------------
# Parity with the official Cityscapes evaluator
# ---------------------------------------------------------------------------------
# Eval ids except train (31: never predicted either, so NaN on both sides) and
# motorcycle (32: only predicted, so IoU 0), plus void/ignored ids.
GT_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 33,
          0, 1, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30]
HAS_INSTANCES = {24, 25, 26, 27, 28, 29, 30, 31, 32, 33}


def make_ground_truth(rng, h, w, block=8):
    """Blocky labelIds and matching instanceIds (id*1000+k for instance classes)."""
    ids = rng.choice(GT_IDS, size=(h // block, w // block))
    label = np.kron(ids, np.ones((block, block), np.int64)).astype(np.uint8)
    inst = label.astype(np.int32)
    for r, c in np.ndindex(ids.shape):
        if ids[r, c] in HAS_INSTANCES:
            inst[r * block:(r + 1) * block, c * block:(c + 1) * block] = \
                ids[r, c] * 1000 + r * ids.shape[1] + c
    return label, inst.astype(np.uint16)


def perturb(rng, classes):
    """A plausible prediction: the labels, with void filled in and errors added."""
    pred = classes.copy()
    void = pred == IGNORE
    pred[void] = rng.integers(0, 16, void.sum())
    noise = rng.random(pred.shape) < 0.2
    not_train = [c for c in range(19) if c != 16]            # 17 = motorcycle is in
    pred[noise] = rng.choice(not_train, noise.sum())
    pred[:, :5] = pred[:, 5:10]                              # a smeared stripe
    return pred.astype(np.uint8)


def test_parity_with_official_cityscapes_evaluator(tmp_path, fake_datasets, monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    scheme = get_scheme("cityscapes19")
    lut = scheme.lut("cityscapes")
    rng = np.random.default_rng(1)
    gt_dir = tmp_path / "gtFine" / "val"
    samples = []
    for i, (city, (h, w)) in enumerate([("aachen", (64, 128)), ("aachen", (64, 128)),
                                         ("bremen", (48, 96))]):
        label, inst = make_ground_truth(rng, h, w)
        stem = f"{city}_{i:06d}_000019"
        (gt_dir / city).mkdir(parents=True, exist_ok=True)
        Image.fromarray(label).save(gt_dir / city / f"{stem}_gtFine_labelIds.png")
        Image.fromarray(inst).save(gt_dir / city / f"{stem}_gtFine_instanceIds.png")
        classes = lut[label]
        samples.append(Sample(f"leftImg8bit/val/{city}/{stem}_leftImg8bit.png", None,
                              {"image": perturb(rng, classes), "label": classes}, "cityscapes"))

    ours = metrics.evaluate(read_channel0, samples, scheme, progress=False)
    pred_dir = tmp_path / "pred"
    paths = cityscapes_eval.write_cityscapes_predictions(read_channel0, samples, scheme, str(pred_dir),
                                                  progress=False)
    assert [os.path.basename(p) for p in paths] == [
        "aachen_000000_000019_pred_labelIds.png", "aachen_000001_000019_pred_labelIds.png",
        "bremen_000002_000019_pred_labelIds.png"]
    assert np.asarray(Image.open(paths[2])).shape == (48, 96)

    official = cityscapes_eval.run_official_evaluator(str(tmp_path / "gtFine"), str(pred_dir))
    assert list(official["class_iou"]) == list(scheme.class_names)
    theirs = np.array([official["class_iou"][n] for n in scheme.class_names])
    np.testing.assert_array_equal(np.isnan(theirs), np.isnan(ours["iou"]))
    assert np.isnan(theirs).sum() == 1 and np.isnan(theirs[scheme.class_names.index("train")])
    assert theirs[scheme.class_names.index("motorcycle")] == 0
    np.testing.assert_allclose(theirs, ours["iou"], rtol=0, atol=1e-6, equal_nan=True)
    assert official["mean_iou"] == pytest.approx(ours["mean_iou"], abs=1e-6)
    assert official["pixel_accuracy"] == pytest.approx(ours["pixel_accuracy"], abs=1e-6)
    assert 0.3 < ours["mean_iou"] < 0.95                    # a real, imperfect score
    assert 0 < official["mean_iiou"] < 1                    # instance files were used
    assert os.listdir(tmp_path / "cwd") == []                 # nothing written to the cwd


def test_parity_on_the_real_cityscapes_frame(tmp_path, shared_data, fake_datasets):
    scheme = get_scheme("cityscapes19")
    gt_dir = shared_data / "cityscapes_sample" / "gtFine"
    (gt_file,) = sorted(gt_dir.rglob("*_gtFine_labelIds.png"))
    classes = scheme.lut("cityscapes")[np.asarray(Image.open(gt_file))]
    pred = perturb(np.random.default_rng(2), classes)
    sample = Sample(gt_file.name.replace("gtFine_labelIds", "leftImg8bit"), None,
                    {"image": pred, "label": classes}, "cityscapes")
    ours = metrics.evaluate(read_channel0, [sample], scheme, progress=False)
    cityscapes_eval.write_cityscapes_predictions(read_channel0, [sample], scheme, str(tmp_path / "p"),
                                          progress=False)
    official = cityscapes_eval.run_official_evaluator(str(gt_dir), str(tmp_path / "p"))
    theirs = np.array([official["class_iou"][n] for n in scheme.class_names])
    np.testing.assert_allclose(theirs, ours["iou"], rtol=0, atol=1e-6, equal_nan=True)
    assert np.isfinite(theirs[[0, 11, 13]]).all()           # road, person, car are present


def test_end_to_end_with_the_real_loader(tmp_path):
    """datasets.find_dataset + load_pair -> evaluate / write -> official evaluator."""
    scheme = get_scheme("cityscapes19")
    lut = scheme.lut("cityscapes")
    rng = np.random.default_rng(3)
    root = tmp_path / "cityscapes"
    counted = 0
    for split, n in (("val", 2), ("test", 1)):
        for i in range(n):
            label, inst = make_ground_truth(rng, 32, 64)
            stem = f"lindau_{i:06d}_000019"
            counted += np.count_nonzero(lut[label] != IGNORE) if split == "val" else 0
            for sub, name, array in (
                    ("gtFine", "gtFine_labelIds", label), ("gtFine", "gtFine_instanceIds", inst),
                    ("leftImg8bit", "leftImg8bit", np.stack([label] * 3, axis=2))):
                if split == "test" and sub == "gtFine":
                    continue
                (root / sub / split / "lindau").mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(root / sub / split / "lindau" / f"{stem}_{name}.png")
    splits = datasets.find_dataset(str(root)).splits

    def oracle(images):  # the image's red channel is the labelId: predict its class
        classes = lut[images[..., 0]]
        return np.where(classes == IGNORE, 0, classes)

    r = metrics.evaluate(oracle, splits["val"], scheme, progress=False)
    assert r["mean_iou"] == 1 and r["pixels"] == counted > 0
    cityscapes_eval.write_cityscapes_predictions(oracle, splits["val"], scheme, str(tmp_path / "p"),
                                          progress=False)
    official = cityscapes_eval.run_official_evaluator(str(root / "gtFine" / "val"), str(tmp_path / "p"))
    assert official["mean_iou"] == 1 and official["mean_iiou"] == 1
    with pytest.raises(UserError, match="no label"):
        metrics.evaluate(oracle, splits["test"], scheme, progress=False)
    paths = cityscapes_eval.write_cityscapes_predictions(oracle, splits["test"], scheme,
                                                  str(tmp_path / "t"), progress=False)
    assert [os.path.basename(p) for p in paths] == ["lindau_000000_000019_pred_labelIds.png"]


def test_official_evaluator_missing_prediction_is_a_user_error(tmp_path):
    gt = tmp_path / "gtFine" / "val" / "ulm"
    gt.mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(gt / "ulm_000000_000019_gtFine_labelIds.png")
    (tmp_path / "pred").mkdir()
    with pytest.raises(UserError, match="Found no prediction"):
        cityscapes_eval.run_official_evaluator(str(tmp_path / "gtFine"), str(tmp_path / "pred"))


def test_write_predictions_refuses_a_non_empty_folder(tmp_path, fake_datasets):
    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / "mine.txt").write_text("keep me")
    samples = [make_sample(stripes(4, 6), stripes(4, 6))]
    with pytest.raises(UserError, match="not empty"):
        cityscapes_eval.write_cityscapes_predictions(read_channel0, samples, get_scheme("road4"),
                                              str(tmp_path / "pred"), progress=False)
    assert (tmp_path / "pred" / "mine.txt").read_text() == "keep me"
