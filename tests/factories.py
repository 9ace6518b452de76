"""Tiny *real* models, adapters and dumps for the whole suite (seeded, offline, each < 1 s).

Qwen2/2.5/3-VL come from transformers configs; Qwen-VL v1 (remote code upstream) is a small module tree
with the exact v1 names. Adapters are made by PEFT itself, with every trainable tensor perturbed so a
no-op merge can never pass a test.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "FAMILIES",
    "tiny_config",
    "build_model",
    "save_base",
    "TinyQwenVL",
    "save_qwen_vl_base",
    "make_adapter",
    "make_dump",
    "make_clean_dump",
    "text_inputs",
    "logits",
    "ADAPTER_VARIANTS",
    "to_legacy_key",
]

FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
VOCAB = 256


def tiny_config(family: str, tied: bool = False):
    text = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=512,
        tie_word_embeddings=tied,
    )
    ids = dict(image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253)
    if family == "qwen2-vl":
        from transformers import Qwen2VLConfig

        text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 2, 4]}
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied, **ids)
    if family == "qwen2.5-vl":
        from transformers import Qwen2_5_VLConfig

        text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 2, 4]}
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, num_heads=4, intermediate_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied, **ids)
    if family == "qwen3-vl":
        from transformers import Qwen3VLConfig

        text.update(head_dim=16, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, num_heads=4, intermediate_size=64, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[1])
        return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied, **ids)
    raise ValueError(family)


def _perturb(model: nn.Module, seed: int, std: float = 0.02) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def build_model(family: str, tied: bool = False, seed: int = 0) -> nn.Module:
    """A real ``*ForConditionalGeneration`` (fp32, eval) or the v1 tree for ``family="qwen-vl"``."""
    torch.manual_seed(seed)
    if family == "qwen-vl":
        model = TinyQwenVL()
    else:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_config(tiny_config(family, tied))
    _perturb(model, seed + 100)
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def save_base(model: nn.Module, path: str | Path, dtype: torch.dtype | None = None, max_shard_size: str | None = None) -> Path:
    """An HF model dir plus non-weight files a merge must carry over.

    transformers writes Qwen2/2.5-VL in the legacy hub layout (``model.layers.*``, ``visual.*``) and
    Qwen3-VL in the new one (``model.language_model.*``); tests rely on that.
    """
    path = Path(path)
    if isinstance(model, TinyQwenVL):
        return save_qwen_vl_base(model, path)
    m = model if dtype is None else copy.deepcopy(model).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    m.save_pretrained(path, **kwargs)
    (path / "chat_template.jinja").write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    return path


# ---------------------------------------------------------------------------------------------------------
# Qwen-VL v1: the remote-code module tree, names exactly as in QWenLMHeadModel
class _Attn(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class _MLP(nn.Module):
    def __init__(self, d: int, ff: int):
        super().__init__()
        self.w1, self.w2 = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False)
        self.c_proj = nn.Linear(ff, d, bias=False)

    def forward(self, x):
        return self.c_proj(self.w1(x) * nn.functional.silu(self.w2(x)))


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, ff: int):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = nn.LayerNorm(d), _Attn(d, heads), nn.LayerNorm(d), _MLP(d, ff)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _VisionBlock(nn.Module):
    def __init__(self, w: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(w), nn.LayerNorm(w)
        self.attn = nn.Module()
        self.attn.in_proj, self.attn.out_proj = nn.Linear(w, 3 * w), nn.Linear(w, w)
        self.mlp = nn.Module()
        self.mlp.c_fc, self.mlp.c_proj = nn.Linear(w, 2 * w), nn.Linear(2 * w, w)


class _AttnPool(nn.Module):
    def __init__(self, w: int, d: int, queries: int = 4):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(queries, d))
        self.pos_embed = nn.Parameter(torch.zeros(16, d))
        self.kv_proj = nn.Linear(w, d, bias=False)
        self.attn = nn.MultiheadAttention(d, 4)
        self.ln_q, self.ln_kv = nn.LayerNorm(d), nn.LayerNorm(d)


class _Visual(nn.Module):
    def __init__(self, w: int, d: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, kernel_size=14, stride=14, bias=False)
        self.positional_embedding = nn.Parameter(torch.zeros(16, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([_VisionBlock(w) for _ in range(2)])
        self.attn_pool = _AttnPool(w, d)
        self.ln_post = nn.LayerNorm(d)
        self.proj = nn.Parameter(torch.zeros(d, d))


class _Transformer(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, ff: int, vision_width: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.h = nn.ModuleList([_Block(d, heads, ff) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.visual = _Visual(vision_width, d)


class TinyQwenVL(nn.Module):
    """QWenLMHeadModel's names and text path; the vision tower exists for its keys, not its forward."""

    CONFIG = {
        "model_type": "qwen", "architectures": ["QWenLMHeadModel"], "vocab_size": VOCAB, "hidden_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256, "tie_word_embeddings": False,
        "visual": {"width": 32, "layers": 2, "heads": 4, "output_dim": 64, "image_size": 56, "patch_size": 14},
    }

    def __init__(self):
        super().__init__()
        c = self.CONFIG
        self.transformer = _Transformer(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["intermediate_size"] // 2, c["visual"]["width"])
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)

    def get_input_embeddings(self):
        return self.transformer.wte

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, **_):
        x = self.transformer.wte(input_ids)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return type("Out", (), {"logits": logits})()


def save_qwen_vl_base(model: TinyQwenVL, path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(TinyQwenVL.CONFIG, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 8}))
    (path / "modeling_qwen.py").write_text("# remote code placeholder: merges must copy it\n")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors", metadata={"format": "pt"})
    return path


def load_qwen_vl(path: str | Path) -> TinyQwenVL:
    model = TinyQwenVL()
    model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
def to_legacy_key(key: str) -> str:
    """Pre-4.52 transformers naming of a PEFT key (what older adapters on disk look like)."""
    return key.replace("base_model.model.model.language_model.", "base_model.model.model.").replace(
        "base_model.model.model.visual.", "base_model.model.visual."
    )


def make_adapter(model: nn.Module, lora_config: LoraConfig, path: str | Path | None = None, seed: int = 1, legacy: bool = False):
    """``get_peft_model`` on a copy, every trainable tensor perturbed (simulated training), optionally saved."""
    peft_model = get_peft_model(copy.deepcopy(model), copy.deepcopy(lora_config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.eval()
    if path is not None:
        path = Path(path)
        peft_model.save_pretrained(path)
        if legacy:
            f = path / "adapter_model.safetensors"
            sd = load_file(str(f))
            save_file({to_legacy_key(k): v for k, v in sd.items()}, str(f), metadata={"format": "pt"})
    return peft_model, path


def make_dump(peft_model: nn.Module, path: str | Path) -> Path:
    """The seed-style manual dump, verbatim: every tensor twice (``x`` and ``.x``)."""
    dump = {
        f"{name}.{param_name}": param.detach().cpu()
        for name, module in peft_model.named_modules()
        for param_name, param in module.named_parameters()
        if param.requires_grad
    }
    torch.save(dump, path)
    return Path(path)


def make_clean_dump(peft_model: nn.Module, path: str | Path) -> Path:
    torch.save({n: p.detach().cpu().clone() for n, p in peft_model.named_parameters() if p.requires_grad}, path)
    return Path(path)


def text_inputs(vocab: int = VOCAB, batch: int = 2, seq: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(vocab, 240), (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def logits(model: nn.Module, inputs: dict | None = None) -> torch.Tensor:
    inputs = inputs or text_inputs()
    return model(**inputs).logits.float()


_QV = ["q_proj", "v_proj"]
_LANG_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

ADAPTER_VARIANTS: dict[str, Callable[[str], LoraConfig]] = {
    "qv": lambda fam: LoraConfig(r=4, lora_alpha=8, target_modules=_QV),
    "linear-embed-head": lambda fam: LoraConfig(r=4, lora_alpha=8, target_modules=_LANG_LINEAR, modules_to_save=["embed_tokens", "lm_head"]),
    "rslora-patterns": lambda fam: LoraConfig(
        r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "o_proj"],
        rank_pattern={"q_proj": 8, r"layers\.1\.self_attn\.v_proj": 2}, alpha_pattern={"o_proj": 32}, modules_to_save=["lm_head"],
    ),
    "dora": lambda fam: LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=_QV),
    "embedding-lora": lambda fam: LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    "conv-lora": lambda fam: LoraConfig(r=2, lora_alpha=4, target_modules=r"model\.visual\.patch_embed\.proj"),
    "lora-bias": lambda fam: LoraConfig(r=4, lora_alpha=8, target_modules=_QV, lora_bias=True),
    "bias-all": lambda fam: LoraConfig(r=4, lora_alpha=8, target_modules=_QV, bias="all"),
    "tokens": lambda fam: LoraConfig(r=4, lora_alpha=8, target_modules=_QV, trainable_token_indices=[3, 5, 7]),
    "tokens-dict": lambda fam: LoraConfig(r=4, lora_alpha=8, target_modules=_QV, trainable_token_indices={"embed_tokens": [3, 5], "lm_head": [7]}),
    "vision-full-path": lambda fam: LoraConfig(r=4, lora_alpha=8, target_modules=r"model\.visual\.blocks\.\d+\.attn\.(qkv|proj)"),
}
