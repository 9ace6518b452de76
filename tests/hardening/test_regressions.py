"""Regressions for bugs the hardening work found outside the readers (degenerate LoRA shapes, rank 0,
hostile pattern regexes, rich markup in file strings, FIFO configs): each one fixed, each kept failing-able."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from qvl_plugin.ckpt.inspect import summarize
from qvl_plugin.ckpt.view import open_checkpoint
from qvl_plugin.errors import AdapterConfigError, CheckpointError


try:
    from .hardening_util import assert_one_line_error, cli
    from .fuzzlib import valid_st, write_st
except ImportError:  # tests/hardening is not a package
    from hardening_util import assert_one_line_error, cli
    from fuzzlib import valid_st, write_st


def _finishes(code: str, what: str, timeout: float = 60) -> None:
    """Run ``code`` in a fresh interpreter (a hang there cannot take the test run with it): it must end,
    with a result or a QvlError, within ``timeout`` (a cold import of torch alone can take several seconds)."""
    body = "from qvl_plugin.ckpt.view import open_checkpoint\nfrom qvl_plugin.errors import QvlError\ntry:\n"
    body += textwrap.indent(textwrap.dedent(code).strip(), "    ") + "\nexcept QvlError:\n    pass\n"
    try:
        subprocess.run([sys.executable, "-c", body], timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{what}: still running after {timeout} s (hang)")


def _adapter(tmp_path, cfg: dict, specs=(("base_model.model.m.q_proj.lora_A.weight", "F32", [2, 4]),)):
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    write_st(d / "adapter_model.safetensors", *valid_st(list(specs)))
    return d


@pytest.mark.parametrize("key,shape", [("m.lora_A.weight", ()), ("m.lora_embedding_A", ())])
def test_degenerate_lora_shapes_are_checkpoint_errors(tmp_path, key, shape):
    torch.save({key: torch.zeros(shape)}, tmp_path / "d.pth")
    with pytest.raises(CheckpointError):
        with open_checkpoint(tmp_path / "d.pth", lora_alpha=8) as c:
            summarize(c)
    assert_one_line_error(cli("inspect", tmp_path / "d.pth", "--lora-alpha", 8))


def test_rank_zero_lora_inspects_and_audits_as_empty(tmp_path):
    """A zero-rank pair is what an ungathered ZeRO-3 save looks like: inspect shows it, audit flags it."""
    from qvl_plugin.ckpt.audit import audit

    torch.save({"m.lora_A.weight": torch.zeros(0, 4), "m.lora_B.weight": torch.zeros(4, 0)}, tmp_path / "d.pth")
    with open_checkpoint(tmp_path / "d.pth", lora_alpha=8) as c:
        assert summarize(c)["lora"] is None
    assert "empty-tensor" in {f.code for f in audit(tmp_path / "d.pth", lora_alpha=8)}


def test_invalid_pattern_regex_is_adapter_config_error(tmp_path):
    d = _adapter(tmp_path, {"r": 2, "lora_alpha": 4, "alpha_pattern": {"(": 8}})
    with pytest.raises(AdapterConfigError, match="not a valid regex"):
        with open_checkpoint(d) as c:
            summarize(c)
    assert_one_line_error(cli("inspect", d), "regex")


def test_redos_pattern_does_not_hang(tmp_path):
    module = "a" * 40
    d = _adapter(tmp_path, {"r": 2, "lora_alpha": 4, "alpha_pattern": {"(a*)*b": 8}},
                 specs=((f"base_model.model.{module}.lora_A.weight", "F32", [2, 4]),))
    _finishes(f"""
        from qvl_plugin.ckpt.inspect import summarize
        with open_checkpoint({str(d)!r}) as c:
            summarize(c)
    """, "inspect of a ReDoS pattern")


def test_rich_markup_in_file_strings_is_printed_literally(tmp_path):
    d = _adapter(tmp_path, {"r": 2, "lora_alpha": 4, "base_model_name_or_path": "org/evil[/bold]"},
                 specs=(("base_model.model.m.q_proj.lora_A.weight", "F32", [2, 4]), ("base_model.model.m.q_proj.lora_B.weight", "F32", [4, 2]),
                        ("base_model.model.x[/red].weight", "F32", [2])))
    res = cli("inspect", d, debug=False)
    assert res.exit_code == 0, res.stderr
    assert "org/evil[/bold]" in res.stdout


def test_adapter_config_fifo_does_not_block(tmp_path):
    fifo = tmp_path / "adapter_config.json"
    os.mkfifo(fifo)
    torch.save({"m.q_proj.lora_A.weight": torch.zeros(2, 4)}, tmp_path / "d.pth")
    _finishes(f"open_checkpoint({str(tmp_path / 'd.pth')!r}, adapter_config={str(fifo)!r})", "a FIFO --adapter-config")
