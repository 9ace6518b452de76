"""Tiny real models for the recipe tests (built from config; nothing downloaded).

Uses the shared ``tests/factories.py`` when it exists, else small local builders.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

try:  # the shared factories, when present
    from tests.factories import build_model as _shared_build_model  # type: ignore
except Exception:  # pragma: no cover - until tests/factories.py lands
    _shared_build_model = None

FAMILIES = ("qwen-vl", "qwen2-vl", "qwen2.5-vl", "qwen3-vl")
_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)


def _config(family: str, tied: bool):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    if family == "qwen2-vl":
        return Qwen2VLConfig(
            text_config=dict(_TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}),
            vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2),
            tie_word_embeddings=tied,
        )
    if family == "qwen2.5-vl":
        return Qwen2_5_VLConfig(
            text_config=dict(_TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                               spatial_merge_size=2, fullatt_block_indexes=[1], window_size=56),
            tie_word_embeddings=tied,
        )
    if family == "qwen3-vl":
        return Qwen3VLConfig(
            text_config=dict(_TEXT, head_dim=16, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True}),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                               spatial_merge_size=2, deepstack_visual_indexes=[0], num_position_embeddings=64),
            tie_word_embeddings=tied,
        )
    raise ValueError(family)



def _v1_config():
    from transformers import PretrainedConfig

    class QWenConfig(PretrainedConfig):
        model_type = "qwen"

    return QWenConfig(hidden_size=64, num_hidden_layers=2, vocab_size=256, visual={"width": 32, "layers": 1, "output_dim": 64},
                      tie_word_embeddings=False)


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.c_attn, self.attn.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d, bias=False)
        self.mlp = nn.Module()
        self.mlp.w1, self.mlp.w2, self.mlp.c_proj = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False), nn.Linear(2 * d, d, bias=False)


class TinyQwenVL(nn.Module):
    """The Qwen-VL v1 module tree (remote code upstream) at toy size: same names, no real forward."""

    def __init__(self) -> None:
        super().__init__()
        self.config = _v1_config()
        d, v, w = 64, 256, 32
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(v, d)
        self.transformer.h = nn.ModuleList(_Block(d) for _ in range(2))
        self.transformer.ln_f = nn.LayerNorm(d)
        vis = self.transformer.visual = nn.Module()
        vis.conv1 = nn.Conv2d(3, w, 14, 14, bias=False)
        vis.positional_embedding = nn.Parameter(torch.zeros(16, w))
        vis.ln_pre = nn.LayerNorm(w)
        vis.transformer = nn.Module()
        block = nn.Module()
        block.ln_1, block.ln_2 = nn.LayerNorm(w), nn.LayerNorm(w)
        block.attn = nn.Module()
        block.attn.in_proj, block.attn.out_proj = nn.Linear(w, 3 * w), nn.Linear(w, w)
        block.mlp = nn.Module()
        block.mlp.c_fc, block.mlp.c_proj = nn.Linear(w, 2 * w), nn.Linear(2 * w, w)
        vis.transformer.resblocks = nn.ModuleList([block])
        vis.attn_pool = nn.Module()
        vis.attn_pool.query = nn.Parameter(torch.zeros(4, d))
        vis.attn_pool.kv_proj = nn.Linear(w, d, bias=False)
        vis.attn_pool.ln_q, vis.attn_pool.ln_kv = nn.LayerNorm(d), nn.LayerNorm(d)
        vis.ln_post = nn.LayerNorm(d)
        vis.proj = nn.Parameter(torch.zeros(d, d))
        self.lm_head = nn.Linear(d, v, bias=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.transformer.wte

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


def build(family: str, tied: bool = False) -> nn.Module:
    """A fresh tiny model of ``family`` (a new one each call: apply_recipe wraps it in place)."""
    if _shared_build_model is not None:
        return _shared_build_model(family, tied=tied)
    if family == "qwen-vl":
        return TinyQwenVL()
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForImageTextToText.from_config(_config(family, tied))
