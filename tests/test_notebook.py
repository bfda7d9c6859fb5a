"""The notebook, executed headless with papermill on tiny parameters, and its committed form.

The run uses a temporary data and runs folder (the kernel starts in the repository, where the
notebook imports the project's modules from), 8 demo scenes at 64x128, a width-1/16
random VGG16 and one epoch: every cell must run, and a new runs/ folder must get the
overlays, class maps, scores and the overlaid video.
"""
import json
from pathlib import Path

import nbformat
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "Semantic_segmentation_cityscape.ipynb"


def labelled_pixels(root, split="val"):
    """Pixels of a split's labels that count (not void) in the road4 scheme."""
    from roadseg import datasets
    from roadseg.schemes import IGNORE, get_scheme
    return sum(int((datasets.load_label(s, get_scheme("road4")) != IGNORE).sum())
               for s in datasets.find_dataset(root).splits[split])


def test_committed_notebook_is_stripped_and_imports_the_modules():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "data_dir = None" in tagged[0].source
    source = "\n".join(c.source for c in code)
    for call in ("fcn.load_vgg(", "fcn.layers(", "fcn.optimize(", "fcn.train_nn(",
                 "helper.gen_batch_function(", "metrics.evaluate(", "helper.session_predict_fn(",
                 "helper.save_inference_samples(", "video.process_video("):
        assert call in source
    assert "def layers" not in source and "conv2d_transpose(" not in source   # no copies of the code


def test_notebook_runs_headless_and_writes_a_run(tmp_path):
    papermill = pytest.importorskip("papermill")
    out = tmp_path / "executed.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOK), str(out), cwd=str(ROOT), progress_bar=False, kernel_name="python3",
        parameters=dict(demo_dir=str(tmp_path / "data" / "demo"), demo_scenes=8,
                        image_shape=[64, 128], epochs=1, vgg_root=str(tmp_path / "data"),
                        vgg_source="random", vgg_width=0.0625, runs_dir=str(tmp_path / "runs"),
                        video_frames=6))
    nb = nbformat.read(out, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 6      # samples, loss curve, IoU bars, image|truth|prediction, overlays, video
    # no TensorFlow start-up or log lines in cells, and progress bars as widgets, not \r lines
    streams = "".join(o.text for c in code for o in c.outputs if o.output_type == "stream")
    for noise in ("oneDNN", "cuda", "absl", "tensorflow:", "\r"):
        assert noise not in streams, noise
    widgets = [o for c in code for o in c.outputs
               if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(widgets) >= 3     # scene drawing, training, evaluation, ... progress bars

    (run,) = (tmp_path / "runs").iterdir()
    maps = sorted(run.glob("*_classes.png"))
    assert len(maps) == 2                                 # the 2 validation scenes
    for path in maps:
        classes = np.asarray(Image.open(path))
        assert classes.shape == (256, 512) and classes.max() < 5
        overlay = np.asarray(Image.open(str(path).replace("_classes", "")))
        assert overlay.shape == (256, 512, 3)
    scores = json.loads((run / "evaluation-val.json").read_text())
    assert np.array(scores["confusion_matrix"]).sum() == labelled_pixels(tmp_path / "data" / "demo")
    loss = np.asarray(Image.open(run / "loss.png").convert("L"))
    edges = (loss[:4], loss[-4:], loss[:, :4], loss[:, -4:])
    assert min(edge.min() for edge in edges) > 200   # white margins: no label cut off at an edge
    from roadseg import video
    frames = video.read_frames(str(run / "clip_overlay.mp4"), range(10))
    assert len(frames) == 6 and frames[0].shape == (256, 512, 3)
