"""Tiny *real* models, adapters and dumps for the whole suite (seeded, offline, each < 1 s).

Qwen2/2.5/3-VL come from transformers configs; Qwen-VL v1 (remote code upstream) is a small module tree
with the exact v1 names. Adapters are made by PEFT itself, with every trainable tensor perturbed so a
no-op merge can never pass a test.

PEFT 0.21.2 facts the catalogue relies on (measured on these models):
- ``lora_bias=True`` needs a base bias to merge: Qwen3-VL's LLM has none, so its variant targets the
  vision ``attn.qkv`` (has a bias). PEFT also warns, wrongly, that ``lora_B.bias`` (1-D) is a ZeRO-3 shard.
- On a *tied* model PEFT's own ``merge_and_unload`` does NOT reproduce the PeftModel's logits for
  ``embedding-lora`` (the delta lands in the shared matrix, so the head moves too) nor for ``tokens-dict``
  (separate ``lm_head`` rows): see :data:`PEFT_TIED_MERGE_MISMATCH`. A correct merge unties instead.
- Vision-only variants leave text-only logits unchanged: compare with :func:`mm_inputs` (image inputs).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PretrainedConfig

__all__ = [
    "FAMILIES",
    "ALL_FAMILIES",
    "MOE_FAMILY",
    "MOE_EXPERTS",
    "hub_layout_base",
    "VOCAB",
    "Base",
    "tiny_config",
    "build_model",
    "save_base",
    "TinyQwenVL",
    "QWenConfig",
    "save_qwen_vl_base",
    "load_qwen_vl",
    "to_legacy_key",
    "make_adapter",
    "make_dump",
    "rewrite_adapter",
    "make_clean_dump",
    "text_inputs",
    "mm_inputs",
    "logits",
    "ADAPTER_VARIANTS",
    "affects_text_logits",
    "PEFT_TIED_MERGE_MISMATCH",
]

FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")  # transformers classes
ALL_FAMILIES = FAMILIES + ("qwen-vl",)  # + the v1 module tree
# Qwen3-VL-MoE: 4 experts of moe_intermediate 24 (gate_up (4, 48, 64), down (4, 64, 24): no square shape, so
# a transposed tensor cannot pass for the right one). Not in FAMILIES: the dense-model catalogue stays as is.
MOE_FAMILY = "qwen3-vl-moe"
MOE_EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
VOCAB = 256
_IDS = dict(image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253)


class Base(NamedTuple):
    """What the session fixtures hand out: the in-memory model and its saved HF dir."""

    model: nn.Module
    path: Path


def tiny_config(family: str, tied: bool = False):
    """A real transformers config: text 64 wide, 2 layers, 4/2 heads, vocab 256; vision depth 2."""
    text = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=512,
        tie_word_embeddings=tied,
    )
    if family == "qwen2-vl":
        from transformers import Qwen2VLConfig

        text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 2, 4]}
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied, **_IDS)
    if family == "qwen2.5-vl":
        from transformers import Qwen2_5_VLConfig

        text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 2, 4]}
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, num_heads=4, intermediate_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied, **_IDS)
    if family == "qwen3-vl":
        from transformers import Qwen3VLConfig

        text.update(head_dim=16, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, num_heads=4, intermediate_size=64, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[1])
        return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied, **_IDS)
    if family == MOE_FAMILY:
        from transformers import Qwen3VLMoeConfig

        text.update(head_dim=16, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
                    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=1, mlp_only_layers=[])
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, num_heads=4, intermediate_size=64, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[1])
        return Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied, **_IDS)
    raise ValueError(f"unknown family {family!r} (one of {FAMILIES + (MOE_FAMILY,)}; 'qwen-vl' has no transformers config)")


def _perturb(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Noise on every tensor (norms and biases too), so a merge that skips anything shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # shared (tied) parameters are visited once
            p.add_(torch.randn(p.shape, generator=g) * std)


def build_model(family: str, tied: bool = False, seed: int = 0) -> nn.Module:
    """A real ``*ForConditionalGeneration`` (fp32, eval) or the v1 tree for ``family="qwen-vl"``."""
    if family == "qwen-vl" and tied:
        raise ValueError("Qwen-VL v1 is untied")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "qwen-vl":
            model = TinyQwenVL()
        else:
            from transformers import AutoModelForImageTextToText

            model = AutoModelForImageTextToText.from_config(tiny_config(family, tied))
    _perturb(model, seed + 100)
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.float().eval()


def save_base(model: nn.Module, path: str | Path, dtype: torch.dtype | None = None,
              max_shard_size: str | None = None, keep_tied_head: bool = False) -> Path:
    """An HF model dir plus non-weight files a merge must carry over.

    transformers 5 writes Qwen2/2.5-VL in the legacy hub layout (``model.layers.*``, ``model.embed_tokens``,
    ``visual.*``, ``lm_head``) and Qwen3-VL in the new one (``model.language_model.*``, ``model.visual.*``);
    tests/test_factories.py checks that. A tied model's file has no ``lm_head.weight`` unless
    ``keep_tied_head`` (single file only) adds it, as the real Qwen3-VL-2B file does.
    Extra files: ``generation_config.json`` (from transformers), ``chat_template.jinja``, ``tokenizer_config.json``.
    """
    path = Path(path)
    if isinstance(model, TinyQwenVL):
        return save_qwen_vl_base(model, path, dtype=dtype)
    m = model if dtype is None else copy.deepcopy(model).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    m.save_pretrained(path, **kwargs)
    (path / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    if keep_tied_head:
        f = path / "model.safetensors"
        sd = load_file(str(f))
        emb = next(v for k, v in sd.items() if k.endswith("embed_tokens.weight"))
        sd.setdefault("lm_head.weight", emb.clone())
        save_file(sd, str(f), metadata={"format": "pt"})
    return path


def hub_layout_base(path: str | Path) -> Path:
    """Rewrite a saved Qwen3-VL-MoE dir to the hub files' expert layout: ``(E, in, out)``, the transpose of
    memory, as the published Qwen3-VL-30B-A3B / 235B-A22B files store them (transformers 5 saves memory
    layout and transposes hub files on load)."""
    f = Path(path) / "model.safetensors"
    sd = load_file(str(f))
    sd = {k: (v.transpose(1, 2).contiguous() if k.endswith(tuple(MOE_EXPERTS)) else v) for k, v in sd.items()}
    save_file(sd, str(f), metadata={"format": "pt"})
    return Path(path)


# ---------------------------------------------------------------------------------------------------------
# Qwen-VL v1: the remote-code module tree, names exactly as in QWenLMHeadModel
class QWenConfig(PretrainedConfig):
    """Stand-in for the remote ``QWenConfig``; PEFT reads ``tie_word_embeddings`` from it."""

    model_type = "qwen"


class _Attn(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)  # fused qkv, with bias (as upstream)
        self.c_proj = nn.Linear(d, d, bias=False)  # no_bias=True upstream

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
        self.ln_1, self.ln_2 = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)  # RMSNorm upstream: weight only
        self.attn, self.mlp = _Attn(d, heads), _MLP(d, ff)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _VisionBlock(nn.Module):
    def __init__(self, w: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(w, eps=1e-6), nn.LayerNorm(w, eps=1e-6)
        self.attn = nn.Module()
        self.attn.in_proj, self.attn.out_proj = nn.Linear(w, 3 * w), nn.Linear(w, w)
        self.mlp = nn.Module()
        self.mlp.c_fc, self.mlp.c_proj = nn.Linear(w, 2 * w), nn.Linear(2 * w, w)


class _AttnPool(nn.Module):
    def __init__(self, w: int, d: int, queries: int = 4):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(queries, d))
        self.pos_embed = nn.Parameter(torch.zeros(queries, d))
        self.kv_proj = nn.Linear(w, d, bias=False)
        self.attn = nn.MultiheadAttention(d, 4)
        self.ln_q, self.ln_kv = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)


class _Visual(nn.Module):
    def __init__(self, w: int, d: int, layers: int, grid: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, kernel_size=14, stride=14, bias=False)
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid, w))
        self.ln_pre = nn.LayerNorm(w, eps=1e-6)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([_VisionBlock(w) for _ in range(layers)])
        self.attn_pool = _AttnPool(w, d)
        self.ln_post = nn.LayerNorm(d, eps=1e-6)
        self.proj = nn.Parameter(torch.zeros(d, d))


class _Transformer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        d, v = c["hidden_size"], c["visual"]
        self.wte = nn.Embedding(c["vocab_size"], d)
        self.h = nn.ModuleList([_Block(d, c["num_attention_heads"], c["intermediate_size"] // 2)
                                for _ in range(c["num_hidden_layers"])])
        self.ln_f = nn.RMSNorm(d, eps=1e-6)
        self.visual = _Visual(v["width"], v["output_dim"], v["layers"], v["image_size"] // v["patch_size"])


class TinyQwenVL(nn.Module):
    """QWenLMHeadModel's names and text path; the vision tower exists for its keys, not its forward.

    PEFT wraps it as is (``get_input_embeddings`` lets list-form ``trainable_token_indices`` find ``wte``);
    ``config`` is a PretrainedConfig with ``tie_word_embeddings=False`` like the remote one.
    """

    CONFIG = {
        "model_type": "qwen", "architectures": ["QWenLMHeadModel"], "vocab_size": VOCAB, "hidden_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256, "kv_channels": 16,
        "layer_norm_epsilon": 1e-6, "no_bias": True, "tie_word_embeddings": False,
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "visual": {"width": 32, "layers": 2, "heads": 4, "output_dim": 64, "image_size": 56, "patch_size": 14,
                   "mlp_ratio": 2.0, "image_start_id": 250},
    }

    def __init__(self):
        super().__init__()
        self.config = QWenConfig(**{k: v for k, v in self.CONFIG.items() if k != "model_type"})
        self.transformer = _Transformer(self.CONFIG)
        self.lm_head = nn.Linear(self.CONFIG["hidden_size"], VOCAB, bias=False)
        self.transformer.visual.attn_pool.pos_embed.requires_grad_(False)  # fixed sin-cos upstream

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


def save_qwen_vl_base(model: TinyQwenVL, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """config.json (model_type qwen, untied) + model.safetensors with v1 keys + remote-code placeholder files."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(TinyQwenVL.CONFIG, dtype=str(dtype or torch.float32).removeprefix("torch."))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 8, "eos_token_id": 2}))
    (path / "modeling_qwen.py").write_text("# remote code placeholder: merges must copy it\n")
    (path / "qwen.tiktoken").write_text("IQ== 0\n")  # tokenizer file upstream; merges must copy it
    sd = {k: v.detach().to(dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def load_qwen_vl(path: str | Path) -> TinyQwenVL:
    """The v1 tree with weights from a dir written by :func:`save_qwen_vl_base` (or a merge of one)."""
    model = TinyQwenVL()
    model.load_state_dict({k: v.float() for k, v in load_file(str(Path(path) / "model.safetensors")).items()})
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
def to_legacy_key(key: str) -> str:
    """Pre-4.52 transformers naming of a PEFT key (what older adapters on disk look like)."""
    return key.replace("base_model.model.model.language_model.", "base_model.model.model.").replace(
        "base_model.model.model.visual.", "base_model.model.visual."
    )


def make_adapter(model: nn.Module, lora_config: LoraConfig, path: str | Path | None = None, seed: int = 1,
                 legacy: bool = False):
    """``get_peft_model`` on a copy, every trainable tensor perturbed (simulated training), optionally saved.

    Returns ``(peft_model, path)`` (path None when not saved). ``legacy=True`` rewrites the saved keys to the
    pre-4.52 layout (``model.language_model.`` -> ``model.``, ``model.visual.`` -> ``visual.``).
    """
    with torch.random.fork_rng(devices=[]):  # PEFT's own init (kaiming lora_A) draws from the global RNG
        torch.manual_seed(seed)
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


def rewrite_adapter(src: str | Path, dst: str | Path, fn: Callable[[dict], dict]) -> Path:
    """Copy an adapter dir and edit its tensors with ``fn(dict) -> dict`` (to build broken cases)."""
    import shutil

    dst = Path(dst)
    shutil.copytree(src, dst)
    f = dst / "adapter_model.safetensors"
    save_file({k: v.contiguous() for k, v in fn(load_file(str(f))).items()}, str(f), metadata={"format": "pt"})
    return dst


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
    """One key per trainable tensor, PEFT in-memory names (``...lora_A.default.weight``)."""
    torch.save({n: p.detach().cpu().clone() for n, p in peft_model.named_parameters() if p.requires_grad}, path)
    return Path(path)


def small_merge_chunks(monkeypatch, counted: str | None = None) -> dict[str, int]:
    """Make the streaming merge use 64-row-sized chunks (several per tiny weight) and, with ``counted``, count
    the calls of that ``merge_rows`` function: ``{"n": calls}`` (it proves which path a merge took)."""
    import qvl_plugin.ckpt.merge as merge_module
    from qvl_plugin.ckpt import merge_rows

    monkeypatch.setattr(merge_module, "CHUNK_ELEMENTS", 64 * 64)
    calls = {"n": 0}
    if counted is not None:
        real = getattr(merge_rows, counted)

        def counting(*a, **k):
            calls["n"] += 1
            return real(*a, **k)

        monkeypatch.setattr(merge_rows, counted, counting)
    return calls


def text_inputs(vocab: int = VOCAB, batch: int = 2, seq: int = 8, seed: int = 0) -> dict:
    """Text-only ``input_ids``/``attention_mask`` (ids in [3, 240): no special or vision tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(vocab, 240), (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def mm_inputs(family: str, batch: int = 2, seed: int = 0) -> dict:
    """Inputs with one 4x4-patch image per row, so vision-tower weights reach the logits.

    Keys: input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids (transformers 5 needs
    the last for M-RoPE when images are passed).
    """
    vc = tiny_config(family).vision_config
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor([[1, 4, 4]] * batch)
    n = int(grid[0].prod())
    pixel_values = torch.randn(batch * n, 3 * vc.temporal_patch_size * vc.patch_size ** 2, generator=g)
    image = [_IDS["vision_start_token_id"]] + [_IDS["image_token_id"]] * (n // vc.spatial_merge_size ** 2) + [_IDS["vision_end_token_id"]]
    rows = [torch.randint(3, 240, (2,), generator=g).tolist() + image + torch.randint(3, 240, (3,), generator=g).tolist()
            for _ in range(batch)]
    ids = torch.tensor(rows)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixel_values,
            "image_grid_thw": grid, "mm_token_type_ids": (ids == _IDS["image_token_id"]).long()}


@torch.no_grad()
def logits(model: nn.Module, inputs: dict | None = None) -> torch.Tensor:
    """fp32 logits without grad (default inputs: :func:`text_inputs`)."""
    inputs = inputs or text_inputs()
    return model(**inputs).logits.float()


# ---------------------------------------------------------------------------------------------------------
# Adapter catalogue: name -> (family -> LoraConfig). Same names for every family, incl. "qwen-vl".
_QV = ["q_proj", "v_proj"]
_LANG_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
_V1_OFFICIAL = ["c_attn", "attn.c_proj", "w1", "w2"]  # Qwen-VL finetune.py


def _v1(fam: str) -> bool:
    return fam == "qwen-vl"


ADAPTER_VARIANTS: dict[str, Callable[[str], LoraConfig]] = {
    "qv": lambda fam: LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"] if _v1(fam) else _QV),
    "linear-embed-head": lambda fam: LoraConfig(
        r=4, lora_alpha=8, target_modules=_V1_OFFICIAL if _v1(fam) else _LANG_LINEAR,
        modules_to_save=["wte" if _v1(fam) else "embed_tokens", "lm_head"]),
    "rslora-patterns": lambda fam: LoraConfig(
        r=4, lora_alpha=16, use_rslora=True, modules_to_save=["lm_head"],
        target_modules=["c_attn", "attn.c_proj", "w1"] if _v1(fam) else ["q_proj", "v_proj", "o_proj"],
        rank_pattern={"c_attn": 8, r"h\.1\.mlp\.w1": 2} if _v1(fam) else {"q_proj": 8, r"layers\.1\.self_attn\.v_proj": 2},
        alpha_pattern={"attn.c_proj": 32} if _v1(fam) else {"o_proj": 32},
    ),
    "dora": lambda fam: LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn"] if _v1(fam) else _QV),
    "embedding-lora": lambda fam: LoraConfig(r=4, lora_alpha=8, target_modules=["wte", "c_attn"] if _v1(fam) else ["embed_tokens", "q_proj"]),
    "conv-lora": lambda fam: LoraConfig(
        r=2, lora_alpha=4, target_modules=r"transformer\.visual\.conv1" if _v1(fam) else r"model\.visual\.patch_embed\.proj"),
    "lora-bias": lambda fam: LoraConfig(
        r=4, lora_alpha=8, lora_bias=True,
        target_modules=["c_attn"] if _v1(fam) else r"model\.visual\.blocks\.\d+\.attn\.qkv" if fam == "qwen3-vl" else _QV),
    "bias-all": lambda fam: LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "w1"] if _v1(fam) else _QV, bias="all"),
    "tokens": lambda fam: LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"] if _v1(fam) else _QV, trainable_token_indices=[3, 5, 7]),
    "tokens-dict": lambda fam: LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"] if _v1(fam) else _QV,
        trainable_token_indices={"wte" if _v1(fam) else "embed_tokens": [3, 5], "lm_head": [7]}),
    "vision-full-path": lambda fam: LoraConfig(
        r=4, lora_alpha=8,
        target_modules=r"transformer\.visual\.transformer\.resblocks\.\d+\.attn\.(in_proj|out_proj)" if _v1(fam)
        else r"model\.visual\.blocks\.\d+\.attn\.(qkv|proj)"),
}

#: (variant, tied) pairs where PEFT's merge_and_unload differs from the PeftModel forward (PEFT, not us).
PEFT_TIED_MERGE_MISMATCH = frozenset({("embedding-lora", True), ("tokens-dict", True)})


def affects_text_logits(variant: str, family: str) -> bool:
    """False when the variant only touches the vision tower (use :func:`mm_inputs`; v1's tree has no vision forward)."""
    vision_only = {"conv-lora", "vision-full-path"} | ({"lora-bias"} if family == "qwen3-vl" else set())
    return variant not in vision_only
