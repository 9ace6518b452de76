"""Image–caption data for the runner: a synthetic set made on the fly, a local JSON/JSONL reader, and a
collator that trains on the answer only (prompt and padding tokens are masked out of the loss)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import QvlError

__all__ = [
    "COLOURS",
    "SHAPES",
    "SIZES",
    "DEFAULT_PROMPT",
    "SyntheticCaptions",
    "JsonCaptions",
    "QwenVLCollator",
    "caption_corpus",
    "draw_shape",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 30),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
BACKGROUNDS = {"grey": (128, 128, 128), "brown": (110, 75, 45)}
DEFAULT_PROMPT = "Describe the image."


def draw_shape(colour: str, shape: str, size: str, background: str, side: int = 56, seed: int = 0):
    """One PIL image: a coloured shape on a plain background; the position jitters with the seed."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (side, side), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    rng = random.Random(seed)
    half = side * (0.38 if size == "large" else 0.2)
    cx = side / 2 + rng.uniform(-1, 1) * (side / 2 - half - 1)
    cy = side / 2 + rng.uniform(-1, 1) * (side / 2 - half - 1)
    box = (cx - half, cy - half, cx + half, cy + half)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    else:
        w = half / 3
        draw.rectangle((cx - half, cy - w, cx + half, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - half, cx + w, cy + half), fill=fill)
    return img


def _caption(colour: str, shape: str, size: str, background: str) -> str:
    return f"A {size} {colour} {shape} on a {background} background."


def caption_corpus() -> list[str]:
    """Every caption the synthetic set can produce (used to train the tiny tokenizer)."""
    return [
        _caption(c, s, z, b) for c in COLOURS for s in SHAPES for z in SIZES for b in BACKGROUNDS
    ]


class SyntheticCaptions:
    """A map-style dataset of ``{"image": PIL.Image, "text": caption}`` drawn deterministically from ``seed``:
    item i is the same image on every process, so multi-process runs see the same data."""

    def __init__(self, size: int = 64, seed: int = 0, side: int = 56) -> None:
        self.size, self.seed, self.side = size, seed, side
        rng = random.Random(seed)
        self._specs = [
            (rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(SIZES), rng.choice(list(BACKGROUNDS)))
            for _ in range(size)
        ]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, Any]:
        colour, shape, size, background = self._specs[i]
        image = draw_shape(colour, shape, size, background, self.side, seed=self.seed * 100_003 + i)
        return {"image": image, "text": _caption(colour, shape, size, background)}


class JsonCaptions:
    """Local ``{"image": path, "text": caption}`` records from a JSON list or JSONL file; image paths are
    relative to the file. An optional ``"prompt"`` per record overrides the collator's prompt."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise QvlError(f"dataset {self.path}: no such file")
        text = self.path.read_text(encoding="utf-8")
        try:
            if self.path.suffix == ".jsonl":
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                records = json.loads(text)
        except json.JSONDecodeError as e:
            raise QvlError(f"dataset {self.path}: not valid JSON ({e})") from None
        if not isinstance(records, list) or not records:
            raise QvlError(f"dataset {self.path}: expected a non-empty list of {{image, text}} records")
        for n, r in enumerate(records):
            if not isinstance(r, dict) or not isinstance(r.get("image"), str) or not isinstance(r.get("text"), str):
                raise QvlError(f"dataset {self.path}: record {n} needs string fields 'image' and 'text'")
            if not (self.path.parent / r["image"]).is_file():
                raise QvlError(f"dataset {self.path}: record {n}: image {r['image']!r} not found")
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from PIL import Image

        r = self.records[i]
        with Image.open(self.path.parent / r["image"]) as im:
            image = im.convert("RGB")
        out = {"image": image, "text": r["text"]}
        if isinstance(r.get("prompt"), str):
            out["prompt"] = r["prompt"]
        return out


@dataclass
class QwenVLCollator:
    """Builds Qwen chat inputs (one image + prompt as the user turn, the caption as the assistant turn).

    The prompt goes through the processor (which expands ``<|image_pad|>`` to the right number of tokens)
    and the answer through the tokenizer; labels are ``-100`` on the prompt and on padding, so the loss is
    the caption's alone. Right padding with the tokenizer's pad token."""

    processor: Any
    prompt: str = DEFAULT_PROMPT
    max_length: int | None = None

    def _prompt_text(self, prompt: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        tok = self.processor.tokenizer
        end = tok.convert_tokens_to_ids("<|im_end|>")
        ids, labels, pixels, grids, types = [], [], [], [], []
        for ex in examples:
            enc = self.processor(
                text=[self._prompt_text(ex.get("prompt", self.prompt))], images=[ex["image"]], return_tensors="pt"
            )
            prompt_ids = enc["input_ids"][0].tolist()
            answer_ids = tok(ex["text"], add_special_tokens=False)["input_ids"] + [end]
            seq = prompt_ids + answer_ids
            lab = [-100] * len(prompt_ids) + answer_ids
            if self.max_length is not None:
                seq, lab = seq[: self.max_length], lab[: self.max_length]
            ids.append(seq)
            labels.append(lab)
            if "mm_token_type_ids" in enc:  # transformers >= 5: M-RoPE needs the per-token modality
                types.append(list(enc["mm_token_type_ids"][0].tolist()) + [0] * len(answer_ids))
            pixels.append(enc["pixel_values"])
            grids.append(enc["image_grid_thw"])
        width = max(len(s) for s in ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        label_t = torch.full((len(ids), width), -100, dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        for i, (s, lab) in enumerate(zip(ids, labels)):
            input_ids[i, : len(s)] = torch.tensor(s)
            label_t[i, : len(lab)] = torch.tensor(lab)
            attention[i, : len(s)] = 1
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": label_t,
            "pixel_values": torch.cat(pixels, dim=0),
            "image_grid_thw": torch.cat(grids, dim=0),
        }
        if types:
            mm = torch.zeros((len(ids), width), dtype=torch.long)
            for i, t in enumerate(types):
                t = t[: len(ids[i])]
                mm[i, : len(t)] = torch.tensor(t)
            batch["mm_token_type_ids"] = mm
        return batch
