"""Cached virtual environments for external systems that pin their own versions.

vLLM, LLaMA-Factory, ms-swift and the oldest supported transformers each pin packages that must never
enter the project's own venv, so each test suite that runs one of them asks ``ensure_venv`` for a venv
built once and kept under the user cache dir (``$QVL_VENV_CACHE``, else ``$XDG_CACHE_HOME/qvl_plugin/venvs``,
else ``~/.cache/qvl_plugin/venvs``), keyed by its name and a hash of what goes into it.

A failed install is a test *error*, never a skip: the suite must be able to fail. Only an explicit
``QVL_EXTERNAL=off`` (for quick local runs) skips these tests, and the skip names that reason.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

__all__ = ["cache_root", "ensure_venv", "venv_python", "run_in_venv", "skip_if_external_off"]

ROOT = Path(__file__).resolve().parents[2]
_READY = "qvl-ready.json"


def cache_root() -> Path:
    if os.environ.get("QVL_VENV_CACHE"):
        return Path(os.environ["QVL_VENV_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qvl_plugin" / "venvs"


def skip_if_external_off(system: str) -> None:
    if os.environ.get("QVL_EXTERNAL", "").lower() in ("off", "0", "no"):
        pytest.skip(f"{system}: QVL_EXTERNAL=off was set (external systems not run)")


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _key(name: str, steps: Sequence[Sequence[str]], post: Sequence[Sequence[str]] = ()) -> str:
    d = {"name": name, "python": sys.version_info[:2], "steps": [list(s) for s in steps]}
    if post:  # a script's content counts, not only its name
        d["post"] = [[Path(a).read_text() if a.endswith(".py") and Path(a).is_file() else a for a in s] for s in post]
    return hashlib.sha256(json.dumps(d).encode()).hexdigest()[:12]


def ensure_venv(name: str, pip_steps: Sequence[Sequence[str]], *, post_install: Sequence[Sequence[str]] = (),
                timeout: float = 1800) -> Path:
    """A ready venv named ``name`` in which each ``pip install <step...>`` in ``pip_steps`` has run.

    ``post_install``: argument lists run with the venv's python afterwards (``["-m", "pip", "uninstall", "-y",
    "x"]``, ``["fix.py"]``), for wheels that need fixing on this platform; they are part of the cache key.
    Built once per distinct (name, steps, post-install, python) and reused; concurrent callers wait on a
    lock. A half-built venv (no ready marker) is removed and built again.
    """
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / f"{name}-{_key(name, pip_steps, post_install)}"
    with open(root / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / _READY).is_file():
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        for step in pip_steps:
            proc = subprocess.run([str(venv_python(venv)), "-m", "pip", "install", "-q", "--disable-pip-version-check", *step],
                                  capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0:
                tail = (proc.stdout + proc.stderr)[-3000:]
                raise RuntimeError(f"building the {name} venv failed at `pip install {' '.join(step)}`:\n{tail}")
        for step in post_install:
            proc = subprocess.run([str(venv_python(venv)), *step], capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0:
                tail = (proc.stdout + proc.stderr)[-3000:]
                raise RuntimeError(f"building the {name} venv failed at post-install `python {' '.join(step)}`:\n{tail}")
        (venv / _READY).write_text(json.dumps({"name": name, "steps": [list(s) for s in pip_steps]}))
        return venv


def run_in_venv(venv: Path, args: Sequence[str], *, timeout: float = 600, env: dict[str, str] | None = None,
                cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python ARGS`` in ``venv`` with this checkout importable (``PYTHONPATH``), offline."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    full_env.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    full_env.update(env or {})
    return subprocess.run([str(venv_python(venv)), *args], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=str(cwd) if cwd else None)
