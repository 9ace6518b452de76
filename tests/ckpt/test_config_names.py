"""config_names mirrors PEFT's own matching rules (it avoids importing PEFT per command): held equal here."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

from qvl_plugin.ckpt.config_names import map_name, map_regex, pattern_value, targets_match
from qvl_plugin.layouts import get_layout

MODULES = [
    "model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.1.mlp.down_proj",
    "model.language_model.embed_tokens", "lm_head", "model.visual.blocks.0.attn.qkv", "model.visual.merger.mlp.0",
    "model.layers.0.self_attn.q_proj",
]
TARGETS = [
    ["q_proj"], ["self_attn.q_proj", "down_proj"], ["model.layers.0.self_attn.q_proj"], ["qkv", "mlp.0"],
    r"^(model\.language_model(?=\.).*\.(q_proj|down_proj))$", r".*\.q_proj", "lm_head",
]
EXTRA = [{}, {"exclude_modules": ["down_proj"]}, {"exclude_modules": r".*visual.*"}, {"modules_to_save": ["q_proj"]}]


def test_targets_match_equals_peft():
    for targets, extra, module in itertools.product(TARGETS, EXTRA, MODULES):
        cfg = {"target_modules": targets, **extra}
        ns = SimpleNamespace(**{"target_parameters": None, "layers_to_transform": None, "layers_pattern": None,
                                "exclude_modules": None, "modules_to_save": None, **cfg})
        assert targets_match(cfg, module) == bool(check_target_module_exists(ns, module)), (cfg, module)


def test_pattern_value_equals_peft():
    pats = {r"layers\.1\.mlp\.down_proj": 2, "q_proj": 8, r"model\.layers\.0\..*": 3}
    for module in MODULES:
        key = get_pattern_key(list(pats), module)
        assert pattern_value(pats, module) == pats.get(key), module


def test_names_map_by_whole_segments():
    layout = get_layout("qwen2-vl")
    assert map_name("model.layers.0.mlp.down_proj", layout) == "model.language_model.layers.0.mlp.down_proj"
    assert map_name("visual.blocks.0.attn.qkv", layout) == "model.visual.blocks.0.attn.qkv"
    assert map_name("model_x.y", layout) == "model_x.y" and map_name("q_proj", layout) == "q_proj"
    assert map_regex(r"model\.layers\.\d+\.self_attn\.(q|v)_proj", layout) == r"model\.language_model\.layers\.\d+\.self_attn\.(q|v)_proj"
    assert map_regex(r"^(model\.language_model(?=\.).*\.o_proj)$", layout) == r"^(model\.language_model(?=\.).*\.o_proj)$"
