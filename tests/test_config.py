"""TrainConfig: defaults once, every option checked up front, CLI flags and recipe files."""
import dataclasses
import json
from pathlib import Path

import pytest

from roadseg import config, trainer
from roadseg.cli import build_parser
from roadseg.cli import main as cli_main
from roadseg.config import TrainConfig
from roadseg.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_and_from_dict():
    cfg = TrainConfig.from_dict({"epochs": 3, "image_shape": (64, 128)})
    assert (cfg.epochs, cfg.batch_size, cfg.image_shape, cfg.scheme) == (3, 4, [64, 128], "road4")
    assert cfg.validate() is cfg
    with pytest.raises(UserError, match="somewhere: unknown option.*epoch_count"):
        TrainConfig.from_dict({"epoch_count": 3}, "somewhere")


@pytest.mark.parametrize("flags, says", [
    (["--epochs", "0"], "option epochs (--epochs) = 0 is not valid: it must be a whole number >= 1"),
    (["--epochs", "-3"], "option epochs (--epochs) = -3"),
    (["--batch-size", "0"], "option batch_size (--batch-size) = 0"),
    (["--keep-prob", "1.5"], "must be a number in (0, 1]"),
    (["--keep-prob", "0"], "option keep_prob (--keep-prob) = 0.0"),
    (["--lr", "nan"], "option lr (--lr) = NaN is not valid: it must be a finite number > 0"),
    (["--lr", "-1"], "option lr (--lr) = -1.0"),
    (["--dice-weight", "inf"], "option dice_weight (--dice-weight) = Infinity"),
    (["--image-shape", "-64", "128"], "image shape -64x128: both sides must be at least 32"),
    (["--width", "0"], "option width (--width) = 0.0"),
    (["--fc-width", "0"], "option fc_width (--fc-width) = 0 is not valid: it must be a whole number >= 1"),
])
def test_bad_options_are_refused_before_anything_runs(flags, says, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = cli_main(["train", "--data", "no/such/dir", *flags, "--run", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and says in err[0], err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


def test_get_vgg_width_inf_is_one_line(tmp_path, capsys):
    code = cli_main(["get-vgg", "--source", "random", "--width", "inf", "--out", str(tmp_path / "v")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "width must be a positive number" in err[0]


def test_every_option_has_a_flag_and_the_flags_fill_the_config():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    dests = {a.dest for a in train._actions}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= dests
    args = parser.parse_args(["train", "--data", "d", "--no-augment", "--no-skip-scaling",
                              "--l2", "0.5", "--image-shape", "64", "96", "--class-weights"])
    assert config.given_options(args) == dict(data="d", augment=False, skip_scales=[],
                                              l2_scale=0.5, image_shape=[64, 96], class_weights=True)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.json")), ids=lambda p: p.name)
def test_recipes_in_configs_are_valid(path):
    values = TrainConfig.read_recipe(path)
    assert values and TrainConfig.from_dict(values).validate()
    assert "_recipe" in json.loads(path.read_text())     # each says what it is for


def test_camvid_road4_recipe_is_the_measured_one():
    cfg = TrainConfig.from_dict(TrainConfig.read_recipe(ROOT / "configs" / "camvid_road4.json"))
    assert (cfg.scheme, cfg.vgg_source, cfg.width) == ("road4", "random", 0.25)
    assert cfg.image_shape == [192, 256]
    assert (cfg.epochs, cfg.batch_size, cfg.lr) == (50, 8, 1e-3)
    assert (cfg.lr_schedule, cfg.warmup_epochs) == ("poly", 1)
    assert (cfg.loss, cfg.dice_weight, cfg.augment, cfg.skip_scales) == ("focal", 3, "mild", [])


def test_bad_recipe_files_are_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    for path, says in [(tmp_path / "missing.json", "does not exist"), (bad, "is not valid JSON")]:
        with pytest.raises(UserError, match=says):
            TrainConfig.read_recipe(path)
    bad.write_text('{"epochs": 2, "learning_rate": 0.1}')
    with pytest.raises(UserError, match=r"bad.json: unknown option\(s\) learning_rate"):
        TrainConfig.read_recipe(bad)


def test_recipe_then_flags_then_config_json(demo_root, vgg_dir, tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"image_shape": [64, 128], "epochs": 1, "batch_size": 4,
                                  "lr": 0.002, "_note": "comment keys are ignored"}))
    result = trainer.train(demo_root, vgg_dir, runs_dir=str(tmp_path / "runs"), run="r",
                           recipe=str(recipe), lr=0.003, log=lambda *a: None)
    saved = json.loads((Path(result["run_dir"]) / "config.json").read_text())
    assert (saved["image_shape"], saved["epochs"], saved["batch_size"]) == ([64, 128], 1, 4)
    assert saved["lr"] == 0.003                                     # the flag wins
    assert saved["vgg"] == vgg_dir and saved["vgg_info"]["width"] == 1 / 16
    assert saved["precision_used"] == "fp32"
    assert TrainConfig.from_dict({k: v for k, v in saved.items() if k not in trainer.RUN_FACTS}).validate()


# config.json as the version before fc_width wrote it (every option of that version, the spec)
CONFIG_BEFORE_FC_WIDTH = {
    "data": None, "vgg": None, "vgg_source": "auto", "width": None, "scheme": "road4",
    "image_shape": [64, 128], "skip_scales": [], "keep_prob": 0.5, "l2_scale": 0.001, "loss": "ce",
    "focal_gamma": 2.0, "ohem_fraction": 0.25, "dice_weight": 0.0, "class_weights": False, "epochs": 2,
    "batch_size": 4, "lr": 0.0001, "lr_schedule": "constant", "warmup_epochs": 0.0, "augment": True,
    "seed": 0, "devices": 1, "workers": 1, "precision": "fp32", "val_split": None, "eval_every": 1,
    "max_eval_images": None, "checkpoint_every": 0, "keep_checkpoints": 3, "cache": "auto",
    "skip_bad": False}


def test_a_run_from_before_fc_width_still_loads_and_resumes(vgg_dir, tmp_path):
    from roadseg import model, vgg
    run = tmp_path / "runs" / "old"
    run.mkdir(parents=True)
    info = vgg.read_vgg_info(vgg_dir)
    assert "fc_width" not in info                     # a default-fc folder: as before
    saved = dict(CONFIG_BEFORE_FC_WIDTH, data=str(tmp_path), vgg=vgg_dir, vgg_info=info)
    (run / "config.json").write_text(json.dumps(saved))
    cfg, run_dir, spec = trainer.resolve_config({}, runs_dir=str(tmp_path / "runs"), run="old",
                                                resume=True)
    assert run_dir == str(run) and cfg.fc_width is None and cfg.vgg == vgg_dir
    assert spec == model.ModelSpec.from_run(str(run)) and spec.vgg_info["channels"]["layer7_out"] == 256
    # the same run on a VGG16 with other fc6/fc7 is another model: refused, naming the fc width
    other, _ = vgg.obtain_vgg(str(tmp_path / "data"), source="random", width=1 / 16, fc_width=40)
    with pytest.raises(UserError, match=r"cannot resume .*source random/width 0.0625/seed 0, now "
                                        r"vgg_info=source random/width 0.0625/fc_width 40/seed 0"):
        trainer.resolve_config({"vgg": other}, runs_dir=str(tmp_path / "runs"), run="old", resume=True)
