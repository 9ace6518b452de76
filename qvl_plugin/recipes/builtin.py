"""The built-in recipes, registered through our own pyproject entry point like any third-party plugin:

    [project.entry-points."qvl_plugin.recipes"]
    builtin = "qvl_plugin.recipes.builtin:RECIPES"
"""

from __future__ import annotations

from .schema import Recipe

__all__ = ["RECIPES"]

_TITLES = {"qwen-vl": "Qwen-VL", "qwen2-vl": "Qwen2-VL", "qwen2.5-vl": "Qwen2.5-VL", "qwen3-vl": "Qwen3-VL", "qwen3-vl-moe": "Qwen3-VL-MoE"}


def _family(family: str, what: str = "", **lora) -> list[Recipe]:
    title = _TITLES[family]
    what = what or f"r={lora['r']} alpha={lora['lora_alpha']:g}"
    return [
        Recipe(
            name=f"{family}/lora",
            family=family,
            description=f"{title}: LoRA {what}, language model only",
            save=("adapter", "pth"),
            **lora,
        ),
        Recipe(
            name=f"{family}/lora-embed-head",
            family=family,
            description=f"{title}: LoRA {what} + embed/lm_head trained whole",
            train_modules=("embed", "lm_head"),
            tied="untie",
            save=("adapter", "pth"),
            **lora,
        ),
        Recipe(
            name=f"{family}/lora-new-tokens",
            family=family,
            description=f"{title}: LoRA {what} + new-token rows only (set trainable_tokens)",
            trainable_tokens=(),
            tied="tie",
            save=("adapter", "pth"),
            **lora,
        ),
    ]


# Qwen-VL v1: the official finetune.py LoRA defaults (targets c_attn, attn.c_proj, w1, w2 — written here as
# full paths under transformer.h.N by the layout's default_targets; r=64, alpha=16, dropout 0.05;
# modules_to_save wte + lm_head in lora-embed-head).
RECIPES: list[Recipe] = [
    *_family("qwen-vl", "as official finetune.py (r=64 alpha=16)", r=64, lora_alpha=16, lora_dropout=0.05),
    *_family("qwen2-vl", r=16, lora_alpha=32, lora_dropout=0.05),
    *_family("qwen2.5-vl", r=16, lora_alpha=32, lora_dropout=0.05),
    *_family("qwen3-vl", r=16, lora_alpha=32, lora_dropout=0.05),
    # Qwen3-VL-MoE: the family default targets are the attention projections (the MLP is fused experts,
    # not Linear layers); lora-experts adds PEFT target_parameters LoRA on the expert tensors (lora_dropout
    # must be 0 there: PEFT's ParamWrapper refuses dropout). The router (mlp.gate) stays frozen unless a
    # recipe lists mlp.gate.weight in target_parameters.
    *_family("qwen3-vl-moe", r=16, lora_alpha=32, lora_dropout=0.05),
    Recipe(
        name="qwen3-vl-moe/lora-experts",
        family="qwen3-vl-moe",
        description="Qwen3-VL-MoE: LoRA r=16 alpha=32 on attention + the fused experts (target_parameters), router frozen",
        r=16, lora_alpha=32, lora_dropout=0.0,
        target_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
        save=("adapter", "pth"),
    ),
]
