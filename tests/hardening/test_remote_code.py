"""No model code ever runs, and transformers never asks: bases whose ``*.py`` files would leave a marker.

Each qvl-ckpt command (and qvl-train) runs as a real process twice: with stdin/stdout on pipes, and at a
terminal (a pty). Both times "y" is already waiting on stdin, so a "Do you wish to run the custom code?
[y/N]" prompt would be answered yes and the marker would appear; the test also checks that no prompt text
reaches the output.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.factories import ADAPTER_VARIANTS, build_model, make_adapter, save_base, save_qwen_vl_base

ROOT = Path(__file__).resolve().parents[2]
PROMPT_WORDS = ("custom code", "[y/N]", "execute the configuration file")

_HOSTILE = """\
import os, pathlib
pathlib.Path({marker!r}).joinpath({name!r} + "-" + os.environ.get("QVL_TEST_COMMAND", "?")).write_text("ran")
from transformers import PretrainedConfig, PreTrainedModel
class {cls}(PretrainedConfig):
    model_type = {model_type!r}
"""


def _plant(base: Path, marker: Path, model_type: str, config_cls: str, model_cls: str) -> None:
    """auto_map in config.json + configuration/modeling files that write ``marker/<file>`` when imported."""
    for name, cls in (("configuration_qwen.py", config_cls), ("modeling_qwen.py", model_cls)):
        (base / name).write_text(_HOSTILE.format(marker=str(marker), name=name, cls=cls, model_type=model_type))
    cfg = json.loads((base / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": f"configuration_qwen.{config_cls}", "AutoModelForCausalLM": f"modeling_qwen.{model_cls}",
                       "AutoModelForImageTextToText": f"modeling_qwen.{model_cls}", "AutoProcessor": f"modeling_qwen.{model_cls}",
                       "AutoTokenizer": [f"modeling_qwen.{model_cls}", None]}
    (base / "config.json").write_text(json.dumps(cfg, indent=2))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """{family: (base, adapter, merged_like)} with hostile remote code planted in each base."""
    root = tmp_path_factory.mktemp("remote-code")
    marker = root / "markers"
    marker.mkdir()
    out = {}
    for family in ("qwen-vl", "qwen2-vl"):
        model = build_model(family)
        base = save_qwen_vl_base(model, root / family / "base") if family == "qwen-vl" else save_base(model, root / family / "base")
        variant = ADAPTER_VARIANTS["qv"](family)
        _, adapter = make_adapter(model, variant, root / family / "adapter")
        if family == "qwen-vl":
            _plant(base, marker, "qwen", "QWenConfig", "QWenLMHeadModel")
        else:
            _plant(base, marker, "qwen2_vl", "EvilConfig", "EvilModel")
        out[family] = (base, adapter)
    return root, marker, out


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("QVL_DEBUG",)}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp / "hf-modules"),
               TRANSFORMERS_VERBOSITY="error")
    return env


def _run_pipes(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    proc = subprocess.run(args, input="y\ny\ny\n", capture_output=True, text=True, timeout=120, env=env, cwd=cwd)
    return proc.returncode, proc.stdout + proc.stderr


def _run_pty(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd, close_fds=True)
    os.close(slave)
    os.write(master, b"y\ny\ny\n")  # typed ahead: a prompt would read it as consent
    chunks = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    else:
        proc.kill()
    os.close(master)
    return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace")


def _commands(family: str, base: Path, adapter: Path, tmp: Path, tag: str) -> dict[str, list[str]]:
    ckpt = [sys.executable, "-c", "from qvl_plugin.cli import main; main()"]
    recipe = "qwen-vl/lora" if family == "qwen-vl" else "qwen2-vl/lora"
    merged = tmp / f"merged-{family}-{tag}"
    cmds = {
        "inspect": [*ckpt, "inspect", str(base)],
        "audit": [*ckpt, "audit", str(adapter), "--base", str(base)],
        "merge": [*ckpt, "merge", str(adapter), "--base", str(base), "-o", str(merged)],
        "diff": [*ckpt, "diff", str(adapter), str(merged), "--base", str(base), "--atol", "1e-4"],
        "convert": [*ckpt, "convert", str(adapter), "--to", "pth", "--base", str(base), "-o", str(tmp / f"{family}-{tag}.pth")],
        "extract": [*ckpt, "extract", str(merged), "--base", str(base), "-o", str(tmp / f"extract-{family}-{tag}"), "--rank", "4"],
        "recipes check": [*ckpt, "recipes", "check", recipe, "--model", str(base)],
    }
    train_yaml = tmp / f"train-{family}-{tag}.yaml"
    train_yaml.write_text(f"recipe: {recipe}\nmodel: {base}\noutput_dir: {tmp / ('train-' + family + '-' + tag)}\n"
                          "synthetic_size: 4\ncollator: 'json:dumps'\ntraining_args: {max_steps: 1, per_device_train_batch_size: 2}\n")
    cmds["qvl-train"] = [sys.executable, "-m", "qvl_plugin.cli.train", str(train_yaml)]
    return cmds


# qvl-train on the v1 base must refuse (remote code, not trusted in the YAML); the rest must work.
_MUST_FAIL = {("qwen-vl", "qvl-train")}
# qvl-train on the qwen2-vl stand-in: the tiny base has no tokenizer, so it fails to load one -- after the
# point where remote code would have run; only "no marker, no prompt" is asserted for it.
_ANY_RC = {("qwen2-vl", "qvl-train")}


@pytest.mark.parametrize("terminal", [False, True], ids=["pipes", "pty"])
@pytest.mark.parametrize("family", ["qwen-vl", "qwen2-vl"])
def test_no_remote_code_runs_or_prompts(hostile, family, terminal, tmp_path):
    """merge first (diff and extract read its output), then the other commands side by side: each process
    names itself in the environment, so a marker says which command ran the code."""
    from concurrent.futures import ThreadPoolExecutor

    root, marker, bases = hostile
    base, adapter = bases[family]
    run = _run_pty if terminal else _run_pipes
    cmds = _commands(family, base, adapter, tmp_path, "pty" if terminal else "pipes")

    def one(name: str) -> tuple[str, int, str]:
        return (name, *run(cmds[name], {**_env(tmp_path), "QVL_TEST_COMMAND": name}, tmp_path))

    results = [one("merge")]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results += list(pool.map(one, [n for n in cmds if n != "merge"]))
    ran_all = sorted(p.name for p in marker.iterdir())
    for p in marker.iterdir():
        p.unlink()
    failures = [f"marker from an unknown process: {m}" for m in ran_all if not any(m.endswith("-" + n) for n in cmds)]
    for name, rc, out in results:
        ran = [m for m in ran_all if m.endswith("-" + name)]
        leaked = [w for w in PROMPT_WORDS if w in out]
        if ran or leaked:
            failures.append(f"{name}: marker {ran} prompt {leaked}\n{out[-800:]}")
        expect_fail = (family, name) in _MUST_FAIL
        if (family, name) not in _ANY_RC and (rc != 0) != expect_fail:
            failures.append(f"{name}: exit {rc} (expected {'non-zero' if expect_fail else 0})\n{out[-1500:]}")
    assert not failures, "\n\n".join(failures)


def test_train_refuses_v1_without_trust(hostile, tmp_path):
    _, marker, bases = hostile
    base, adapter = bases["qwen-vl"]
    cmds = _commands("qwen-vl", base, adapter, tmp_path, "msg")
    rc, out = _run_pipes(cmds["qvl-train"], _env(tmp_path), tmp_path)
    assert rc == 1 and "remote code" in out and "Traceback" not in out, out
    assert not list(marker.iterdir())
