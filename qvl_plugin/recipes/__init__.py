"""Recipes: validated LoRA + modules_to_save setups per Qwen-VL family, from entry-point plugins.

    from qvl_plugin.recipes import get_recipe, apply_recipe
    peft_model = apply_recipe(model, get_recipe("qwen2-vl/lora-embed-head").with_overrides(r=8))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .registry import ENV_VAR, GROUP, RecipeInfo, get_recipe, list_recipes, reset_registry
from .schema import FAMILIES, FREEZABLE, SAVE_FORMATS, TIED_POLICIES, Recipe, RecipeError, load_recipe_file

__all__ = [
    "Recipe",
    "RecipeError",
    "RecipeInfo",
    "RecipePlan",
    "PatternMatch",
    "ModelIndex",
    "TrainableRow",
    "get_recipe",
    "list_recipes",
    "reset_registry",
    "load_recipe_file",
    "apply_recipe",
    "plan_recipe",
    "trainable_report",
    "check_recipe",
    "CheckReport",
    "FAMILIES",
    "FREEZABLE",
    "SAVE_FORMATS",
    "TIED_POLICIES",
    "GROUP",
    "ENV_VAR",
]

# torch/peft load only when a model is involved: `from qvl_plugin.recipes import Recipe` stays light for plugins.
_APPLY = ("ModelIndex", "PatternMatch", "RecipePlan", "TrainableRow", "apply_recipe", "plan_recipe", "trainable_report")

_CHECK = ("check_recipe", "CheckReport")

if TYPE_CHECKING:  # pragma: no cover
    from .apply import ModelIndex, PatternMatch, RecipePlan, TrainableRow, apply_recipe, plan_recipe, trainable_report
    from .check import CheckReport, check_recipe


def __getattr__(name: str):
    if name in _APPLY:
        from . import apply

        return getattr(apply, name)
    if name in _CHECK:
        from . import check

        return getattr(check, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
