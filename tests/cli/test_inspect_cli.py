"""`qvl-ckpt inspect` as a user sees it: JSON contract, rich output, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig

from qvl_plugin.cli import main
from tests.factories import make_adapter, make_dump


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_inspect_adapter_and_dump(qwen2_vl_tied_base, tmp_path):
    model, base = qwen2_vl_tied_base
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"])
    peft_model, path = make_adapter(model, cfg, tmp_path / "a")
    make_dump(peft_model, tmp_path / "dump.pth")

    res = run("inspect", path, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["format"] == "peft" and info["lora"]["rank"] == 4

    res = run("inspect", tmp_path / "dump.pth", "--json", "--lora-alpha", 8)
    dump = json.loads(res.stdout)
    assert dump["format"] == "pth" and dump["lora"]["alpha"] == 8.0 and dump["lora"]["scaling"] == 2.0
    assert "duplicate-key" in {f["code"] for f in dump["findings"]}

    res = run("inspect", tmp_path / "dump.pth")
    assert res.exit_code == 0 and "duplicate-key" in res.stdout and "modules_to_save" in res.stdout

    res = run("inspect", base)
    assert res.exit_code == 0 and "vision tower" in res.stdout and "merger" in res.stdout


@pytest.mark.parametrize("make", ["missing", "text", "truncated", "empty-dir"])
def test_bad_input_is_one_line_exit_1(tmp_path, make):
    target = tmp_path / "x.pth"
    if make == "text":
        target.write_text("hello")
    elif make == "truncated":
        torch.save({"w": torch.ones(100, 100)}, target)
        target.write_bytes(target.read_bytes()[:2000])
    elif make == "empty-dir":
        target = tmp_path / "d"
        target.mkdir()
    res = run("inspect", target)
    if make == "missing":  # a mistyped path is a usage error, as for every command (exit 2, the reason named)
        assert res.exit_code == 2 and "no such file or directory" in res.stderr and res.stdout == ""
        return
    assert res.exit_code == 1
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in res.stderr


def test_pickle_payload_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    torch.save({"w": torch.ones(2), "x": Payload()}, tmp_path / "evil.pth")
    res = run("inspect", tmp_path / "evil.pth")
    assert res.exit_code == 1 and "refused" in res.stderr
    assert not marker.exists()
