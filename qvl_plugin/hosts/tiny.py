"""The embedded tiny Qwen2-VL: config and processor files shipped in the package (``hosts/tiny/``, made by
``tools/make_tiny_assets.py``), weights initialised from a seed. Nothing touches the network."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["TINY_DIR", "tiny_dir", "build_tiny_model", "load_config", "config_for_transformers4", "load_processor", "save_base"]

TINY_DIR = "tiny"


def tiny_dir() -> Path:
    """The directory with the tiny model's ``config.json``, tokenizer, image-processor config."""
    return Path(str(resources.files("qvl_plugin.hosts").joinpath(TINY_DIR)))


def build_tiny_model(seed: int = 0, config_dir: str | Path | None = None):
    """A real ``Qwen2VLForConditionalGeneration`` from the shipped config, randomly initialised from ``seed``
    (identical on every process). fp32, eval-mode-free (the caller decides)."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    config = load_config(config_dir)
    gen = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config)
    finally:
        torch.random.set_rng_state(gen)
    return model.float()


def load_config(config_dir: str | Path | None = None):
    """The model config of ``config_dir`` (default: the tiny one). The shipped file is written by transformers 5;
    on 4.x its 5.x names are read as 4.x names (see :func:`config_for_transformers4`)."""
    from transformers import AutoConfig

    from ..compat import version_at_least

    path = Path(str(config_dir or tiny_dir()))
    if version_at_least("transformers", 5):
        return AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    raw = config_for_transformers4(json.loads((path / "config.json").read_text()))
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


def config_for_transformers4(raw: dict[str, Any]) -> dict[str, Any]:
    """A transformers 5 Qwen2-VL ``config.json`` dict as transformers 4.52-4.57 need it. 4.x does not know
    ``rope_parameters`` (M-RoPE then fails in the first forward: ``rope_scaling`` is None), takes the tie from
    ``text_config`` and computes the loss with a top-level ``vocab_size``. 4.x-style keys already there win."""
    raw = json.loads(json.dumps(raw))
    text = raw.get("text_config")
    if isinstance(text, dict):
        rope = text.pop("rope_parameters", None)
        if isinstance(rope, dict):
            if "mrope_section" in rope and text.get("rope_scaling") is None:
                text["rope_scaling"] = {"type": "mrope", "mrope_section": list(rope["mrope_section"])}
            if "rope_theta" in rope:
                text.setdefault("rope_theta", rope["rope_theta"])
        if "tie_word_embeddings" in raw:
            text.setdefault("tie_word_embeddings", raw["tie_word_embeddings"])
        if "vocab_size" in text:
            raw.setdefault("vocab_size", text["vocab_size"])
    return raw


def _processor_class():
    from transformers import Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        """The real ``Qwen2VLProcessor`` minus the video processor: transformers 5 type-checks every
        sub-processor, and the video one needs torchvision. Images and text go through the stock code."""

        def __init__(self, image_processor=None, tokenizer=None, video_processor=None, chat_template=None, **kwargs):
            if video_processor is None and "video_processor" in getattr(self, "attributes", ()):
                # transformers 4.x type-checks every name in the class's `attributes` inside ProcessorMixin.__init__
                # (no per-argument hook): leave the video processor out of this instance's list.
                self.attributes = [a for a in self.attributes if a != "video_processor"]
            super().__init__(image_processor, tokenizer, video_processor, chat_template=chat_template, **kwargs)

        def check_argument_for_proper_class(self, argument_name: str, argument: Any):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyQwen2VLProcessor


def load_processor(model_dir: str | Path | None = None, trust_remote_code: bool = False):
    """A Qwen2-VL processor for a local model dir (default: the tiny one), offline.

    Uses ``AutoProcessor`` when it works (torchvision installed, full processor files); otherwise the stock
    tokenizer + the PIL ``Qwen2VLImageProcessorPil`` joined without a video processor. A model dir's own
    code runs only with ``trust_remote_code=True``; otherwise transformers is told no (it never prompts)."""
    from transformers import AutoTokenizer

    try:
        from transformers import Qwen2VLImageProcessorPil
    except ImportError:  # transformers 4.x: the plain image processor is the PIL/numpy one
        from transformers import Qwen2VLImageProcessor as Qwen2VLImageProcessorPil

    path = str(model_dir or tiny_dir())
    if model_dir is not None:
        try:
            from transformers import AutoProcessor

            return AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        except Exception:  # noqa: BLE001 - fall back to the torchvision-free assembly below
            pass
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
    return _processor_class()(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=tokenizer.chat_template,
    )


def save_base(model, processor, out: str | Path) -> Path:
    """Write ``model`` (the untrained base) and its processor files as a plain HF model dir, so a merge and
    an audit have a base to work from."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.tokenizer.save_pretrained(out)
    processor.image_processor.save_pretrained(out)
    return out
