"""Generate the tiny Qwen2-VL assets shipped in ``qvl_plugin/hosts/tiny/`` (run once, output committed).

A real ``Qwen2Tokenizer`` (byte-level BPE, Qwen's pre-tokenizer regex and chat special tokens) trained
locally on the synthetic captions, the real ``Qwen2VLImageProcessorPil`` with small min/max pixels, the
Qwen2-VL chat template, and a ``config.json`` for a ~64-wide, 2-layer Qwen2-VL with tied embeddings (like
the 2B size). No network: nothing is downloaded.

    python tools/make_tiny_assets.py [OUT_DIR]      # default: qvl_plugin/hosts/tiny
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
VOCAB_SIZE = 384  # trained tokenizer size (256 bytes + specials + merges)
MODEL_VOCAB = 512  # embedding rows: padded past the tokenizer, like the real checkpoints
SIDE = 56  # images are 56x56 -> 4x4 patches of 14 -> 4 tokens after the 2x2 merge

CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from qvl_plugin.hosts.data import DEFAULT_PROMPT, caption_corpus

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = caption_corpus() + [
        "system\nYou are a helpful assistant.",
        "user\n" + DEFAULT_PROMPT,
        "assistant\n",
        "What colour is the shape? What shape is it? Is it small or large?",
    ]
    bpe.train_from_iterator(corpus * 4, trainer=trainer)
    data = json.loads(bpe.to_str())
    vocab = data["model"]["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in data["model"]["merges"]]
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
        model_max_length=4096,
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIAL})
    return tok


def build_image_processor():
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=SIDE * SIDE, max_pixels=SIDE * SIDE)


def build_config(tokenizer):
    from transformers import Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=MODEL_VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
        architectures=["Qwen2VLForConditionalGeneration"],
    )


def _readable_by_transformers_4(path: Path) -> None:
    """transformers 5 saves the special-token list as ``extra_special_tokens``, which 4.x cannot read (the
    floor venv loads these files too); ``additional_special_tokens`` means the same to both."""
    cfg = json.loads(path.read_text())
    if isinstance(cfg.get("extra_special_tokens"), list):
        cfg["additional_special_tokens"] = cfg.pop("extra_special_tokens")
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    _readable_by_transformers_4(out / "tokenizer_config.json")
    build_image_processor().save_pretrained(out)
    build_config(tok).save_pretrained(out)
    print(f"wrote {sorted(p.name for p in out.iterdir())} (tokenizer {len(tok)} tokens, model vocab {MODEL_VOCAB})")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "qvl_plugin" / "hosts" / "tiny")
