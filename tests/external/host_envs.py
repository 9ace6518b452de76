"""Cached venvs for the host trainers (LLaMA-Factory 0.9.5, ms-swift 4.6.0) and what their tests share.

Each host pins its own transformers/peft/trl, so each gets its own venv (tests/external/venv.py), never the
project's. Pins are the versions pip resolved on 2026-12-07, fixed so a cold build is reproducible. CPU quirks
of this registry (FIELD_NOTES, "Host trainers"): its torchvision and torchaudio wheels are CUDA builds that
fail to load beside the CPU torch. torchvision keeps its pure-Python transforms (tests/external/cpu_torchvision.py;
Qwen2VLProcessor wants the torchvision video processor); torchaudio loses its compiled ops, which
torchaudio then reports as unavailable (LLaMA-Factory's mm_plugin imports it at module level and uses
only ``load``/``resample`` for audio, which these tests never feed).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from tests.external.venv import ensure_venv, run_in_venv

__all__ = ["LLAMAFACTORY", "SWIFT", "host_venv", "run_worker", "make_base", "trainable_of", "qvl_ckpt", "TEXT_SAMPLES", "CASES", "case_args", "case_recipe"]

HERE = Path(__file__).resolve().parent
_TORCH = ["torch==2.13.0", "torchvision==0.28.0"]  # torch from this machine's disk (CPU build)
_CPU_TORCHVISION = [str(HERE / "cpu_torchvision.py")]
_NO_TORCHAUDIO_OPS = ["-c", "import pathlib, importlib.util as u; "
                      "[p.unlink() for p in (pathlib.Path(u.find_spec('torchaudio').origin).parent / 'lib').glob('*.so')]; "
                      "import torchaudio.functional"]

#: name -> (pip steps, post-install steps)
# LLaMA-Factory itself goes in --no-deps, beside what its training path (hparams, data, model, train.sft)
# imports: its web UI, API server, plotting and audio/video decoders (gradio, fastapi, matplotlib, av, scipy,
# modelscope: ~0.7 GB) are never imported there, and leaving them out halves the cold build.
LLAMAFACTORY = ("llamafactory-0.9.5", [[*_TORCH, "torchaudio==2.11.1", "transformers==5.6.0", "peft==0.18.1", "trl==0.24.0",
                                        "accelerate==1.11.0", "datasets==4.0.0", "omegaconf==2.4.0", "pyyaml"],
                                       ["--no-deps", "llamafactory==0.9.5"]],
                [_CPU_TORCHVISION, _NO_TORCHAUDIO_OPS])
SWIFT = ("ms-swift-4.6.0", [[*_TORCH, "ms-swift==4.6.0", "qwen_vl_utils==0.0.14", "transformers==5.19.0", "peft==0.20.0", "trl==0.29.1",
                             "accelerate==1.16.0", "datasets==4.8.4"]],
         [_CPU_TORCHVISION])

TEXT_SAMPLES = [("hello there", "general kenobi"), ("what is one plus one", "two"), ("name a colour", "blue"),
                ("say yes", "yes")]


#: label -> (recipe, --set overrides): two built-ins, and LoRA on single layers of both towers, where bare leaf
#: names would hit every layer and LLaMA-Factory must leave its vision-tower freeze off
CASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "lora": ("qwen2-vl/lora", ()),
    "lora-embed-head": ("qwen2-vl/lora-embed-head", ()),
    "layer0-vision1": ("qwen2-vl/lora", (r"targets=['model\.language_model\.layers\.0\.self_attn\.(q|v)_proj']",
                                         r"vision_targets=['model\.visual\.blocks\.1\.attn\.qkv']", "freeze=[merger]")),
}


def case_args(label: str) -> list[str]:
    """``RECIPE --set ...`` for ``qvl-ckpt recipes export``."""
    name, sets = CASES[label]
    return [name, *(a for s in sets for a in ("--set", s))]


def case_recipe(label: str):
    from qvl_plugin.cli.recipes import _resolve  # the command's own resolution of RECIPE + --set

    return _resolve(*CASES[label])


def host_venv(spec: tuple[str, list[list[str]], list[list[str]]]) -> Path:
    name, steps, post = spec
    t = time.time()
    venv = ensure_venv(name, steps, post_install=post)
    if time.time() - t > 30:
        print(f"built the {name} venv in {time.time() - t:.0f} s: {venv}")
    return venv


def run_worker(spec, code: str, job: dict, workdir: Path, timeout: float = 600, env: dict[str, str] | None = None) -> dict:
    """Run ``code`` (a script reading argv[1] = job JSON, writing argv[2] = result JSON) in the host's venv."""
    venv = host_venv(spec)
    script, job_path, out = workdir / "worker.py", workdir / "job.json", workdir / "result.json"
    script.write_text(code)
    job_path.write_text(json.dumps(job))
    full_env = {"OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true", "HF_DATASETS_OFFLINE": "1",
                "MODELSCOPE_OFFLINE": "1", "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
                "DISABLE_VERSION_CHECK": "1", **(env or {})}
    proc = run_in_venv(venv, [str(script), str(job_path), str(out)], timeout=timeout, env=full_env, cwd=workdir)
    if proc.returncode != 0 or not out.is_file():
        raise AssertionError(f"the {spec[0]} worker failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    result = json.loads(out.read_text())
    result["log"] = proc.stdout + proc.stderr
    return result


def make_base(path: Path) -> Path:
    """The tiny tied Qwen2-VL (qvl_plugin.hosts.tiny) saved as a plain HF model dir, with its processor files."""
    from qvl_plugin.hosts.tiny import build_tiny_model, load_processor, save_base

    return save_base(build_tiny_model(seed=0), load_processor(), path)


def trainable_of(recipe) -> set[str]:
    """apply_recipe's trainable parameter names on the tiny model, without PEFT's ``base_model.model.`` prefix."""
    from qvl_plugin.hosts.tiny import build_tiny_model
    from qvl_plugin.recipes import apply_recipe

    model = apply_recipe(build_tiny_model(seed=0), recipe)
    return {n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad}


def qvl_ckpt(*args: str) -> subprocess.CompletedProcess[str]:
    """``qvl-ckpt ARGS`` in-process (the export and the audit are ours; only the host runs in its venv)."""
    from click.testing import CliRunner

    from qvl_plugin.cli import main

    res = CliRunner().invoke(main, list(args))
    return subprocess.CompletedProcess(list(args), res.exit_code, res.stdout, res.stderr)
