"""apply_recipe on tiny real models: exactly the intended parameters trainable, typos never ignored."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from qvl_plugin.recipes import RecipeError, apply_recipe, get_recipe, plan_recipe, trainable_report

E2 = "model.language_model.embed_tokens"
EMBED = {"qwen-vl": "transformer.wte", "qwen2-vl": E2, "qwen2.5-vl": E2, "qwen3-vl": E2}
LEAVES = {
    "qwen-vl": ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2"),
    "qwen2-vl": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}
CASES = [(f, tied, kind) for f in ("qwen-vl", "qwen2-vl", "qwen2.5-vl", "qwen3-vl") for tied in ((False,) if f == "qwen-vl" else (False, True))
         for kind in ("lora", "lora-embed-head", "lora-new-tokens")]


def quiet_apply(model, recipe):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return apply_recipe(model, recipe)


def trainable(peft_model) -> set[str]:
    return {n for n, p in peft_model.named_parameters() if p.requires_grad}


def layer_modules(model, family: str) -> list[str]:
    names = {n for n, _ in model.named_modules()}
    prefix = "transformer.h" if family == "qwen-vl" else "model.language_model.layers"
    n_layers = len({m.group(1) for n in names if (m := re.fullmatch(re.escape(prefix) + r"\.(\d+)", n))})
    leaves = LEAVES["qwen-vl" if family == "qwen-vl" else "qwen2-vl"]
    return [f"{prefix}.{i}.{leaf}" for i in range(n_layers) for leaf in leaves]


@pytest.mark.parametrize("family, tied, kind", CASES)
def test_builtin_trains_exactly_its_parameters(tiny, family, tied, kind):
    model = tiny(family, tied=tied)
    recipe = get_recipe(f"{family}/{kind}")
    if kind == "lora-new-tokens":
        recipe = recipe.with_overrides(trainable_tokens=[3, 5])
    expected = {f"base_model.model.{m}.lora_{ab}.default.weight" for m in layer_modules(model, family) for ab in "AB"}
    embed = EMBED[family]
    if kind == "lora-embed-head":
        expected |= {f"base_model.model.{m}.modules_to_save.default.weight" for m in (embed, "lm_head")}
    if kind == "lora-new-tokens":
        heads = (embed,) if tied else (embed, "lm_head")  # tied="tie": the head shares the embedding's rows
        expected |= {f"base_model.model.{m}.token_adapter.trainable_tokens_delta.default" for m in heads}
    peft_model = quiet_apply(model, recipe)
    assert trainable(peft_model) == expected
    if kind == "lora-new-tokens":
        delta = peft_model.get_base_model().get_submodule(embed).token_adapter.trainable_tokens_delta["default"]
        assert delta.shape[0] == 2
        assert peft_model.peft_config["default"].trainable_token_indices == {embed: [3, 5], "lm_head": [3, 5]}


def test_untie_keeps_trained_head_and_marks_config(tiny):
    model = tiny("qwen2-vl", tied=True)
    peft_model = quiet_apply(model, get_recipe("qwen2-vl/lora-embed-head"))
    assert model.config.tie_word_embeddings is False
    base = peft_model.get_base_model()
    emb, head = base.get_submodule(E2).modules_to_save["default"], base.lm_head.modules_to_save["default"]
    assert emb.weight is not head.weight
    with torch.no_grad():  # "training" moves the two copies apart
        head.weight.add_(0.5)
        emb.weight.mul_(1.5)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()
        got = merged(input_ids=ids).logits
    assert merged.lm_head.weight is not merged.get_input_embeddings().weight
    torch.testing.assert_close(got, want)


def test_tie_policy_shares_one_copy(tiny):
    model = tiny("qwen2-vl", tied=True)
    peft_model = quiet_apply(model, get_recipe("qwen2-vl/lora-embed-head").with_overrides(tied="tie"))
    base = peft_model.get_base_model()
    assert base.lm_head.modules_to_save["default"].weight is base.get_submodule(E2).modules_to_save["default"].weight
    assert peft_model.peft_config["default"].ensure_weight_tying is True
    assert model.config.tie_word_embeddings is True


def test_tied_error_policy(tiny):
    recipe = get_recipe("qwen2-vl/lora-embed-head").with_overrides(tied="error")
    with pytest.raises(RecipeError, match="ties embedding and lm_head"):
        plan_recipe(tiny("qwen2-vl", tied=True), recipe)
    plan_recipe(tiny("qwen2-vl", tied=False), recipe)  # untied: nothing to decide


def test_typo_in_target_names_close_modules(tiny):
    recipe = get_recipe("qwen2-vl/lora").with_overrides(targets=[r"model\.language_model\.layers\.\d+\.self_attn\.q_prj"])
    with pytest.raises(RecipeError) as e:
        apply_recipe(tiny("qwen2-vl"), recipe)
    msg = str(e.value)
    assert "matches no module" in msg and "did you mean: model.language_model.layers.N.self_attn.q_proj" in msg


def test_legacy_names_do_not_match(tiny):
    recipe = get_recipe("qwen2-vl/lora").with_overrides(targets=[r"model\.layers\.\d+\.self_attn\.q_proj"])
    with pytest.raises(RecipeError, match="did you mean: model.language_model.layers.N.self_attn.q_proj"):
        plan_recipe(tiny("qwen2-vl"), recipe)


def test_target_reaching_into_vision_is_refused(tiny):
    """Qwen2.5-VL's vision MLP reuses gate/up/down_proj: a language target must not reach it."""
    recipe = get_recipe("qwen2.5-vl/lora").with_overrides(targets=[r"model\.(language_model\.layers|visual\.blocks)\.\d+\.mlp\.gate_proj"])
    with pytest.raises(RecipeError, match="outside the language"):
        plan_recipe(tiny("qwen2.5-vl"), recipe)


def test_vision_targets(tiny):
    recipe = get_recipe("qwen2.5-vl/lora").with_overrides(
        vision_targets=[r"model\.visual\.blocks\.\d+\.mlp\.(gate|up|down)_proj"], freeze=["merger"])
    model = tiny("qwen2.5-vl")
    n_blocks = len(model.model.visual.blocks)
    peft_model = quiet_apply(model, recipe)
    names = trainable(peft_model)
    vision = {n for n in names if ".visual." in n}
    assert len(vision) == n_blocks * 3 * 2 and all(".mlp." in n and ".blocks." in n for n in vision)
    assert not any("merger" in n for n in names)
    rows = {r.group: r for r in trainable_report(peft_model)}
    assert rows["vision"].trainable > 0 and rows["merger"].trainable == 0


def test_vision_target_in_frozen_merger(tiny):
    recipe = get_recipe("qwen2-vl/lora").with_overrides(vision_targets=[r"model\.visual\.merger\.mlp\.(0|2)"], freeze=["merger"])
    with pytest.raises(RecipeError, match="frozen merger"):
        plan_recipe(tiny("qwen2-vl"), recipe)


def test_merger_trained_whole_qwen3(tiny):
    recipe = get_recipe("qwen3-vl/lora").with_overrides(train_modules=["merger"], freeze=["vision"])
    peft_model = quiet_apply(tiny("qwen3-vl"), recipe)
    whole = {n.split(".modules_to_save.")[0] for n in trainable(peft_model) if ".modules_to_save." in n}
    assert whole == {"base_model.model.model.visual.merger", "base_model.model.model.visual.deepstack_merger_list.0"}


def test_lora_inside_whole_module_refused(tiny):
    recipe = get_recipe("qwen2-vl/lora").with_overrides(vision_targets=[r"model\.visual\.merger\.mlp\.0"], train_modules=["merger"], freeze=[])
    with pytest.raises(RecipeError, match="lies inside model.visual.merger"):
        plan_recipe(tiny("qwen2-vl"), recipe)


def test_container_target_refused(tiny):
    recipe = get_recipe("qwen2-vl/lora").with_overrides(targets=[r"model\.language_model\.layers\.\d+\.self_attn"])
    with pytest.raises(RecipeError, match="LoRA cannot wrap"):
        plan_recipe(tiny("qwen2-vl"), recipe)


def test_family_mismatch(tiny):
    with pytest.raises(RecipeError, match="is for qwen2-vl but the model is qwen2.5-vl"):
        plan_recipe(tiny("qwen2.5-vl"), "qwen2-vl/lora")


def test_token_template_and_range(tiny):
    with pytest.raises(RecipeError, match="needs trainable_tokens"):
        plan_recipe(tiny("qwen2-vl"), "qwen2-vl/lora-new-tokens")
    model = tiny("qwen2-vl")
    vocab = model.get_input_embeddings().num_embeddings
    recipe = get_recipe("qwen2-vl/lora-new-tokens").with_overrides(trainable_tokens=[1, vocab])
    with pytest.raises(RecipeError, match=f"token id {vocab} >= {vocab} rows"):
        plan_recipe(model, recipe)
    recipe = recipe.with_overrides(trainable_tokens={"embedd": [1]})
    with pytest.raises(RecipeError, match="trainable_tokens 'embedd'"):
        plan_recipe(tiny("qwen2-vl"), recipe)


def test_lora_config_is_pure_and_fullmatches(tiny):
    model = tiny("qwen2-vl", tied=True)
    recipe = get_recipe("qwen2-vl/lora-embed-head").with_overrides(r=8, lora_alpha=16, use_rslora=True)
    config = recipe.lora_config(model)
    assert model.config.tie_word_embeddings is True  # only apply_recipe changes the model
    assert (config.r, config.lora_alpha, config.use_rslora, config.task_type) == (8, 16, True, "CAUSAL_LM")
    assert isinstance(config.target_modules, str)
    hit = {n for n, _ in model.named_modules() if re.fullmatch(config.target_modules, n)}
    assert hit == set(layer_modules(model, "qwen2-vl"))
    assert config.modules_to_save == [E2, "lm_head"]


def test_trainable_report_rows(tiny):
    model = tiny("qwen-vl")
    n_embed, n_lora = model.transformer.wte.weight.numel(), 2 * len(layer_modules(model, "qwen-vl"))
    peft_model = quiet_apply(model, "qwen-vl/lora-embed-head")
    rows = {r.group: r for r in trainable_report(peft_model)}
    assert rows["embedding"].trainable == rows["embedding"].total == n_embed
    assert rows["head"].percent == 100.0 and rows["vision"].trainable == rows["merger"].trainable == 0
    assert rows["language"].tensors == n_lora


def test_tied_rows_must_agree_when_tied(tiny):
    recipe = get_recipe("qwen2-vl/lora-new-tokens").with_overrides(trainable_tokens={"embed": [1, 2], "lm_head": [2]})
    with pytest.raises(RecipeError, match="must be the same ids"):
        plan_recipe(tiny("qwen2-vl", tied=True), recipe)
    peft_model = quiet_apply(tiny("qwen2-vl", tied=True), recipe.with_overrides(tied="untie"))
    deltas = {n: p.shape[0] for n, p in peft_model.named_parameters() if "trainable_tokens_delta" in n}
    assert sorted(deltas.values()) == [1, 2]


def test_recipe_pickles():
    import pickle

    recipe = get_recipe("qwen2-vl/lora-new-tokens").with_overrides(trainable_tokens={"embed": [1, 2]})
    assert pickle.loads(pickle.dumps(recipe)) == recipe
