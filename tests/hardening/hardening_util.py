"""Shared helpers for the hardening tests: run the CLI and check the one-line error contract.

(Not conftest.py: other test dirs have one too, and `from conftest import` would be ambiguous.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner, Result

from qvl_plugin.cli import main

# The generic catch in QvlGroup prints "error: SomeError: ..."; a QvlError never starts like that.
_GENERIC = re.compile(r"^error: [A-Z]\w*(Error|Exception|Interrupt): ")


def cli(*args, debug: bool = True) -> Result:
    """Invoke ``qvl-ckpt`` in-process. With QVL_DEBUG=1 a non-QvlError escapes as ``result.exception``."""
    env = {"QVL_DEBUG": "1"} if debug else {"QVL_DEBUG": ""}
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def assert_one_line_error(result: Result, *fragments: str) -> str:
    """Exit 1, exactly one ``error: ...`` line on stderr, no traceback, raised as a QvlError."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"not a QvlError: {type(result.exception).__name__}: {result.exception}") from result.exception
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not _GENERIC.match(lines[0]), f"reached the generic catch: {lines[0]}"
    assert "Traceback" not in result.output
    for frag in fragments:
        assert frag.lower() in lines[0].lower(), (frag, lines[0])
    return lines[0]


def console_script() -> list[str]:
    """The installed ``qvl-ckpt`` (next to this interpreter), else ``python -m``-style fallback."""
    exe = Path(sys.executable).with_name("qvl-ckpt")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("qvl-ckpt")
    if found:
        return [found]
    return [sys.executable, "-c", "from qvl_plugin.cli import main; main()"]


def script_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child run as a user would (no QVL_DEBUG), plus ``extra``."""
    return {k: v for k, v in os.environ.items() if k != "QVL_DEBUG"} | extra


def run_script(*args, cwd=None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``qvl-ckpt ARGS`` in a fresh process, as a user runs it."""
    return subprocess.run([*console_script(), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=script_env())


def assert_script_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert not _GENERIC.match(lines[0]), f"reached the generic catch: {lines[0]}"
    assert "Traceback" not in proc.stderr + proc.stdout
    for frag in fragments:
        assert frag.lower() in lines[0].lower(), (frag, lines[0])
    return lines[0]


# --- a real (tiny-width, big-vocab) Qwen2-VL model and a PEFT adapter for the fault tests -------------

def build_qwen2_vl(out: Path, *, vocab: int = 256, tied: bool = False, max_shard_size: str = "5GB", seed: int = 0):
    """Save a Qwen2-VL model made from config (nothing downloaded). A large ``vocab`` makes it big cheaply:
    embedding + untied head are vocab x 64 fp32 each (~50 MB per 200k rows)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch_mod = __import__("torch")
    torch_mod.manual_seed(seed)
    cfg = Qwen2VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2),
        tie_word_embeddings=tied,
    )
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(out, max_shard_size=max_shard_size)
    return model


def make_lora_adapter(model, out: Path, *, modules_to_save=("lm_head",), seed: int = 1):
    """A real PEFT adapter (non-zero B so the merge changes weights) saved with save_pretrained."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=list(modules_to_save) or None)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(out)
    return peft_model
