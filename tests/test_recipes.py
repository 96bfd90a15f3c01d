"""Recipes (cxrlab/recipes.py): the settings `cxrlab train --recipe NAME` lays beneath the config file and the
options, the same that bench/accuracy.py benchmarks; the recommended one validates only what it ships."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from cxrlab.cli import build_parser, main
from cxrlab.commands.train import config_from_args
from cxrlab.config import TrainConfig
from cxrlab.errors import CxrlabError
from cxrlab.recipes import RECIPES, format_recipes, recipe_settings, with_recipe

BENCH = Path(__file__).resolve().parents[1] / "bench" / "accuracy.py"


def config(name: str) -> TrainConfig:
    """The recipe as bench/accuracy.py builds it (it always passes a time budget), validated."""
    return TrainConfig.from_dict({"data": "d", "time_budget_min": 30.0, **RECIPES[name]}).validate()


def from_cli(*argv) -> TrainConfig:
    """The config `cxrlab train ARGV` would train."""
    return config_from_args(build_parser().parse_args(["train", "--data", "d", *map(str, argv)]))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_is_a_valid_config(name):
    assert config(name).model == RECIPES[name]["model"]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_accuracy", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_recipe_trains_exactly_what_the_benchmark_trains(tmp_path):
    """`cxrlab train --recipe recommended` with the benchmark's budget, seed and patient pattern is the benchmark's
    run, setting for setting (a seed and its settings give the same model on one CPU type: docs/BENCHMARKS.md)."""
    bench = _bench()
    assert bench.RECIPES is RECIPES
    recipe = {**recipe_settings("recommended"), "recipe": "recommended"}  # as bench/accuracy.py main() builds it
    ref = bench.member_configs(tmp_path, recipe, 5, tmp_path / "run", budget_min=30.0)[0]
    cfg = config_from_args(build_parser().parse_args(
        ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--recipe", "recommended", "--seed", "5",
         "--time-budget-min", str(ref.time_budget_min), "--group-regex", bench.PATIENT_REGEX]))
    assert ref.time_budget_min == 26.0  # 30 minutes less the run's fixed costs
    assert cfg.carve_seed == ref.carve_seed == 5
    assert {**cfg.to_dict(), "split_seed": 5} == ref.to_dict()


def test_recommended_recipe_validates_only_the_epoch_it_ships():
    cfg = config("recommended")
    assert (cfg.select, cfg.early_stop, cfg.scheduler) == ("last", 0, "cosine")  # nothing chosen by validation
    assert cfg.val_every == 0
    # the reference designs keep choosing their best epoch, so they validate every epoch
    for name in ("chestxray_cnn", "custom_cnn"):
        assert config(name).val_every == 1


def test_cli_recipe_gives_every_setting_of_the_recipe():
    cfg = from_cli("--recipe", "recommended", "--time-budget-min", 30)
    assert cfg.recipe == "recommended"
    for key, value in RECIPES["recommended"].items():
        assert getattr(cfg, key) == value, key
    # and what the recipe leaves alone keeps TrainConfig's default
    assert cfg.mixup == TrainConfig.mixup and cfg.val_fraction == TrainConfig.val_fraction


def test_options_and_config_file_override_the_recipe(tmp_path):
    assert from_cli("--recipe", "recommended", "--time-budget-min", 30, "--lr", 5e-4, "--no-equalize").lr == 5e-4
    assert not from_cli("--recipe", "recommended", "--time-budget-min", 30, "--no-equalize").equalize
    f = tmp_path / "c.yaml"
    f.write_text("recipe: recommended\ntime_budget_min: 20\nlr: 0.0002\nmodel: resnet18\n")
    cfg = from_cli("--config", f)  # the recipe named in the file
    assert (cfg.recipe, cfg.lr, cfg.model, cfg.optimizer, cfg.auto_freeze) == ("recommended", 2e-4, "resnet18", "adamw", True)
    assert from_cli("--config", f, "--lr", 1e-3).lr == 1e-3  # options over the file
    assert from_cli("--config", f, "--recipe", "custom_cnn").model == "resnet18"  # the file over the recipe
    assert from_cli("--config", f, "--recipe", "custom_cnn").monitor == "val_auc"


def test_without_a_time_budget_the_recipe_trains_every_layer():
    cfg = from_cli("--recipe", "recommended")
    assert not cfg.auto_freeze and cfg.time_budget_min is None and cfg.epochs == 30
    with pytest.raises(CxrlabError, match="--auto-freeze decides from the time budget"):
        from_cli("--recipe", "recommended", "--auto-freeze")  # asked for explicitly: refused, not dropped


def test_unknown_recipe_lists_the_valid_ones(capsys):
    with pytest.raises(CxrlabError, match="unknown recipe 'fast'. Valid recipes: chestxray_cnn, custom_cnn, recommended"):
        recipe_settings("fast")
    with pytest.raises(CxrlabError, match="unknown recipe 'fast'"):
        TrainConfig(data="d", recipe="fast").validate()
    assert main(["train", "--data", "d", "--recipe", "fast", "--out", "o"]) == 2
    assert "Valid recipes: chestxray_cnn, custom_cnn, recommended" in capsys.readouterr().err


def test_with_recipe_leaves_its_input_and_the_recipes_alone():
    d = {"data": "d", "recipe": "recommended", "lr": 0.5}
    before = {k: dict(v) for k, v in RECIPES.items()}
    out = with_recipe(d)
    assert out["lr"] == 0.5 and out["model"] == "efficientnet_lite0" and "auto_freeze" not in out
    assert d == {"data": "d", "recipe": "recommended", "lr": 0.5} and RECIPES == before
    assert with_recipe({"data": "d"}) == {"data": "d"}


def test_recipe_without_budget_says_what_trains(caplog):
    """Without --time-budget-min the log says every layer trains, unless --freeze-stages fixes some."""
    with caplog.at_level("INFO", logger="cxrlab.recipes"):
        with_recipe({"data": "d", "recipe": "recommended", "epochs": 6})
        with_recipe({"data": "d", "recipe": "recommended", "epochs": 6, "freeze_stages": 3})
    first, second = [r.getMessage() for r in caplog.records]
    assert first.endswith("every layer trains for 6 epochs")
    assert second.endswith("stages fixed by --freeze-stages 3 for 6 epochs")


def test_list_recipes_prints_usable_options(capsys):
    assert main(["train", "--list-recipes"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == format_recipes()
    for name in RECIPES:
        assert f"\n{name}: " in "\n" + out
    flat = " ".join(out.split())
    assert "--pretrained --head-init probe" in flat and "--auto-freeze" in flat and "--lr 0.001" in flat
    assert "True" not in out and "False" not in out  # booleans as the flags that set them


def test_recipe_trains_end_to_end_and_is_recorded(synth_dir, tmp_path):
    """The recommended recipe on phantoms at 64 px: pretrained Lite0, probe head, auto-freeze from the budget."""
    out = tmp_path / "run"
    rc = main(["train", "--data", str(synth_dir), "--recipe", "recommended", "--img-size", "64", "--epochs", "2",
               "--time-budget-min", "5", "--out", str(out), "--no-report", "--no-cache", "--workers", "0", "--quiet"])
    assert rc == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["recipe"] == "recommended" and saved["model"] == "efficientnet_lite0" and saved["head_init"] == "probe"
    assert saved["img_size"] == 64 and saved["epochs"] == 2 and saved["auto_freeze"] is True
    log = (out / "train.log").read_text()
    assert "loaded 245/245 body tensors" in log and "--auto-freeze" in log and "recipe recommended" in log
    assert (out / "best.pt").is_file() and (out / "metrics.json").is_file()


def test_compare_trains_every_model_with_the_recipe(tmp_path):
    from cxrlab.compare import _train_config

    # the recipe's settings, the model of the row; no pretrained weights for the reference CNN
    cfg = _train_config("custom_cnn", "d", tmp_path, 30.0, None, None, None, {"recipe": "recommended"})
    assert (cfg.model, cfg.pretrained, cfg.optimizer, cfg.head_init, cfg.epochs, cfg.batch_size, cfg.auto_freeze) == \
        ("custom_cnn", False, "adamw", "probe", 30, 32, True)
    # compare's own options and the config keys win over the recipe
    cfg = _train_config("efficientnet_lite0", "d", tmp_path, None, 2, 64, 16, {"recipe": "recommended", "lr": 5e-4})
    assert (cfg.epochs, cfg.img_size, cfg.batch_size, cfg.lr, cfg.pretrained, cfg.auto_freeze) == (2, 64, 16, 5e-4, True, False)
    # without a recipe compare's defaults stay as they were
    cfg = _train_config("custom_cnn", "d", tmp_path, None, None, None, None, {})
    assert (cfg.epochs, cfg.batch_size, cfg.img_size, cfg.optimizer, cfg.recipe) == (10, 32, None, "adam", None)


def test_compare_refuses_an_unknown_recipe_before_training(synth_dir, tmp_path, capsys):
    assert main(["compare", "--data", str(synth_dir), "--recipe", "fast", "--out", str(tmp_path / "c")]) == 2
    assert "Valid recipes" in capsys.readouterr().err and not (tmp_path / "c").exists()
