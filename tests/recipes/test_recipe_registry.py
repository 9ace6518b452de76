"""Entry-point plugins: a throw-away distribution on the path is listed, usable, filterable; broken ones are loud."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qvl_plugin.recipes import RecipeError, get_recipe, list_recipes, reset_registry

ACME = '''
from qvl_plugin.recipes import Recipe

ATTN = r"model\\.language_model\\.layers\\.\\d+\\.self_attn\\.(q|v)_proj"

def recipes():
    return [Recipe(name="acme/qwen2-vl-attn", family="qwen2-vl", description="Acme: q/v LoRA r=4", r=4, lora_alpha=8,
                   targets=[ATTN])]

SINGLE = Recipe(name="acme/qwen3-vl-attn", family="qwen3-vl", description="Acme: q/v LoRA on Qwen3-VL", targets=[ATTN])
'''


def make_dist(site: Path, dist: str, module: str, source: str, entry_points: dict[str, str]) -> None:
    """A minimal installed distribution: <dist>.dist-info (METADATA + entry_points.txt) and one module."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    eps = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[qvl_plugin.recipes]\n{eps}")


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    make_dist(site, "acme-recipes", "acme_recipes", ACME, {"acme": "acme_recipes:recipes", "acme-single": "acme_recipes:SINGLE"})
    monkeypatch.syspath_prepend(str(site))
    reset_registry()
    return site


def add_broken(site: Path) -> None:
    make_dist(site, "broken-recipes", "broken_recipes", "import not_a_real_module_qvl\n", {"broken": "broken_recipes:RECIPES"})
    reset_registry()


def test_builtins_come_from_our_entry_point():
    infos = {i.name: i for i in list_recipes()}
    for family in ("qwen-vl", "qwen2-vl", "qwen2.5-vl", "qwen3-vl"):
        for kind in ("lora", "lora-embed-head", "lora-new-tokens"):
            info = infos[f"{family}/{kind}"]
            assert (info.family, info.distribution, info.entry_point) == (family, "qvl-plugin", "builtin")
            assert info.description and "\n" not in info.description


def test_plugin_listed_and_usable(site, tiny):
    infos = {i.name: i for i in list_recipes()}
    assert infos["acme/qwen2-vl-attn"].distribution == "acme-recipes"
    assert infos["acme/qwen3-vl-attn"].entry_point == "acme-single"  # an entry point naming one Recipe
    assert "qwen2-vl/lora" in infos
    from qvl_plugin.recipes import apply_recipe

    peft_model = apply_recipe(tiny("qwen2-vl"), get_recipe("acme/qwen2-vl-attn"))
    names = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(names) == 2 * 2 * 2 and all(".self_attn.q_proj." in n or ".self_attn.v_proj." in n for n in names)


def test_unknown_name_suggests():
    with pytest.raises(RecipeError, match=r"no recipe named 'qwen2-vl/lora-embed' \(did you mean: qwen2-vl/lora-embed-head"):
        get_recipe("qwen2-vl/lora-embed")


def test_broken_plugin_is_an_error_naming_its_distribution(site):
    add_broken(site)
    with pytest.raises(RecipeError) as e:
        list_recipes()
    msg = str(e.value)
    assert "plugin 'broken' (broken_recipes:RECIPES) from distribution 'broken-recipes' failed to load" in msg
    assert "not_a_real_module_qvl" in msg


def test_plugin_with_wrong_type_or_invalid_recipe(site):
    make_dist(site, "odd-recipes", "odd_recipes", "VALUE = 42\n", {"odd": "odd_recipes:VALUE"})
    reset_registry()
    with pytest.raises(RecipeError, match="'odd-recipes' must provide a Recipe, a list of Recipes"):
        list_recipes()


def test_invalid_recipe_in_plugin(tmp_path, monkeypatch):
    site = tmp_path / "s2"
    make_dist(site, "typo-recipes", "typo_recipes",
              "from qvl_plugin.recipes import Recipe\nR = [Recipe(name='t/x', family='qwen2-vl', train_modules=['embd'])]\n",
              {"typo": "typo_recipes:R"})
    monkeypatch.syspath_prepend(str(site))
    reset_registry()
    with pytest.raises(RecipeError, match=r"distribution 'typo-recipes': recipe t/x: train_modules: unknown module 'embd'"):
        list_recipes()


def test_duplicate_names_name_both_distributions(tmp_path, monkeypatch):
    site = tmp_path / "s3"
    make_dist(site, "copycat-recipes", "copycat_recipes",
              "from qvl_plugin.recipes import Recipe\nR = Recipe(name='qwen2-vl/lora', family='qwen2-vl')\n", {"copy": "copycat_recipes:R"})
    monkeypatch.syspath_prepend(str(site))
    reset_registry()
    with pytest.raises(RecipeError) as e:
        list_recipes()
    assert "'qwen2-vl/lora' is defined twice" in str(e.value)
    assert "'qvl-plugin'" in str(e.value) and "'copycat-recipes'" in str(e.value)


def test_qvl_plugins_filters(site, monkeypatch):
    add_broken(site)  # not selected -> never imported
    monkeypatch.setenv("QVL_PLUGINS", "acme_recipes")  # a distribution name (normalised)
    assert {i.distribution for i in list_recipes()} == {"acme-recipes"}
    reset_registry()
    monkeypatch.setenv("QVL_PLUGINS", "builtin, acme-single")  # entry-point names
    names = {i.name for i in list_recipes()}
    assert "qwen2-vl/lora" in names and "acme/qwen3-vl-attn" in names and "acme/qwen2-vl-attn" not in names
    reset_registry()
    monkeypatch.setenv("QVL_PLUGINS", "acme-recipe")
    with pytest.raises(RecipeError, match=r"QVL_PLUGINS names no installed recipe plugin: acme-recipe \(did you mean: acme-recipes"):
        list_recipes()


def test_plugin_looking_up_recipes_at_load_time(tmp_path, monkeypatch):
    site = tmp_path / "s4"
    make_dist(site, "lazy-recipes", "lazy_recipes",
              "from qvl_plugin.recipes import get_recipe\ndef R():\n    return [get_recipe('qwen2-vl/lora').with_overrides(name='lazy/x')]\n",
              {"lazy": "lazy_recipes:R"})
    monkeypatch.syspath_prepend(str(site))
    reset_registry()
    with pytest.raises(RecipeError, match="looked up recipes while plugins were loading"):
        list_recipes()


def _cli(site: Path, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("QVL_PLUGINS", "QVL_DEBUG")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(env_extra or {})
    code = "from qvl_plugin.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120)


def test_cli_subprocess_lists_plugin_and_reports_broken(site):
    """The real console path: a separate interpreter with the throw-away distribution on PYTHONPATH."""
    add_broken(site)
    ok = _cli(site, "recipes", "--json", env_extra={"QVL_PLUGINS": "acme-recipes"})
    assert ok.returncode == 0, ok.stderr
    rows = json.loads(ok.stdout)["recipes"]
    assert {(r["name"], r["distribution"]) for r in rows} == {("acme/qwen2-vl-attn", "acme-recipes"), ("acme/qwen3-vl-attn", "acme-recipes")}
    bad = _cli(site, "recipes", "--json")
    assert bad.returncode == 1 and bad.stdout == ""
    err = bad.stderr.strip()
    assert err.startswith("error: plugin 'broken'") and "distribution 'broken-recipes'" in err and "Traceback" not in err
