"""What test modules share: colours, a fake model, a video reader (test_overlays, test_video); a
model's class maps (test_litert, test_openvino)."""
import imageio_ffmpeg
import numpy as np

from roadseg.schemes import get_scheme

COLORS = get_scheme("road4").colors
ROAD, VEHICLE, PED, LIGHT = (128, 64, 128), (0, 0, 142), (220, 20, 60), (250, 170, 30)
RED, GREEN = (220, 40, 40), (40, 200, 40)  # make_test_video's left / right halves


def red_is_road(images):
    """Fake model: road where the red channel is bright, vehicle where blue is, else 0."""
    maps = np.zeros(images.shape[:3], np.uint8)
    maps[images[..., 0] > 128] = 1
    maps[images[..., 2] > 128] = 2
    return maps


def read_video(path):
    """(metadata, uint8 frames (N, H, W, 3)) of a video file."""
    gen = imageio_ffmpeg.read_frames(str(path))
    meta = next(gen)
    width, height = meta["size"]
    frames = [np.frombuffer(raw, np.uint8).reshape(height, width, 3) for raw in gen]
    return meta, np.stack(frames)


def blend(image_rgb, color_rgb, alpha=0.5):
    return tuple(int(np.rint((1 - alpha) * i + alpha * c)) for i, c in zip(image_rgb, color_rgb))


def class_maps(model, images, **kwargs):
    """The class maps ``inference.load_predictor(model, **kwargs)`` gives for ``images``."""
    from roadseg import inference
    with inference.load_predictor(model, **kwargs) as predictor:
        return predictor.predict(images)


def val_mious(models, data_root):
    """``{name: mean IoU}`` of each model folder in ``models`` on ``data_root``'s val split."""
    from roadseg import datasets, inference, metrics
    val = datasets.find_dataset(data_root).splits["val"]
    scores = {}
    for name, model in models.items():
        with inference.load_predictor(model) as predictor:
            scores[name] = metrics.evaluate(predictor.predict, val, predictor.scheme,
                                            progress=False)["mean_iou"]
    return scores
