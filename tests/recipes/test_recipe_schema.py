"""Recipe validation: every bad field is a RecipeError with a message that says what to fix."""

from __future__ import annotations

import pytest

from qvl_plugin.errors import QvlError
from qvl_plugin.recipes import Recipe, RecipeError, get_recipe, load_recipe_file

LM = r"model\.language_model\.layers\.\d+\."


def make(**kw) -> Recipe:
    return Recipe(**{"name": "t/x", "family": "qwen2-vl", **kw})


def test_recipe_error_is_a_qvl_error():
    assert issubclass(RecipeError, QvlError)


def test_defaults_fill_family_targets():
    r = make()
    assert r.targets == (LM + r"self_attn\.(q|k|v|o)_proj", LM + r"mlp\.(gate|up|down)_proj")
    assert make(family="qwen-vl").targets[0].startswith(r"transformer\.h\.\d+\.")
    assert r.freeze == ("vision", "merger") and r.save == ("adapter",) and r.tied == "untie"


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(family="qwen2-v"), "unknown family 'qwen2-v' (did you mean: qwen2-vl"),
        (dict(name=""), "name must be"),
        (dict(r=0), "r must be an integer >= 1"),
        (dict(r=8.0), "r must be an integer"),
        (dict(r=True), "r must be an integer"),
        (dict(lora_alpha=0), "lora_alpha must be a number > 0"),
        (dict(lora_dropout=1.0), "lora_dropout must be in [0, 1)"),
        (dict(use_dora="yes"), "use_dora must be true or false"),
        (dict(description="two\nlines"), "one line"),
        (dict(targets=[r"model\.language_model\.layers\.(\d+"]), "invalid regex"),
        (dict(targets=[r".*\.mlp\.gate_proj"]), "suffix pattern"),
        (dict(targets=[r"(.*\.)?q_proj"]), "suffix pattern"),
        (dict(targets=[], vision_targets=[]), "at least one LoRA target"),
        (dict(targets="q_proj x", vision_targets=5), "vision_targets must be a list of strings"),
        (dict(train_modules=["embd"]), "unknown module 'embd' for qwen2-vl (did you mean: embed"),
        (dict(train_modules=["embed", "embed"]), "duplicates"),
        (dict(trainable_tokens=[1, -2]), "token ids must be >= 0"),
        (dict(trainable_tokens=[1, 1]), "duplicate token ids"),
        (dict(trainable_tokens=["a"]), "list of token ids"),
        (dict(trainable_tokens={"embed": []}), "empty list of token ids"),
        (dict(trainable_tokens=[1], train_modules=["lm_head"]), "conflicts with train_modules ['lm_head']"),
        (dict(trainable_tokens={"embed": [1]}, train_modules=["embed"]), "both in train_modules and trainable_tokens"),
        (dict(freeze=["visoin"]), "unknown component 'visoin' (did you mean: vision"),
        (dict(vision_targets=[r"model\.visual\.blocks\.\d+\.attn\.qkv"]), "vision tower is frozen"),
        (dict(freeze=["language"]), "language model is frozen"),
        (dict(train_modules=["merger"]), "train_modules has 'merger' but freeze has 'merger'"),
        (dict(tied="untied"), "tied must be one of untie, tie, error, got 'untied' (did you mean: untie"),
        (dict(save=["adapter", "gguf"]), "unknown format 'gguf'"),
        (dict(save=[]), "at least one"),
    ],
)
def test_invalid_fields(kw, needle):
    with pytest.raises(RecipeError) as e:
        make(**kw)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_several_problems_reported_together():
    with pytest.raises(RecipeError) as e:
        make(r=0, lora_dropout=2, save=["x"])
    msg = str(e.value)
    assert msg.startswith("recipe t/x: ") and "r must" in msg and "lora_dropout" in msg and "save" in msg


def test_lists_become_tuples_and_frozen():
    r = make(train_modules=["embed"], trainable_tokens={"lm_head": [4, 5]}, save=["adapter", "merged"])
    assert r.train_modules == ("embed",) and r.save == ("adapter", "merged")
    assert dict(r.trainable_tokens) == {"lm_head": (4, 5)}
    with pytest.raises(Exception):
        r.r = 3  # type: ignore[misc]


def test_with_overrides_validates_and_copies():
    base = get_recipe("qwen2-vl/lora")
    r = base.with_overrides(r=8, lora_alpha=16)
    assert (r.r, r.lora_alpha, base.r) == (8, 16, 16)
    with pytest.raises(RecipeError, match="r must be"):
        base.with_overrides(r=-1)
    with pytest.raises(RecipeError, match=r"unknown field\(s\) rank \(did you mean: r"):
        base.with_overrides(rank=8)
    moved = base.with_overrides(family="qwen-vl")
    assert moved.targets[0].startswith(r"transformer\.h")  # default targets follow the family


def test_dict_roundtrip_and_base():
    r = get_recipe("qwen2-vl/lora-new-tokens").with_overrides(trainable_tokens=[7, 9])
    assert Recipe.from_dict(r.to_dict()) == r
    derived = Recipe.from_dict({"base": "qwen2-vl/lora", "r": 4, "save": ["adapter", "pth", "merged"]})
    assert derived.r == 4 and derived.name == "qwen2-vl/lora" and derived.save == ("adapter", "pth", "merged")
    with pytest.raises(RecipeError, match="missing family"):
        Recipe.from_dict({"name": "a/b"})
    with pytest.raises(RecipeError, match="unknown field"):
        Recipe.from_dict({"name": "a/b", "family": "qwen2-vl", "lora_rank": 3})


def test_load_recipe_file(tmp_path):
    full = tmp_path / "full.yaml"
    full.write_text("name: mine/x\nfamily: qwen2.5-vl\nr: 8\ntrain_modules: [embed, lm_head]\nsave: [adapter, merged]\n")
    assert load_recipe_file(full).train_modules == ("embed", "lm_head")
    train = tmp_path / "train.yaml"  # a qvl-train style file: recipe + other sections
    train.write_text("recipe:\n  base: qwen3-vl/lora\n  r: 4\nmodel: some/dir\ntraining: {max_steps: 3}\n")
    assert load_recipe_file(train).r == 4
    named = tmp_path / "named.yaml"
    named.write_text("recipe: qwen2-vl/lora-embed-head\n")
    assert load_recipe_file(named).name == "qwen2-vl/lora-embed-head"
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe:\n  base: qwen2-vl/lora\n  r: zero\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: recipe qwen2-vl/lora: r must"):
        load_recipe_file(bad)
    with pytest.raises(RecipeError, match="cannot read"):
        load_recipe_file(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("a: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe_file(tmp_path / "broken.yaml")


README_EXAMPLE = r"""
name: mine/qwen2.5-vl-attn
family: qwen2.5-vl
description: q/v LoRA, embed + head trained whole
r: 16
lora_alpha: 32
lora_dropout: 0.05
use_rslora: false
use_dora: false
targets:
  - 'model\.language_model\.layers\.\d+\.self_attn\.(q|v)_proj'
vision_targets: []
train_modules: [embed, lm_head]
trainable_tokens: null
freeze: [vision, merger]
tied: untie
save: [adapter, pth]
"""


def test_readme_example(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(README_EXAMPLE)
    r = load_recipe_file(f)
    assert r.family == "qwen2.5-vl" and r.train_modules == ("embed", "lm_head") and r.save == ("adapter", "pth")


def test_public_api_names():
    import qvl_plugin.recipes as api

    for name in api.__all__:
        assert getattr(api, name) is not None
