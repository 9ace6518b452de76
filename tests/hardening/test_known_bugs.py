"""Bugs found by the hardening work in files hardening does not own. Each is strict-xfail: it flips to a
failure once fixed, so the marker gets removed (the fuzz skips of ``fuzzlib.KNOWN_BUGS`` disable
themselves at the same time). Fix descriptions are in each ``reason``.
"""

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
from qvl_plugin.errors import CheckpointError, QvlError


try:
    from .hardening_util import assert_one_line_error, cli
    from .fuzzlib import valid_st, write_st
except ImportError:  # tests/hardening is not a package
    from hardening_util import assert_one_line_error, cli
    from fuzzlib import valid_st, write_st


def _adapter(tmp_path, cfg: dict, specs=(("base_model.model.m.q_proj.lora_A.weight", "F32", [2, 4]),)):
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    write_st(d / "adapter_model.safetensors", *valid_st(list(specs)))
    return d


@pytest.mark.xfail(strict=True, raises=(IndexError, AssertionError), reason=(
    "view.py/inspect.py: a LoRA tensor with the wrong number of dims (0-d lora_A, 1-d lora_embedding_A) crashes "
    "lora_summary with IndexError (e.shape[0]). Fix: in view._build, refuse LORA_A/LORA_B/EMB_A/EMB_B entries "
    "whose ndim is not 2 (4/5 for conv LoRA) and MAGNITUDE entries that are not 1-D/2-D with CheckpointError "
    "naming the key."))
@pytest.mark.parametrize("key,shape", [("m.lora_A.weight", ()), ("m.lora_embedding_A", ())])
def test_degenerate_lora_shapes_are_checkpoint_errors(tmp_path, key, shape):
    torch.save({key: torch.zeros(shape)}, tmp_path / "d.pth")
    with pytest.raises(CheckpointError):
        with open_checkpoint(tmp_path / "d.pth", lora_alpha=8) as c:
            summarize(c)
    assert_one_line_error(cli("inspect", tmp_path / "d.pth", "--lora-alpha", 8))


@pytest.mark.xfail(strict=True, raises=ZeroDivisionError, reason=(
    "adapter_config.AdapterSettings.scaling divides by rank; a rank-0 LoRA (lora_A shape (0, n)) gives "
    "ZeroDivisionError in inspect/merge. Fix: view._build refuses LoRA A/B entries with a zero rank dim "
    "(CheckpointError 'rank 0'), and scaling() raises AdapterConfigError for rank <= 0."))
def test_rank_zero_lora_is_a_checkpoint_error(tmp_path):
    torch.save({"m.lora_A.weight": torch.zeros(0, 4), "m.lora_B.weight": torch.zeros(4, 0)}, tmp_path / "d.pth")
    with pytest.raises(CheckpointError):
        with open_checkpoint(tmp_path / "d.pth", lora_alpha=8) as c:
            summarize(c)


@pytest.mark.xfail(strict=True, raises=Exception, reason=(
    "adapter_config.py: alpha_pattern/rank_pattern keys are regexes (PEFT get_pattern_key uses re.match) but are "
    "never compiled at load, so '(' raises re.error during inspect/merge. Fix: in AdapterSettings.from_dict, "
    "re.compile(rf'(.*\\.)?({key})$') every pattern key and raise AdapterConfigError('alpha_pattern key ... is "
    "not a valid regex') on re.error."))
def test_invalid_pattern_regex_is_adapter_config_error(tmp_path):
    d = _adapter(tmp_path, {"r": 2, "lora_alpha": 4, "alpha_pattern": {"(": 8}})
    try:
        with open_checkpoint(d) as c:
            summarize(c)
    except QvlError:
        return
    raise AssertionError("accepted an invalid regex")


@pytest.mark.xfail(strict=True, reason=(
    "adapter_config.py: a hostile alpha_pattern key with nested quantifiers ('(a*)*b') backtracks "
    "exponentially against a long module name, so inspect hangs (PEFT shares the flaw). Fix: in from_dict, "
    "refuse pattern keys with a quantified group containing a quantifier (e.g. re.search(r'\\([^)]*[*+}][^)]*\\)[*+{?]', "
    "key)) with AdapterConfigError, or match literal keys (no regex metacharacters) with endswith and only "
    "allow simple regexes."))
def test_redos_pattern_does_not_hang(tmp_path):
    module = "a" * 40
    d = _adapter(tmp_path, {"r": 2, "lora_alpha": 4, "alpha_pattern": {"(a*)*b": 8}},
                 specs=((f"base_model.model.{module}.lora_A.weight", "F32", [2, 4]),))
    code = textwrap.dedent(f"""
        from qvl_plugin.ckpt.view import open_checkpoint
        from qvl_plugin.ckpt.inspect import summarize
        from qvl_plugin.errors import QvlError
        try:
            with open_checkpoint({str(d)!r}) as c:
                summarize(c)
        except QvlError:
            pass
    """)
    try:
        subprocess.run([sys.executable, "-c", code], timeout=3, check=True)
    except subprocess.TimeoutExpired:
        raise AssertionError("inspect still running after 3 s")


@pytest.mark.xfail(strict=True, reason=(
    "cli/inspect.py _render passes file-controlled strings (base_model_name_or_path, module names, path) to "
    "console.print with markup on: '[/bold]' raises rich MarkupError -> 'error: MarkupError: ...' exit 1, and "
    "'[red]' silently restyles. Fix: rich.markup.escape() every value taken from a file or path "
    "(or build rich.text.Text objects)."))
def test_rich_markup_in_file_strings_is_printed_literally(tmp_path):
    d = _adapter(tmp_path, {"r": 2, "lora_alpha": 4, "base_model_name_or_path": "org/evil[/bold]"},
                 specs=(("base_model.model.m.q_proj.lora_A.weight", "F32", [2, 4]), ("base_model.model.m.q_proj.lora_B.weight", "F32", [4, 2]),
                        ("base_model.model.x[/red].weight", "F32", [2])))
    res = cli("inspect", d, debug=False)
    assert res.exit_code == 0, res.stderr
    assert "org/evil[/bold]" in res.stdout


@pytest.mark.xfail(strict=True, reason=(
    "adapter_config.load_adapter_config reads --adapter-config with Path.read_text: a FIFO blocks forever and "
    "/dev/zero reads until memory runs out. Fix: read it through qvl_plugin.ckpt.safety.read_json (regular file "
    "check + 64 MB cap) and wrap its CheckpointError as AdapterConfigError."))
def test_adapter_config_fifo_does_not_block(tmp_path):
    fifo = tmp_path / "adapter_config.json"
    os.mkfifo(fifo)
    torch.save({"m.q_proj.lora_A.weight": torch.zeros(2, 4)}, tmp_path / "d.pth")
    code = textwrap.dedent(f"""
        from qvl_plugin.ckpt.view import open_checkpoint
        from qvl_plugin.errors import QvlError
        try:
            open_checkpoint({str(tmp_path / 'd.pth')!r}, adapter_config={str(fifo)!r})
        except QvlError:
            pass
    """)
    try:
        subprocess.run([sys.executable, "-c", code], timeout=3, check=True)
    except subprocess.TimeoutExpired:
        raise AssertionError("blocked on a FIFO --adapter-config")
