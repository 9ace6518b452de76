"""Recipes from entry points in the ``qvl_plugin.recipes`` group — ours and everyone else's, same path.

An entry point may name a Recipe, a list/tuple of Recipes, or a zero-argument callable returning either.
Plugins load lazily (first lookup), loudly (a broken plugin is an error naming its distribution, never a
silent skip), and only those allowed by ``QVL_PLUGINS`` (comma-separated distribution or entry-point
names; unset or empty = all installed).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from .schema import Recipe, RecipeError, close

__all__ = ["GROUP", "ENV_VAR", "RecipeInfo", "get_recipe", "list_recipes", "reset_registry"]

GROUP = "qvl_plugin.recipes"
ENV_VAR = "QVL_PLUGINS"


@dataclass(frozen=True)
class RecipeInfo:
    name: str
    family: str
    description: str
    distribution: str
    entry_point: str


_loaded: dict[str, tuple[Recipe, RecipeInfo]] | None = None
_loading = False


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _dist(ep: EntryPoint) -> str:
    return ep.dist.name if getattr(ep, "dist", None) is not None else "<unknown distribution>"


def _selected(eps: list[EntryPoint]) -> list[EntryPoint]:
    wanted = [w.strip() for w in os.environ.get(ENV_VAR, "").split(",") if w.strip()]
    if not wanted:
        return eps
    names = {ep.name for ep in eps} | {_norm(_dist(ep)) for ep in eps}
    unknown = [w for w in wanted if w not in names and _norm(w) not in names]
    if unknown:
        raise RecipeError(f"{ENV_VAR} names no installed recipe plugin: {', '.join(unknown)}{close(unknown[0], names)}; installed: {', '.join(sorted(names)) or 'none'}")
    return [ep for ep in eps if ep.name in wanted or _norm(_dist(ep)) in {_norm(w) for w in wanted}]


def _recipes_of(ep: EntryPoint) -> list[Recipe]:
    where = f"plugin {ep.name!r} ({ep.value}) from distribution {_dist(ep)!r}"
    try:
        obj = ep.load()
        if callable(obj) and not isinstance(obj, Recipe):
            obj = obj()
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from e
    except Exception as e:
        raise RecipeError(f"{where} failed to load: {type(e).__name__}: {e}") from e
    items = [obj] if isinstance(obj, Recipe) else obj
    if not isinstance(items, (list, tuple)) or not all(isinstance(r, Recipe) for r in items):
        raise RecipeError(f"{where} must provide a Recipe, a list of Recipes or a callable returning them, got {type(obj).__name__}")
    return list(items)


def _load() -> dict[str, tuple[Recipe, RecipeInfo]]:
    global _loaded, _loading
    if _loading:
        raise RecipeError("a recipe plugin looked up recipes while plugins were loading; build Recipe objects directly "
                          "(e.g. import qvl_plugin.recipes.builtin.RECIPES) instead of calling get_recipe at import time")
    if _loaded is None:
        found: dict[str, tuple[Recipe, RecipeInfo]] = {}
        _loading = True
        try:
            eps = _selected(list(entry_points(group=GROUP)))
            loaded = [(ep, recipe) for ep in eps for recipe in _recipes_of(ep)]
        finally:
            _loading = False
        for ep, recipe in loaded:
            info = RecipeInfo(recipe.name, recipe.family, recipe.description, _dist(ep), ep.name)
            if recipe.name in found:
                other = found[recipe.name][1]
                raise RecipeError(
                    f"recipe {recipe.name!r} is defined twice: by distribution {other.distribution!r} "
                    f"(entry point {other.entry_point!r}) and {info.distribution!r} (entry point {info.entry_point!r})"
                )
            found[recipe.name] = (recipe, info)
        _loaded = found
    return _loaded


def list_recipes() -> list[RecipeInfo]:
    """Every recipe of the allowed plugins, sorted by name."""
    return [info for _, (_, info) in sorted(_load().items())]


def get_recipe(name: str | Recipe) -> Recipe:
    """A registered recipe by name (a Recipe passes through)."""
    if isinstance(name, Recipe):
        return name
    table = _load()
    if name not in table:
        hint = close(str(name), table) or (" (no recipes installed: is qvl-plugin installed, e.g. `pip install -e .`?)" if not table else "")
        raise RecipeError(f"no recipe named {name!r}{hint}; `qvl-ckpt recipes` lists them")
    return table[name][0]


def reset_registry() -> None:
    """Forget loaded plugins (tests, or after changing QVL_PLUGINS)."""
    global _loaded
    _loaded = None
