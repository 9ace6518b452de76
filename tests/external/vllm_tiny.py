"""A tiny Qwen2-VL that vLLM's CPU backend accepts, its adapters, and transformers+PEFT reference tokens.

vLLM 0.32 CPU needs head_dim >= 32 (16 is refused: "Unsupported CPU attention configuration") and
``architectures`` in config.json (else it picks the pooling runner); the suite's other tiny models use
head_dim 16. This one: text 128 wide, 4/2 heads (head_dim 32), 2 layers, vocab 512, vision 64 wide with
2 heads; the shipped tiny tokenizer and image processor (qvl_plugin/hosts/tiny) ride along so vLLM can
process images. Built from config with a seed, never downloaded.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from peft import LoraConfig

from qvl_plugin.hosts.tiny import load_processor, tiny_dir
from tests.factories import make_adapter

__all__ = ["vllm_config", "build_vllm_model", "save_vllm_base", "VARIANTS", "PROMPTS", "IMAGE_PROMPT", "image",
           "hf_tokens", "NEW_TOKENS", "make_variant"]

NEW_TOKENS = 6
_TEXT_IDS = [[11, 57, 203, 98, 140, 77], [300, 12, 45, 451, 9, 233, 88, 19], [150, 151, 152, 400]]
PROMPTS: list[list[int]] = _TEXT_IDS
IMAGE_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>shape<|im_end|>\n<|im_start|>assistant\n"


def vllm_config(tied: bool = False):
    from transformers import Qwen2VLConfig

    raw = json.loads((tiny_dir() / "config.json").read_text())
    text = dict(raw["text_config"], hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                rope_parameters={"mrope_section": [4, 6, 6], "rope_theta": 1000000.0, "rope_type": "default"},
                tie_word_embeddings=tied)
    text.pop("model_type", None)
    vision = dict(raw["vision_config"], embed_dim=64, num_heads=2, hidden_size=128)
    vision.pop("model_type", None)
    ids = {k: raw[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied,
                         architectures=["Qwen2VLForConditionalGeneration"], **ids)


def build_vllm_model(tied: bool = False, seed: int = 0):
    from transformers import Qwen2VLForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(vllm_config(tied))
        g = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            for p in model.parameters():  # larger than init noise: tokens must depend on every weight
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    if tied:
        model.tie_weights()
    return model.float().eval()


def save_vllm_base(model, path: str | Path) -> Path:
    path = Path(path)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.jinja"):
        shutil.copy(tiny_dir() / name, path / name)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg.get("architectures") == ["Qwen2VLForConditionalGeneration"], cfg.get("architectures")
    return path


_QV = ["q_proj", "v_proj"]
_LANG = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
_VISION = r"model\.visual\.blocks\.\d+\.attn\.(qkv|proj)"

#: adapter kind -> LoraConfig, each a thing people train and then want to serve
VARIANTS: dict[str, LoraConfig] = {
    "lora": LoraConfig(r=8, lora_alpha=16, target_modules=_LANG),
    "lora-rank32": LoraConfig(r=32, lora_alpha=32, target_modules=_QV),
    "rslora-patterns": LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "o_proj"],
                                  rank_pattern={"q_proj": 8}, alpha_pattern={"o_proj": 32}),
    "modules-to-save": LoraConfig(r=8, lora_alpha=16, target_modules=_LANG, modules_to_save=["embed_tokens", "lm_head"]),
    "tokens": LoraConfig(r=8, lora_alpha=16, target_modules=_QV, trainable_token_indices=[20, 30, 40]),
    "dora": LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=_QV),
    "vision-lora": LoraConfig(r=8, lora_alpha=16, target_modules=_VISION),
    "embedding-lora": LoraConfig(r=8, lora_alpha=16, target_modules=["embed_tokens", "q_proj"]),
    "lora-bias": LoraConfig(r=8, lora_alpha=16, lora_bias=True, target_modules=_QV),
    "bias-all": LoraConfig(r=8, lora_alpha=16, bias="all", target_modules=_QV),
    "vision-combo": LoraConfig(r=8, lora_alpha=16, target_modules=f"({_VISION}|{_LANG})"),
}
#: lora_B scale per kind: the simulated training's noise must move greedy tokens through 4 image tokens
_BOOST = {"vision-lora": 40.0, "vision-combo": 40.0}


def make_variant(base_model, kind: str, path: Path, seed: int = 1):
    """PEFT adapter ``kind`` on a copy of ``base_model``, saved to ``path``: ``(peft_model, path)``."""
    peft_model, _ = make_adapter(base_model, copy.deepcopy(VARIANTS[kind]), None, seed=seed)
    boost = _BOOST.get(kind)
    if boost:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name and "visual" in name:
                    p.mul_(boost)
    peft_model.save_pretrained(path)
    return peft_model, Path(path)


def image():
    """A fixed 56x56 RGB image (4x4 patches of 14 px -> 4 merged image tokens)."""
    from PIL import Image

    g = torch.Generator().manual_seed(3)
    arr = (torch.rand(56, 56, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr, "RGB")


@torch.no_grad()
def hf_tokens(model, base_dir: Path) -> dict[str, list[list[int]]]:
    """Greedy new tokens (transformers generate) for the text prompts and the image prompt."""
    out = {"text": [], "image": []}
    for ids in PROMPTS:
        x = torch.tensor([ids])
        y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                           min_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)
        out["text"].append(y[0, len(ids):].tolist())
    proc = load_processor(base_dir)
    enc = proc(text=[IMAGE_PROMPT], images=[image()], return_tensors="pt")
    n = enc["input_ids"].shape[1]
    y = model.generate(**enc, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    out["image"].append(y[0, n:].tolist())
    return out
