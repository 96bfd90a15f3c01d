"""The recipes of `bench/accuracy.py` are valid training configurations, and the recommended one validates only
what it ships: with `select="last"` and no early stopping nothing in between is chosen."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from cxrlab.config import TrainConfig

BENCH = Path(__file__).resolve().parents[1] / "bench" / "accuracy.py"


def _load_recipes() -> dict:
    spec = importlib.util.spec_from_file_location("bench_accuracy", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RECIPES


RECIPES = _load_recipes()


def config(name: str) -> TrainConfig:
    """The recipe as bench/accuracy.py builds it (it always passes a time budget), validated."""
    return TrainConfig.from_dict({"data": "d", "time_budget_min": 30.0, **RECIPES[name]}).validate()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_is_a_valid_config(name):
    assert config(name).model == RECIPES[name]["model"]


def test_recommended_recipe_validates_only_the_epoch_it_ships():
    cfg = config("recommended")
    assert (cfg.select, cfg.early_stop, cfg.scheduler) == ("last", 0, "cosine")  # nothing chosen by validation
    assert cfg.val_every == 0
    # the reference designs keep choosing their best epoch, so they validate every epoch
    for name in ("chestxray_cnn", "custom_cnn"):
        assert config(name).val_every == 1
